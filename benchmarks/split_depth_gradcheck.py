"""Benchmark (issue 18): is EP's gradient right inside the blocks of the fully connected
splitting study once they have trained?

Trains the study's split of 784-128x6-10 into blocks of ``--block-layers`` layers (default 6:
one 6-layer block and the output block) and checks the first block
(`benchmarks/ffebm_conv.py --split-model fc`: centered EP at beta 0.2, 60 free and 20 nudged
steps with tolerance 0.002, Adam at 1e-3, init scale 1.0, ideal board) for ``--epochs`` epochs,
then takes 64 training images and, as the loss, half the squared distance of the block's
output layer to a target (its free output plus N(0, 0.2^2), clipped to [0, 1]). The truth is
implicit differentiation of the float64 reference at its fixed point, settled for 5000 steps
and polished by Newton. Per settle budget (free / nudged steps, tolerance 0) it prints how
far the block's free states end from that fixed point (largest difference) and, per beta, the
cosine and relative error of centered EP against the truth per weight tile (W0, the input's,
first); docs/conv.md has the table.

    python benchmarks/split_depth_gradcheck.py [--epochs 2] [--block-layers 6]
        [--budgets 60/20,200/60,1000/200] [--betas 0.2,0.05,0.01]
        [--settle board|host|host-alternating]

Ends by printing one JSON object per line. About 15 s on one thread.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ffebm_conv

from drivers import SettleBudget
from hil.config import load_config
from hil.data import load_dataset
from hil.gradcheck import cosine, mse_loss, rel_error, split_bias
from hil.train_classifier import train_classifier


def budgets(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        free, _, nudge = part.partition("/")
        f, n = int(free), int(nudge)
        if not (1 <= f <= 20000 and 1 <= n <= 20000):
            raise argparse.ArgumentTypeError(f"budget {part!r}: free and nudged steps must be in [1, 20000]")
        out.append((f, n))
    return out


# how the checked block settles: (settle path, host update, dt; None: the training's)
SETTLES = {
    "board": ("board", "synchronous", None),
    "host": ("host", "synchronous", None),
    "host-alternating": ("host", "alternating", 1.0),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=2, choices=range(1, 21), metavar="1..20",
                   help="training epochs before the check")  # fmt: skip
    p.add_argument("--budgets", type=budgets, default=budgets("60/20,200/60,1000/200"),
                   help="free/nudged steps per checked settle budget, comma-separated")  # fmt: skip
    p.add_argument("--betas", default="0.2,0.05,0.01")
    p.add_argument("--block-layers", type=int, default=6, choices=(1, 2, 3, 6),
                   help="layers per block of the split; the first block is checked")  # fmt: skip
    p.add_argument("--settle", choices=SETTLES, default="board",
                   help="how the checked block settles after training (on the board, as it trained; "
                        "or iterated on the host through the board's mvm, synchronous at the "
                        "training's dt or alternating at dt 1)")  # fmt: skip
    a = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    overrides = [*ffebm_conv.SPLIT_FC, f"model.block_layers={a.block_layers}", "model.init_scale=1.0",
                 f"train.epochs={a.epochs}", "data.limit_train=0"]  # fmt: skip
    ds = load_dataset("mnist5k")
    res = train_classifier(load_config(ffebm_conv.EXAMPLE, overrides), data=ds)
    blk = res.model.blocks()[0]
    path, update, dt_check = SETTLES[a.settle]
    blk.use_settle(path, update)  # type: ignore[arg-type]
    x = ds.x_train[:64]
    cl = blk.clamp_arrays(x)
    free_groups = list(blk.free_groups)
    out = free_groups[-1]
    s_out = blk.as_tensor(blk.free(cl).states[out])
    gen = torch.Generator().manual_seed(1)
    target = (s_out + 0.2 * torch.randn(s_out.shape, generator=gen)).clamp(0.0, 1.0)
    ref = blk.reference(torch.float64)
    long = SettleBudget(max_steps=5000, tol=1e-10, dt=0.5, check_every=50)
    clamp64 = {g: blk.as_tensor(v).double() for g, v in cl.items()}
    _, gw, _, eq = ref.implicit_gradients(clamp64, mse_loss(out, target.double()), budget=long)
    truth = {k: v for k, v in split_bias(blk.topology, gw).items() if k.endswith("weight")}
    common = {
        "bench": "split_depth_gradcheck",
        "block_layers": a.block_layers,
        "epochs": a.epochs,
        "test_acc": round(res.history[-1].test_acc, 4),
        "truth_converged": bool(eq.converged),
        "settle": a.settle,
    }
    lines = []
    for f, n in a.budgets:
        dt = blk.budgets["free"].dt if dt_check is None else dt_check
        blk.budgets = {
            "free": SettleBudget(max_steps=f, tol=0.0, dt=dt),
            "nudge": SettleBudget(max_steps=n, tol=0.0, dt=dt),
        }
        free = blk.free(cl)
        ends = {g: blk.as_tensor(free.states[g]).double() for g in free_groups}
        dist = max(float((ends[g] - eq.states[g]).abs().max()) for g in free_groups)
        for beta in (float(b) for b in a.betas.split(",")):
            r = blk.ep(cl, target=blk.as_groups({out: target}), beta=beta, mode="centered", free=free)
            est = split_bias(blk.topology, r.grads)
            lines.append(
                {
                    **common,
                    "free_steps": f,
                    "nudge_steps": n,
                    "distance_to_fixed_point": round(dist, 4),
                    "beta": beta,
                    "cosine": [round(cosine(est[k], v), 3) for k, v in truth.items()],
                    "rel_error": [round(rel_error(est[k], v), 2) for k, v in truth.items()],
                }
            )
    res.model.close()
    lines.append({**common, "seconds": round(time.perf_counter() - t0, 1)})
    for line in lines:
        print(json.dumps(line))


if __name__ == "__main__":
    main()
