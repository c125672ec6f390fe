"""Benchmark (issue 17): how often one EP training step makes the host wait for a GPU.

Every read-back of a CUDA tensor (``float(t)``, ``t.tolist()``, ``t.item()``, a numpy copy)
blocks the host until the GPU has finished all the work queued before it: on a GPU a step
is bound by how fast the host launches work, and each wait empties the queue the host had
filled ahead. torch's sync debug mode (``torch.cuda.set_sync_debug_mode("warn")``) warns once
per such synchronisation; this counts them per phase of `hil.classifier.Classifier.step`
(784-512-10, batch 128, T1 = 30, T2 = 10 + 10 centered, fixed step counts, the ideal board,
as `benchmarks/peer_ep.py`) and per settle and per programmed tile.

    python benchmarks/cuda_syncs.py [--steps 5]

Needs a CUDA device (exits with a message elsewhere). Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_ep import IDEAL, project

if TYPE_CHECKING:
    from hil.classifier import Classifier


def count_syncs(clf: Classifier, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, object]:
    """Train `clf` one step per batch and count the warnings of torch's sync debug mode (on
    when the caller turned it on) by the phase of the step they came from: ``programming``
    (`EBBlock.sync`), ``settle`` (the device's settles), ``optimizer``, ``other``."""
    blk = clf.block
    phase = {"now": "other"}

    def tagged(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def go(*args: Any, **kw: Any) -> Any:
            outer, phase["now"] = phase["now"], name
            try:
                return fn(*args, **kw)
            finally:
                phase["now"] = outer

        return go

    plain = blk.sync, blk.device.settle_tensors, clf.opt.step
    blk.sync = tagged("programming", blk.sync)  # type: ignore[method-assign]
    blk.device.settle_tensors = tagged("settle", blk.device.settle_tensors)  # type: ignore[method-assign]
    clf.opt.step = tagged("optimizer", clf.opt.step)  # type: ignore[method-assign]
    counts: Counter[str] = Counter()
    settles = tiles = 0

    def count(message: Warning | str, *rest: object) -> None:
        if "synchroniz" in str(message):
            counts[phase["now"]] += 1

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = count  # type: ignore[assignment]
            for x, y in batches:
                stats = clf.step(x, y)[2]
                settles += int(stats["settles"])
                tiles += len(clf.last_programming)
    finally:
        blk.sync, blk.device.settle_tensors, clf.opt.step = plain  # type: ignore[method-assign]
    n = len(batches)
    return {
        "steps": n, "syncs_per_step": round(sum(counts.values()) / n, 2),
        "by_phase": {p: round(c / n, 2) for p, c in sorted(counts.items())},
        "settles_per_step": settles / n, "tiles_programmed_per_step": tiles / n,
        "per_settle": round(counts["settle"] / max(settles, 1), 2),
        "per_programmed_tile": round(counts["programming"] / max(tiles, 1), 2),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5, help="training steps counted (after 2 warm-up steps)")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit(f"no CUDA device (torch {torch.__version__}): nothing to count")
    from hil.data import load_dataset

    ds = load_dataset("mnist5k")
    clf = project(IDEAL, [784, 512, 10], 128, 30, 10, "cuda")
    batches = [
        (ds.x_train[k * 128 : (k + 1) * 128], ds.y_train[k * 128 : (k + 1) * 128]) for k in range(2 + a.steps)
    ]
    for x, y in batches[:2]:
        clf.step(x, y)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        figures = count_syncs(clf, batches[2:])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    print(json.dumps({"bench": "cuda_syncs", "device": torch.cuda.get_device_name(), **figures}))


if __name__ == "__main__":
    main()
