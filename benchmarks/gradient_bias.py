"""Benchmark (issue 20): EP's gradient bias per neuron curve, next to its digits accuracy.

1. Bias: for every activation (`drivers.activation`), EP on the ideal emulator against
   implicit differentiation of the float64 reference (`hil.gradcheck.gradcheck`: the loss
   ``1/2 |s_out - onehot|^2`` on 64 digits images, the weights read back from the board), at
   beta 0.1, 0.01 and 0.001, one-sided (free and +beta) and centered (+beta and -beta), on
   random layered and dense networks whose sizes and seeds no test uses, each at two
   initialisations: ``check`` (weights N(0, 0.5^2 / fan_in), biases U(0.1, 0.4), as
   `hil gradcheck`), ``trainer`` (N(0, 0.6^2 / fan_in), zero biases: the classifier's
   gaussian init), ``trainer-mid`` (the same weights, biases centred: `model.init_bias =
   "mid"`, `hil.init.centre_biases`), ``goe`` (`hil.init.goe_init` at 0.5, zero biases:
   `model.init = "goe"`) and ``goe-mid`` (centred). Per (activation, init, beta, mode): the worst cosine and
   the worst relative error over every parameter (each tile's weights and bias row, and the
   input) and every network, the median over networks of each network's worst relative error,
   and the fraction of free units on a kink of the hard sigmoid in the free settle
   (`hil.init.kink_fraction`).
2. Accuracy: the digits classifier (`hil.train_classifier`, the default 64-256-10 recipe:
   centered EP, CE nudge, beta 0.2, SGD + cosine) on the ideal preset with that activation,
   `--epochs` epochs per seed of `--seeds`, with the config overrides of `--set` (e.g.
   ``--set model.init_bias=mid``); test accuracy per seed and the mean (``--epochs 0``: none).
3. ``--vae``: each Hopfield VAE variant at the trainer's initialisation (`hil train vae`
   defaults), zero and mid biases (and GOE weights with mid biases): the cosine of the
   whole-ELBO EP gradient with implicit differentiation at the training beta
   (`HopfieldVAE.gradient_check`, one batch of 16 test digits, settled to the fixed point), per
   seed of `--vae-seeds`, and the kink fraction of the encoder's free settle.

One torch thread. Ends by printing one JSON object per line. Usage::

    python benchmarks/gradient_bias.py [--epochs 30] [--seeds 0,1,2] [--quick] [--vae]
                                       [--activations hard_sigmoid,soft_sigmoid:0.1,logistic]
                                       [--inits check,trainer,trainer-mid,goe,goe-mid]
                                       [--set KEY=VALUE ...]
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

from drivers import SettleBudget, open_device
from hil.config import load_config
from hil.data import load_digits
from hil.ep import EBBlock
from hil.gradcheck import check_block, gradcheck
from hil.init import centre_biases, goe_init, kink_fraction
from hil.train_classifier import train_classifier
from hil.vae.config import VAERunConfig
from hil.vae.hopfield import VARIANTS, HopfieldVAE
from hil.vae.latent import LatentCode, make_likelihood

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
# name: (weight scale, bias range, biases centred afterwards)
INITS = {
    "check": (0.5, (0.1, 0.4), False),
    "trainer": (0.6, (0.0, 0.0), False),
    "trainer-mid": (0.6, (0.0, 0.0), True),
    "goe": (0.5, (0.0, 0.0), False),  # `model.init = "goe"`, `hil.init.goe_init`
    "goe-mid": (0.5, (0.0, 0.0), True),
}
VAE_INITS = (("gaussian", "zero"), ("gaussian", "mid"), ("goe", "mid"))  # (model.init, model.init_bias)


def bias_rows(activation: str, nets: list, x: torch.Tensor, y: torch.Tensor, inits: list[str]) -> list[dict]:
    """Per network and init: the worst cosine and relative error over the parameters, per
    (beta, mode), and the fraction of free units on a kink."""
    out = []
    for kind, sizes, seed in nets:
        for init in inits:
            scale, bias, centre = INITS[init]
            with open_device(IDEAL) as dev:
                blk = check_block(
                    dev, sizes, dense=kind == "dense", init_scale=scale, bias=bias, seed=seed,
                    activation=activation,
                )  # fmt: skip
                if init.startswith("goe") or centre:
                    w = {t: p.detach() for t, p in blk.weights.items()}
                    if init.startswith("goe"):
                        w = goe_init(blk.topology, scale, torch.Generator().manual_seed(seed))
                    w = centre_biases(blk.topology, w) if centre else w
                    blk = EBBlock(
                        dev, blk.topology, inputs=blk.inputs, outputs=blk.outputs, weights=w, seed=seed
                    )
                free = blk.free(x)
                kinks = kink_fraction(blk.reference(), free.states, blk.free_groups)
                rows = gradcheck(blk, x, y, betas=BETAS, modes=("positive", "centered"))
            for beta in BETAS:
                for mode in ("one-sided", "centered"):
                    sel = [r for r in rows if r.beta == beta and r.mode == mode]
                    worst = max(sel, key=lambda r: r.rel_error)
                    out.append({
                        "net": f"{kind} {'-'.join(map(str, sizes))} seed {seed} {init}", "init": init,
                        "beta": beta, "mode": mode, "converged": free.converged, "kinks": kinks,
                        "cos": min(r.cosine for r in sel), "rel": worst.rel_error, "param": worst.param,
                    })  # fmt: skip
    return out


def vae_rows(activation: str, seeds: list[int]) -> list[dict]:
    """Each Hopfield VAE variant at the trainer's initialisation: whole-ELBO gradient cosines
    at the training beta and the encoder's kink fraction, per (init, bias, seed)."""
    cfg = VAERunConfig()
    m = cfg.model
    x = load_digits().x_test[:16].reshape(16, -1)
    lik = make_likelihood(cfg.likelihood.kind, cfg.likelihood.sigma, cfg.likelihood.eps)
    out = []
    for variant in VARIANTS:
        for init, bias in VAE_INITS:
            for seed in seeds:
                eps = torch.randn(16, m.latent, generator=torch.Generator().manual_seed(seed + 1))
                with open_device(IDEAL) as a, open_device(IDEAL) as b:
                    vae = HopfieldVAE(
                        variant, (a, b), pixels=64, hidden=m.hidden, code=LatentCode(dim=m.latent),
                        budget=SettleBudget(max_steps=20000, tol=1e-7, dt=0.5), init_scale=m.init_scale,
                        init_bias=bias, init=init, seed=seed, activation=activation,  # type: ignore[arg-type]
                    )  # fmt: skip
                    cos = vae.gradient_check(x, eps, lik, beta=cfg.ep.beta, mode=cfg.ep.mode)
                    enc = vae.encoder.free({"x": x})
                    kinks = kink_fraction(vae.encoder.reference(), enc.states, vae.encoder.free_groups)
                out.append({
                    "vae": variant, "activation": activation, "init": init, "init_bias": bias, "seed": seed,
                    "beta": cfg.ep.beta, "cos_all": cos["all"], "cos_worst_tile": min(cos.values()),
                    "encoder_kinks": kinks,
                })  # fmt: skip
    return out


def digits_accuracy(activation: str, seeds: list[int], epochs: int, sets: list[str]) -> list[float]:
    accs = []
    for s in seeds:
        over = [f"device={IDEAL}", f"model.activation={activation}", f"train.epochs={epochs}", *sets]
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
    ap.add_argument("--inits", default=",".join(INITS), help=f"of {', '.join(INITS)}")
    ap.add_argument("--vae", action="store_true", help="also the VAE variants' whole-ELBO gradient at init")
    ap.add_argument("--vae-seeds", default="0,1")
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="config override of the digits runs, e.g. model.init_bias=mid (repeatable)",
    )  # fmt: skip
    args = ap.parse_args()
    inits = args.inits.split(",")
    for i in inits:
        if i not in INITS:
            ap.error(f"--inits: unknown init {i!r}; known: {', '.join(INITS)}")
    vae_seeds = [int(s) for s in args.vae_seeds.split(",")]
    if args.epochs < 0 or len(vae_seeds) > 10:
        ap.error("--epochs must be >= 0 and --vae-seeds at most 10 seeds")
    torch.set_num_threads(1)
    acts = args.activations.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    nets, epochs = (NETS[::3], min(args.epochs, 3)) if args.quick else (NETS, args.epochs)
    if args.quick:
        seeds = seeds[:1]
    ds = load_digits()
    x = ds.x_train[1000:1064]
    y = torch.nn.functional.one_hot(ds.y_train[1000:1064], 10).float()
    lines = [{
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "load_avg_start": os.getloadavg(),
        "torch": torch.__version__, "networks": [f"{k} {s} seed {d}" for k, s, d in nets],
        "inits": {k: {"init_scale": INITS[k][0], "bias": INITS[k][1], "centred": INITS[k][2]} for k in inits},
        "sets": args.set,
        "batch": int(x.shape[0]), "epochs": epochs, "seeds": seeds,
    }]  # fmt: skip
    # the summaries: per init, and over the first two (the table of docs/neuron.md's first section)
    groups = [[i] for i in inits] + ([["check", "trainer"]] if {"check", "trainer"} <= set(inits) else [])
    for act in acts:
        t0 = time.perf_counter()
        rows = bias_rows(act, nets, x, y, inits)
        t_bias = time.perf_counter() - t0
        for group in groups:
            for beta in BETAS:
                for mode in ("one-sided", "centered"):
                    sel = [r for r in rows if r["beta"] == beta and r["mode"] == mode and r["init"] in group]
                    worst = max(sel, key=lambda r: r["rel"])
                    lines.append({
                        "activation": act, "init": "+".join(group), "beta": beta, "mode": mode,
                        "worst_cos": min(r["cos"] for r in sel), "worst_rel": worst["rel"],
                        "median_rel": statistics.median(r["rel"] for r in sel),
                        "worst_at": f"{worst['net']} {worst['param']}",
                        "all_converged": all(r["converged"] for r in sel),
                        "kinks_max": max(r["kinks"] for r in sel),
                        "kinks_median": statistics.median(r["kinks"] for r in sel),
                    })  # fmt: skip
        if args.vae:
            t0 = time.perf_counter()
            lines += vae_rows(act, vae_seeds)
            print(f"{act}: VAE checks {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        if epochs == 0:
            continue
        t0 = time.perf_counter()
        accs = digits_accuracy(act, seeds, epochs, args.set)
        lines.append({
            "activation": act, "sets": args.set, "digits_acc": accs, "digits_mean": statistics.mean(accs),
            "epochs": epochs,
            "train_s": round(time.perf_counter() - t0, 1), "bias_s": round(t_bias, 1),
            "load_avg": os.getloadavg(),
        })  # fmt: skip
        took = time.perf_counter() - t0
        print(f"{act}: done ({t_bias:.0f} s bias, {took:.0f} s training)", file=sys.stderr)
    for line in lines:
        print(json.dumps(line))


if __name__ == "__main__":
    main()
