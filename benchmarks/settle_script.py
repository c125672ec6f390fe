"""The compiled settle loop (`emulator.settle_script`) against the engine's Python loop, on
the settles of the README's main job, in one process; the compiled loop both in
`torch.inference_mode` (the engine's default) and with autograd's dispatch, and both with a
step's products as one ``addmm`` through the plan's joined matrix (the default,
`emulator.settle_plan.joined_coupling`) and as one per (source, destination group) pair, 9
calls for this network's three free groups (`SettleEngine.joined = False`).

The TDH-VAE of `hil train vae --model tdh-vae` settles a dense network of 64 pixels, 64
hidden units and two latent groups of 4 on batches of 32: encoding clamps the pixels (72
free nodes), decoding clamps the latent mean (132 free nodes), each to a tolerance checked
every 5 steps. The same topology here, with fixed random weights on the ideal board, settles
one batch repeatedly with `SettleEngine.scripted` on and off (and, on, with
`SettleEngine.inference` on and off, and `SettleEngine.joined` on and off), alternating per
repeat; each settle starts from zero states, so each takes the same steps. The figures are
medians of microseconds per settle step, and of the per-repeat ratios of the Python loop's
time to the compiled loop's (and of the compiled loop without inference mode, or with one
product per pair, to the default). The states of the loops with the same products must be
equal; the per-pair products' states differ from the joined ones by float rounding
(``per_pair_max_state_difference``). The engine before the joined matrix ran one product per
source over all free rows (3 calls), between the two; docs/emulator.md compares the joined
products with that code, run in turn.

    python benchmarks/settle_script.py [--repeats 21] [--threads 1] [--main-job scripted|joined]

``--main-job FLAG`` also times the README's main job itself (`hil train vae --model
tdh-vae`), twice with the engine's FLAG on and twice off, alternating, in this process
through the CLI, with the flag set on every board the run opens (about 2 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drivers import SettleBudget, Topology, open_device

GROUPS = {"x": 64, "h": 64, "mu": 4, "lv": 4}
BUDGET = SettleBudget(max_steps=400, tol=1e-4, dt=0.5, check_every=5)


def board(scripted: bool, inference: bool = True, joined: bool = True):
    """The main job's network on an ideal board, fixed weights, with the chosen loop."""
    topo = Topology.dense(GROUPS, budget=BUDGET)
    dev = open_device("emulator://?preset=ideal&seed=0")
    dev.configure(topo)
    dev.board.engine.scripted = scripted  # type: ignore[attr-defined]
    dev.board.engine.inference = inference  # type: ignore[attr-defined]
    dev.board.engine.joined = joined  # type: ignore[attr-defined]
    rng = np.random.default_rng(0)
    w = rng.normal(0.0, 0.08, topo.tile_shape("W"))
    lim = dev.info.limits
    gp = lim.g_min + np.maximum(w, 0) * (lim.g_max - lim.g_min)
    gm = lim.g_min + np.maximum(-w, 0) * (lim.g_max - lim.g_min)
    dev.program("W", gp.astype(np.float32), gm.astype(np.float32))
    return dev


def timed(dev, clamp: dict[str, torch.Tensor]) -> tuple[float, int, dict[str, torch.Tensor]]:
    t = time.perf_counter()
    res = dev.board.settle(clamp, None)
    return time.perf_counter() - t, res.steps, res.states


def settles(repeats: int) -> list[dict]:
    rng = np.random.default_rng(1)
    cases = {
        "encode": {"x": torch.from_numpy(rng.uniform(0, 1, (32, 64)).astype(np.float32))},
        "decode": {"mu": torch.from_numpy(rng.normal(0, 1, (32, 4)).astype(np.float32))},
    }
    lines = []
    for name, clamp in cases.items():
        devs = {
            "python": board(False),
            "compiled": board(True),
            "dispatch": board(True, inference=False),
            "per_pair": board(True, joined=False),
        }
        try:
            for d in devs.values():  # warm: plans, workspaces, the compiled loop
                timed(d, clamp)
            times: dict[str, list[float]] = {k: [] for k in devs}
            ratios, dispatch_ratios, joined_ratios, steps, equal, diff = [], [], [], 0, True, 0.0
            for _ in range(repeats):
                took = {k: timed(d, clamp) for k, d in devs.items()}
                for k, (t, n, _s) in took.items():
                    times[k].append(t / n)
                ratios.append(took["python"][0] / took["compiled"][0])
                dispatch_ratios.append(took["dispatch"][0] / took["compiled"][0])
                joined_ratios.append(took["per_pair"][0] / took["compiled"][0])
                _t, steps, s_js = took["compiled"]
                for k, (_t2, n, s) in took.items():
                    if k == "per_pair":
                        diff = max(diff, *(float((s[g] - s_js[g]).abs().max()) for g in s))
                    else:
                        equal = equal and n == steps and all(torch.equal(s[g], s_js[g]) for g in s)
        finally:
            for d in devs.values():
                d.close()
        lines.append(
            {
                "bench": "settle_script",
                "settle": name,
                "free_nodes": sum(v for g, v in GROUPS.items() if g not in clamp),
                "batch": 32,
                "steps": steps,
                "python_us_per_step": round(statistics.median(times["python"]) * 1e6, 2),
                "compiled_us_per_step": round(statistics.median(times["compiled"]) * 1e6, 2),
                "compiled_without_inference_mode_us_per_step": round(
                    statistics.median(times["dispatch"]) * 1e6, 2
                ),
                "per_pair_us_per_step": round(statistics.median(times["per_pair"]) * 1e6, 2),
                "python_over_compiled": round(statistics.median(ratios), 3),
                "without_over_with_inference_mode": round(statistics.median(dispatch_ratios), 3),
                "per_pair_over_joined": round(statistics.median(joined_ratios), 3),
                "same_states": equal,
                "per_pair_max_state_difference": diff,
            }
        )
    return lines


def main_job(runs: int, flag: str) -> dict:
    """Wall seconds of the README's main job, alternating the engine's `flag` on and off."""
    import emulator.settle as settle
    from hil.cli import app

    init = settle.SettleEngine.__init__
    walls: dict[bool, list[float]] = {True: [], False: []}
    for i in range(2 * runs):
        on = i % 2 == 0

        def patched(self, board, _on=on):
            init(self, board)
            setattr(self, flag, _on)

        settle.SettleEngine.__init__ = patched  # type: ignore[method-assign]
        try:
            with tempfile.TemporaryDirectory() as out:
                t = time.perf_counter()
                try:
                    app(["train", "vae", "--model", "tdh-vae", "--out", out, "--no-progress", "--overwrite"])
                except SystemExit as exc:
                    if exc.code:
                        raise
                walls[on].append(time.perf_counter() - t)
        finally:
            settle.SettleEngine.__init__ = init  # type: ignore[method-assign]
    return {
        "bench": "settle_script",
        "main_job": "hil train vae --model tdh-vae",
        "flag": flag,
        "off_wall_s": [round(w, 1) for w in walls[False]],
        "on_wall_s": [round(w, 1) for w in walls[True]],
        "off_over_on": round(statistics.median(walls[False]) / statistics.median(walls[True]), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=21, choices=range(1, 1001), metavar="1..1000")
    ap.add_argument("--threads", type=int, default=1, choices=range(1, 257), metavar="1..256")
    ap.add_argument(
        "--main-job",
        choices=["scripted", "joined"],
        help="also time the README's main job with this engine flag on and off (2 minutes)",
    )
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    load0 = os.getloadavg()[0]
    lines = settles(a.repeats)
    if a.main_job:
        lines.append(main_job(2, a.main_job))
    load = [load0, os.getloadavg()[0]]
    env = {"threads": a.threads, "cpus": os.cpu_count(), "load_avg_1min_start_end": load}
    for line in lines:
        print(json.dumps({**line, **env}))


if __name__ == "__main__":
    main()
