"""Benchmark (issue 18): is EP's gradient right on a deep conv EB block?

`hil.gradcheck.gradcheck` (centered EP on the ideal emulated board against implicit differentiation
of the float64 reference, Newton-settled) on one 6-layer conv block of the splitting study's
shape, with smaller maps so the reference stays cheap: input 4 x 8 x 8, channels 4, 4, 8, 8, 8,
8, pools 1, 1, 2, 1, 1, 1, a head of 10; 16 random images and one-hot targets; GOE
initialisation at ``--scale`` with zero or centred (``--bias mid``) biases; the free phase
``--free`` steps and each nudged phase ``--nudge`` steps (tolerance 0.002 below 600 free
steps, else none). Prints the layer means at the reference's fixed point, whether the free
settle converged, and per beta and weight tile (W0 first, W6 the head) the cosine and
relative error; docs/conv.md has the table.

    python benchmarks/conv_depth_gradcheck.py [--scale 1.0] [--bias zero|mid] [--free 60] [--nudge 20]

Ends by printing one JSON object per line. One to four minutes per configuration on one thread.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from drivers import SettleBudget, Topology, open_device
from hil.ep import EBBlock
from hil.gradcheck import gradcheck
from hil.init import centre_biases, goe_init

CHANNELS, POOLS = [4, 4, 8, 8, 8, 8], [1, 1, 2, 1, 1, 1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=float, default=1.0, help="GOE init scale")
    p.add_argument("--bias", choices=["zero", "mid"], default="zero")
    p.add_argument("--free", type=int, default=60, help="free-phase steps (the study's: 60)")
    p.add_argument("--nudge", type=int, default=20, help="steps of each nudged phase (the study's: 20)")
    p.add_argument("--betas", default="0.2,0.01")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    tol = 0.0 if a.free >= 600 else 0.002
    budget = SettleBudget(max_steps=a.free, tol=tol, dt=0.5)
    topo = Topology.convolutional((4, 8, 8), CHANNELS, pools=POOLS, head=[10], budget=budget)
    w = goe_init(topo, a.scale, torch.Generator().manual_seed(0))
    if a.bias == "mid":
        w = centre_biases(topo, w)
    t0 = time.perf_counter()
    with open_device("emulator://?preset=ideal&seed=0") as dev:
        blk = EBBlock(dev, topo, weights=w)
        blk.budgets = {"free": budget, "nudge": SettleBudget(max_steps=a.nudge, tol=tol, dt=0.5)}
        gen = torch.Generator().manual_seed(2)
        x = torch.rand(16, 4 * 8 * 8, generator=gen)
        target = torch.zeros(16, 10)
        target[torch.arange(16), torch.randint(0, 10, (16,), generator=gen)] = 1.0
        eq = blk.reference().settle({"s0": x.double()}, newton=True)
        means = [round(float(eq.states[f"s{k}"].mean()), 3) for k in range(1, len(CHANNELS) + 2)]
        betas = tuple(float(b) for b in a.betas.split(","))
        rows = gradcheck(blk, x, target, betas=betas, modes=("centered",))
        free = blk.free(blk.clamp_arrays(x))
    common = {"bench": "conv_depth_gradcheck", "scale": a.scale, "bias": a.bias, "free_steps": a.free,
              "nudge_steps": a.nudge, "converged": bool(free.converged), "layer_means": means}  # fmt: skip
    checked = [r for r in rows if r.param.endswith("weight") or r.param.startswith("input")]
    out = [
        {
            **common,
            "beta": r.beta,
            "param": r.param,
            "cosine": round(r.cosine, 4),
            "rel_error": round(r.rel_error, 3),
        }
        for r in checked
    ]
    out.append({**common, "seconds": round(time.perf_counter() - t0, 1)})
    for o in out:
        print(json.dumps(o))


if __name__ == "__main__":
    main()
