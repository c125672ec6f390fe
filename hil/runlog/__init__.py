"""Zarr run logs: one self-describing store per run (layout: docs/runlog.md).

A `RunLog` records the run's config, software versions, device identity and calibration id
(attributes), metrics (appendable 1-D arrays per stream), sub-sampled settle traces, tile
weight/conductance snapshots, programming reports and resume snapshots. Rows go through an
in-memory buffer and are written in chunk-aligned blocks (a one-row zarr append costs about
2-3 ms on this machine's local disk, ~10 ms on slower or networked disks; a buffered row costs
under 10 us), on a timer (`flush_every_s`, 30 s) and at every snapshot, so a SIGKILL loses at
most the unflushed rows; every flush leaves the store consistent. `close()` writes the
complete marker last.

Wiring into a training loop (``--resume RUN`` included; tests/test_runlog.py runs exactly
this loop, killed by SIGKILL and resumed)::

    if resume:
        log, state = open_for_resume(run_dir)  # the run's config: log.config
    else:
        log, state = RunLog.create(run_dir, config, device=dev.info, device_uri=uri), None
    with log:  # clean exit: complete marker; exception: status "failed" + error text
        extra = restore_training(state, model=model, optimizer=opt, scheduler=sched) if state else {}
        order = DataOrder.from_state(extra["order"]) if state else DataOrder(len(x_train), seed)
        step = extra.get("step", 0)
        for epoch, idx in order.batches(batch_size, epochs):
            ...  # train on idx; settles get trace=log.trace_for(step); then log.settle(step, "free", eq)
            log.metrics("train", step=step, epoch=epoch, loss=loss, acc=acc)
            step += 1
            if order.pos == 0:  # the epoch ended
                sched.step()
            if step % snapshot_every == 0 or order.pos == 0:
                log.snapshot(step, training_state(model=model, optimizer=opt, scheduler=sched,
                                                  step=step, order=order.state()))

The project's trainers snapshot at an epoch's end when ``log.snapshot_due(last=...)`` says
so: once `snapshot_every_s` (10 s by default; the config's ``log.snapshot_every_s``) has
passed since the last snapshot, and at the last epoch.

`restore_training` puts the model, optimizer and scheduler states back and the global RNG
states (torch, numpy, Python; a loop that draws only from generators of its own, such as the
project's trainers, leaves them out with ``global_rng=False`` on both sides), and returns the
rest of what `training_state` was given
(here the step to continue from and the data order). A model's own generators
(``torch.Generator``, e.g. ``EBBlock.generator``) go in as extra tensors (``gen.get_state()``).
Everything is stored as arrays and JSON, never pickled. `open_for_resume` drops the rows
written after the last snapshot, so the resumed run appends exactly where it left off.
Errors (garbage, truncated or complete stores, a live writer) are `RunLogError`s: one line
naming the path, for the command line to print and exit 2. Every chunk carries a CRC-32C: a
damaged one raises `RunLogCorrupt` naming the array and chunk, and `open_for_resume` falls back
past damaged snapshots to the newest intact one (docs/runlog.md, "Checksums").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from drivers.lazy import lazy_exports

if TYPE_CHECKING:
    from hil.runlog.layout import FORMAT, FORMAT_VERSION, RunExistsError, RunLogCorrupt, RunLogError
    from hil.runlog.order import DataOrder
    from hil.runlog.reader import Run, open_run
    from hil.runlog.state import restore_rng, restore_training, rng_state, training_state
    from hil.runlog.writer import (
        AnotherBoardWarning,
        RunLog,
        TraceConfig,
        never_started,
        open_for_resume,
    )

# The module each name of the package comes from, imported on the name's first use (PEP 562):
# a reader of a run log (`hil inspect`, `hil plot`) loads the reader's modules, not the
# writer's nor the data order's (torch)
_HOMES = {
    "hil.runlog.layout": ("FORMAT", "FORMAT_VERSION", "RunExistsError", "RunLogCorrupt", "RunLogError"),
    "hil.runlog.order": ("DataOrder",),
    "hil.runlog.reader": ("Run", "open_run"),
    "hil.runlog.state": ("restore_rng", "restore_training", "rng_state", "training_state"),
    "hil.runlog.writer": ("AnotherBoardWarning", "RunLog", "TraceConfig", "never_started", "open_for_resume"),
}

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "AnotherBoardWarning",
    "DataOrder",
    "Run",
    "RunExistsError",
    "RunLog",
    "RunLogCorrupt",
    "RunLogError",
    "TraceConfig",
    "never_started",
    "open_for_resume",
    "open_run",
    "restore_rng",
    "restore_training",
    "rng_state",
    "training_state",
]


__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
