"""Benchmark: EP training of a layered DHN 64-256-10 on the digits, on the emulator.

1. Accuracy: 3 seeds x 30 epochs on the ideal preset (target: mean test accuracy >= 97.5 %),
   the same recipe on the rram preset with a 6-bit ADC (target >= 93 %), and an ff-EBM of
   two EB blocks with a digital Linear between them (target >= 97 %).
2. Speed: the epoch time of the project's EP training (Device, EBBlock, programming after
   every step) as a ratio to a minimal pure-torch EP loop of the same model, T1, T2, beta,
   batch and optimiser in the same process (target <= 1.3). Both run a fixed number of settle
   steps (tol = 0); they run epoch by epoch in turn and each project epoch is compared with
   the minimal epoch next to it, so the drift of this machine's speed and load from other
   processes affect both alike (see `timing`).

Ends by printing one JSON object per line. Usage::

    python benchmarks/train_digits.py [--quick] [--skip-rram] [--skip-ffebm]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drivers import open_device
from hil.classifier import Classifier
from hil.config import load_config
from hil.data import Dataset, batches, load_dataset
from hil.train_classifier import train_classifier

IDEAL = "emulator://?preset=ideal&seed=0"
RRAM6 = "emulator://?preset=rram&seed=0&adc_bits=6"

# the fixed-step recipe used for the timing comparison (tol = 0: every settle runs T1 / T2)
T1, T2 = 40, 15
# fixed step counts, and the clamp the minimal loop uses (the classifier default is the soft sigmoid)
TIMING = [f"ep.free_steps={T1}", f"ep.nudge_steps={T2}", "ep.tol=0.0", "model.activation=hard_sigmoid"]


def minimal_step(
    w0: torch.Tensor, w1: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor, *, beta: float, tau: float,
    dt: float, lrs: tuple[float, float],
) -> None:  # fmt: skip
    """One batch of plain centered EP on a 64-256-10 layered DHN in pure torch: the same
    dynamics as the board's analog settle (s <- s + dt (rho(drive) - s)), the input's drive
    computed once per settle, T1 free steps, T2 steps per nudged phase, the CE gradient at
    the free state as nudge current, SGD in place."""
    n0 = w0.shape[0] - 1
    n1 = w1.shape[0] - 1
    b = xb.shape[0]
    c1 = xb @ w0[:n0] + w0[n0]
    v1, bias2 = w1[:n1], w1[n1]
    s1 = torch.zeros(b, n1)
    s2 = torch.zeros(b, w1.shape[1])
    for _ in range(T1):
        u1 = (c1 + s2 @ v1.T).clamp_(0, 1)
        u2 = (s1 @ v1 + bias2).clamp_(0, 1)
        s1 = torch.lerp(s1, u1, dt)
        s2 = torch.lerp(s2, u2, dt)
    grad = tau * (torch.softmax(tau * s2, 1) - F.one_hot(yb, w1.shape[1]).float())
    phases = []
    for sign in (1.0, -1.0):
        p1, p2 = s1, s2
        base2 = bias2 - sign * beta * grad
        for _ in range(T2):
            u1 = (c1 + p2 @ v1.T).clamp_(0, 1)
            u2 = (p1 @ v1 + base2).clamp_(0, 1)
            p1 = torch.lerp(p1, u1, dt)
            p2 = torch.lerp(p2, u2, dt)
        phases.append((p1, p2))
    (a1, a2), (m1, m2) = phases
    k = -1.0 / (2 * beta * b)
    g0 = torch.cat([xb.T @ (a1 - m1), (a1 - m1).sum(0, keepdim=True)]) * k
    g1 = torch.cat([a1.T @ a2 - m1.T @ m2, (a2 - m2).sum(0, keepdim=True)]) * k
    w0.sub_(lrs[0] * g0)
    w1.sub_(lrs[1] * g1)


def timing(ds: Dataset, reps: int, batch: int | None = None) -> dict:
    """Epoch times of the project's training and of the minimal loop, epoch by epoch in turn
    (the same batches, in the same order). This machine's speed drifts by up to 30 % over
    seconds, so each project epoch is compared with the minimal epoch right after it, and the
    ratio is the median of those pairs' ratios."""
    extra = [f"train.batch_size={batch}"] if batch else []
    cfg = load_config(None, ["train.epochs=30", *TIMING, *extra])
    project = Classifier(cfg, ds.features, ds.classes, open_device)
    blk = project.block
    w0 = blk.weights["W0"].detach().clone()
    w1 = blk.weights["W1"].detach().clone()
    e = cfg.ep
    gen_p, gen_m = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    lrs = (cfg.train.lr[0], cfg.train.lr[min(1, len(cfg.train.lr) - 1)])
    bs = cfg.train.batch_size
    t_proj, t_min = [], []

    def project_epoch() -> None:
        for x, y in batches(ds.x_train, ds.y_train, bs, generator=gen_p):
            project.step(x, y)

    def min_epoch() -> None:
        for x, y in batches(ds.x_train, ds.y_train, bs, generator=gen_m):
            minimal_step(w0, w1, x, y, beta=e.beta, tau=e.tau, dt=e.dt, lrs=lrs)

    def seconds(fn: Callable[[], None]) -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    project_epoch()  # warm-up (plans, allocator)
    min_epoch()
    for k in range(reps):  # which runs first alternates
        if k % 2:
            t_min.append(seconds(min_epoch))
            t_proj.append(seconds(project_epoch))
        else:
            t_proj.append(seconds(project_epoch))
            t_min.append(seconds(min_epoch))

    parts = breakdown(project, project_epoch)
    project.close()
    return {
        "bench": "train_digits_epoch_time",
        "model": "64-256-10",
        "T1": T1,
        "T2": T2,
        "batch": bs,
        "project_epoch_s": round(min(t_proj), 4),
        "minimal_epoch_s": round(min(t_min), 4),
        "project_epoch_s_median": round(statistics.median(t_proj), 4),
        "minimal_epoch_s_median": round(statistics.median(t_min), 4),
        "ratio": round(statistics.median(p / m for p, m in zip(t_proj, t_min, strict=True)), 3),
        "ratio_range": [round(min(p / m for p, m in zip(t_proj, t_min, strict=True)), 3),
                        round(max(p / m for p, m in zip(t_proj, t_min, strict=True)), 3)],
        "target_ratio": 1.3,
        # where one project epoch's time goes (a separate, instrumented epoch)
        **{f"{k}_s": round(v, 4) for k, v in parts.items()},
    }  # fmt: skip


def breakdown(project: Classifier, epoch: Callable[[], None]) -> dict[str, float]:
    """Seconds of one epoch spent programming the tiles (`EBBlock.sync` when it writes),
    inside the Device's settles, and everywhere else (EP bookkeeping, checks, optimiser)."""
    blk, dev = project.block, project.block.device
    spent = {"programming": 0.0, "settle": 0.0}

    def timed(fn: Callable[..., object], key: str) -> Callable[..., object]:
        def run(*a: object, **k: object) -> object:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[key] += time.perf_counter() - t

        return run

    blk.sync = timed(blk.sync, "programming")  # type: ignore[method-assign]
    dev.settle = timed(dev.settle, "settle")  # type: ignore[method-assign]
    # the in-process board's tensor path (a classifier on a compute device: hil.compute)
    dev.settle_tensors = timed(dev.settle_tensors, "settle")  # type: ignore[method-assign]
    t = time.perf_counter()
    epoch()
    total = time.perf_counter() - t
    del blk.sync, dev.settle, dev.settle_tensors  # back to the class methods
    return {**spent, "host": total - spent["programming"] - spent["settle"]}


def accuracy(uri: str, seeds: list[int], epochs: int, extra: list[str]) -> tuple[list[float], float, str]:
    accs, secs, idn = [], 0.0, ""
    for s in seeds:
        cfg = load_config(None, [f"device={uri}", f"train.epochs={epochs}", f"train.seed={s}", *extra])
        t = time.perf_counter()
        r = train_classifier(cfg)
        secs += time.perf_counter() - t
        accs.append(r.test_acc)
        idn = r.devices[0]
        r.model.close()  # type: ignore[union-attr]
        print(f"  {uri} seed {s}: test accuracy {r.test_acc:.2%}", file=sys.stderr, flush=True)
    return accs, secs, idn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 seed, 5 epochs, 2 timing repeats")
    ap.add_argument("--skip-rram", action="store_true")
    ap.add_argument("--skip-ffebm", action="store_true")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: fastest for this small model)"
    )
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    seeds = [0] if a.quick else [0, 1, 2]
    epochs = 5 if a.quick else 30
    ds = load_dataset("digits")
    out = []

    accs, secs, idn = accuracy(IDEAL, seeds, epochs, TIMING)
    out.append({
        "bench": "train_digits", "preset": "ideal", "model": "dhn 64-256-10", "epochs": epochs,
        "seeds": seeds, "accs": [round(v, 4) for v in accs],
        "seed_mean_acc": round(statistics.mean(accs), 4), "target": 0.975, "seconds": round(secs, 1),
        "device": idn,
    })  # fmt: skip
    if not a.skip_rram:
        r_accs, r_secs, r_idn = accuracy(RRAM6, seeds[:1], epochs, TIMING)
        out.append({
            "bench": "train_digits", "preset": "rram adc_bits=6", "model": "dhn 64-256-10", "epochs": epochs,
            "seeds": seeds[:1], "accs": [round(v, 4) for v in r_accs],
            "seed_mean_acc": round(statistics.mean(r_accs), 4), "target": 0.93, "seconds": round(r_secs, 1),
            "device": r_idn,
        })  # fmt: skip
    if not a.skip_ffebm:
        ff = [
            "model.kind=ffebm",
            "model.sizes=[64,256,128,10]",
            "model.block_layers=2",
            "model.between=linear",
            "model.init=goe",
            "model.init_scale=0.5",
        ]
        # settles stop at tol (1e-3) within 100 steps: the ff-EBM's blocks are not timed
        f_accs, f_secs, f_idn = accuracy(IDEAL, seeds[:2], epochs, ff)
        out.append({
            "bench": "train_digits_ffebm", "preset": "ideal",
            "model": "ffebm [64-256-128] + Linear(128,128) + clamp + [128-10], GOE init",
            "epochs": epochs, "seeds": seeds[:2], "accs": [round(v, 4) for v in f_accs],
            "seed_mean_acc": round(statistics.mean(f_accs), 4), "target": 0.97, "seconds": round(f_secs, 1),
            "device": f_idn,
        })  # fmt: skip
    out.append(timing(ds, 3 if a.quick else 9))
    # the host and device work per batch (programming the tiles, settle set-up) is fixed, so
    # the ratio falls with the batch size: show it at larger batches too
    for batch in (64, 256):
        row = timing(ds, 3 if a.quick else 5, batch)
        row["bench"] = "train_digits_epoch_time_by_batch"
        out.append(row)
    for o in out:
        print(json.dumps(o))


if __name__ == "__main__":
    main()
