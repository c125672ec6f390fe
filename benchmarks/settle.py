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
        [--boards "ideal" "rram&wire_resistance=0" ...] [--mode analog|mvm]

Board and floor alternate per repeat; the figures are medians (ms per sample, and the
median of the per-repeat ratios).

IR drop (issue 21): the rram preset has wires of 2.12 ohms per segment; it is measured
with them (``rram``) and without (``rram&wire_resistance=0``). A settle reads the tiles'
effective conductances, computed once per write, so its time should not change; the cost
is at the write: ``write_ms_per_batch`` is the median time of one training-like write
(every tile reprogrammed with its conductances moved by a small step, 0.2 % of the window
on average, then one single-row mvm per tile, which makes the tile compute its effective
conductances), and ``write_ratio_ir`` that time over the same preset's without wires,
measured in the same process; ``settle_ratio_ir`` is the settle's ratio to its floor with
wires over the same without.
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
from drivers.numerics import denormals_flushed


def floor_settle(floor: Floor, x: torch.Tensor, steps: int) -> torch.Tensor:
    """One free settle of `steps` steps in the board's layout, the input's product (and the
    biases) computed once; the states (nodes, batch)."""
    w, rows = floor.w, floor.rows
    const = torch.empty(floor.nodes, x.shape[0], device=x.device)
    torch.addmm(w[0][-1:].T, w[0][:-1].T, x.T, out=const[rows[0]])
    for k in range(1, len(rows)):
        const[rows[k]] = w[k][-1:].T
    state = torch.zeros(floor.nodes, x.shape[0], device=x.device)
    with denormals_flushed():  # as the board's settle (drivers.numerics): the same arithmetic
        floor._settle(state, const, steps)
    return state


def time_writes(dev, targets: dict[str, tuple[np.ndarray, np.ndarray]], repeats: int) -> float:
    """Median seconds of one training-like write of every tile: its targets moved by
    N(0, 0.25 % of the window) (a small update, as between two training batches), clipped to
    the window and programmed directly, then a one-row mvm per tile (a tile computes its
    effective conductances, IR drop included, at its first read after a write)."""
    lim = dev.info.limits
    span = lim.g_max - lim.g_min
    rng = np.random.default_rng(1)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        for tile, (gp, gm) in targets.items():
            gp += rng.normal(0.0, 0.0025 * span, gp.shape).astype(np.float32)
            gm += rng.normal(0.0, 0.0025 * span, gm.shape).astype(np.float32)
            np.clip(gp, lim.g_min, lim.g_max, out=gp)
            np.clip(gm, lim.g_min, lim.g_max, out=gm)
            dev.program(tile, gp, gm)
            dev.mvm(tile, np.zeros((1, gp.shape[0]), np.float32))
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


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
    parser.add_argument(
        "--boards",
        nargs="+",
        default=["ideal", "rram&wire_resistance=0", "rram"],
        help="preset and URI overrides per board, e.g. 'pcm&noise_1f_scale=1' (the IR-drop ratios "
        "need 'rram&wire_resistance=0' and 'rram')",
    )
    parser.add_argument("--mode", choices=("analog", "mvm"), default="analog", help="the settle mode")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes, batch, steps, dt = [784, 512, 10], args.batch, args.steps, 0.5
    results = []
    write_ms: dict[str, float] = {}
    for spec in args.boards:
        preset, _, rest = spec.partition("&")
        extra = f"&{rest}" if rest else ""
        rng = np.random.default_rng(0)  # the same weights and inputs for every board
        with open_device(f"emulator://?preset={preset}&seed=0&device={args.device}{extra}") as dev:
            # one convergence check, at the last step: every settle runs `steps` steps
            topo = Topology.layered(
                sizes,
                budget=SettleBudget(max_steps=steps, tol=0.0, dt=dt, check_every=steps),
                mode=args.mode,
            )
            dev.configure(topo)
            lim = dev.info.limits
            span = lim.g_max - lim.g_min
            targets = {}
            for c in topo.couplings:
                rows, cols = topo.tile_shape(c.tile)
                w = np.clip(rng.normal(0, 1 / np.sqrt(rows), (rows, cols)), -1, 1).astype(np.float32)
                gp = (lim.g_min + np.maximum(w, 0) * span).astype(np.float32)
                gm = (lim.g_min + np.maximum(-w, 0) * span).astype(np.float32)
                dev.program(c.tile, gp, gm)
                targets[c.tile] = (gp, gm)
            board = dev.board
            label = preset + extra
            write_ms[label] = 1e3 * time_writes(dev, targets, args.repeats)
            tiles = [board.tile(c.tile).weights(board.clock).clone() for c in topo.couplings]
            # a new input per settle: the board's cache of the last clamp's product does not apply
            xs = [rng.uniform(0, 1, (batch, 784)).astype(np.float32) for _ in range(args.repeats + 1)]
            dev.settle({"s0": xs[0]})
            # the step the board takes (its bound on the couplings may shrink the budget's dt)
            key = frozenset({"s0"})
            step_dt = board.engine.planner.step_dt(board.engine.planner.plan(key), key)
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
                    "preset": label,
                    "wire_ohms": board.preset.device.wire_resistance,
                    "write_ms_per_batch": write_ms[label],
                    "write_ratio_ir": (
                        write_ms[label] / write_ms["rram&wire_resistance=0"]
                        if preset == "rram" and "rram&wire_resistance=0" in write_ms
                        else None
                    ),
                    "mode": args.mode,
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
    off = next((r for r in results if r["preset"] == "rram&wire_resistance=0"), None)
    for r in results:
        # the settle's overhead with wires over that without (same weights and inputs; each
        # against its own floor, so load between the runs cancels)
        if r["preset"] == "rram" and off is not None:
            r["settle_ratio_ir"] = r["ratio"] / off["ratio"]
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
