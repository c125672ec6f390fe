"""Every VAE variant under the `ideal` and `rram` presets: test negative ELBO, Frechet distance,
crossbar cells, settle energy per image, settle convergence and wall time, on the built-in digits.

    python benchmarks/vae_table.py [--epochs 40] [--presets ideal,rram] [--variants ...]
                                   [--mvm-only tdh-vae] [--tuned] [--seeds 0,1,2] [--jobs 2]
                                   [--set KEY=VALUE ...]

Each run uses the `hil train vae` defaults (the main job's budget) with only the variant, the
device and the training seed (`train.seed`; the board's seed stays 0) changed. `--tuned`
starts each variant from its shipped best settings instead, `examples/vae_tuned/VARIANT.toml`
(the best trials of `examples/sweep_*.toml`, docs/vae.md "Tuned variants"). `--set KEY=VALUE`
(repeatable) sets one config key on every run, after the tuned file, as `hil train vae --set`
does and with its parser and checks (`hil.config.load_into`, `check_repeated_overrides`,
`validate_vae`): `--set ep.joint_phases=true`, `--set ep.programming=mixed`. It refuses the
keys the benchmark's own options set (`model.variant`, `device`, `train.seed`,
`train.epochs`: use `--variants`, `--presets`, `--seeds`, `--epochs`); each run's JSON line
records the overrides under "set". `--mvm-only`
variants also run on each preset's board without the `settle` capability
(`capabilities=mvm,pulse,program_verify`: the host iterates every settle through the board's
mvm). `--jobs N` trains N runs at once in separate processes (each with `--threads` threads).

Before the runs it computes Frechet references in the same digits-classifier features as the
runs (`hil.vae.metrics.frechet_references`): 360 training images and every training image
against the test images (the floor a perfect generator would reach), and the mean training
image repeated (a generator that ignores its latent input); each run also reports its
untrained model's distance. Prints a Markdown table per run and one of the mean and spread
(min-max) over seeds, then one JSON object per line: the references, one per run, one per
variant summary and, when F-VAE and TDH-VAE ran on the ideal board, the issue's targets.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from hil.config import ConfigError, check_repeated_overrides, load_into, overlapping, override_keys
from hil.vae.config import VAERunConfig, validate_vae

VARIANTS = ("f-vae", "h-vae", "dh-vae", "tdh-vae", "shared-layered")
HOPFIELD = VARIANTS[1:]
TUNED_DIR = Path(__file__).resolve().parent.parent / "examples" / "vae_tuned"
SUMMARY_KEYS = ("neg_elbo", "recon_mse", "frechet", "frechet_untrained", "converged", "wall_s")
# the config keys the benchmark's own options set on every run, which --set may not set too
OWN_KEYS = {
    "model.variant": "--variants",
    "device": "--presets (and --mvm-only)",
    "train.seed": "--seeds",
    "train.epochs": "--epochs",
}


def tuned_path(variant: str, tuned_dir: Path = TUNED_DIR) -> Path:
    return tuned_dir / f"{variant}.toml"


def check_sets(sets: list[str]) -> None:
    """Refuse (SystemExit, naming the override) --set items that are not ``key=value``, that
    give a key twice, or that set a key one of the benchmark's own options sets."""
    try:
        check_repeated_overrides(sets)
        for item in (i for i in sets if "=" in i):  # load_into refuses the rest, naming them
            for key in override_keys(item):
                for own, option in OWN_KEYS.items():
                    if overlapping(key, own):
                        raise ConfigError(f"--set {item} sets {own}, which the benchmark sets from {option}")
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None


def run_config(
    variant: str,
    preset: str,
    caps: str,
    seed: int,
    epochs: int | None,
    tuned_dir: Path | None,
    sets: list[str] | tuple[str, ...] = (),
) -> VAERunConfig:
    """The config of one run: defaults, or the variant's tuned file, then the --set overrides,
    then board, seed, epochs. A bad override or value exits naming it."""
    cfg = VAERunConfig()
    if tuned_dir is not None:
        path = tuned_path(variant, tuned_dir)
        load_into(cfg, path)
        if cfg.model.variant != variant:
            raise SystemExit(f"{path}: model.variant is {cfg.model.variant!r}, not {variant!r}")
    try:
        load_into(cfg, None, list(sets))
    except ConfigError as exc:
        raise SystemExit(f"error: --set: {exc}") from None
    cfg.model.variant = variant  # type: ignore[assignment]
    cfg.device = f"emulator://?preset={preset}&seed=0{caps}"
    cfg.train.seed = seed
    if epochs is not None:
        cfg.train.epochs = epochs
    try:
        validate_vae(cfg)
    except ConfigError as exc:
        raise SystemExit(
            f"error: config: {exc}" + (f" (with --set {' --set '.join(sets)})" if sets else "")
        ) from None
    return cfg


def _train(job: tuple[VAERunConfig, str, int, list[str]]) -> dict[str, Any]:
    from hil.vae.train import train_vae

    cfg, preset, threads, sets = job
    torch.set_num_threads(threads)
    r = train_vae(cfg, progress=False)
    return {
        "bench": "vae_table",
        "kind": "run",
        "variant": cfg.model.variant,
        "preset": preset,
        "seed": cfg.train.seed,
        "epochs": cfg.train.epochs,
        "lr": cfg.train.lr,
        "beta": cfg.ep.beta,
        "mu_scale": cfg.model.mu_scale,
        "set": list(sets),
        "joint_phases": cfg.ep.joint_phases,
        "programming": cfg.ep.programming,
        "threads": threads,
        "neg_elbo": r.final.neg_elbo,
        "recon_mse": r.final.recon_mse,
        "frechet": r.final.frechet,
        "neg_elbo_untrained": r.initial.neg_elbo,
        "frechet_untrained": r.initial.frechet,
        "cells": r.cells,
        "energy_per_image_j": r.final.energy_per_image_j,
        "converged": r.final.converged,
        "converged_untrained": r.initial.converged,
        "wall_s": r.wall_s,
    }


def references(samples: int) -> dict[str, Any]:
    from hil.data import load_digits
    from hil.vae.metrics import DigitsFeatures, frechet_references

    data = load_digits()
    refs = frechet_references(DigitsFeatures.load_or_train(), data.x_train, data.x_test, samples=samples)
    return {"bench": "vae_table", "kind": "frechet_references", "samples": samples, **refs}


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["variant"], r["preset"]), []).append(r)
    out = []
    for (variant, preset), rs in groups.items():
        s: dict[str, Any] = {"bench": "vae_table", "kind": "summary", "variant": variant, "preset": preset}
        s["seeds"] = [r["seed"] for r in rs]
        for k in SUMMARY_KEYS:
            vals = [float(r[k]) for r in rs]
            s[f"{k}_mean"] = statistics.fmean(vals)
            s[f"{k}_min"] = min(vals)
            s[f"{k}_max"] = max(vals)
            s[f"{k}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        s["cells"] = rs[0]["cells"]
        s["set"] = rs[0]["set"]
        out.append(s)
    return out


def targets(summary: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Issue 20 part 4: TDH-VAE within 3 nats of F-VAE (mean over seeds), its Frechet distance
    at most 1.5 times F-VAE's (stretch: at or below it), every Hopfield variant within 5 nats."""
    by = {s["variant"]: s for s in summary if s["preset"] in ("ideal", "digital")}
    if "f-vae" not in by or "tdh-vae" not in by:
        return None
    f, t = by["f-vae"], by["tdh-vae"]
    gaps = {v: by[v]["neg_elbo_mean"] - f["neg_elbo_mean"] for v in HOPFIELD if v in by}
    ratio = t["frechet_mean"] / f["frechet_mean"]
    return {
        "bench": "vae_table",
        "kind": "targets",
        "tdh_minus_f_nats": gaps["tdh-vae"],
        "tdh_within_3_nats": gaps["tdh-vae"] <= 3.0,
        "tdh_over_f_frechet": ratio,
        "tdh_frechet_within_1.5x": ratio <= 1.5,
        "tdh_frechet_at_or_below_f": ratio <= 1.0,
        "hopfield_minus_f_nats": gaps,
        "every_hopfield_within_5_nats": all(g <= 5.0 for g in gaps.values()) and len(gaps) == len(HOPFIELD),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="default: the config's (40)")
    parser.add_argument("--presets", default="ideal,rram")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once, one process each")
    parser.add_argument(
        "--mvm-only", default="tdh-vae", help="variants also run on MVM-only boards ('' for none)"
    )
    parser.add_argument("--tuned", action="store_true", help="each variant's examples/vae_tuned/VARIANT.toml")
    parser.add_argument("--tuned-dir", type=Path, default=TUNED_DIR)
    parser.add_argument("--seeds", default="0", help="training seeds (train.seed), comma-separated")
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config key for every run, as hil train vae --set (repeatable), e.g. ep.joint_phases=true",
    )
    args = parser.parse_args()
    check_sets(args.sets)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",") if s]
    for variant in args.variants.split(","):  # a bad --set or value exits before the references
        run_config(variant, "ideal", "", 0, args.epochs, args.tuned_dir if args.tuned else None, args.sets)
    refs = references(VAERunConfig().eval.samples)
    print(
        "Frechet references against the test images: "
        + ", ".join(f"{k} {v:.2f}" for k, v in refs.items() if isinstance(v, float)),
        flush=True,
    )
    mvm_only = [v for v in args.mvm_only.split(",") if v]
    boards = [(p, "") for p in args.presets.split(",")]
    boards += [(p, "&capabilities=mvm,pulse,program_verify") for p in args.presets.split(",")]
    jobs = []
    for preset, caps in boards:
        for variant in args.variants.split(","):
            if variant == "f-vae" and (preset != "ideal" or caps):
                continue  # digital: no device, one row is enough
            if caps and variant not in mvm_only:
                continue
            label = (preset + (", MVM-only" if caps else "")) if variant != "f-vae" else "digital"
            tuned = args.tuned_dir if args.tuned else None
            for seed in seeds:
                cfg = run_config(variant, preset, caps, seed, args.epochs, tuned, args.sets)
                jobs.append((cfg, label, args.threads, args.sets))
    rows = []

    def done(r: dict[str, Any]) -> None:
        rows.append(r)
        print(f"done {r['variant']} on {r['preset']} seed {r['seed']}: -ELBO {r['neg_elbo']:.3f}", flush=True)

    if args.jobs > 1:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
            for r in pool.map(_train, jobs):
                done(r)
    else:
        for job in jobs:
            done(_train(job))
    header = ("variant", "preset", "seed", "-ELBO (nats)", "recon MSE", "Frechet (untrained)", "cells")
    header += ("J / image", "converged", "wall (s)")
    print("\n| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print(
            f"| {r['variant']} | {r['preset']} | {r['seed']} | {r['neg_elbo']:.3f} | {r['recon_mse']:.4f} | "
            f"{r['frechet']:.2f} ({r['frechet_untrained']:.0f}) | {r['cells']} | "
            f"{r['energy_per_image_j']:.2e} | {r['converged']:.1%} | {r['wall_s']:.0f} |"
        )
    summary = summarise(rows)
    if len(seeds) > 1:
        print(f"\nMean over seeds {args.seeds} (min-max):\n")
        header = ("variant", "preset", "-ELBO (nats)", "Frechet", "Frechet untrained", "converged")
        header += ("wall (s)",)
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for s in summary:
            cells = [s["variant"], s["preset"]]
            for k, fmt in (("neg_elbo", ".3f"), ("frechet", ".2f"), ("frechet_untrained", ".1f")):
                cells.append(f"{s[k + '_mean']:{fmt}} ({s[k + '_min']:{fmt}} to {s[k + '_max']:{fmt}})")
            cells.append(f"{s['converged_mean']:.1%} (min {s['converged_min']:.1%})")
            cells.append(f"{s['wall_s_mean']:.0f}")
            print("| " + " | ".join(cells) + " |")
    wall = time.perf_counter() - t0
    print(f"\nwhole benchmark: {wall:.0f} s wall, {len(rows)} runs, {args.jobs} at a time\n")
    print(json.dumps(refs))
    for r in rows:
        print(json.dumps(r))
    for s in summary:
        print(json.dumps(s))
    t = targets(summary)
    if t is not None:
        print(json.dumps(t))


if __name__ == "__main__":
    main()
