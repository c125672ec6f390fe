"""Cost of the opt-in effects that accumulate after a write (docs/emulator.md, "Against
aihwkit"): the PCM 1/f noise (`noise_1f_scale`) and the RRAM relaxation (`relax_sigma`), off
and on, on the 785 x 512 tile of a 784-512-10 network, batch 128, analog settles of 100 steps.

Per board, alternating the boards every repeat (load from other processes hits them alike):

- ``write_ms``: one direct write of the 785 x 512 tile (its conductances moved by a small
  step, as between two training batches), then a one-row mvm (the tile recomputes its weights);
- ``settle_ms``: one free settle of the network on a new input (the board's clock advances by
  the settle's time, so with an effect on, the tile recomputes its weights whenever what
  accumulated moved more than the cache's tolerance);
- ``recomputes``: the 785 x 512 tile's weight recomputations per settle.

    OMP_NUM_THREADS=1 python benchmarks/accumulated_noise.py [--repeats 21] [--device cpu]
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

from drivers import SettleBudget, Topology, open_device

BOARDS = (
    "rram&wire_resistance=0",
    "rram&wire_resistance=0&relax_sigma=6.6e-08",
    "pcm&wire_resistance=0",
    "pcm&wire_resistance=0&noise_1f_scale=1",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes, batch, steps = [784, 512, 10], 128, 100
    rng = np.random.default_rng(0)
    xs = [rng.uniform(0, 1, (batch, 784)).astype(np.float32) for _ in range(args.repeats + 1)]
    devs, targets = {}, {}
    for spec in BOARDS:
        dev = open_device(f"emulator://?preset={spec}&seed=0&device={args.device}")
        topo = Topology.layered(sizes, budget=SettleBudget(max_steps=steps, tol=0.0, check_every=steps))
        dev.configure(topo)
        lim = dev.info.limits
        span = lim.g_max - lim.g_min
        r = np.random.default_rng(1)
        for c in topo.couplings:
            rows, cols = topo.tile_shape(c.tile)
            w = np.clip(r.normal(0, 1 / np.sqrt(rows), (rows, cols)), -1, 1).astype(np.float32)
            gp = (lim.g_min + np.maximum(w, 0) * span).astype(np.float32)
            gm = (lim.g_min + np.maximum(-w, 0) * span).astype(np.float32)
            dev.program(c.tile, gp, gm)
            targets[spec, c.tile] = (gp, gm, lim.g_min, lim.g_max, span)
        devs[spec] = dev
    times: dict[str, dict[str, list[float]]] = {
        s: {"write": [], "settle": [], "recomputes": []} for s in BOARDS
    }
    for k in range(args.repeats + 1):
        order = BOARDS if k % 2 else tuple(reversed(BOARDS))
        for spec in order:
            dev, tile = devs[spec], devs[spec].board.tile("W0")
            gp, gm, lo, hi, span = targets[spec, "W0"]
            gp = np.clip(gp + r.normal(0, 0.0025 * span, gp.shape).astype(np.float32), lo, hi)
            gm = np.clip(gm + r.normal(0, 0.0025 * span, gm.shape).astype(np.float32), lo, hi)
            t0 = time.perf_counter()
            dev.program("W0", gp, gm)
            dev.mvm("W0", np.zeros((1, 785), np.float32))
            t1 = time.perf_counter()
            epoch = tile.weights_epoch
            for j in range(5):  # five settles after each write, as in a training step
                dev.settle({"s0": xs[(k + j) % len(xs)]})
            t2 = time.perf_counter()
            if k:  # the first round warms up
                times[spec]["write"].append(1e3 * (t1 - t0))
                times[spec]["settle"].append(1e3 * (t2 - t1) / 5)
                times[spec]["recomputes"].append((tile.weights_epoch - epoch) / 5)
    for spec in BOARDS:
        t = times[spec]
        print(
            json.dumps(
                {
                    "bench": "accumulated_noise",
                    "board": spec,
                    "write_ms": statistics.median(t["write"]),
                    "settle_ms": statistics.median(t["settle"]),
                    "recomputes_per_settle": statistics.mean(t["recomputes"]),
                    "repeats": args.repeats,
                    "threads": args.threads,
                    "device": args.device,
                }
            )
        )
    for dev in devs.values():
        dev.close()


if __name__ == "__main__":
    main()
