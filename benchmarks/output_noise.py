"""Cost of the mvm output noise (`out_noise`, docs/emulator.md "Against aihwkit"), off and on:
an mvm-mode free settle of a 784-512-10 network (batch 128, 100 steps) and one `mvm` of its
785 x 512 tile (batch 128), on `ideal` (where the output noise is the only noise) and `rram`
(wires off), the boards alternating every repeat (load from other processes hits them alike).

    OMP_NUM_THREADS=1 python benchmarks/output_noise.py [--repeats 21] [--device cpu]
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
    "ideal",
    "ideal&out_noise=0.06",
    "rram&wire_resistance=0",
    "rram&wire_resistance=0&out_noise=0.06",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batch, steps = 128, 100
    rng = np.random.default_rng(0)
    xs = [rng.uniform(0, 1, (batch, 784)).astype(np.float32) for _ in range(args.repeats + 1)]
    devs = {}
    for spec in BOARDS:
        dev = open_device(f"emulator://?preset={spec}&seed=0&device={args.device}")
        budget = SettleBudget(max_steps=steps, tol=0.0, check_every=steps)
        topo = Topology.layered([784, 512, 10], mode="mvm", budget=budget)
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
        devs[spec] = dev
    times: dict[str, dict[str, list[float]]] = {s: {"settle": [], "mvm": []} for s in BOARDS}
    ones = np.ones((batch, 1), np.float32)
    for k in range(args.repeats + 1):
        for spec in BOARDS if k % 2 else tuple(reversed(BOARDS)):
            dev = devs[spec]
            t0 = time.perf_counter()
            dev.settle({"s0": xs[k]})
            t1 = time.perf_counter()
            dev.mvm("W0", np.concatenate([xs[k], ones], 1))
            t2 = time.perf_counter()
            if k:
                times[spec]["settle"].append(1e3 * (t1 - t0))
                times[spec]["mvm"].append(1e3 * (t2 - t1))
    for spec in BOARDS:
        t = times[spec]
        row = {"bench": "output_noise", "board": spec, "repeats": args.repeats, "threads": args.threads}
        row |= {"settle_ms": statistics.median(t["settle"]), "mvm_ms": statistics.median(t["mvm"])}
        print(json.dumps(row))
    for dev in devs.values():
        dev.close()


if __name__ == "__main__":
    main()
