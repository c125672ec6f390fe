"""The text summary of a run that `hil inspect` prints."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from hil.runlog.layout import METRICS, PROGRAM, TILES, TRACES
from hil.runlog.meta import plain
from hil.runlog.reader import Run

_INDEX = ("step", "epoch")


def summary(run: Run) -> str:
    a = run.attrs
    lines = [f"run          {run.path}  (kind {a.get('kind', '?')}, name {a.get('name', '?')})"]
    status = f"status       {run.status}  created {a.get('created')}"
    if a.get("finished"):
        status += f"  finished {a['finished']}"
    lines.append(status)
    if a.get("error"):
        lines.append(f"error        {a['error']}")
    if isinstance(stopped := a.get("stopped"), dict):
        lines.append(f"stopped      {_stopped(stopped)}")
    for r in a.get("resumes", []):
        was = r.get("status_before")
        start = r.get("from_step")
        origin = "the start (no snapshot had been taken)" if start is None else f"step {start}"
        lines.append(f"resumed      {r.get('time')} from {origin} (was {was})")
        for skip in r.get("skipped", []):
            lines.append(f"             skipped damaged snapshot {skip.get('snapshot')}: {skip.get('error')}")
    v = a.get("versions", {})
    lines.append("versions     " + "  ".join(f"{k} {val}" for k, val in v.items() if k != "platform"))
    lines += _device(run.device)
    for b in run.boards:  # which board held which EB block (`RunLog.set_boards`)
        label = f"block {b.get('block')}"
        lines.append(f"{label:<13}board {b.get('board')}: {b.get('idn')}  uri {b.get('uri')}")
    for r in a.get("ranks") or []:  # a data parallel job's board per rank (`RunLog.set_ranks`)
        label = f"rank {r.get('rank')}"
        lines.append(f"{label:<13}{r.get('idn')}  uri {r.get('uri')}")
    lines += _device_state(a.get("device_state") or {})
    lines.append(f"calibration  {a.get('calibration_id') or 'none'}")
    if resolved := a.get("resolved"):
        lines.append("resolved     " + ", ".join(f"{k} = {v}" for k, v in resolved.items()))
    lines.append("config")
    lines += [f"  {k} = {json.dumps(val)}" for k, val in _flatten(run.config)] or ["  (empty)"]
    lines += _metrics(run)
    lines += _traces(run)
    lines += _tiles(run)
    snaps = run.snapshots
    if snaps:
        last = run.snapshot_attrs(snaps[-1])
        lines.append(f"snapshots    {len(snaps)} kept, last at step {last['step']} ({last.get('time')})")
    else:
        lines.append("snapshots    none")
    return "\n".join(lines)


def _stopped(stopped: dict[str, Any]) -> str:
    """The root attribute ``stopped`` in words: ``by SIGTERM after step 37 (epoch 3)``."""
    by, step, epoch = stopped.get("by"), stopped.get("step"), stopped.get("epoch")
    where = "before its first step" if step is None else f"after step {step}"
    return f"by {by} {where}" + ("" if step is None or epoch is None else f" (epoch {epoch})")


def _device(dev: dict[str, Any] | None) -> list[str]:
    if not dev:
        return ["device       not recorded"]
    out = [f"device       {dev.get('idn')}  preset {dev.get('preset') or '-'}  uri {dev.get('uri') or '-'}"]
    lim = dev.get("limits") or {}
    if lim:
        out.append(
            f"             G {lim.get('g_min'):.3g}..{lim.get('g_max'):.3g} S, "
            f"DAC {_bits(lim.get('dac_bits'))}, ADC {_bits(lim.get('adc_bits'))}, "
            f"tiles up to {lim.get('tile_rows_max')}x{lim.get('tile_cols_max')}, "
            f"v_read {lim.get('v_read')} V"
        )
    return out


def _device_state(states: dict[str, Any]) -> list[str]:
    """One line for the boards' counters at the run's start and one at its end
    (`RunLog.device_state`); several boards are separated by ``|``."""
    out = []
    for when in ("start", "end"):
        records = states.get(when)
        if records:
            boards = " | ".join(f"{uri}: {_counters(rec)}" for uri, rec in records.items())
            out.append(f"{'board ' + when:<13}{boards}")
    return out


def _counters(rec: dict[str, Any]) -> str:
    def read(key: str) -> Any:
        value = rec.get(key)
        return value.get("error", "?") if isinstance(value, dict) and "error" in value else value

    parts = []
    safety = read("safety")
    if isinstance(safety, dict):
        parts.append(f"violations {safety.get('violations')}, refused {safety.get('refused')}")
    elif safety is not None:
        parts.append(f"safety unread ({safety})")
    meter = read("meter")
    if isinstance(meter, dict):
        parts.append(
            f"clock {_num(meter.get('clock_s'))} s, {_num(meter.get('energy_j'))} J, "
            f"{meter.get('mvm_calls')} mvm"
        )
    else:
        parts.append("no meter" if meter is None else f"meter unread ({meter})")
    status = read("status")
    if isinstance(status, dict):
        open_tx = status.get("transaction")
        parts.append(f"epoch {status.get('epoch')}" + (f", open transaction {open_tx}" if open_tx else ""))
    elif status is not None:
        parts.append(f"status unread ({status})")
    recovery = read("recovery")
    if isinstance(recovery, dict):
        counts = ", ".join(f"{k} {v}" for k, v in recovery.items() if v)
        parts.append(f"recovery {counts or 'none'}")
    elif recovery is not None:
        parts.append(f"recovery unread ({recovery})")
    return "; ".join(parts)


def _num(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, int | float) else str(x)


def _metrics(run: Run) -> list[str]:
    streams = run.streams(METRICS)
    if not streams:
        return ["metrics      none"]
    out = []
    for s in streams:
        t = run.table(f"{METRICS}/{s}")
        steps = t.get("step", np.zeros(0))
        n = len(steps)
        span = f", steps {steps[0]}..{steps[-1]}" if n else ""
        epochs = t.get("epoch")
        if n and epochs is not None and epochs.max() >= 0:
            span += f", epochs {epochs.min()}..{epochs.max()}"
        out.append(f"metrics      {s}: {n} rows{span}")
        names = [c for c in t if c not in _INDEX]
        if not n or not names:
            continue
        width = max(len(c) for c in names)
        out.append(f"  {'name':<{width}}  {'last':>12}  {'min':>12}  {'max':>12}")
        for c in names:
            col = t[c].astype(np.float64)
            ok = col[np.isfinite(col)]
            last = ok[-1] if ok.size else np.nan
            lo, hi = (ok.min(), ok.max()) if ok.size else (np.nan, np.nan)
            out.append(f"  {c:<{width}}  {last:>12.6g}  {lo:>12.6g}  {hi:>12.6g}")
    return out


def _traces(run: Run) -> list[str]:
    opts = run.attrs.get("log", {}).get("traces", {})
    cfg = (
        f"every {opts.get('every_steps')} steps, settle stride {opts.get('settle_stride')}, "
        f"{opts.get('samples')} samples"
    )
    if f"{TRACES}/settles" not in run.tables:
        return [f"traces       none ({cfg})"]
    t = run.table(f"{TRACES}/settles")
    if not len(t.get("step", ())):  # created, nothing flushed yet (a run killed early)
        return [f"traces       none flushed ({cfg})"]
    labels = run.labels(f"{TRACES}/settles", "phase")
    counts = ", ".join(
        f"{lab} {int(np.sum(t['phase'] == i))}" for i, lab in enumerate(labels) if np.any(t["phase"] == i)
    )
    n_steps = len(np.unique(t["step"]))
    return [f"traces       {len(t['step'])} settles at {n_steps} training steps ({counts}); {cfg}"]


def _tiles(run: Run) -> list[str]:
    out = []
    for tile, r in _tiles_record(run).items():
        dims = "x".join(map(str, r["shape"]))
        out.append(f"tile         {tile} {dims}: {r['snapshots']} snapshots ({', '.join(r['arrays'])})")
    for tile in run.streams(PROGRAM):
        t = run.table(f"{PROGRAM}/{tile}")
        if not len(t.get("step", ())):
            continue
        # gave_up: -1 where the board did not report it; absent in logs older than the column
        gave = int(t["gave_up"][-1]) if len(t.get("gave_up", ())) else -1
        out.append(
            f"program      {tile}: {len(t['step'])} reports, {int(t['pulses'].sum())} pulses in all; last: "
            f"{int(t['iterations'][-1])} iterations, {t['within_tol'][-1]:.1%} within tol, "
            f"residual {t['residual_max'][-1]:.3g} S" + (f", gave up on {gave} devices" if gave >= 0 else "")
        )
    return out


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out += _flatten(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def _bits(bits: int | None) -> str:
    return f"{bits} bit" if bits else "ideal"


def summary_record(run: Run) -> dict[str, Any]:
    """What `hil inspect --json` writes: the summary's content as one JSON object, its keys
    stable (docs/runlog.md, "hil inspect --json"). Numbers stay numbers; a NaN or infinite one
    is null."""
    a = run.attrs
    snaps = run.snapshots
    last = run.snapshot_attrs(snaps[-1]) if snaps else None
    return plain(
        {
            "path": str(run.path),
            "kind": a.get("kind"),
            "name": a.get("name"),
            "status": run.status,
            "created": a.get("created"),
            "finished": a.get("finished"),
            "error": a.get("error"),
            "stopped": a.get("stopped"),
            "resumes": a.get("resumes", []),
            "versions": a.get("versions", {}),
            "device": run.device or None,
            "boards": run.boards,
            "ranks": a.get("ranks") or [],
            "device_state": a.get("device_state") or {},
            "calibration_id": a.get("calibration_id") or None,
            "resolved": a.get("resolved") or {},
            "config": run.config,
            "metrics": _metrics_record(run),
            "traces": _traces_record(run),
            "tiles": _tiles_record(run),
            "program": _program_record(run),
            "snapshots": {
                "kept": len(snaps),
                "last_step": None if last is None else last["step"],
                "last_time": None if last is None else last.get("time"),
            },
        }
    )


def _metrics_record(run: Run) -> dict[str, Any]:
    """Per stream: ``rows``, ``steps`` and ``epochs`` ([first, last] / [min, max]; null when
    empty) and, per column, its ``last``, ``min`` and ``max`` over the finite values."""
    out: dict[str, Any] = {}
    for s in run.streams(METRICS):
        t = run.table(f"{METRICS}/{s}")
        steps = t.get("step", np.zeros(0))
        epochs = t.get("epoch")
        n = len(steps)
        has_epochs = n and epochs is not None and epochs.max() >= 0
        columns = {}
        for c in (c for c in t if c not in _INDEX):
            col = t[c].astype(np.float64)
            ok = col[np.isfinite(col)]
            columns[c] = {
                "last": ok[-1] if ok.size else None,
                "min": ok.min() if ok.size else None,
                "max": ok.max() if ok.size else None,
            }
        out[s] = {
            "rows": n,
            "steps": [steps[0], steps[-1]] if n else None,
            "epochs": [epochs.min(), epochs.max()] if has_epochs else None,
            "columns": columns,
        }
    return out


def _traces_record(run: Run) -> dict[str, Any]:
    """``settles`` and ``steps`` traced (0 when none), ``phases`` (settles per phase) and the
    writer's trace ``options``."""
    opts = run.attrs.get("log", {}).get("traces", {})
    empty = {"settles": 0, "steps": 0, "phases": {}, "options": opts}
    if f"{TRACES}/settles" not in run.tables:
        return empty
    t = run.table(f"{TRACES}/settles")
    if not len(t.get("step", ())):
        return empty
    labels = run.labels(f"{TRACES}/settles", "phase")
    phases = {lab: int(np.sum(t["phase"] == i)) for i, lab in enumerate(labels) if np.any(t["phase"] == i)}
    return {"settles": len(t["step"]), "steps": len(np.unique(t["step"])), "phases": phases, "options": opts}


def _tiles_record(run: Run) -> dict[str, Any]:
    """Per tile with snapshots: ``shape`` (rows, cols), ``snapshots`` and the ``arrays`` kept."""
    out: dict[str, Any] = {}
    for tile in run.streams(TILES):
        t = run.table(f"{TILES}/{tile}")
        if not len(t.get("step", ())):
            continue
        kinds = [c for c in ("weights", "g_plus", "g_minus") if c in t]
        shape = next((t[c].shape[1:] for c in kinds), ())
        out[tile] = {"shape": list(shape), "snapshots": len(t["step"]), "arrays": kinds}
    return out


def _program_record(run: Run) -> dict[str, Any]:
    """Per tile with programming reports: ``reports``, ``pulses`` in all and the ``last``
    report's ``iterations``, ``within_tol`` (a fraction), ``residual_max`` (siemens) and
    ``gave_up`` (null where the board did not report it)."""
    out: dict[str, Any] = {}
    for tile in run.streams(PROGRAM):
        t = run.table(f"{PROGRAM}/{tile}")
        if not len(t.get("step", ())):
            continue
        gave = int(t["gave_up"][-1]) if len(t.get("gave_up", ())) else -1
        out[tile] = {
            "reports": len(t["step"]),
            "pulses": int(t["pulses"].sum()),
            "last": {
                "iterations": int(t["iterations"][-1]),
                "within_tol": t["within_tol"][-1],
                "residual_max": t["residual_max"][-1],
                "gave_up": gave if gave >= 0 else None,
            },
        }
    return out
