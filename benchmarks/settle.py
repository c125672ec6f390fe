"""Settle time of a 784-512-10 layered network, batch 128, analog mode, on the emulator,
as a ratio to a bare torch loop doing the same matmuls in the same process.

The bare loop gets the same algorithmic shortcut as the board (the clamped input's
product is computed once per settle) so the ratio measures the board's overhead:
periphery, noise, bookkeeping and the Device boundary.

    python benchmarks/settle.py [--repeats 5] [--device cpu] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from drivers import SettleBudget, Topology, open_device


def bare_loop(x: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor, steps: int, dt: float) -> torch.Tensor:
    """Damped fixed-point iteration of the 784-512-10 DHN; weights with the bias as last row."""
    c1 = F.linear(x, w0[:-1].T.contiguous(), w0[-1])
    c2 = w1[-1].expand(x.shape[0], -1)
    h = torch.zeros(x.shape[0], w0.shape[1], device=x.device)
    y = torch.zeros(x.shape[0], w1.shape[1], device=x.device)
    w_up = w1[:-1].T.contiguous()  # (10, 512): the layout F.linear is fastest with, both ways
    w_down = w1[:-1].contiguous()
    for _ in range(steps):
        nh = (c1 + F.linear(y, w_down)).clamp_(0, 1)
        ny = (c2 + F.linear(h, w_up)).clamp_(0, 1)
        h = torch.lerp(h, nh, dt)
        y = torch.lerp(y, ny, dt)
    return y


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable timings)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes, batch, steps, dt = [784, 512, 10], args.batch, args.steps, 0.5
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (batch, 784)).astype(np.float32)
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
            w0 = board.tile("W0").weights(board.clock).clone()
            w1 = board.tile("W1").weights(board.clock).clone()
            xt = torch.from_numpy(x).to(args.device)
            t_board = timed(lambda dev=dev: dev.settle({"s0": x}), args.repeats)
            t_bare = timed(lambda w0=w0, w1=w1, xt=xt: bare_loop(xt, w0, w1, steps, dt), args.repeats)
            results.append(
                {
                    "bench": "settle",
                    "preset": preset,
                    "sizes": sizes,
                    "batch": batch,
                    "steps": steps,
                    "device": args.device,
                    "board_ms_per_sample": 1e3 * t_board / batch,
                    "bare_ms_per_sample": 1e3 * t_bare / batch,
                    "ratio": t_board / t_bare,
                    "target": 1.5 if preset == "ideal" else 3.0,
                }
            )
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
