"""IR drop benchmark (issue 21): what wire resistance does to a network as its tiles grow, and
what the exact solve costs.

1. Deployment: the digits classifier 64-H-10 (tiles 65 x H and (H + 1) x 10) is trained on
   the ideal board, and its weights are programmed (write-verify) onto an ideal board whose
   wires have `r` ohms per cell segment (`wire_resistance`, `emulator.ir_drop`); the test
   accuracy on the 360 held-out digits is reported per (H, r), with the RMS relative
   deviation of the effective weights from the programmed ones (the tile's IR-drop error).
2. Cost: seconds per exact effective-conductance solve (one write of one array) per tile
   size, and the conjugate-gradient work it bounds (R^2 C).

No compensation is applied (the host does not know r yet): this is the degradation a user
would see. One torch thread.

    .venv/bin/python benchmarks/ir_drop.py [--sizes 64,256,512,1023] [--ohms 0,2,8,32]
                                           [--epochs 10] [--seed 0]

Ends by printing one JSON object per line.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from drivers import open_device
from emulator.ir_drop import effective_conductance


def deploy_rows(sizes: list[int], ohms: list[float], epochs: int, seed: int) -> list[dict[str, object]]:
    from hil.config import ModelConfig, RunConfig, TrainConfig
    from hil.data import load_dataset
    from hil.ep import EBBlock
    from hil.train_classifier import train_classifier

    ds = load_dataset("digits")
    rows = []
    for h in sizes:
        model = ModelConfig(sizes=[64, h, 10])
        ideal = "emulator://?preset=ideal&seed=0"
        t0 = time.perf_counter()
        cfg = RunConfig(device=ideal, model=model, train=TrainConfig(epochs=epochs, seed=seed))
        res = train_classifier(cfg)
        train_s = time.perf_counter() - t0
        block = res.model.block
        weights = {t: p.detach().clone() for t, p in block.weights.items()}
        for r in ohms:
            with open_device(f"emulator://?preset=ideal&seed=0&wire_resistance={r}") as dev:
                t0 = time.perf_counter()
                deployed = EBBlock(
                    dev, block.topology, weights=weights, budgets=block.budgets, programming="verify"
                )
                acc = float((deployed.predict(ds.x_test).argmax(1) == ds.y_test).float().mean())
                deploy_s = time.perf_counter() - t0
                # the tiles' IR-drop error: effective weights against (G+ - G-) / range of the
                # conductances the devices hold (board internals: this is the emulator)
                err = {}
                for t in weights:
                    tile = dev.board.tile(t)
                    g = tile.state(dev.board.clock)
                    plain = (g[0] - g[1]) / tile.model.g_range
                    err[t] = float((tile.weights(dev.board.clock) - plain).norm() / plain.norm())
            line = {
                "bench": "ir_drop",
                "kind": "deploy",
                "hidden": h,
                "tiles": {t: list(w.shape) for t, w in weights.items()},
                "wire_ohms": r,
                "test_acc": acc,
                "ideal_board_acc": res.test_acc,
                "weight_rel_error": err,
                "train_s": round(train_s, 1),
                "deploy_s": round(deploy_s, 2),
            }
            print(json.dumps(line), flush=True)
            rows.append(line)
    return rows


def cost_rows(sizes: list[int], r: float) -> list[dict[str, object]]:
    rows = []
    for n in sizes:
        g = torch.rand((n, n), generator=torch.Generator().manual_seed(n)) * 9e-6 + 1e-6
        t0 = time.perf_counter()
        m = effective_conductance(g, r)
        dt = time.perf_counter() - t0
        line = {
            "bench": "ir_drop",
            "kind": "cost",
            "tile": [n, n],
            "wire_ohms": r,
            "solve_s": round(dt, 3),
            "work_r2c": n * n * n,
            "current_lost": float(1 - m.double().sum() / g.double().sum()),
        }
        print(json.dumps(line), flush=True)
        rows.append(line)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64,256,512,1023")
    parser.add_argument("--ohms", default="0,2,8,32")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cost-sizes", default="64,128,256")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes = [int(v) for v in args.sizes.split(",")]
    ohms = [float(v) for v in args.ohms.split(",")]
    load = os.getloadavg()[0]
    rows = deploy_rows(sizes, ohms, args.epochs, args.seed)
    rows += cost_rows([int(v) for v in args.cost_sizes.split(",")], 2.0)
    print(f"# load average {load:.2f} -> {os.getloadavg()[0]:.2f}, 1 torch thread")
    for line in rows:
        print(json.dumps(line))


if __name__ == "__main__":
    main()
