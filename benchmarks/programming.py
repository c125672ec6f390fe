"""Benchmark: weight-programming schemes (issue 7) on the emulator.

1. Every scheme (``ideal``, ``verify``, ``pulsed``, ``mixed``) x presets ``rram`` and ``pcm``:
   a layered DHN 64-256-10 trained by EP on the digits; test accuracy, programming pulses and
   energy (every write, pulse update and refresh of the run, step measurement included).
   Targets: ``mixed`` >= 94 % on rram and above ``pulsed``.
2. PCM drift: the accuracy right after training, after ``device.wait(86400)`` (one simulated
   day) without refresh, and after a drift-triggered refresh (`EBBlock.refresh`). Target:
   with refresh within 1 point of the accuracy right after training.

Prints one JSON object per line (``scheme``, ``preset``, ``accuracy``, ...), then a Markdown
table. Usage::

    python benchmarks/programming.py [--epochs 30] [--presets rram pcm] [--schemes mixed ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hil.config import load_config
from hil.data import load_dataset
from hil.programming import SCHEMES
from hil.train_classifier import Classifier, train_classifier


def run(
    scheme: str, preset: str, epochs: int, seed: int, extra: list[str]
) -> tuple[dict[str, Any], Classifier]:
    cfg = load_config(
        None,
        [f"device=emulator://?preset={preset}&seed={seed}", f"train.epochs={epochs}", f"train.seed={seed}",
         f"ep.programming={scheme}", *extra],
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


def drift_experiment(scheme: str, epochs: int, seed: int, extra: list[str]) -> dict[str, Any]:
    """Train on pcm, then let one simulated day pass; accuracy before, after, after refresh."""
    _, model = run(scheme, "pcm", epochs, seed, extra)
    ds = load_dataset("digits")

    def acc() -> float:  # mean of 3 evaluations: every settle has its own read and node noise
        return sum(model.accuracy(ds.x_test, ds.y_test) for _ in range(3)) / 3

    blk = model.block
    blk.commit()
    acc0 = acc()
    blk.device.wait(86400.0)
    decay = {t: blk.programming.drift(blk.device, t) for t in blk.weights}
    acc_day = acc()
    reports = blk.refresh(only_drifted=True)
    acc_refresh = acc()
    model.close()
    return {
        "experiment": "pcm_drift",
        "scheme": scheme,
        "preset": "pcm",
        "accuracy": acc_refresh,
        "accuracy_after_training": acc0,
        "accuracy_after_1_day": acc_day,
        "accuracy_after_1_day_refreshed": acc_refresh,
        "conductance_decay": decay,
        "refreshed_tiles": [r.tile for r in reports],
        "refresh_pulses": int(sum(r.pulses for r in reports)),
        "refresh_energy_j": float(sum(r.energy_j for r in reports)),
        "epochs": epochs,
        "overrides": extra,
    }


def table(rows: list[dict[str, Any]], drift: list[dict[str, Any]]) -> str:
    out = [
        "| scheme | preset | test accuracy | pulses | programming energy | updates | refreshes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['scheme']} | {r['preset']} | {100 * r['accuracy']:.1f} % | {r['pulses']:.3g} | "
            f"{r['energy_j'] * 1e6:.3g} uJ | {r['updates']} | {r['refreshes']} |"
        )
    if drift:
        out += [
            "",
            "| scheme (pcm) | after training | after 1 day, no refresh | after 1 day, refreshed "
            "| refresh energy |",
            "|---|---|---|---|---|",
        ]
        for d in drift:
            out.append(
                f"| {d['scheme']} | {100 * d['accuracy_after_training']:.1f} % | "
                f"{100 * d['accuracy_after_1_day']:.1f} % | "
                f"{100 * d['accuracy_after_1_day_refreshed']:.1f} % | "
                f"{d['refresh_energy_j'] * 1e6:.3g} uJ |"
            )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--presets", nargs="+", default=["rram", "pcm"])
    ap.add_argument("--schemes", nargs="*", default=list(SCHEMES), choices=SCHEMES)
    ap.add_argument("--drift-schemes", nargs="*", default=["verify", "mixed"], choices=SCHEMES)
    ap.add_argument("--set", action="append", default=[], help="extra config override, key=value")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows, drift = [], []
    for preset in args.presets:
        for scheme in args.schemes:
            row, model = run(scheme, preset, args.epochs, args.seed, args.set)
            model.close()
            rows.append(row)
            print(json.dumps(row), flush=True)
    for scheme in args.drift_schemes:
        d = drift_experiment(scheme, args.epochs, args.seed, args.set)
        drift.append(d)
        print(json.dumps(d), flush=True)
    print()
    print(table(rows, drift))


if __name__ == "__main__":
    main()
