"""Cost of the run log: EP training-step time with a `RunLog` recording (metrics every step,
settle traces of free and both nudged phases at the default sub-sampling, programming
reports every step, tile weights every 100 steps, the default flush timer) as a ratio to the
same steps with logging off, in the same process (target <= 1.05).

The training step is a centered-EP step of a 64-256-10 layered DHN (`hil.ep.EBBlock`) on the
ideal emulator, batch 64 of the digits, Adam, fixed settle budgets (tol = 0, T1 = 40, T2 = 15)
so every step does the same work. Blocks of steps with and without the log alternate; the
logged blocks count their own steps, so traced steps come at their default rate. The flush
timer runs on wall time, half of which the unlogged blocks take, so flushes land in the
logged blocks twice as often as in a real run: their share is overstated. The ratio
is total logged time over total unlogged time, in process CPU time (all threads, zarr's I/O
thread included; other processes' load on this shared machine barely moves it) and in wall
time. Also measured: a one-row zarr ``append`` (what the buffer avoids), one buffered metrics
row, a flush, and a resume snapshot.

Ends with one JSON object per line::

    python benchmarks/runlog.py [--steps 100] [--pairs 40] [--every-steps J] [--settle-stride K]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drivers import Nudge, SettleBudget, open_device
from hil.data import load_digits
from hil.ep import EBBlock
from hil.runlog import RunLog, TraceConfig, training_state
from hil.runlog.writer import FLUSH_EVERY_S

URI = "emulator://?preset=ideal&seed=0"
SIZES, BATCH, BETA, T1, T2 = [64, 256, 10], 64, 0.2, 40, 15


class Trainer:
    """Centered EP on one block; `log` None is logging off."""

    def __init__(self, block: EBBlock, x: torch.Tensor, y: torch.Tensor) -> None:
        self.block, self.x, self.y = block, x, y
        self.target = torch.eye(SIZES[-1])[y].numpy()
        self.opt = torch.optim.Adam(block.weights.values(), lr=1e-3)
        self.gen = torch.Generator().manual_seed(0)
        self.logged = 0  # steps taken with the log on: the run's step index

    def step(self, log: RunLog | None) -> None:
        idx = torch.randint(0, len(self.x), (BATCH,), generator=self.gen)
        x, target, y = self.x[idx], self.target[idx.numpy()], self.y[idx]
        step = self.logged
        trace = log.trace_for(step) if log is not None else 0
        blk, out = self.block, f"s{len(SIZES) - 1}"
        free = blk.settle(x, trace=trace)
        plus = blk.settle(x, {out: Nudge(BETA, target=target)}, init=free.states, trace=trace)
        minus = blk.settle(x, {out: Nudge(-BETA, target=target)}, init=free.states, trace=trace)
        pa, pb = blk.phi_grads(plus.states), blk.phi_grads(minus.states)
        self.opt.zero_grad()
        for tile, p in blk.weights.items():
            p.grad = (pb[tile] - pa[tile]) / (2 * BETA * BATCH)
        self.opt.step()
        pred = free.states[out]  # the loop's own bookkeeping, logged or not
        loss = float(0.5 * ((pred - target) ** 2).sum(1).mean())
        acc = float((torch.from_numpy(pred).argmax(1) == y).float().mean())
        if log is None:
            return
        log.metrics("train", step=step, epoch=0, loss=loss, acc=acc)
        for phase, eq in (("free", free), ("nudged+", plus), ("nudged-", minus)):
            log.settle(step, phase, eq)
        for rep in blk.last_reports.values():
            log.program(step, rep)
        if step % 100 == 0:
            for tile, p in blk.weights.items():
                log.tile(step, tile, weights=p.detach().numpy())
        self.logged += 1


def timed_steps(trainer: Trainer, log: RunLog | None, n: int) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds) of `n` steps."""
    c0, w0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        trainer.step(log)
    return time.process_time() - c0, time.perf_counter() - w0


def micro(folder: Path) -> dict[str, float]:
    """Costs of the primitives, in milliseconds."""
    root = zarr.open_group(str(folder / "micro.zarr"), mode="w")
    arr = root.create_array("x", shape=(0,), chunks=(4096,), dtype="f8")
    n = 200
    t0 = time.perf_counter()
    for i in range(n):
        arr.append(np.array([float(i)]))
    append_ms = 1e3 * (time.perf_counter() - t0) / n
    log = RunLog.create(folder / "m.zarr", {}, flush_every_s=1e9)
    t0 = time.perf_counter()
    for i in range(4000):
        log.metrics("train", step=i, loss=float(i), acc=0.5)
    row_ms = 1e3 * (time.perf_counter() - t0) / 4000
    t0 = time.perf_counter()
    log.flush()
    flush_ms = 1e3 * (time.perf_counter() - t0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 10))
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 64)).sum().backward()
    opt.step()
    t0 = time.perf_counter()
    log.snapshot(0, training_state(model=model, optimizer=opt, step=0))
    snapshot_ms = 1e3 * (time.perf_counter() - t0)
    log.close()
    return {
        "zarr_append_one_row_ms": append_ms,
        "runlog_metrics_row_ms": row_ms,
        "flush_4000_rows_ms": flush_ms,
        "snapshot_64_256_10_adam_ms": snapshot_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="training steps per timed block")
    parser.add_argument("--pairs", type=int, default=40, help="(off, on) block pairs")
    parser.add_argument("--flush-every-s", type=float, default=FLUSH_EVERY_S)
    parser.add_argument("--every-steps", type=int, default=TraceConfig.every_steps)
    parser.add_argument("--settle-stride", type=int, default=TraceConfig.settle_stride)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_digits()
    traces = TraceConfig(every_steps=args.every_steps, settle_stride=args.settle_stride)
    budgets = {
        "free": SettleBudget(max_steps=T1, tol=0.0, dt=0.5, check_every=T1),
        "nudge": SettleBudget(max_steps=T2, tol=0.0, dt=0.5, check_every=T2),
    }
    with tempfile.TemporaryDirectory() as tmp, open_device(URI) as dev:
        folder = Path(tmp)
        block = EBBlock.layered(dev, SIZES, budget=budgets["free"], budgets=budgets, init_scale=0.6)
        trainer = Trainer(block, data.x_train, data.y_train)
        config = {"sizes": SIZES, "batch": BATCH, "beta": BETA, "T1": T1, "T2": T2}
        log = RunLog.create(
            folder / "bench.zarr",
            config,
            device=dev.info,
            device_uri=URI,
            traces=traces,
            flush_every_s=args.flush_every_s,
        )
        timed_steps(trainer, None, 10)  # warm-up
        off, on = [], []
        for _ in range(args.pairs):
            off.append(timed_steps(trainer, None, args.steps))
            on.append(timed_steps(trainer, log, args.steps))
        t0 = time.perf_counter()
        log.flush()  # what the timer costs every `flush_every_s`
        flush_ms = 1e3 * (time.perf_counter() - t0)
        log.close()
        costs = micro(folder)
    n = args.steps * args.pairs
    cpu_off, cpu_on = sum(c for c, _ in off), sum(c for c, _ in on)
    wall_off, wall_on = sum(w for _, w in off), sum(w for _, w in on)
    results = [
        {
            "bench": "runlog_overhead",
            "sizes": SIZES,
            "batch": BATCH,
            "T1": T1,
            "T2": T2,
            "traces": asdict(traces),
            "steps": n,
            "off_ms_per_step": 1e3 * cpu_off / n,
            "on_ms_per_step": 1e3 * cpu_on / n,
            "ratio": cpu_on / cpu_off,
            "wall_off_ms_per_step": 1e3 * wall_off / n,
            "wall_on_ms_per_step": 1e3 * wall_on / n,
            "wall_ratio": wall_on / wall_off,
            "target": 1.05,
            "flush_all_tables_ms": flush_ms,
            "flush_every_s": log.flush_every_s,
        },
        {"bench": "runlog_primitives", **costs},
    ]
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
