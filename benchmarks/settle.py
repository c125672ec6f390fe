"""Settle time of a 784-512-10 layered network, batch 128, analog mode, on the emulator,
as a ratio to a floor: a tight plain-torch loop in the board's layout doing the same
steps in the same process.

The floor is `benchmarks.peer_ep.Floor`'s settle (the same floor as peer_ep's (b)): the free
states as one (nodes, batch) buffer, per step one ``addmm`` per destination group written
into its rows, one clamp and one in-place ``lerp``, the weights as the tiles store them, and
the clamped input's product computed once per settle, as the board does. (An earlier
baseline iterated batch-first states with ``F.linear``, whose (128x512)@(512x10) product is
a slow case: its ratio of about 0.6 flattered the board.) The ratio is the board's overhead:
periphery, noise, bookkeeping and the Device boundary. Each settle clamps a new input (the
board's cache of the last clamp's product does not apply), and the floor's step is the
board's (`Board.settle` may take a smaller step than the budget's dt when the couplings are
strong: the floor is given the same one).

    python benchmarks/settle.py [--repeats 15] [--device cpu] [--threads 1]

Board and floor alternate per repeat; the figures are medians (ms per sample, and the
median of the per-repeat ratios).
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

from benchmarks.peer_ep import Floor
from drivers import SettleBudget, Topology, open_device


def floor_settle(floor: Floor, x: torch.Tensor, steps: int) -> torch.Tensor:
    """One free settle of `steps` steps in the board's layout, the input's product (and the
    biases) computed once; the states (nodes, batch)."""
    w, rows = floor.w, floor.rows
    const = torch.empty(floor.nodes, x.shape[0], device=x.device)
    torch.addmm(w[0][-1:].T, w[0][:-1].T, x.T, out=const[rows[0]])
    for k in range(1, len(rows)):
        const[rows[k]] = w[k][-1:].T
    state = torch.zeros(floor.nodes, x.shape[0], device=x.device)
    floor._settle(state, const, steps)
    return state


def interleaved(board, floor, repeats: int) -> tuple[float, float, float]:
    """Time `board(k)` and `floor(k)` on input k, alternating which goes first, after one
    warm-up each; (median board s, median floor s, median of the per-repeat ratios): load
    from other processes hits both alike."""
    board(0), floor(0)
    tb, tf = [], []
    for k in range(1, repeats + 1):
        for name, fn in (("b", board), ("f", floor)) if k % 2 else (("f", floor), ("b", board)):
            t0 = time.perf_counter()
            fn(k)
            if torch.cuda.is_initialized():
                torch.cuda.synchronize()
            (tb if name == "b" else tf).append(time.perf_counter() - t0)
    ratios = [b / f for b, f in zip(tb, tf, strict=True)]
    return statistics.median(tb), statistics.median(tf), statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable timings)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes, batch, steps, dt = [784, 512, 10], args.batch, args.steps, 0.5
    rng = np.random.default_rng(0)
    results = []
    for preset in ("ideal", "rram"):
        with open_device(f"emulator://?preset={preset}&seed=0&device={args.device}") as dev:
            # one convergence check, at the last step: every settle runs `steps` steps
            topo = Topology.layered(
                sizes, budget=SettleBudget(max_steps=steps, tol=0.0, dt=dt, check_every=steps)
            )
            dev.configure(topo)
            lim = dev.info.limits
            span = lim.g_max - lim.g_min
            for c in topo.couplings:
                rows, cols = topo.tile_shape(c.tile)
                w = np.clip(rng.normal(0, 1 / np.sqrt(rows), (rows, cols)), -1, 1).astype(np.float32)
                gp = (lim.g_min + np.maximum(w, 0) * span).astype(np.float32)
                gm = (lim.g_min + np.maximum(-w, 0) * span).astype(np.float32)
                dev.program(c.tile, gp, gm)
            board = dev.board
            tiles = [board.tile(c.tile).weights(board.clock).clone() for c in topo.couplings]
            # a new input per settle: the board's cache of the last clamp's product does not apply
            xs = [rng.uniform(0, 1, (batch, 784)).astype(np.float32) for _ in range(args.repeats + 1)]
            dev.settle({"s0": xs[0]})
            # the step the board takes (its bound on the couplings may shrink the budget's dt)
            key = frozenset({"s0"})
            step_dt = board.engine._step_dt(board.engine._plan(key), key)
            floor = Floor(tiles, lrs=[0.0], beta=0.0, tau=1.0, dt=step_dt, gain=1.0, t1=steps, t2=0,
                          device=args.device)  # fmt: skip
            xt = [torch.from_numpy(v).to(args.device) for v in xs]
            t_board, t_bare, ratio = interleaved(
                lambda k, dev=dev, xs=xs: dev.settle({"s0": xs[k]}),
                lambda k, floor=floor, xt=xt: floor_settle(floor, xt[k], steps),
                args.repeats,
            )
            results.append(
                {
                    "bench": "settle",
                    "preset": preset,
                    "sizes": sizes,
                    "batch": batch,
                    "steps": steps,
                    "device": args.device,
                    "board_ms_per_sample": 1e3 * t_board / batch,
                    "floor_ms_per_sample": 1e3 * t_bare / batch,
                    "ratio": ratio,
                    "baseline": "floor in the board's layout (benchmarks.peer_ep.Floor)",
                    "target": 1.5 if preset == "ideal" else 3.0,
                }
            )
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
