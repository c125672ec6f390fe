"""Benchmark (issue 20): EP's gradient bias per neuron curve, next to its digits accuracy.

1. Bias: for every activation (`drivers.activation`), EP on the ideal emulator against
   implicit differentiation of the float64 reference (`hil.ep.gradcheck`: the loss
   ``1/2 |s_out - onehot|^2`` on 64 digits images, the weights read back from the board), at
   beta 0.1, 0.01 and 0.001, one-sided (free and +beta) and centered (+beta and -beta), on
   random layered and dense networks whose sizes and seeds no test uses, each at two
   initialisations: ``check`` (weights N(0, 0.5^2 / fan_in), biases U(0.1, 0.4), as
   `hil gradcheck`) and ``trainer`` (N(0, 0.6^2 / fan_in), zero biases: the classifier's
   gaussian init). Per (activation, beta, mode): the worst cosine and the worst relative
   error over every parameter (each tile's weights and bias row, and the input) and every
   network, and the median over networks of each network's worst relative error.
2. Accuracy: the digits classifier (`hil.train_classifier`, the default 64-256-10 recipe:
   centered EP, CE nudge, beta 0.2, SGD + cosine) on the ideal preset with that activation,
   `--epochs` epochs per seed of `--seeds`; test accuracy per seed and the mean.

One torch thread. Ends by printing one JSON object per line. Usage::

    python benchmarks/gradient_bias.py [--epochs 30] [--seeds 0,1,2] [--quick]
                                       [--activations hard_sigmoid,soft_sigmoid:0.1,logistic]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drivers import open_device
from hil.cli.gradcheck import check_block
from hil.config import load_config
from hil.data import load_digits
from hil.ep import gradcheck
from hil.train_classifier import train_classifier

IDEAL = "emulator://?preset=ideal&seed=0"
ACTIVATIONS = ["hard_sigmoid", "soft_sigmoid:0.05", "soft_sigmoid:0.1", "soft_sigmoid:0.2", "logistic"]
BETAS = (0.1, 0.01, 0.001)
# (kind, sizes, seed): sizes and seeds the tests do not use
NETS = [
    ("layered", [64, 80, 10], 101),
    ("layered", [64, 120, 10], 102),
    ("layered", [64, 60, 30, 10], 103),
    ("dense", [64, 40, 10], 104),
    ("dense", [64, 24, 16, 10], 105),
]
INITS = {"check": (0.5, (0.1, 0.4)), "trainer": (0.6, (0.0, 0.0))}


def bias_rows(activation: str, nets: list, x: torch.Tensor, y: torch.Tensor) -> list[dict]:
    """Per network and init: the worst cosine and relative error over the parameters, per
    (beta, mode)."""
    out = []
    for kind, sizes, seed in nets:
        for init, (scale, bias) in INITS.items():
            with open_device(IDEAL) as dev:
                blk = check_block(
                    dev, sizes, dense=kind == "dense", init_scale=scale, bias=bias, seed=seed,
                    activation=activation,
                )  # fmt: skip
                free = blk.free(x)
                rows = gradcheck(blk, x, y, betas=BETAS, modes=("positive", "centered"))
            for beta in BETAS:
                for mode in ("one-sided", "centered"):
                    sel = [r for r in rows if r.beta == beta and r.mode == mode]
                    worst = max(sel, key=lambda r: r.rel_error)
                    out.append({
                        "net": f"{kind} {'-'.join(map(str, sizes))} seed {seed} {init}",
                        "beta": beta, "mode": mode, "converged": free.converged,
                        "cos": min(r.cosine for r in sel), "rel": worst.rel_error, "param": worst.param,
                    })  # fmt: skip
    return out


def digits_accuracy(activation: str, seeds: list[int], epochs: int) -> list[float]:
    accs = []
    for s in seeds:
        over = [f"device={IDEAL}", f"model.activation={activation}", f"train.epochs={epochs}"]
        over.append(f"train.seed={s}")
        cfg = load_config(None, over)
        accs.append(float(train_classifier(cfg).test_acc))
    return accs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--activations", default=",".join(ACTIVATIONS))
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--quick", action="store_true", help="two networks, 1 seed x 3 epochs (a smoke run)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    acts = args.activations.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    nets, epochs = (NETS[::3], 3) if args.quick else (NETS, args.epochs)
    if args.quick:
        seeds = seeds[:1]
    ds = load_digits()
    x = ds.x_train[1000:1064]
    y = torch.nn.functional.one_hot(ds.y_train[1000:1064], 10).float()
    lines = [{
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "load_avg_start": os.getloadavg(),
        "torch": torch.__version__, "networks": [f"{k} {s} seed {d}" for k, s, d in nets],
        "inits": {k: {"init_scale": a, "bias": b} for k, (a, b) in INITS.items()},
        "batch": int(x.shape[0]), "epochs": epochs, "seeds": seeds,
    }]  # fmt: skip
    for act in acts:
        t0 = time.perf_counter()
        rows = bias_rows(act, nets, x, y)
        t_bias = time.perf_counter() - t0
        for beta in BETAS:
            for mode in ("one-sided", "centered"):
                sel = [r for r in rows if r["beta"] == beta and r["mode"] == mode]
                worst = max(sel, key=lambda r: r["rel"])
                lines.append({
                    "activation": act, "beta": beta, "mode": mode, "worst_cos": min(r["cos"] for r in sel),
                    "worst_rel": worst["rel"], "median_rel": statistics.median(r["rel"] for r in sel),
                    "worst_at": f"{worst['net']} {worst['param']}",
                    "all_converged": all(r["converged"] for r in sel),
                })  # fmt: skip
        t0 = time.perf_counter()
        accs = digits_accuracy(act, seeds, epochs)
        lines.append({
            "activation": act, "digits_acc": accs, "digits_mean": statistics.mean(accs), "epochs": epochs,
            "train_s": round(time.perf_counter() - t0, 1), "bias_s": round(t_bias, 1),
            "load_avg": os.getloadavg(),
        })  # fmt: skip
        took = time.perf_counter() - t0
        print(f"{act}: done ({t_bias:.0f} s bias, {took:.0f} s training)", file=sys.stderr)
    for line in lines:
        print(json.dumps(line))


if __name__ == "__main__":
    main()
