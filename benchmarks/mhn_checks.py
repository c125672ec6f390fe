"""The quantities the MHN's tests bound, printed instead of asserted (docs/mhn.md "Measured
figures"), and the `rram` classifier's noise floor, small-nudge runs and one-write accuracy.

Each part builds its setup with the helpers the tests build theirs with (`hil.mhn.setups`), so
its figures are of the tests' setups, and computes what the test asserts on:

- ``retrieval`` (tests/test_mhn.py): the ideal board's retrieval against the torch update, and
  the steps to converge with ``tol = 1e-7``;
- ``gradient`` (tests/test_mhn_learn.py): centered EP's pattern gradient against implicit
  differentiation at beta / beta_c = 0.5, 1.5, 3, and with half the state clamped;
- ``classifier`` (tests/test_mhn_learn.py): the ideal-board classifier's test accuracy,
  untrained and after each of ``--classifier-epochs`` epochs (the test: 2);
- ``layer`` (tests/test_mhn_layer.py): `MHNLayer` against autograd through the unrolled torch
  update, then the Linear -> clamp -> MHNLayer chain's six SGD steps (in the tests' order: the
  chain's draws follow the first test's from the same generator);
- ``transition`` (tests/test_mhn.py): measured beta_c against derived on three settings, the
  attractors at 0.5 and 2 beta_c;
- ``digits`` (tests/test_mhn.py): ten stored digits, 100 corrupted queries;
- ``rram`` (docs/mhn.md, the classifier against the DHN): the classifier built as
  `benchmarks/mhn_phase.py` builds it on ``emulator://?preset=rram&seed=0`` (``verify``
  writes, beta 1.5 beta_c, seed 0): the noise floor and steps of a free retrieval of the 360
  test images at the untrained prototypes, ``--rram-epochs`` epochs at beta_EP 0.01 and lr 0.5
  and 2, and the test accuracy with one write (``rewrite=False``: without the second write
  that compensates the stuck devices the first found). Each from a fresh board.

    python benchmarks/mhn_checks.py [--parts retrieval,gradient,...] [--classifier-epochs 2]
                                    [--rram-epochs 3] [--threads 1]

Ends by printing one JSON object per line (part, figures, wall seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drivers import open_device
from hil.mhn import RetrievalBudget, measured_critical, retrieve, sweep
from hil.mhn.learn import cosine, ep_gradient, implicit_gradient
from hil.mhn.phase import distinct
from hil.mhn.setups import (
    DIGITS_COLLAPSED_RATIOS,
    DIGITS_RETRIEVED_RATIOS,
    GRADIENT_RATIOS,
    IDEAL,
    RETRIEVAL_BETA,
    RETRIEVAL_CONVERGED,
    RETRIEVAL_STEPS,
    TRANSITION_FACTORS,
    TRANSITION_SETTINGS,
    digits_setup,
    gradient_clamp,
    gradient_problem,
    layer_setup,
    layer_unrolled,
    retrieval_setup,
    transition_setup,
)

PARTS = ("retrieval", "gradient", "classifier", "layer", "transition", "digits", "rram")
RRAM = "emulator://?preset=rram&seed=0"
# size-setting options and their bounds (an epoch of the classifier is a few seconds on one core)
MAX_EPOCHS = 20
MAX_THREADS = 64


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def retrieval() -> dict[str, Any]:
    blk, x0 = retrieval_setup()
    got = blk.retrieve(x0)
    steps = RetrievalBudget(max_steps=RETRIEVAL_STEPS, tol=0.0)
    want = retrieve(torch.from_numpy(x0), blk.device_patterns(), RETRIEVAL_BETA, steps).x.numpy()
    conv = blk.retrieve(x0, budget=RETRIEVAL_CONVERGED)
    return {
        "max_abs_diff_to_torch": float(np.abs(got.x - want).max()),
        "bound": 1e-5,
        "steps": got.steps,
        "converged_tol": RETRIEVAL_CONVERGED.tol,
        "converged_steps": conv.steps,
        "converged": bool(conv.converged),
        "converged_max_abs_diff_to_torch": float(np.abs(conv.x - want).max()),
        "noise_floor": conv.noise_floor,
    }


def gradient() -> dict[str, Any]:
    out: dict[str, Any] = {"beta_ep": 0.01, "ratios": list(GRADIENT_RATIOS), "cosine": [], "rel_error": []}
    for ratio in GRADIENT_RATIOS:
        p = gradient_problem(ratio)
        ep = ep_gradient(p.block, p.x0, p.target, mask=p.mask, beta_ep=0.01)
        ref = implicit_gradient(p.block.device_patterns(), ep.free.x, p.target, p.beta, mask=p.mask)
        out["cosine"].append(cosine(ep.grad, ref))
        out["rel_error"].append(_rel(ep.grad, ref))
    p = gradient_problem(1.5)
    clamp = gradient_clamp()
    ep = ep_gradient(p.block, p.x0, p.target, mask=p.mask, beta_ep=0.01, clamp=clamp)
    ref = implicit_gradient(p.block.device_patterns(), ep.free.x, p.target, p.beta, mask=p.mask, clamp=clamp)
    free_only = implicit_gradient(p.block.device_patterns(), ep.free.x, p.target, p.beta, mask=p.mask)
    out["clamped"] = {
        "ratio": 1.5,
        "cosine": cosine(ep.grad, ref),
        "rel_error": _rel(ep.grad, ref),
        "unclamped_reference_cosine": cosine(free_only, ref),
    }
    return out


def classifier(epochs: int) -> dict[str, Any]:
    from hil.mhn.classifier import MHNClassifier

    clf = MHNClassifier(open_device(IDEAL), per_class=2, beta_ratio=1.5)
    res = clf.fit(epochs=epochs, lr=2.0)
    return {
        "board": IDEAL,
        "per_class": 2,
        "beta_ratio": 1.5,
        "lr": 2.0,
        "beta_ep": 0.01,
        "epochs": epochs,
        "test_accuracy": res.test_accuracy,
        "train_loss": res.train_loss,
    }


def layer() -> dict[str, Any]:
    from hil.mhn.layer import MHNLayer
    from hil.mhn.setups import LAYER_D_IN, LAYER_D_OUT

    blk, gen = layer_setup()
    lay = MHNLayer(blk, LAYER_D_IN, beta=0.01)
    lo, hi = blk.box()
    x = (lo + (hi - lo) * torch.rand(10, LAYER_D_IN, generator=gen, dtype=torch.float64)).float()
    w = torch.randn(10, LAYER_D_OUT, generator=gen, dtype=torch.float64)
    x.requires_grad_(True)
    out = lay(x)
    (out.double() * w).sum().backward()
    xi = blk.device_patterns().clone().requires_grad_(True)
    xin = x.detach().double().clone().requires_grad_(True)
    ref = layer_unrolled(xin, xi)
    diff = float((out.detach().double() - ref.detach()).abs().max())
    (ref * w).sum().backward()
    assert (
        blk.patterns.grad is not None and x.grad is not None and xi.grad is not None and xin.grad is not None
    )
    row: dict[str, Any] = {
        "max_abs_output_diff": diff,
        "bound": 1e-5,
        "patterns_cosine": cosine(blk.patterns.grad.double(), xi.grad),
        "input_cosine": cosine(x.grad.double(), xin.grad),
        "patterns_rel_error": _rel(blk.patterns.grad.double(), xi.grad),
        "input_rel_error": _rel(x.grad.double(), xin.grad),
    }
    # the chain, from the same block and generator, as the second test runs after the first
    lay = MHNLayer(blk, LAYER_D_IN, beta=0.01)
    torch.manual_seed(0)
    front = torch.nn.Linear(5, LAYER_D_IN)
    xc = torch.randn(16, 5, generator=gen)
    y = 0.3 * torch.randn(16, LAYER_D_OUT, generator=gen)
    opt = torch.optim.SGD([*front.parameters(), lay.patterns], lr=0.1)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = 0.5 * ((lay(front(xc).clamp(lo, hi)) - y) ** 2).sum(1).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    row["chain_losses"] = losses
    row["chain_loss_lowered"] = losses[-1] < losses[0]
    return row


def transition() -> dict[str, Any]:
    rows = []
    for n, d, r in TRANSITION_SETTINGS:
        s = transition_setup(n, d, r)

        def run(x0: np.ndarray, beta: float, blk: Any = s.block) -> np.ndarray:
            return blk.retrieve(x0, beta=beta).x

        betas = [f * s.crit.beta_c for f in TRANSITION_FACTORS]
        pts = sweep(run, s.xi, betas, crit=s.crit, starts=s.starts, box=s.block.box())
        low, high = pts[0], pts[-1]
        rows.append(
            {
                "n": n,
                "d": d,
                "r": r,
                "beta_c": s.crit.beta_c,
                "measured_over_derived": measured_critical(pts) / s.crit.beta_c,
                "low_ratio": TRANSITION_FACTORS[0],
                "low_escaped": low.escaped,
                "low_minima": low.minima,
                "high_ratio": TRANSITION_FACTORS[-1],
                "high_escaped": high.escaped,
                "high_minima": high.minima,
                "high_min_overlap": float(min(high.overlaps)),
            }
        )
    return {"settings": rows}


def digits() -> dict[str, Any]:
    s = digits_setup()
    pats = s.block.device_patterns().numpy()
    retrieved = {}
    for ratio in DIGITS_RETRIEVED_RATIOS:
        end = s.block.retrieve(s.queries, beta=ratio * s.crit.beta_c).x
        nearest = np.linalg.norm(end[:, :, None] - pats[None], axis=1).argmin(1)
        retrieved[str(ratio)] = float((s.labels_of_patterns[nearest] == s.labels).mean())
    end_states = {}
    for ratio in DIGITS_COLLAPSED_RATIOS:
        end = s.block.retrieve(s.queries, beta=ratio * s.crit.beta_c).x
        end_states[str(ratio)] = len(distinct(end, 0.01))
    return {
        "queries": len(s.queries),
        "symmetric": s.crit.symmetric,
        "retrieved_right": retrieved,
        "distinct_end_states": end_states,
    }


def rram(epochs: int) -> dict[str, Any]:
    from hil.mhn.classifier import MHNClassifier

    def build(rewrite: bool = True) -> MHNClassifier:
        return MHNClassifier(
            open_device(RRAM), per_class=2, beta_ratio=1.5, programming="verify", seed=0, rewrite=rewrite
        )

    clf = build()
    free = clf.block.retrieve(clf.queries(clf.x_test), clamp=clf.clamp)
    out: dict[str, Any] = {
        "board": RRAM,
        "programming": "verify",
        "beta_ratio": 1.5,
        "seed": 0,
        "untrained_noise_floor": free.noise_floor,
        "untrained_steps": free.steps,
        "untrained_converged": bool(free.converged),
        "beta_ep": 0.01,
        "epochs": epochs,
    }
    for lr in (0.5, 2.0):
        res = build().fit(epochs=epochs, lr=lr, beta_ep=0.01, seed=0)
        out[f"test_accuracy_lr_{lr}"] = res.test_accuracy
    out["one_write_test_accuracy"] = build(rewrite=False).evaluate()[0]
    out["two_writes_test_accuracy"] = build().evaluate()[0]
    return out


def _bounded(name: str, hi: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} {text!r}: not a whole number") from None
        if not 1 <= v <= hi:
            raise argparse.ArgumentTypeError(f"{name} {v}: must be 1 to {hi}")
        return v

    return parse


def _parts(text: str) -> list[str]:
    parts = [p for p in text.split(",") if p]
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise argparse.ArgumentTypeError(
            f"--parts {text!r}: {', '.join(bad) or 'none'} not one of {', '.join(PARTS)}"
        )
    return parts


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--parts", type=_parts, default=list(PARTS), help=f"comma-separated, of {', '.join(PARTS)}"
    )
    ap.add_argument(
        "--classifier-epochs",
        type=_bounded("--classifier-epochs", MAX_EPOCHS),
        default=2,
        help=f"the ideal classifier's epochs (the test's: 2; 1 to {MAX_EPOCHS})",
    )
    ap.add_argument(
        "--rram-epochs",
        type=_bounded("--rram-epochs", MAX_EPOCHS),
        default=3,
        help=f"epochs of each rram small-nudge run (1 to {MAX_EPOCHS})",
    )
    ap.add_argument(
        "--threads",
        type=_bounded("--threads", MAX_THREADS),
        default=1,
        help=f"torch threads (1 to {MAX_THREADS})",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    funcs = {
        "retrieval": retrieval,
        "gradient": gradient,
        "classifier": lambda: classifier(args.classifier_epochs),
        "layer": layer,
        "transition": transition,
        "digits": digits,
        "rram": lambda: rram(args.rram_epochs),
    }
    rows = []
    t_all = time.perf_counter()
    for part in args.parts:
        t = time.perf_counter()
        row = {"bench": "mhn_checks", "part": part, **funcs[part]()}
        row["wall_s"] = round(time.perf_counter() - t, 2)
        rows.append(row)
        print(f"{part}: {row['wall_s']} s", flush=True)
    print(
        f"whole: {time.perf_counter() - t_all:.0f} s wall, {args.threads} torch thread(s), "
        f"{os.cpu_count()} cpus seen, torch {torch.__version__}"
    )
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
