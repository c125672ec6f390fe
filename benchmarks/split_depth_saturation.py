"""Benchmark (issue 18): what happens inside the splitting study's 6-layer block while it
trains, with the study's settles or longer ones (``--model conv``: the conv study's 6-layer
block, `benchmarks/ffebm_conv.py --split-model conv`, behind the example's digital front).

Trains the split of 784-128x6-10 into a 6-layer block and the output block
(`benchmarks/ffebm_conv.py --split-model fc`: centered EP at beta 0.2, Adam at 1e-3, init
scale 1.0, ideal board, batch 64, the training images in one fixed order) with the settle
budget ``--budget`` (free / nudged steps; ``study``: the study's 60 / 20 with tolerance 0.002,
else fixed step counts) and every ``--every`` steps prints, for the 6-layer block: the batch's
loss and accuracy, the largest change of the free settle's last step, per layer the mean
|s+ - s-| of the two nudged phases (the error signal EP reads) and the fraction of units at a
rail of the hard sigmoid (0 or 1) in the free state, and each weight tile's spectral norm.
docs/conv.md has what it showed.

    python benchmarks/split_depth_saturation.py [--budget study|200/60] [--steps 130] [--every 10]
                                                [--model fc|conv] [--set KEY=VALUE ...]

Ends by printing one JSON object per line (one per logged step). About a minute on one
thread for 200 / 60.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ffebm_conv
from split_depth_gradcheck import budgets

from drivers import open_device
from hil.classifier import Classifier
from hil.config import load_config
from hil.data import load_dataset


def budget(text: str) -> tuple[str, list[str]]:
    """(the budget as given, its config overrides): ``study``, or one free/nudged pair as
    `split_depth_gradcheck.budgets` reads it."""
    if text == "study":
        return text, []
    ((free, nudge),) = budgets(text)
    return text, [f"ep.free_steps={free}", f"ep.nudge_steps={nudge}", "ep.tol=0"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=budget, default=budget("200/60"), help="study, or free/nudged steps")
    p.add_argument("--steps", type=int, default=130, choices=range(1, 2001), metavar="1..2000")
    p.add_argument("--every", type=int, default=10, choices=range(1, 2001), metavar="1..2000")
    p.add_argument("--model", choices=sorted(ffebm_conv.SPLIT), default="fc", help="which study's block")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override on top of the study's, e.g. model.gain=1.4 (repeatable)",
    )
    a = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    study = ffebm_conv.SPLIT[a.model]
    overrides = [*study, "model.block_layers=6", "model.init_scale=1.0", *a.budget[1], *a.set]
    cfg = load_config(ffebm_conv.EXAMPLE, overrides)
    ds = load_dataset("mnist5k")
    clf = Classifier(cfg, ds.features, ds.classes, open_device, image_shape=ds.image_shape)
    assert clf.ffebm is not None
    layer, blk = clf.ffebm.eb_layers[0], clf.blocks()[0]
    groups = list(blk.free_groups)
    order = torch.randperm(len(ds.x_train), generator=torch.Generator().manual_seed(0))
    per_epoch = len(order) // 64
    lines = []
    try:
        for step in range(a.steps):
            idx = order[(step % per_epoch) * 64 : (step % per_epoch + 1) * 64]
            loss, acc, _ = clf.step(ds.x_train[idx], ds.y_train[idx])
            if step % a.every or layer.last_vjp is None:
                continue
            res = layer.last_vjp
            free, first, second = (
                {g: blk.as_tensor(eq.states[g]) for g in groups} for eq in (res.free, res.first, res.second)
            )
            lines.append(
                {
                    "bench": "split_depth_saturation",
                    "model": a.model,
                    "budget": a.budget[0],
                    "overrides": a.set,
                    "step": step,
                    "loss": round(loss, 3),
                    "acc": round(acc, 3),
                    "free_last_change": float(f"{res.free.residual:.2e}"),
                    "nudge_gap": [round(float((second[g] - first[g]).abs().mean()), 4) for g in groups],
                    "at_rail": [round(float(((s <= 0) | (s >= 1)).float().mean()), 3) for s in free.values()],
                    "spectral_norm": [  # a conv tile's (C_in k^2, C_out) matrix
                        round(float(torch.linalg.matrix_norm(w.detach()[:-1].reshape(-1, w.shape[-1]), 2)), 3)
                        for w in blk.weights.values()
                    ],
                }
            )
    finally:
        clf.close()
    lines.append({"bench": "split_depth_saturation", "seconds": round(time.perf_counter() - t0, 1)})
    for line in lines:
        print(json.dumps(line))


if __name__ == "__main__":
    main()
