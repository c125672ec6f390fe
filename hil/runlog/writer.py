"""The run-log writer: one `RunLog` per run, the only writer of its store."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import threading
import time
import warnings
from collections.abc import Coroutine, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync

from drivers.base import Device, DeviceInfo, Equilibrium, ProgramReport
from drivers.numerics import to_numpy
from hil.config import LogConfig
from hil.processes import other_process_alive, stop_signal
from hil.runlog.chunks import ArrayCopier
from hil.runlog.layout import (
    ARRAY_CONFIG,
    COMPRESSORS,
    FORMAT,
    FORMAT_VERSION,
    METRICS,
    PROGRAM,
    SNAPSHOTS,
    STATUS_COMPLETE,
    STATUS_FAILED,
    STATUS_RUNNING,
    TABLE_GROUPS,
    TILES,
    TRACES,
    RunExistsError,
    RunLogCorrupt,
    RunLogError,
    array_dims,
    check_json,
)
from hil.runlog.meta import device_record, device_state, now, versions, writer
from hil.runlog.reader import Run, open_run
from hil.runlog.state import encode_state
from hil.runlog.table import Table, gather

try:
    import fcntl
except ImportError:  # not POSIX: run logs are created without `_store_lock`
    fcntl = None  # type: ignore[assignment]

_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
_RESERVED = ("step", "epoch")
# The writer's defaults are the run config's ``[log]`` defaults (`hil.config.LogConfig` says
# why they are what they are), so a store written without a trainer behaves as one with.
FLUSH_EVERY_S: float = LogConfig.flush_every_s
SNAPSHOT_EVERY_S: float = LogConfig.snapshot_every_s
KEEP_SNAPSHOTS: int = LogConfig.keep_snapshots


@dataclass(frozen=True)
class TraceConfig:
    """Which settle traces are kept.

    every_steps: record the settles of every j-th training step (step % j == 0; 0: none);
    settle_stride: keep every k-th settle iteration (passed to ``Device.settle(trace=k)``; the
    first and last iterations are always kept);
    samples: batch samples whose energies and node states are kept (the batch-mean energy
    is always kept).
    """

    every_steps: int = 50
    settle_stride: int = 4
    samples: int = 4

    def __post_init__(self) -> None:
        if self.every_steps < 0 or self.settle_stride < 1 or self.samples < 1:
            raise RunLogError(
                f"trace settings need every_steps >= 0, settle_stride >= 1, samples >= 1; got {self}"
            )


class RunLog:
    """Writer of one run-log store (layout: docs/runlog.md). Create with `RunLog.create`,
    continue a crashed run with `open_for_resume`. Use as a context manager: a clean exit
    writes the complete marker, an exception marks the run failed (with the exception text)
    and keeps everything flushed so far."""

    def __init__(self, run: Run) -> None:
        self.path = run.path
        self.root = run.root
        opts = run.attrs.get("log", {})
        self.traces = TraceConfig(**opts.get("traces", {}))
        self.flush_every_s = float(opts.get("flush_every_s", FLUSH_EVERY_S))
        self.keep_snapshots = int(opts.get("keep_snapshots", KEEP_SNAPSHOTS))
        self.snapshot_every_s = float(opts.get("snapshot_every_s", SNAPSHOT_EVERY_S))
        self.config: dict[str, Any] = run.config
        self._tables: dict[str, Table] = {}
        for path in run.tables:
            group = self.root[path]
            assert isinstance(group, zarr.Group)
            self._tables[path] = Table(group)
        self._committed: list[str] = run.snapshots
        self._copier = ArrayCopier()  # a snapshot's arrays, past zarr's array creation
        self._last_flush = self._last_snapshot = time.monotonic()
        self._closed = False
        self.resumed_step: int | None = None
        self.last_step: int | None = None  # the last step of a metrics row (`stopped`)
        self.last_epoch: int | None = None  # the epoch (from 1) of the last step of the train metrics
        self.skipped_snapshots: list[dict[str, str]] = []  # damaged ones a resume fell back past

    # ------------------------------------------------------------------------------ creation
    @staticmethod
    def create(
        path: str | Path,
        config: Mapping[str, Any] | Any,
        *,
        kind: str = "train",
        name: str = "",
        device: DeviceInfo | None = None,
        device_uri: str | None = None,
        calibration_id: str | None = None,
        traces: TraceConfig | None = None,
        flush_every_s: float = FLUSH_EVERY_S,
        keep_snapshots: int = KEEP_SNAPSHOTS,
        snapshot_every_s: float = SNAPSHOT_EVERY_S,
        overwrite: bool = False,
    ) -> RunLog:
        """Start a new run at `path` (a folder; ``.zarr`` by convention). `config` is the full
        config of the run: a JSON-serialisable dict, or a dataclass (converted with ``asdict``).
        `flush_every_s`: the flush timer, checked at every write; `keep_snapshots`: how many
        resume snapshots to keep (0: all); `snapshot_every_s`: the least time between the
        snapshots a trainer takes (`snapshot_due`). An existing run at `path` raises `RunExistsError`
        unless `overwrite`, or unless it never started (`never_started`): then it is replaced; a run
        still being written is never replaced. The check and the creation hold `_store_lock`, so of
        two processes creating one store at once, one wins and the other gets `RunExistsError`."""
        path = Path(path)
        if dataclasses.is_dataclass(config) and not isinstance(config, type):
            config = dataclasses.asdict(config)
        config = dict(config)
        check_json(config, "config")
        traces = traces or TraceConfig()
        # the check and the creation as one step: of two runs started at once, one wins
        with _store_lock(path):
            if path.exists() and not overwrite and not never_started(path):
                raise RunExistsError(f"{path}: already exists (pass overwrite=True or pick a new run folder)")
            if path.exists() and overwrite:  # a run still being written would be deleted under its writer
                _check_not_live(path)
            try:
                root = zarr.open_group(str(path), mode="w", zarr_format=3)
            except OSError as exc:
                raise RunLogError(f"{path}: cannot create the store: {exc}") from None
            for top in (*TABLE_GROUPS, SNAPSHOTS):
                root.create_group(top)
            root[SNAPSHOTS].update_attributes({"committed": []})
            # The root attributes last: a store without them is not a run log.
            root.update_attributes(  # one metadata write, so the store becomes a run log at once
                {
                    "format": FORMAT,
                    "format_version": FORMAT_VERSION,
                    "kind": kind,
                    "name": name or path.name.removesuffix(".zarr"),
                    "status": STATUS_RUNNING,
                    "complete": False,
                    "created": now(),
                    "finished": None,
                    "error": None,
                    "config": config,
                    "versions": versions(),
                    "device": None,
                    "device_state": {},
                    "calibration_id": calibration_id,
                    "log": {
                        "traces": dataclasses.asdict(traces),
                        "flush_every_s": flush_every_s,
                        "keep_snapshots": keep_snapshots,
                        "snapshot_every_s": snapshot_every_s,
                    },
                    "writer": writer(),
                    "resumes": [],
                    "stopped": None,
                }
            )
        log = RunLog(Run(path, mode="r+"))
        if device is not None:
            log.set_device(device, uri=device_uri)
        return log

    def set_device(self, info: DeviceInfo, *, uri: str | None = None) -> None:
        """Record the board: *IDN fields, preset, limits, capabilities. A resumed run on a
        board of another identity than the one recorded keeps the one before in the last
        ``resumes`` entry (``device_identity_before``) and says so (`AnotherBoardWarning`)."""
        record = device_record(info, uri)
        update: dict[str, Any] = {"device": record}
        before = self.root.attrs.get("device")
        resumes = list(self.root.attrs.get("resumes", []))
        if isinstance(before, dict) and before.get("idn") not in (None, record["idn"]) and resumes:
            resumes[-1] = {**resumes[-1], "device_identity_before": before["idn"]}
            update["resumes"] = resumes
            warnings.warn(
                f"{self.path}: this run continues on another board ({record['idn']}) than it ran on "
                f"({before['idn']}); the run log keeps both. Every tile is programmed again from the "
                "snapshot; the new board's devices differ, so expect the first steps to differ from "
                "what the old board would have given",
                AnotherBoardWarning,
                stacklevel=2,
            )
        self._update_root(update)

    def device_state(
        self,
        when: str,
        devices: Device | Sequence[Device],
        uris: Sequence[str | None] | None = None,
        *,
        lost: Sequence[Device] = (),
    ) -> None:
        """Record the boards' dynamic counters at the run's ``"start"`` or ``"end"``, like a
        station snapshot: safety counters, meter, status and the driver's recovery statistics
        (`hil.runlog.meta.device_state`), under ``device_state[when]``, one record per device
        URI (`uris`, one per device; a URI given twice, as the VAE's two boards of one URI, gets
        ``#<index>``; no URI: ``device<index>``). A read that fails is recorded as its error,
        so the end of a failed run is recorded too; the boards in `lost` (their link known to be
        gone) are not read (`hil.runlog.meta.LINK_LOST`). A resumed run starts a new ``device_state``
        (`open_for_resume` keeps the one before in its ``resumes`` entry)."""
        if when not in ("start", "end"):
            raise RunLogError(f"device_state: when is 'start' or 'end', got {when!r}")
        self._check_open()
        devs = [devices] if isinstance(devices, Device) else list(devices)
        names = list(uris) if uris is not None else [None] * len(devs)
        if len(names) != len(devs):
            raise RunLogError(f"device_state: {len(devs)} devices but {len(names)} URIs")
        records: dict[str, Any] = {}
        for i, (dev, uri) in enumerate(zip(devs, names, strict=True)):
            key = uri or f"device{i}"
            if key in records:
                key = f"{key}#{i}"
            records[key] = device_state(dev, lost=any(dev is d for d in lost))
        states = {**(self.root.attrs.get("device_state") or {}), when: records}
        self._update_root({"device_state": states})

    def set_boards(self, boards: list[dict[str, Any]]) -> None:
        """Record which board held which block: one JSON record per EB block (block index,
        board index, URI, *IDN, tile names; `Classifier.board_records`), read back as
        `hil.runlog.Run.boards`. A resumed run whose blocks continue on boards of other identities
        keeps the records before in the last ``resumes`` entry (``boards_before``) and says so
        (`AnotherBoardWarning`, one for every block that moved, but those on board 0 then and now,
        whose change `set_device` words)."""
        update: dict[str, Any] = {"boards": [dict(b) for b in boards]}
        before = self.root.attrs.get("boards")
        resumes = list(self.root.attrs.get("resumes", []))
        if isinstance(before, list) and resumes:
            old = {r.get("block"): r for r in before if isinstance(r, dict)}
            moved = [
                (b, old[b.get("block")])
                for b in boards
                if b.get("block") in old and old[b.get("block")].get("idn") not in (None, b.get("idn"))
            ]
            if moved:
                resumes[-1] = {**resumes[-1], "boards_before": [dict(r) for r in before]}
                update["resumes"] = resumes
            # board 0 then and now: the run's `device`, whose change `set_device` words
            told = [(b, o) for b, o in moved if (b.get("board"), o.get("board")) != (0, 0)]
            if told:
                which = "; ".join(
                    f"block {b['block']} continues on {b.get('idn')} ({b.get('uri')}), it ran on "
                    f"{o.get('idn')} ({o.get('uri')})"
                    for b, o in told
                )
                warnings.warn(
                    f"{self.path}: another board than the run's for {which}; the run log keeps both "
                    "(resumes: boards_before). Every tile is programmed again from the snapshot; the "
                    "new board's devices differ, so expect the first steps to differ from what the old "
                    "board would have given",
                    AnotherBoardWarning,
                    stacklevel=2,
                )
        self._update_root(update)

    def set_ranks(self, ranks: list[dict[str, Any]]) -> None:
        """Record the board of every rank of a data parallel job (rank, URI, *IDN, model), read
        back as the run attribute ``ranks``: rank 0's is also the run's ``device``."""
        self._update_root({"ranks": [dict(r) for r in ranks]})

    def set_calibration(self, calibration_id: str | None) -> None:
        self._update_root({"calibration_id": calibration_id})

    def set_resolved(self, values: Mapping[str, Any]) -> None:
        """Record what the config's ``auto`` keys became in this run (dotted key -> value, e.g.
        ``model.activation`` -> ``logistic``): the config keeps ``auto``, whose meaning is the
        code's and may change, so the run says what it used."""
        self._update_root({"resolved": {str(k): v for k, v in values.items()}})

    def set_device_uri(self, uri: str) -> None:
        """Continue a resumed run on another board (the same board at a new address, or its
        replacement): the config's ``device`` becomes `uri`; the last ``resumes`` entry keeps
        the one before as ``device_before``. The trainer then records the board's identity."""
        before = self.config.get("device")
        if before == uri:
            return
        self.config = {**self.config, "device": uri}
        resumes = list(self.root.attrs.get("resumes", []))
        if resumes:
            resumes[-1] = {**resumes[-1], "device_before": before}
        self._update_root({"config": self.config, "resumes": resumes})

    def fallback_notes(self) -> list[str]:
        """One line per damaged snapshot the resume fell back past (`open_for_resume`)."""
        return [
            f"snapshot {s['snapshot']} is damaged ({s['error']}); resuming from step {self.resumed_step}"
            for s in self.skipped_snapshots
        ]

    # ------------------------------------------------------------------------------ metrics
    def metrics(self, stream: str = "train", *, step: int, epoch: int = -1, **values: float) -> None:
        """Append one row to the metrics table `stream` (e.g. ``"train"`` per step, ``"eval"``
        per epoch). Metric names may appear at any row; rows without them read NaN."""
        _check_name(stream, "metrics stream")
        row: dict[str, Any] = {"step": np.int64(step), "epoch": np.int64(epoch)}
        for key, value in values.items():
            if key in _RESERVED:
                raise RunLogError(f"metric name {key!r} is reserved")
            _check_name(key, "metric")
            row[key] = np.float64(value)
        self._append(f"{METRICS}/{stream}", row)
        if self.last_step is None or step >= self.last_step:
            self.last_step = int(step)
            if stream == "train" and epoch >= 0:  # the trainers' per-step rows count epochs from 0
                self.last_epoch = int(epoch) + 1

    # ------------------------------------------------------------------------------ traces
    def trace_for(self, step: int) -> int:
        """The ``trace`` argument for this training step's settles: the settle stride on a
        traced step, 0 (no trace) otherwise."""
        every = self.traces.every_steps
        return self.traces.settle_stride if every and step % every == 0 else 0

    def settle(self, step: int, phase: str, eq: Equilibrium, *, block: str = "") -> None:
        """Record one settle's trace (nothing if `eq` has none). `phase`: ``"free"``,
        ``"nudged+"``, ``"nudged-"`` or any label; `block`: which EB block, when a model has
        several (their node groups get separate columns)."""
        if eq.trace is None:
            return
        tr = eq.trace
        k = self.traces.samples
        energy = np.asarray(tr["energy"], dtype=np.float32)
        n = energy.shape[0]
        points = self._table(f"{TRACES}/points")
        settles = self._table(f"{TRACES}/settles")
        start = points.rows + points.buffered
        block_points: dict[str, np.ndarray] = {
            "settle_step": np.asarray(tr["step"], dtype=np.int32),
            "energy_mean": energy.mean(axis=1),
            "energy": _samples(energy, k),
        }
        prefix = f"state.{block}." if block else "state."
        for group, states in tr.items():
            if group not in ("step", "energy"):
                _check_name(group, "node group")
                block_points[prefix + group] = _samples(np.asarray(states, dtype=np.float32), k)
        points.extend(block_points, n)
        if settles.room == 1:  # this row fills the buffer, which writes itself: points first
            points.flush()
        settles.append(
            {
                "step": np.int64(step),
                "phase": np.int16(settles.label("phase", phase)),
                "block": np.int16(settles.label("block", block)),
                "start": np.int64(start),
                "length": np.int32(n),
                "steps": np.int32(eq.steps),
                "converged": np.bool_(eq.converged),
                "residual": np.float32(eq.residual),
                "batch": np.int32(energy.shape[1]),
                "settle_time_s": np.float64(eq.settle_time_s),
                "energy_j": np.float64(eq.energy_j),
            }
        )
        self._tick()

    # ------------------------------------------------------------------------------ tiles
    def tile(
        self,
        step: int,
        tile: str,
        *,
        weights: np.ndarray | None = None,
        g_plus: np.ndarray | None = None,
        g_minus: np.ndarray | None = None,
    ) -> None:
        """Snapshot one tile: host weights and/or conductances (siemens), float32."""
        _check_name(tile, "tile")
        row: dict[str, Any] = {"step": np.int64(step)}
        for key, value in (("weights", weights), ("g_plus", g_plus), ("g_minus", g_minus)):
            if value is not None:
                row[key] = to_numpy(value)
        self._append(f"{TILES}/{tile}", row)

    def conductances(self, step: int, device: Device, tiles: list[str] | None = None) -> None:
        """Read every tile's conductances from `device` (one read each) and snapshot them."""
        if tiles is None:
            topo = device.topology
            tiles = [] if topo is None else [c.tile for c in topo.couplings]
        for t in tiles:
            gp, gm = device.read_conductance(t)
            self.tile(step, t, g_plus=gp, g_minus=gm)

    def program(self, step: int, report: ProgramReport, *, conductances: bool = False) -> None:
        """Append a programming report; `conductances` also snapshots its read-back G+/G-.
        ``gave_up`` is -1 where the board did not report it (unknown)."""
        _check_name(report.tile, "tile")
        self._append(
            f"{PROGRAM}/{report.tile}",
            {
                "step": np.int64(step),
                "iterations": np.int32(report.iterations),
                "pulses": np.int64(report.pulses),
                "residual_max": np.float64(report.residual_max),
                "within_tol": np.float64(report.within_tol),
                "energy_j": np.float64(report.energy_j),
                "time_s": np.float64(report.time_s),
                "gave_up": np.int64(-1 if report.gave_up is None else report.gave_up),
            },
        )
        if conductances:
            self.tile(step, report.tile, g_plus=report.g_plus, g_minus=report.g_minus)

    def configure(self, *, snapshot_every_s: float, flush_every_s: float, keep_snapshots: int) -> None:
        """Set the writer's settings (a trainer applies its config's ``[log]`` this way, on a
        new run and on a resume alike) and record them in the store's ``log`` attribute."""
        self._check_open()
        self.snapshot_every_s = float(snapshot_every_s)
        self.flush_every_s = float(flush_every_s)
        self.keep_snapshots = int(keep_snapshots)
        opts = {
            **self.root.attrs.get("log", {}),
            "snapshot_every_s": self.snapshot_every_s,
            "flush_every_s": self.flush_every_s,
            "keep_snapshots": self.keep_snapshots,
        }
        self._update_root({"log": opts})

    # ------------------------------------------------------------------------------ snapshots
    def snapshot_due(self, *, last: bool = False) -> bool:
        """Whether a trainer at the end of an epoch should take a snapshot now: at the `last`
        epoch, and once `snapshot_every_s` seconds have passed since the last snapshot (or
        since the log was opened); every epoch with 0."""
        return last or time.monotonic() - self._last_snapshot >= self.snapshot_every_s

    def snapshot(self, step: int, state: Mapping[str, Any]) -> None:
        """Store everything needed to resume at `step` (see `hil.runlog.state` for what
        `state` may hold). Flushes every table first; the snapshot records their row counts,
        so resuming drops rows written after it. The snapshot's arrays and the tables' chunks
        are written first (straight to the store where `hil.runlog.chunks` can, the rest in
        one batch of concurrent zarr writes); then come the tables' row counts, the
        snapshot's attributes and, last, its name in ``committed``."""
        self._check_open()
        tree, arrays = encode_state(state)
        snaps = self.root[SNAPSHOTS]
        assert isinstance(snaps, zarr.Group)
        index = int(self._committed[-1]) + 1 if self._committed else 0
        name = f"{index:06d}"
        group = snaps.create_group(name, overwrite=True)
        created = [
            key
            for key, data in arrays.items()
            if not self._copier.write(group, key, data, array_dims(key, data.ndim))
        ]
        create = group._async_group.create_array
        self._flush(
            create(
                key,
                data=arrays[key],
                compressors=COMPRESSORS,
                config=ARRAY_CONFIG,
                dimension_names=array_dims(key, arrays[key].ndim),
            )
            for key in created
        )
        for key in created:
            array = group[key]
            assert isinstance(array, zarr.Array)
            self._copier.learn(array, arrays[key])
        group.update_attributes(
            {
                "step": int(step),
                "time": now(),
                "tables": {path: t.rows for path, t in self._tables.items()},
                "state": tree,
            }
        )
        committed = [*self._committed, name]
        keep = committed[-self.keep_snapshots :] if self.keep_snapshots else committed
        snaps.update_attributes({"committed": keep})
        self._committed = keep
        for old in set(snaps.group_keys()) - set(keep):
            del snaps[old]
        self._last_snapshot = time.monotonic()

    # ------------------------------------------------------------------------------ lifecycle
    def flush(self) -> None:
        """Write every buffered row (all tables' arrays, then each table's row count)."""
        self._check_open()
        self._flush(())

    def _flush(self, also: Iterable[Coroutine[Any, Any, Any]]) -> None:
        """Flush every table, writing the chunks of all of them (and the writes in `also`; those
        that need zarr concurrently, in one call into its event loop); then commit the row
        counts in sorted path order, so traces/points is committed before the traces/settles
        rows that point into it."""
        tables = [self._tables[path] for path in sorted(self._tables)]
        for table in tables:
            if table.buffered:
                table.create_columns()
        pending = [*also]
        for table in tables:
            pending += table.write_chunks()
        if pending:
            sync(gather(pending))
        for table in tables:
            table.commit_written()
        self._last_flush = time.monotonic()

    def close(self) -> None:
        """Flush and write the complete marker (status "complete"), last. Idempotent."""
        if self._closed:
            return
        with _signals_held():
            self.flush()
            for table in self._tables.values():
                table.trim()
            self._update_root({"status": STATUS_COMPLETE, "complete": True, "finished": now()})
            self._closed = True

    def stopped(self, by: str) -> dict[str, Any]:
        """The ``stopped`` record of a run that ends now, not complete: `by` (``"SIGINT"``,
        ``"SIGTERM"``, ``"error"``), and the last step of a metrics row (null: none yet) and
        the epoch of that step (counted from 1; null: not known)."""
        return {"by": by, "step": self.last_step, "epoch": self.last_epoch}

    def where(self) -> str:
        """Where the run stopped, as words: ``after step 37 (epoch 3)``, ``before its first step``."""
        if self.last_step is None:
            return "before its first step"
        return f"after step {self.last_step}" + (
            f" (epoch {self.last_epoch})" if self.last_epoch is not None else ""
        )

    def fail(self, error: str, stopped: dict[str, Any] | None = None) -> None:
        """Flush what can be flushed and mark the run failed with `error`; `stopped`: how and
        where it stopped (`stopped`; default: by an error, at the last step logged)."""
        if self._closed:
            return
        stopped = stopped or self.stopped("error")
        with _signals_held():
            try:
                self.flush()
                for table in self._tables.values():
                    table.trim()
            except Exception as exc:
                error = f"{error} (and the final flush failed: {type(exc).__name__}: {exc})"
            self._update_root(
                {
                    "status": STATUS_FAILED,
                    "complete": False,
                    "finished": now(),
                    "error": error,
                    "stopped": stopped,
                }
            )
            self._closed = True

    def __enter__(self) -> RunLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        elif issubclass(exc_type, KeyboardInterrupt):  # Ctrl-C, or SIGTERM taken as one (`stop_signal`)
            by = stop_signal() or "SIGINT"
            self.fail(f"interrupted by {by} {self.where()}", self.stopped(by))
        else:
            self.fail(f"{exc_type.__name__}: {exc}" if str(exc) else exc_type.__name__)

    # ------------------------------------------------------------------------------ internals
    def _table(self, path: str) -> Table:
        table = self._tables.get(path)
        if table is None:
            top, name = path.split("/", 1)
            parent = self.root[top]
            assert isinstance(parent, zarr.Group)
            table = Table.create(parent, name)
            self._tables[path] = table
        return table

    def _append(self, path: str, row: Mapping[str, Any]) -> None:
        self._check_open()
        self._table(path).append(row)
        self._tick()

    def _tick(self) -> None:
        """The flush timer, checked at every write."""
        if time.monotonic() - self._last_flush >= self.flush_every_s:
            self.flush()

    def _update_root(self, values: dict[str, Any]) -> None:
        check_json(values, "run attributes")
        self.root.update_attributes(values)  # one metadata write (attrs.update writes one per key)

    def _check_open(self) -> None:
        if self._closed:
            raise RunLogError(f"{self.path}: the run log is closed")


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM held back while the run log writes its final status, then delivered:
    torchrun's SIGTERM (taken as Ctrl-C by the command line) arriving while a failed rank's log
    wrote "failed" cut that write and left the log saying it still ran. In the main thread only
    (the only one Python runs signal handlers in)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    before = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        if handler is not None:  # a handler not set from Python cannot be put back: left alone
            before[sig] = signal.signal(sig, lambda signum, _frame: held.append(signum))
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(held):
            signal.raise_signal(sig)


def open_for_resume(path: str | Path) -> tuple[RunLog, dict[str, Any] | None]:
    """Reopen a crashed or failed run to continue it: returns the writer and the state of the
    last intact snapshot (None if the run had none: start over, the tables are emptied). Rows
    written after that snapshot are dropped, so the resumed run appends exactly where it left off.

    A snapshot is intact when its arrays are whole on disk and decode (checksums), and every
    table chunk below the rows it recorded is on disk and decodes: damaged newer snapshots
    are skipped (named in the ``resumes`` entry, under ``skipped``) and deleted, and the
    tables cut back to the snapshot used. Snapshots that are all damaged raise
    `RunLogCorrupt`."""
    with _store_lock(Path(path)):  # two resumes at once (or a resume and a new run): one goes on
        return _open_for_resume(path)


def _open_for_resume(path: str | Path) -> tuple[RunLog, dict[str, Any] | None]:
    run = open_run(path, validate=False)  # each snapshot and table is checked below, on its own
    if run.complete:
        raise RunLogError(f"{run.path}: the run is complete; nothing to resume")
    _check_writer_gone(run)
    step, state, tables, used = None, None, {}, None
    present = {p: run.present_rows(p) for p in run.tables}
    intact = {p: min(run.intact_rows(p), present[p][0]) for p in run.tables}
    skipped: list[dict[str, str]] = []
    for name in reversed(run.snapshots):
        problem = run.snapshot_problem(name)
        if problem is not None:  # a missing chunk or torn metadata: an older snapshot may be whole
            skipped.append({"snapshot": name, "error": problem})
            continue
        recorded = {p: int(r) for p, r in run.snapshot_attrs(name)["tables"].items()}
        damaged = [p for p, rows in run.tables.items() if min(rows, recorded.get(p, 0)) > intact[p]]
        if damaged:
            skipped.append(
                {"snapshot": name, "error": present[damaged[0]][1] or _table_error(run, damaged[0])}
            )
            continue
        try:
            step, state = run.load_snapshot(name)
        except RunLogCorrupt as exc:
            skipped.append({"snapshot": name, "error": str(exc).removeprefix(f"{run.path}: ")})
            continue
        tables, used = recorded, name
        break
    if skipped and used is None:
        raise RunLogCorrupt(
            f"{run.path}: no intact snapshot to resume from (the newest: {skipped[0]['error']}); "
            "start the run again"
        )
    run = Run(path, mode="r+")
    log = RunLog(run)
    snaps = log.root[SNAPSHOTS]
    assert isinstance(snaps, zarr.Group)
    if used is not None and used != log._committed[-1]:  # damaged snapshots: uncommitted first
        kept = log._committed[: log._committed.index(used) + 1]
        snaps.update_attributes({"committed": kept})
        log._committed = kept
    for table_path, table in log._tables.items():
        table.truncate(int(tables.get(table_path, 0)))
        table.trim()  # also drops chunks of an interrupted flush past the rows kept
    for stray in set(snaps.group_keys()) - set(log._committed):
        del snaps[stray]  # a snapshot interrupted before it was committed, or a damaged one
    entry: dict[str, Any] = {
        "time": now(),
        "from_step": step,
        "status_before": run.status,
        "error_before": run.attrs.get("error"),
    }
    if run.attrs.get("stopped"):
        entry["stopped_before"] = run.attrs["stopped"]
    if skipped:
        entry["skipped"] = skipped
    if run.attrs.get("device_state"):  # the boards' counters of the session before
        entry["device_state_before"] = run.attrs["device_state"]
    resumes = [*run.attrs.get("resumes", []), entry]
    log._update_root(
        {
            "status": STATUS_RUNNING,
            "complete": False,
            "finished": None,
            "error": None,
            "stopped": None,
            "writer": writer(),
            "resumes": resumes,
            "device_state": {},
        }
    )
    log.resumed_step = log.last_step = step
    log.skipped_snapshots = skipped
    return log, state


def never_started(path: str | Path) -> bool:
    """True for a run log whose run failed before it recorded anything (no device, no table
    row, no snapshot), e.g. because its board could not be opened: nothing in it is worth
    keeping, so `RunLog.create` lets a new run take its place without ``overwrite``."""
    try:
        run = open_run(path, validate=False)
    except RunLogError:
        return False
    return (
        run.status == STATUS_FAILED
        and run.device is None
        and not run.snapshots
        and not any(run.tables.values())
    )


def _table_error(run: Run, path: str) -> str:
    """The read error of the table at `path` (one of its chunks is damaged)."""
    try:
        run.table(path)
    except RunLogError as exc:
        return str(exc).removeprefix(f"{run.path}: ")
    return f"cannot read {path}"


class AnotherBoardWarning(UserWarning):
    """A resumed run continues on a board of another identity than the one it ran on."""


@contextlib.contextmanager
def _store_lock(path: Path) -> Iterator[None]:
    """Held while a run log at `path` is created, replaced or reopened for resume, so that
    checking what is there and writing the store (or its ``writer``) is one step: of two
    processes starting a run on one folder at once, one creates it and the other finds it and
    is refused. An exclusive `flock` of the store's parent folder (created if missing), which
    the system releases when the process ends, however it ends; where the file system does not
    lock folders, of a lock file beside the store (``.NAME.lock``, left there)."""
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunLogError(f"{path}: cannot create the store: {exc}") from None
    if fcntl is None:
        yield
        return
    fd = os.open(parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        os.close(fd)
        fd = os.open(parent / f".{path.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
    try:
        yield
    finally:
        os.close(fd)  # and the lock with it


def _check_not_live(path: Path) -> None:
    """Refuse to replace a run log whose writer still runs on this host."""
    try:
        run = open_run(path, validate=False)
    except RunLogError:
        return  # not a run log (or a damaged one): nothing is writing it
    try:
        _check_writer_gone(run)
    except RunLogError as exc:
        raise RunLogError(
            f"{exc}: it cannot be overwritten while it runs; stop that process or pick a new run folder"
        ) from None


def _check_writer_gone(run: Run) -> None:
    """Refuse to resume a run whose writer still runs on this host (one writer per array)."""
    if run.status != STATUS_RUNNING:
        return
    pid = other_process_alive(run.attrs.get("writer"))
    if pid is not None:
        raise RunLogError(f"{run.path}: still being written by process {pid} on this host")


def _check_name(name: str, what: str) -> None:
    if not _NAME.match(name) or name.startswith("__"):
        raise RunLogError(f"{what} name {name!r}: use letters, digits, '_', '.', '-'")


def _samples(x: np.ndarray, k: int) -> np.ndarray:
    """The first `k` samples along axis 1, NaN-padded when the batch is smaller."""
    if x.shape[1] >= k:
        return np.ascontiguousarray(x[:, :k])
    pad = np.full((x.shape[0], k - x.shape[1], *x.shape[2:]), np.nan, dtype=x.dtype)
    return np.concatenate([x, pad], axis=1)
