"""Benchmark: weight-programming schemes (issue 7) on the emulator.

1. Every scheme (``ideal``, ``verify``, ``pulsed``, ``mixed``) x presets ``rram`` and ``pcm``:
   a layered DHN 64-256-10 trained by EP on the digits; test accuracy, programming pulses and
   energy (every write, pulse update and refresh of the run, step measurement included).
   Targets: ``mixed`` >= 94 % on rram and above ``pulsed``.
2. PCM drift, on each pcm-trained network: `EBBlock.commit` (the devices' state becomes what a
   refresh restores), the accuracy right after training, after ``device.wait(86400)`` (one
   simulated day) without refresh, and after a drift-triggered refresh
   (`EBBlock.refresh(only_drifted=True)`; the scheme's default refresh, a closed-loop tuning of
   the pairs, `hil.programming.tune`). Target: with refresh within 1 point of the accuracy
   right after training.

Prints one JSON object per line (``scheme``, ``preset``, ``accuracy``, ...), then a Markdown
table. Usage::

    python benchmarks/programming.py [--epochs 30] [--seeds 0 1 2] [--presets rram pcm] [--schemes mixed ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hil.classifier import Classifier
from hil.config import load_config
from hil.data import load_dataset
from hil.programming import SCHEMES
from hil.train_classifier import train_classifier


def run(
    scheme: str, preset: str, epochs: int, seed: int, extra: list[str]
) -> tuple[dict[str, Any], Classifier]:
    cfg = load_config(
        None,
        [f"device=emulator://?preset={preset}&seed={seed}", f"train.epochs={epochs}", f"train.seed={seed}",
         f"ep.programming={scheme}", "model.activation=hard_sigmoid", *extra],
    )  # fmt: skip
    t0 = time.perf_counter()
    res = train_classifier(cfg)
    model = res.model
    assert isinstance(model, Classifier)
    tot = model.block.programming.totals()
    row = {
        "scheme": scheme,
        "preset": preset,
        "accuracy": res.test_acc,
        "epochs": epochs,
        "seed": seed,
        "pulses": int(tot["pulses"]),
        "energy_j": tot["energy_j"],
        "program_time_s": tot["time_s"],
        "updates": int(tot["updates"]),
        "refreshes": int(tot["refreshes"]),
        "seconds": round(time.perf_counter() - t0, 1),
        "overrides": extra,
    }
    return row, model


def drift_experiment(
    model: Classifier, scheme: str, seed: int, epochs: int, extra: list[str]
) -> dict[str, Any]:
    """On a pcm-trained model: accuracy right after training, after one simulated day without
    refresh, and after a drift-triggered refresh (`EBBlock.refresh(only_drifted=True)`)."""
    ds = load_dataset("digits")

    def acc() -> float:  # mean of 3 evaluations: every settle has its own read and node noise
        return sum(model.accuracy(ds.x_test, ds.y_test) for _ in range(3)) / 3

    blk = model.block
    blk.commit(reads=32)  # the target of the refresh: averaged well below the read noise
    acc0 = acc()
    blk.device.wait(86400.0)
    decay = {t: blk.programming.drift(blk.device, t) for t in blk.weights}
    acc_day = acc()
    n_hist = len(blk.programming.history)
    t0 = time.perf_counter()
    reports = blk.refresh(only_drifted=True)
    seconds = time.perf_counter() - t0
    acc_refresh = acc()
    done = blk.programming.history[n_hist:]
    return {
        "experiment": "pcm_drift",
        "scheme": scheme,
        "preset": "pcm",
        "accuracy": acc_refresh,
        "accuracy_after_training": acc0,
        "accuracy_after_1_day": acc_day,
        "accuracy_after_1_day_refreshed": acc_refresh,
        "conductance_decay": decay,
        "refresh_mode": blk.programming.refresh_mode or "auto",
        "refreshed_tiles": [r.tile for r in reports],
        "refresh_iterations": [int(r["iterations"]) for r in done],
        "refresh_pulses": int(sum(r.pulses for r in reports)),
        "refresh_energy_j": float(sum(r.energy_j for r in reports)),
        "refresh_within_tol": [round(float(r["within_tol"]), 4) for r in done],
        "refresh_seconds": round(seconds, 2),
        "epochs": epochs,
        "seed": seed,
        "overrides": extra,
    }


def _mean_std(xs: list[float]) -> str:
    m = statistics.fmean(xs)
    return f"{m:.1f}" if len(xs) < 2 else f"{m:.1f} ± {statistics.stdev(xs):.1f}"


def table(rows: list[dict[str, Any]], drift: list[dict[str, Any]]) -> str:
    """Markdown tables: means (± std over seeds) per scheme and preset."""
    seeds = sorted({r["seed"] for r in rows} | {d["seed"] for d in drift})
    out = [
        f"Mean ± std over {len(seeds)} seed(s) ({', '.join(map(str, seeds))}).",
        "",
        "| scheme | preset | test accuracy (%) | pulses | programming energy (uJ) | refreshes |",
        "|---|---|---|---|---|---|",
    ]
    keys = list(dict.fromkeys((r["scheme"], r["preset"]) for r in rows))
    for scheme, preset in sorted(keys, key=lambda k: (k[1] != "rram", SCHEMES.index(k[0]))):
        g = [r for r in rows if r["scheme"] == scheme and r["preset"] == preset]
        out.append(
            f"| {scheme} | {preset} | {_mean_std([100 * r['accuracy'] for r in g])} | "
            f"{statistics.fmean(r['pulses'] for r in g):.3g} | "
            f"{statistics.fmean(r['energy_j'] for r in g) * 1e6:.3g} | "
            f"{statistics.fmean(r['refreshes'] for r in g):.3g} |"
        )
    if drift:
        out += [
            "",
            "| scheme (pcm) | after training (%) | after 1 day, no refresh (%) | after 1 day, refreshed (%) "
            "| refresh - after training (points) | refresh pulses | refresh energy (uJ) |",
            "|---|---|---|---|---|---|---|",
        ]
        for scheme in [s for s in SCHEMES if any(d["scheme"] == s for d in drift)]:
            g = [d for d in drift if d["scheme"] == scheme]
            gap = [100 * (d["accuracy_after_1_day_refreshed"] - d["accuracy_after_training"]) for d in g]
            out.append(
                f"| {scheme} | {_mean_std([100 * d['accuracy_after_training'] for d in g])} | "
                f"{_mean_std([100 * d['accuracy_after_1_day'] for d in g])} | "
                f"{_mean_std([100 * d['accuracy_after_1_day_refreshed'] for d in g])} | "
                f"{_mean_std(gap)} (worst {min(gap):.1f}) | "
                f"{statistics.fmean(d['refresh_pulses'] for d in g):.3g} | "
                f"{statistics.fmean(d['refresh_energy_j'] for d in g) * 1e6:.3g} |"
            )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--presets", nargs="+", default=["rram", "pcm"])
    ap.add_argument("--schemes", nargs="*", default=list(SCHEMES), choices=SCHEMES)
    ap.add_argument("--drift-schemes", nargs="*", default=list(SCHEMES), choices=SCHEMES)
    ap.add_argument("--set", action="append", default=[], help="extra config override, key=value")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows, drift = [], []
    for seed in args.seeds:
        for preset in args.presets:
            for scheme in args.schemes:
                row, model = run(scheme, preset, args.epochs, seed, args.set)
                rows.append(row)
                print(json.dumps(row), flush=True)
                if preset == "pcm" and scheme in args.drift_schemes:
                    d = drift_experiment(model, scheme, seed, args.epochs, args.set)
                    drift.append(d)
                    print(json.dumps(d), flush=True)
                model.close()
    print()
    print(table(rows, drift))


if __name__ == "__main__":
    main()
