"""What a run records about its environment: software versions and the device it ran on."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

import numpy as np

from drivers.errors import RetriesExhausted
from hil.processes import this_process

if TYPE_CHECKING:  # annotations only: drivers.base loads torch (drivers.topology), `hil inspect` needs none
    from drivers.base import Device, DeviceInfo


def now() -> str:
    """UTC time in ISO 8601, to the millisecond."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def versions() -> dict[str, str | None]:
    # torch and zarr are imported here, not by the module: `hil inspect` (summary.plain) and
    # `hil info` (device_record) use this module and need neither
    import torch
    import zarr

    try:
        own = importlib.metadata.version("xbar-hil")
    except importlib.metadata.PackageNotFoundError:
        own = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "zarr": zarr.__version__,
        "xbar-hil": own,
        "git": _git_commit(),
        "platform": platform.platform(),
    }


def _git_commit() -> str | None:
    """The commit of the checkout this package runs from, with ``-dirty`` for local changes;
    None outside a git checkout."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


# The command line is kept whole (every --out and --set); the bounds only keep a pathological
# one (a script passing thousands of arguments, or a data blob as one) from bloating the root
# attributes, which every attribute update rewrites. A cut argv says so in ``argv_total``.
ARGV_ITEMS = 200
ARGV_ITEM_CHARS = 1000


def writer() -> dict[str, Any]:
    """Who writes the store (the one-writer check of `open_for_resume` reads it) and its
    command line."""
    argv = [a if len(a) <= ARGV_ITEM_CHARS else a[:ARGV_ITEM_CHARS] + "..." for a in sys.argv[:ARGV_ITEMS]]
    cut = len(sys.argv) > ARGV_ITEMS or any(len(a) > ARGV_ITEM_CHARS for a in sys.argv[:ARGV_ITEMS])
    return {**this_process(), "argv": argv, **({"argv_total": len(sys.argv)} if cut else {})}


def device_record(info: DeviceInfo, uri: str | None = None) -> dict[str, Any]:
    """`DeviceInfo` as plain JSON: the *IDN fields, preset, limits, capabilities, extras."""
    limits = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(info.limits).items()}
    return {
        "idn": info.identity.idn(),
        "identity": dataclasses.asdict(info.identity),
        "preset": info.preset,
        "uri": uri,
        "limits": limits,
        "capabilities": sorted(info.capabilities),
        "extra": dict(info.extra),
    }


LINK_LOST = "not read: the link to the board was lost"


def device_state(device: Device, *, lost: bool = False) -> dict[str, Any]:
    """The board's dynamic counters now, as plain JSON (a station snapshot): `safety`
    (refused, violations), `meter` (clock_s, energy_j, mvm_calls; null: the board keeps none),
    `status` (epoch, transaction, configured, arrays_id) and, where the driver has them (a remote
    board's link), `recovery` (failures, retries, reconnects, resets, reconfigured, exhausted, arrays_lost).
    Each is read on its own: one that fails (a lost board at a failed run's end) is recorded as
    ``{"error": ...}`` and the others still are, except after a read whose driver gave up on
    the link (`RetriesExhausted`), and with `lost` (a board whose link is known to be gone):
    the board's reads are then recorded as `LINK_LOST`, not sent through the driver's whole
    retry budget each (the driver's own `recovery` is still read)."""
    out: dict[str, Any] = {"time": now()}
    reads: dict[str, Any] = {
        "safety": lambda: dataclasses.asdict(device.safety()),
        "meter": lambda: None if (m := device.meter()) is None else dataclasses.asdict(m),
        "status": lambda: dataclasses.asdict(device.status()),
    }
    recovery = recovery_stats(device)
    if recovery is not None:
        reads["recovery"] = recovery.as_dict
    for key, read in reads.items():
        if lost and key != "recovery":
            out[key] = {"error": LINK_LOST}
            continue
        try:
            out[key] = _finite(read())
        except Exception as exc:
            out[key] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            lost = lost or isinstance(exc, RetriesExhausted)
    return out


def recovery_stats(device: Device) -> Any:
    """The driver's recovery statistics (an object with ``as_dict``), looked for through the
    wrappers (calibration, tiling, shared-board views) down to the driver; None if none."""
    seen: set[int] = set()
    dev: Any = device
    while dev is not None and id(dev) not in seen:
        seen.add(id(dev))
        own = getattr(dev, "__dict__", {})  # not getattr: a wrapper's __getattr__ may forward
        stats = own.get("recovery")
        if stats is not None and callable(getattr(stats, "as_dict", None)):
            return stats
        dev = own.get("inner")
    return None


def plain(value: Any) -> Any:
    """`value` as strict JSON data (what the commands' ``--json`` write): numpy scalars and
    arrays as numbers and lists, tuples as lists, paths as strings, NaN and infinities as null."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return plain(value.tolist())
    if isinstance(value, np.generic):
        return plain(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, PurePath):
        return str(value)
    return value


def _finite(value: Any) -> Any:
    """`value` with non-finite floats as None (the run attributes are strict JSON)."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
