"""Benchmark: the MHN temperature transition on boards (issue 19).

1. Derived vs measured critical beta for equidistant normalised patterns, per (count,
   dimension, norm) setting, on `ideal` and `rram` (`hil.mhn.diagnose.phase_diagnostic`: the
   sweep over beta / beta_c, then 4 bisections inside the bracket where half the near-centre
   starts stop returning). On `rram` also the beta_c derived from the patterns as read back
   after programming (write noise and stuck devices change the stored set itself).
2. The same for 10 stored digits (one per class, centred, norm 1).
3. Retrieval of the stored digits from queries with a fraction of pixels replaced by uniform
   noise, at beta = 0.8, 2 and 4 beta_c: the fraction retrieved to the right pattern, and the
   distinct end states (within a tenth of the closest two patterns' distance of each other).

4. An MHN classifier on the digits (`hil.mhn.classifier`: prototypes ``[image ; label]``, the
   image clamped, patterns learned by centered EP through the board) against the layered DHN
   classifier (64-256-10, `hil.train_classifier` with its default config) for the same
   number of epochs: test accuracy, crossbar cells (differential pairs), array energy per
   test image of the free settle/retrieval. On `rram` with beta_EP 0.3: its noise floor
   (~0.08 in state units) hides the state shift of a 0.01 nudge.

Ends by printing one JSON object per line. Usage::

    python benchmarks/mhn_phase.py [--quick] [--seeds N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drivers import open_device
from hil.mhn import MHNBlock, RetrievalBudget, critical_beta, equidistant_patterns
from hil.mhn.diagnose import phase_diagnostic
from hil.mhn.digits import corrupt, digit_memory
from hil.mhn.phase import distinct

SETTINGS = [(10, 64, 1.0), (5, 32, 2.0), (8, 16, 0.5), (20, 64, 1.5)]
BUDGET = RetrievalBudget(max_steps=3000, tol=1e-7, check_every=5)


def uri(preset: str, seed: int) -> str:
    return f"emulator://?preset={preset}&seed={seed}"


def transition(preset: str, n: int, d: int, r: float, seed: int, digits: bool = False) -> dict:
    xi = digit_memory(1, norm=r, classes=n).patterns if digits else equidistant_patterns(n, d, r, seed=seed)
    t = time.perf_counter()
    with open_device(uri(preset, seed)) as dev:
        rep = phase_diagnostic(dev, xi, seed=seed)
    c = rep.crit
    return {
        "bench": "mhn_phase",
        "preset": preset,
        "seed": seed,
        "patterns": "digits" if digits else "equidistant",
        "n": n,
        "d": int(xi.shape[0]),
        "norm": r,
        "kind": c.kind,
        "beta_c_derived": round(c.beta_c, 4),
        "beta_c_readback": round(rep.beta_c_readback, 4),
        "beta_c_measured": round(rep.beta_c_measured, 4),
        "measured_over_derived": round(rep.beta_c_measured / c.beta_c, 3),
        "mvm_calls": rep.mvm_calls,
        "board_energy_j": rep.board_energy_j,
        "wall_s": round(time.perf_counter() - t, 2),
    }


def retrieval(preset: str, seed: int, fractions: list[float], per: int) -> list[dict]:
    mem = digit_memory(1, norm=1.0)
    xi = mem.patterns
    crit = critical_beta(xi)
    rows = []
    with open_device(uri(preset, seed)) as dev:
        blk = MHNBlock(dev, xi.float().numpy(), beta=crit.beta_c, budget=BUDGET, programming="verify")
        blk.sync(force=True)  # the second write compensates the stuck devices the first one found
        pats = blk.device_patterns().numpy()
        gaps = np.linalg.norm(pats[:, :, None] - pats[:, None, :], axis=0)
        radius = 0.1 * float(gaps[~np.eye(len(gaps), dtype=bool)].min())  # as `hil.mhn.phase.measure`
        for frac in fractions:
            rng = np.random.default_rng(seed)
            images = np.repeat(mem.raw.T, per, axis=0)
            labels = np.repeat(mem.labels, per)
            queries = np.clip(mem.encode(corrupt(images, frac, rng)), *blk.box())
            for ratio in (0.8, 2.0, 4.0):
                r = blk.retrieve(queries, beta=ratio * crit.beta_c)
                nearest = np.linalg.norm(r.x[:, :, None] - pats[None], axis=1).argmin(1)
                rows.append({
                    "bench": "mhn_retrieval", "preset": preset, "seed": seed, "corrupted": frac,
                    "beta_over_beta_c": ratio, "queries": len(queries),
                    "correct": round(float((mem.labels[nearest] == labels).mean()), 4),
                    "end_states": len(distinct(r.x, radius)), "steps": r.steps, "converged": r.converged,
                    "board_energy_j_per_query": r.energy_j / len(queries),
                })  # fmt: skip
    return rows


def mhn_classifier(
    preset: str, per_class: int, epochs: int, *, lr: float = 2.0, beta_ep: float = 0.01, seed: int = 0
) -> dict:
    from hil.mhn.classifier import MHNClassifier

    t = time.perf_counter()
    with open_device(uri(preset, seed)) as dev:
        clf = MHNClassifier(dev, per_class=per_class, beta_ratio=1.5, programming="verify", seed=seed)
        res = clf.fit(epochs=epochs, lr=lr, beta_ep=beta_ep, seed=seed)
    return {
        "bench": "mhn_classifier", "preset": preset, "seed": seed,
        "model": f"MHN {per_class * 10} prototypes",
        "epochs": epochs, "test_acc_before": round(res.test_accuracy[0], 4),
        "test_acc": round(res.test_accuracy[-1], 4), "best_test_acc": round(max(res.test_accuracy), 4),
        "cells": res.cells, "energy_j_per_image": res.energy_j_per_image,
        "beta_over_beta_c": 1.5, "beta_ep": beta_ep, "lr": lr, "clipped": clf.block.clipped,
        "wall_s": round(time.perf_counter() - t, 1),
    }  # fmt: skip


def dhn_classifier(preset: str, epochs: int, seed: int = 0) -> dict:
    from hil.config import load_config
    from hil.train_classifier import train_classifier

    t = time.perf_counter()
    cfg = load_config(None, [f"train.epochs={epochs}", f"device=emulator://?preset={preset}&seed={seed}"])
    res = train_classifier(cfg)
    from hil.data import load_digits

    x_test = load_digits().x_test
    dev = res.model.blocks()[0].device  # type: ignore[attr-defined]
    before = dev.meter()
    res.model.predict(x_test)  # type: ignore[attr-defined]
    after = dev.meter()
    energy = float("nan")
    if before is not None and after is not None:
        energy = (after.energy_j - before.energy_j) / len(x_test)
    return {
        "bench": "mhn_classifier", "preset": preset, "seed": seed, "model": "DHN 64-256-10",
        "epochs": epochs, "test_acc": round(res.test_acc, 4),
        "best_test_acc": round(max(h.test_acc for h in res.history), 4), "cells": res.cells,
        "energy_j_per_image": energy, "wall_s": round(time.perf_counter() - t, 1),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one seed, two settings, fewer queries")
    ap.add_argument("--seeds", type=int, default=3, help="rram board seeds (ideal: seed 0)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    settings = SETTINGS[:2] if args.quick else SETTINGS
    seeds = 1 if args.quick else args.seeds
    out = []
    for n, d, r in settings:
        out.append(transition("ideal", n, d, r, 0))
        out += [transition("rram", n, d, r, s) for s in range(seeds)]
    out.append(transition("ideal", 10, 64, 1.0, 0, digits=True))
    out += [transition("rram", 10, 64, 1.0, s, digits=True) for s in range(seeds)]
    fractions = [0.3] if args.quick else [0.1, 0.2, 0.3, 0.4, 0.5]
    per = 5 if args.quick else 20
    out += retrieval("ideal", 0, fractions, per)
    for s in range(seeds):
        out += retrieval("rram", s, fractions, per)
    epochs = 2 if args.quick else 8
    out.append(mhn_classifier("ideal", 2, epochs))
    if not args.quick:
        out.append(mhn_classifier("ideal", 4, epochs))
        # on rram the noise floor (~0.08) dwarfs a nudge of 0.01: beta_EP 0.3 (0.01 did not learn)
        out.append(mhn_classifier("rram", 2, epochs, lr=1.0, beta_ep=0.3))
    out.append(dhn_classifier("ideal", epochs))
    out.append({"bench": "mhn_phase", "metric": "wall_s", "value": round(time.perf_counter() - t0, 1),
                "threads": args.threads})  # fmt: skip
    for o in out:
        print(json.dumps(o))


if __name__ == "__main__":
    main()
