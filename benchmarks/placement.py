"""Benchmark: a network larger than the board's tiles, placed on grids of physical tiles.

A layered DHN of several million weights (default 784-2048-1024-1024-10, 4.77 M weights) is
placed on an ideal emulated board with 256 x 256 tiles (`drivers.placement`, through
`drivers.tiled.TiledDevice`) and, as the fair baseline in the same process, configured
unsplit on the same preset with tiles large enough for every coupling. Both get the same
conductances; then free settles of one batch (fixed steps: ``tol = 0``) are timed, split and
unsplit interleaved, and the median per-image times compared. It also checks that the two
settles agree (max |difference| of the states).

Figures: physical tiles used, cells, utilisation (cells used / cells of the tiles occupied),
settle ms per image for both, ratio split / unsplit. Ends with one JSON object per line.
`placement_figures()` returns the same objects (for `benchmarks/many_boards.py`). Usage::

    python benchmarks/placement.py [--sizes 784,2048,1024,1024,10] [--tile 256] [--batch 32]
                                   [--steps 20] [--reps 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drivers import Device, SettleBudget, Topology, open_device
from drivers.tiled import TiledDevice

MAX_REPS = 100  # timed settles per side (each is a full settle of the network)
MAX_STEPS = 10_000
MAX_TILE = 4096
MAX_WEIGHTS = 50_000_000  # a settle's host memory and time grow with them


def _board(tile: int, max_tiles: int, channels: int) -> TiledDevice:
    uri = (
        f"emulator://?preset=ideal&seed=0&tile_rows_max={tile}&tile_cols_max={tile}"
        f"&max_tiles={max_tiles}&channels={channels}"
    )
    return TiledDevice(open_device(uri))


def _program(dev: Device, topo: Topology, seed: int) -> None:
    """The same random conductances (weights of std ~ 1 / sqrt(fan-in)) on every board."""
    lim = dev.info.limits
    rng = np.random.default_rng(seed)
    mid, span = 0.5 * (lim.g_min + lim.g_max), lim.g_max - lim.g_min
    for c in topo.couplings:
        rows, cols = topo.tile_shape(c.tile)
        w = rng.normal(0.0, 1.0 / np.sqrt(rows), (rows, cols)).clip(-1, 1) * span / 2
        dev.program(c.tile, (mid + w / 2).astype(np.float32), (mid - w / 2).astype(np.float32))


def placement_figures(
    sizes: tuple[int, ...] = (784, 2048, 1024, 1024, 10),
    *,
    tile: int = 256,
    batch: int = 32,
    steps: int = 20,
    reps: int = 5,
    seed: int = 0,
) -> list[dict[str, object]]:
    """Place `sizes` on `tile` x `tile` tiles and time free settles split against unsplit."""
    if not 1 <= reps <= MAX_REPS or not 1 <= steps <= MAX_STEPS or not 1 <= tile <= MAX_TILE:
        raise ValueError(
            f"reps in 1..{MAX_REPS}, steps in 1..{MAX_STEPS}, tile in 1..{MAX_TILE}; "
            f"got {reps}, {steps}, {tile}"
        )
    topo = Topology.layered(list(sizes), budget=SettleBudget(max_steps=steps, tol=0.0, dt=0.5))
    weights = sum(r * c for r, c in (topo.tile_shape(t.tile) for t in topo.couplings))
    if weights > MAX_WEIGHTS:
        raise ValueError(f"{weights} weights; at most {MAX_WEIGHTS} (a settle's memory grows with them)")
    channels = max(4096, sum(sizes))
    big = max(max(topo.tile_shape(c.tile)) for c in topo.couplings)
    split = _board(tile, 4096, channels)
    whole = _board(big, len(topo.couplings), channels)
    try:
        split.configure(topo)
        whole.configure(topo)
        p = split.placement
        assert p is not None and p.split and not whole.placement.split  # type: ignore[union-attr]
        for dev in (split, whole):
            _program(dev, topo, seed)
        x = {"s0": np.random.default_rng(seed + 1).uniform(0, 1, (batch, sizes[0])).astype(np.float32)}
        times: dict[str, list[float]] = {"split": [], "whole": []}
        last = {}
        for _ in range(reps + 1):  # the first round warms both up and is not counted
            for name, dev in (("split", split), ("whole", whole)):
                t = time.perf_counter()
                eq = dev.settle(x)
                times[name].append(time.perf_counter() - t)
                last[name] = eq.states
        diff = max(float(np.abs(last["split"][g] - last["whole"][g]).max()) for g in topo.groups)
        ms = {k: 1e3 * statistics.median(v[1:]) / batch for k, v in times.items()}
        return [
            {
                "bench": "placement",
                "sizes": list(sizes),
                "weights": weights,
                "tile": tile,
                "tiles": p.tiles,
                "cells": p.cells,
                "utilisation": round(p.utilisation, 4),
                "grid": {t: list(p.grid(t)) for t in p.blocks},
                "batch": batch,
                "steps": steps,
                "reps": reps,
                "settle_ms_per_image": round(ms["split"], 4),
                "unsplit_settle_ms_per_image": round(ms["whole"], 4),
                "ratio_vs_unsplit": round(ms["split"] / ms["whole"], 3),
                "max_state_difference": diff,
                "threads": torch.get_num_threads(),
            }
        ]
    finally:
        split.close()
        whole.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="784,2048,1024,1024,10")
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sizes = tuple(int(s) for s in args.sizes.split(","))
    figs = placement_figures(sizes, tile=args.tile, batch=args.batch, steps=args.steps, reps=args.reps)
    for f in figs:
        print(
            f"{f['weights']} weights on {f['tiles']} tiles of {f['tile']}x{f['tile']} "
            f"(utilisation {f['utilisation']}): {f['settle_ms_per_image']} ms/image split, "
            f"{f['unsplit_settle_ms_per_image']} unsplit, ratio {f['ratio_vs_unsplit']}; "
            f"states differ by {f['max_state_difference']:.2e}"
        )
    for f in figs:
        print(json.dumps(f))


if __name__ == "__main__":
    main()
