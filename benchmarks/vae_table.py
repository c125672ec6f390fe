"""Every VAE variant under the `ideal` and `rram` presets: test negative ELBO, Frechet distance,
crossbar cells, settle energy per image and wall time, on the built-in digits.

    python benchmarks/vae_table.py [--epochs 40] [--presets ideal,rram] [--variants ...]
                                   [--mvm-only tdh-vae]

Each run uses the `hil train vae` defaults (the main job's budget) with only the variant and
the device changed. `--mvm-only` variants also run on each preset's board without the
`settle` capability (`capabilities=mvm,pulse,program_verify`: the host iterates every settle
through the board's mvm). Prints a Markdown table, then one JSON object per run.
"""

from __future__ import annotations

import argparse
import json

import torch

from hil.vae.config import VAERunConfig
from hil.vae.train import train_vae

VARIANTS = ("f-vae", "h-vae", "dh-vae", "tdh-vae", "shared-layered")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=VAERunConfig().train.epochs)
    parser.add_argument("--presets", default="ideal,rram")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--mvm-only", default="tdh-vae", help="variants also run on MVM-only boards ('' for none)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    mvm_only = [v for v in args.mvm_only.split(",") if v]
    boards = [(p, "") for p in args.presets.split(",")]
    boards += [(p, "&capabilities=mvm,pulse,program_verify") for p in args.presets.split(",")]
    for preset, caps in boards:
        for variant in args.variants.split(","):
            if variant == "f-vae" and (preset != "ideal" or caps):
                continue  # digital: no device, one row is enough
            if caps and variant not in mvm_only:
                continue
            cfg = VAERunConfig()
            cfg.model.variant = variant  # type: ignore[assignment]
            cfg.device = f"emulator://?preset={preset}&seed=0{caps}"
            cfg.train.epochs = args.epochs
            r = train_vae(cfg, progress=False)
            rows.append(
                {
                    "bench": "vae_table",
                    "variant": variant,
                    "preset": (preset + (", MVM-only" if caps else "")) if variant != "f-vae" else "digital",
                    "epochs": args.epochs,
                    "neg_elbo": r.final.neg_elbo,
                    "recon_mse": r.final.recon_mse,
                    "frechet": r.final.frechet,
                    "frechet_untrained": r.initial.frechet,
                    "cells": r.cells,
                    "energy_per_image_j": r.final.energy_per_image_j,
                    "converged": r.final.converged,
                    "wall_s": r.wall_s,
                }
            )
            print(f"done {variant} on {preset}{caps}: -ELBO {r.final.neg_elbo:.2f}", flush=True)
    header = ("variant", "preset", "-ELBO (nats)", "recon MSE", "Frechet (untrained)", "cells", "J / image")
    header += ("converged", "wall (s)")
    print("\n| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print(
            f"| {r['variant']} | {r['preset']} | {r['neg_elbo']:.2f} | {r['recon_mse']:.4f} | "
            f"{r['frechet']:.1f} ({r['frechet_untrained']:.0f}) | {r['cells']} | "
            f"{r['energy_per_image_j']:.2e} | {r['converged']:.0%} | {r['wall_s']:.0f} |"
        )
    print()
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
