"""Data parallel throughput over emulated boards (`hil.distributed`, docs/distributed.md).

One board per process: a ``torchrun --standalone`` job of 1, 2 and 4 ranks on gloo, each rank
an emulated ideal board settling its shard, trains a 64-256-10 DHN on the digits at a fixed
batch per board (weak scaling: the global batch grows with the boards). Images per second
count training images over the epochs' wall time (the test set is kept small); the scaling
efficiency is images/s of k boards over k x that of one board in the same harness (a
one-rank torchrun job, measured in this run). The plain baseline is the same training in
this process without torch.distributed: the one-rank job's ratio to it is the cost of the
data parallel machinery itself.

Time in collectives (the gradient all-reduce and the metric sums, waiting for the slowest
rank included) is each rank's `DataParallel.reduce_s`, averaged over ranks; the rest of the
epoch is settling, programming and host work.

    python benchmarks/many_boards.py [--boards 1,2,4] [--epochs 3] [--batch 32] [--repeats 3]

Each configuration runs `--repeats` times, interleaved with the others; the figures are
the median run's.

Every process runs one torch thread. Ranks beyond the machine's cores share them: on a
2-core machine 4 boards cannot scale, and other jobs loading it lower every figure.
At the end, the figures of `benchmarks/placement.py` (if present) follow as JSON lines too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hil.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MAX_BOARDS = 16  # ranks one benchmark job may start on this host
MAX_EPOCHS = 20
MAX_REPEATS = 15
MAX_BATCH = 256  # images per board per step
TRAIN = 1024  # training images: divisible by every global batch 32 x 2^k used here
JOB_TIMEOUT_S = 900


def _config(batch: int, epochs: int) -> RunConfig:
    from hil.config import load_config

    return load_config(
        None,
        [
            f"data.limit_train={TRAIN}", "data.limit_test=64", "model.sizes=[64,256,10]",
            "model.activation=hard_sigmoid",
            f"train.batch_size={batch}", f"train.epochs={epochs}",
        ],
    )  # fmt: skip


def worker(batch: int, epochs: int) -> None:
    """One rank: train and, on rank 0, print the job's figures as one JSON line."""
    import torch

    from hil.distributed import DataParallel, rank_config
    from hil.train_classifier import train_classifier

    torch.set_num_threads(1)
    dp = DataParallel.from_env()
    try:
        cfg = rank_config(_config(batch * dp.world, epochs), dp)
        t0 = time.perf_counter()
        res = train_classifier(cfg, dp=dp)
        wall = time.perf_counter() - t0
        seconds = sum(h.seconds for h in res.history)
        reduce_s, calls = dp.sums([dp.reduce_s, dp.reduce_calls])
        if dp.rank == 0:
            print(
                "FIGURES "
                + json.dumps(
                    {
                        "boards": dp.world,
                        "images": TRAIN * epochs,
                        "seconds": seconds,
                        "wall_s": wall,
                        "reduce_s": reduce_s / dp.world,
                        "reduce_calls": calls / dp.world,
                        "test_acc": res.test_acc,
                    }
                ),
                flush=True,
            )
    except BaseException:
        dp.close(wait=False)
        raise
    dp.close()


def plain(batch: int, epochs: int) -> dict[str, float]:
    """The same training in this process, without torch.distributed."""
    import torch

    from hil.train_classifier import train_classifier

    torch.set_num_threads(1)
    res = train_classifier(_config(batch, epochs))
    return {"seconds": sum(h.seconds for h in res.history), "test_acc": res.test_acc}


def job(boards: int, batch: int, epochs: int) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        str(Path(sys.executable).with_name("torchrun")), "--standalone", f"--nproc-per-node={boards}",
        str(Path(__file__).resolve()), "--worker", f"--batch={batch}", f"--epochs={epochs}",
    ]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S, check=False)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("FIGURES ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"torchrun with {boards} boards failed:\n{out.stdout[-2000:]}{out.stderr[-4000:]}")
    return json.loads(lines[0].removeprefix("FIGURES "))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--boards", default="1,2,4", help="comma-separated rank counts (1 is the baseline)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32, help="images per board per step")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs of each (medians)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    boards = sorted({int(b) for b in args.boards.split(",")} | {1})
    bounds = (1 <= args.epochs <= MAX_EPOCHS, 1 <= args.batch <= MAX_BATCH, 1 <= args.repeats <= MAX_REPEATS)
    if not all(bounds) or max(boards) > MAX_BOARDS:
        raise SystemExit(
            f"--epochs in 1..{MAX_EPOCHS}, --batch in 1..{MAX_BATCH}, --repeats in 1..{MAX_REPEATS}, "
            f"--boards at most {MAX_BOARDS}; got {args.epochs}, {args.batch}, {args.repeats}, {args.boards}"
        )
    if any(0 < TRAIN % (args.batch * b) < b for b in boards):
        raise SystemExit(f"--batch x boards must leave every rank an example of the last of {TRAIN} images")
    if args.worker:
        worker(args.batch, args.epochs)
        return
    # interleaved repeats, medians: the load of other jobs drifts over a run
    plain_ips: list[float] = []
    runs: dict[int, list[dict[str, float]]] = {k: [] for k in boards}
    for _ in range(args.repeats):
        plain_ips.append(TRAIN * args.epochs / plain(args.batch, args.epochs)["seconds"])
        for k in boards:
            runs[k].append(job(k, args.batch, args.epochs))
    base_ips = statistics.median(plain_ips)
    rows = []
    for k in boards:
        r = sorted(runs[k], key=lambda f: f["images"] / f["seconds"])[len(runs[k]) // 2]  # the median run
        rows.append((k, r, r["images"] / r["seconds"]))
    one = next(ips for k, _, ips in rows if k == 1)
    cores = len(os.sched_getaffinity(0))
    print(f"plain (no torch.distributed, one process): {base_ips:.0f} images/s")
    for k, r, ips in rows:
        print(
            f"{k} boards: {ips:.0f} images/s, efficiency {ips / (k * one):.2f}, "
            f"collectives {r['reduce_s'] / r['seconds']:.1%} of the epochs' time"
        )
    load = os.getloadavg()[0]
    for k, r, ips in rows:
        print(
            json.dumps(
                {
                    "bench": "many_boards",
                    "boards": k,
                    "batch_per_board": args.batch,
                    "images_per_s": round(ips, 1),
                    "efficiency": round(ips / (k * one), 3),
                    "vs_plain": round(ips / base_ips, 3),
                    "reduce_fraction": round(r["reduce_s"] / r["seconds"], 4),
                    "settle_fraction": round(1 - r["reduce_s"] / r["seconds"], 4),
                    "reduce_ms_per_call": round(1e3 * r["reduce_s"] / max(1.0, r["reduce_calls"]), 3),
                    "test_acc": round(r["test_acc"], 4),
                    "repeats": args.repeats,
                    "cores": cores,
                    "threads_per_rank": 1,
                    "load_avg_1min": round(load, 2),
                }
            )
        )
    placement = ROOT / "benchmarks" / "placement.py"
    if placement.exists():
        sys.path.insert(0, str(placement.parent))
        from placement import placement_figures  # the tiling engineer's benchmark

        for fig in placement_figures():
            print(json.dumps(fig))


if __name__ == "__main__":
    main()
