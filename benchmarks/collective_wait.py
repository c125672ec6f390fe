"""What waiting for a gloo all-reduce interruptibly costs (`hil.distributed.wait_interruptibly`).

Two ranks (two processes on this host, one torch thread each, gloo over loopback) all-reduce
one flat float32 buffer the size of a DHN's gradients, as `DataParallel.reduce_grads` does
each step, and a float64 vector of 8 (the step's metric sums). Each round times `--calls`
all-reduces with the blocking call (``dist.all_reduce(t)``) and as many issued with
``async_op=True`` and waited for in slices (`wait_interruptibly`), the two kinds interleaved
round by round; it prints the median over rounds of the mean time per call, in microseconds,
for each kind and size, and the difference (the cost of being interruptible). The same on a
one-rank group first (no peer to wait for, so the difference is the waiting machinery alone,
without the scheduling noise of two processes on shared cores).

    python benchmarks/collective_wait.py [--rounds 7] [--calls 500]  # one rank, then two
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (name, elements, dtype): the gradients of 64-256-10 (the default model) and of 784-512-10,
# and the metric sums of a step
SIZES = (
    ("grads 64-256-10", 65 * 256 + 257 * 10, "float32"),
    ("grads 784-512-10", 785 * 512 + 513 * 10, "float32"),
    ("metric sums", 8, "float64"),
)


def _rank(rank: int, port: int | None, rounds: int, calls: int) -> None:
    """Rank `rank` of two (`port`: the rendezvous), or the one rank of its own group (None)."""
    import torch
    import torch.distributed as dist

    from hil.distributed import wait_interruptibly

    torch.set_num_threads(1)
    if port is None:
        store, world = dist.HashStore(), 1
    else:
        store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0, timeout=timedelta(seconds=60))
        world = 2
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    ways = {
        "blocking": lambda t: dist.all_reduce(t),
        "interruptible": lambda t: wait_interruptibly(dist.all_reduce(t, async_op=True)),
    }
    out = {}
    for name, n, dtype in SIZES:
        t = torch.ones(n, dtype=getattr(torch, dtype))
        for f in ways.values():  # warm up
            for _ in range(20):
                f(t)
        times: dict[str, list[float]] = {w: [] for w in ways}
        for r in range(rounds):
            for w in sorted(ways, reverse=r % 2 == 1):  # alternate which kind goes first
                dist.barrier()
                t0 = time.perf_counter()
                for _ in range(calls):
                    ways[w](t)
                times[w].append((time.perf_counter() - t0) / calls * 1e6)
        out[name] = {w: statistics.median(v) for w, v in times.items()}
    if rank == 0:
        for name, v in out.items():
            v["added_us"] = v["interruptible"] - v["blocking"]
            print(json.dumps({"ranks": world, "size": name, **{k: round(x, 1) for k, x in v.items()}}))
    dist.destroy_process_group()


def main() -> None:
    import socket
    import subprocess

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not (1 <= args.rounds <= 101 and 1 <= args.calls <= 100_000):
        ap.error("--rounds: 1 to 101, --calls: 1 to 100000")
    if args.rank is not None:
        _rank(args.rank, args.port, args.rounds, args.calls)
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--rounds", str(args.rounds), "--calls", str(args.calls)]
    subprocess.run([*cmd, "--rank", "0"], env=env, check=True)  # one rank, its own group
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [*cmd, "--port", str(port)]
    peer = subprocess.Popen([*cmd, "--rank", "1"], env=env)
    subprocess.run([*cmd, "--rank", "0"], env=env, check=True)
    peer.wait(timeout=60)
    print(f"load average {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} CPUs", file=sys.stderr)


if __name__ == "__main__":
    main()
