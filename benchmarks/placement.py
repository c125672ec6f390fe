"""Benchmark: a network larger than the board's tiles, placed on grids of physical tiles.

A layered DHN of several million weights (default 784-2048-1024-1024-10, 4.77 M weights) is
placed on an ideal emulated board with 256 x 256 tiles (`drivers.placement`, through
`drivers.tiled.TiledDevice`) and, as the fair baseline in the same process, configured
unsplit on the same preset with tiles large enough for every coupling. Both get the same
conductances; then free settles of one batch (fixed steps: ``tol = 0``) are timed, split and
unsplit interleaved, and the median per-image times compared. It also checks that the two
settles agree (max |difference| of the states).

Two more rows, measured the same way: a conv layer (default the 128 -> 256 channel, 3 x 3,
2 x 2 max-pooled layer of the ff-EBM CIFAR-10 model's second block, on 16 x 16 maps: a
1153 x 256 kernel tile in row blocks of 28 source channels that pool at the destination nodes)
and, with ``--conv-block``, that block's two layers (128 -> 256 -> 256, the second pooled); and a
dense network (default 600 nodes: 3 parts, 3 diagonal dense tiles and 3 bipartite pair tiles).
The conv and dense settles clamp the first group (the source map; for the dense network its
first 100 nodes) and let the rest relax.

Figures: physical tiles used, cells, utilisation (cells used / cells of the tiles occupied),
settle ms per image for both, ratio split / unsplit. Ends with one JSON object per line.
`placement_figures()` returns the layered network's objects (for `benchmarks/many_boards.py`),
`conv_figures()` and `dense_figures()` the others. Usage::

    python benchmarks/placement.py [--sizes 784,2048,1024,1024,10] [--tile 256] [--batch 32]
                                   [--steps 20] [--reps 5] [--threads 1] [--conv-batch 8]
                                   [--conv-block] [--dense 600] [--only layered,conv,dense]
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
MAX_DENSE = 8192  # nodes of the dense network (its tile grows with their square)


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
        if c.kind == "dense":  # symmetric, diagonal 0: what EP programs
            w[:cols] = 0.5 * (w[:cols] + w[:cols].T)
            np.fill_diagonal(w[:cols], 0.0)
        dev.program(c.tile, (mid + w / 2).astype(np.float32), (mid - w / 2).astype(np.float32))


def _check(reps: int, steps: int, tile: int) -> None:
    if not 1 <= reps <= MAX_REPS or not 1 <= steps <= MAX_STEPS or not 1 <= tile <= MAX_TILE:
        raise ValueError(
            f"reps in 1..{MAX_REPS}, steps in 1..{MAX_STEPS}, tile in 1..{MAX_TILE}; "
            f"got {reps}, {steps}, {tile}"
        )


def _measure(
    name: str, topo: Topology, clamp: dict[str, np.ndarray], *, tile: int, reps: int, seed: int, channels: int
) -> dict[str, object]:
    """Place `topo` on `tile` x `tile` tiles and time free settles split against unsplit (the
    same conductances, interleaved, the first round a warm-up)."""
    weights = topo.cells()
    if weights > MAX_WEIGHTS:
        raise ValueError(f"{weights} weights; at most {MAX_WEIGHTS} (a settle's memory grows with them)")
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
        times: dict[str, list[float]] = {"split": [], "whole": []}
        last = {}
        for _ in range(reps + 1):
            for side, dev in (("split", split), ("whole", whole)):
                t = time.perf_counter()
                eq = dev.settle(clamp)
                times[side].append(time.perf_counter() - t)
                last[side] = eq.states
        diff = max(float(np.abs(last["split"][g] - last["whole"][g]).max()) for g in topo.groups)
        batch = next(iter(clamp.values())).shape[0]
        ms = {k: 1e3 * statistics.median(v[1:]) / batch for k, v in times.items()}
        return {
            "bench": name,
            "weights": weights,
            "tile": tile,
            "tiles": p.tiles,
            "cells": p.cells,
            "utilisation": round(p.utilisation, 4),
            "grid": {t: list(p.grid(t)) for t in p.blocks},
            "node_pools": p.as_dict()["node_pools"],
            "batch": batch,
            "steps": topo.budget.max_steps,
            "reps": reps,
            "settle_ms_per_image": round(ms["split"], 4),
            "unsplit_settle_ms_per_image": round(ms["whole"], 4),
            "ratio_vs_unsplit": round(ms["split"] / ms["whole"], 3),
            "max_state_difference": diff,
            "threads": torch.get_num_threads(),
        }
    finally:
        split.close()
        whole.close()


def conv_figures(
    input_shape: tuple[int, int, int] = (128, 16, 16),
    channels: tuple[int, ...] = (256,),
    pools: tuple[int, ...] = (2,),
    *,
    tile: int = 256,
    batch: int = 8,
    steps: int = 20,
    reps: int = 3,
    seed: int = 0,
) -> list[dict[str, object]]:
    """A conv layer (or block) on `tile` x `tile` tiles against unsplit (module doc)."""
    _check(reps, steps, tile)
    budget = SettleBudget(max_steps=steps, tol=0.0, dt=0.5)
    topo = Topology.convolutional(input_shape, list(channels), pools=list(pools), budget=budget)
    x = np.random.default_rng(seed + 1).uniform(0, 1, (batch, topo.groups["s0"])).astype(np.float32)
    lines = max(max(topo.tile_shape(c.tile)) for c in topo.couplings)
    fig = _measure("placement_conv", topo, {"s0": x}, tile=tile, reps=reps, seed=seed, channels=lines + 1)
    fig.update(input_shape=list(input_shape), channels=list(channels), pools=list(pools))
    return [fig]


def dense_figures(
    nodes: int = 600, *, tile: int = 256, batch: int = 32, steps: int = 20, reps: int = 5, seed: int = 0
) -> list[dict[str, object]]:
    """A dense network of `nodes` (its first 100 clamped) on `tile` x `tile` tiles (module doc)."""
    _check(reps, steps, tile)
    if not 101 <= nodes <= MAX_DENSE:
        raise ValueError(f"dense nodes in 101..{MAX_DENSE}, got {nodes}")
    budget = SettleBudget(max_steps=steps, tol=0.0, dt=0.5)
    topo = Topology.dense({"x": 100, "h": nodes - 100}, budget=budget)
    x = np.random.default_rng(seed + 1).uniform(0, 1, (batch, 100)).astype(np.float32)
    channels = max(4096, nodes)
    fig = _measure("placement_dense", topo, {"x": x}, tile=tile, reps=reps, seed=seed, channels=channels)
    fig["nodes"] = nodes
    return [fig]


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
    _check(reps, steps, tile)
    topo = Topology.layered(list(sizes), budget=SettleBudget(max_steps=steps, tol=0.0, dt=0.5))
    x = {"s0": np.random.default_rng(seed + 1).uniform(0, 1, (batch, sizes[0])).astype(np.float32)}
    fig = _measure("placement", topo, x, tile=tile, reps=reps, seed=seed, channels=max(4096, sum(sizes)))
    fig["sizes"] = list(sizes)
    return [fig]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="784,2048,1024,1024,10")
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--conv-batch", type=int, default=8)
    ap.add_argument("--conv-block", action="store_true", help="the conv block's two layers, not one")
    ap.add_argument("--dense", type=int, default=600, help="nodes of the dense network")
    ap.add_argument("--only", default="layered,conv,dense")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    only = set(args.only.split(","))
    figs: list[dict[str, object]] = []
    kw = {"tile": args.tile, "steps": args.steps, "reps": args.reps}
    if "layered" in only:
        sizes = tuple(int(s) for s in args.sizes.split(","))
        figs += placement_figures(sizes, batch=args.batch, **kw)
    if "conv" in only:
        chans, pools = ((256, 256), (1, 2)) if args.conv_block else ((256,), (2,))
        figs += conv_figures(channels=chans, pools=pools, batch=args.conv_batch, **kw)
    if "dense" in only:
        figs += dense_figures(args.dense, batch=args.batch, **kw)
    for f in figs:
        print(
            f"{f['bench']}: {f['weights']} weights on {f['tiles']} tiles of {f['tile']}x{f['tile']} "
            f"(utilisation {f['utilisation']}, grid {f['grid']}): {f['settle_ms_per_image']} ms/image "
            f"split, {f['unsplit_settle_ms_per_image']} unsplit, ratio {f['ratio_vs_unsplit']}; "
            f"states differ by {f['max_state_difference']:.2e}"
        )
    for f in figs:
        print(json.dumps(f))


if __name__ == "__main__":
    main()
