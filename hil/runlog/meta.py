"""What a run records about its environment: software versions and the device it ran on."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from drivers.base import DeviceInfo
from hil.processes import this_process


def now() -> str:
    """UTC time in ISO 8601, to the millisecond."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def versions() -> dict[str, str | None]:
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
