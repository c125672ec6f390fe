"""Names and constants of the run-log store layout (docs/runlog.md is the spec), the error
type, and the few zarr helpers every module shares."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

FORMAT = "xbar-hil.runlog"
FORMAT_VERSION = 1

STATUS_RUNNING = "running"
STATUS_COMPLETE = "complete"
STATUS_FAILED = "failed"

# Groups under the root; each table lives at <group>/<name> (traces: traces/settles, traces/points).
METRICS = "metrics"
TRACES = "traces"
TILES = "tiles"
PROGRAM = "program"
SNAPSHOTS = "snapshots"
TABLE_GROUPS = (METRICS, TRACES, TILES, PROGRAM)

# Every array is written with all of its chunks present, including chunks equal to the fill
# value, so a missing chunk file always means a truncated store.
ARRAY_CONFIG: dict[str, Any] = {"write_empty_chunks": True}

# Every array's chunks: zstd (zarr's default), then a CRC-32C of the compressed bytes (4 bytes
# appended per chunk), so a flipped byte makes the chunk unreadable instead of wrong. Stores written
# before the checksum have zstd only and are read unchecked.
COMPRESSORS = (ZstdCodec(level=0, checksum=False), Crc32cCodec())

# zarr 3 ``dimension_names`` of every array (xarray reads a table group as one Dataset by
# them): the columns of one table share their first (row) dimension, named for what a row is;
# the dimensions after it are named per column below (tile matrices, trace samples), else
# ``<column>.dim<i>``. A snapshot's arrays: ``<array>.dim<i>``.
ROW_DIMS: dict[str, str] = {
    METRICS: "row",
    f"{TRACES}/settles": "settle",
    f"{TRACES}/points": "point",
    TILES: "snapshot",
    PROGRAM: "report",
}
INNER_DIMS: dict[tuple[str, str], tuple[str, ...]] = {
    (TILES, "weights"): ("tile_row", "tile_col"),
    (TILES, "g_plus"): ("tile_row", "tile_col"),
    (TILES, "g_minus"): ("tile_row", "tile_col"),
    (f"{TRACES}/points", "energy"): ("sample",),
}
STATE_PREFIX = "state."  # traces/points: state.<group> (rows, samples, nodes of the group)


def column_dims(table: str, column: str, ndim: int) -> tuple[str, ...]:
    """The dimension names of `column` (an array of `ndim` dimensions) of the table at path
    `table` (e.g. ``metrics/train``, ``tiles/W0``, ``traces/points``)."""
    top = table.split("/", 1)[0]
    row = ROW_DIMS.get(table) or ROW_DIMS.get(top) or "row"
    inner = INNER_DIMS.get((table, column)) or INNER_DIMS.get((top, column))
    if inner is None and table == f"{TRACES}/points" and column.startswith(STATE_PREFIX):
        inner = ("sample", f"{column}.node")
    if inner is None or len(inner) != ndim - 1:
        inner = tuple(f"{column}.dim{i}" for i in range(1, ndim))
    return (row, *inner)


# Units (the array attribute ``units``, SI symbols as UDUNITS/CF write them; "1": a
# dimensionless fraction): the one table of them. By (top group, column) first, then by the
# suffix the project names quantities with (``energy_j``, ``settle_time_s``, a metric
# ``energy_per_image_j``). Arrays of no physical unit (steps, counts, labels, weights in device
# weight units, node states and energies in state units) get no ``units``.
UNITS: dict[tuple[str, str], str] = {
    (TILES, "g_plus"): "S",
    (TILES, "g_minus"): "S",
    (PROGRAM, "residual_max"): "S",
    (PROGRAM, "within_tol"): "1",
}
UNIT_SUFFIXES: dict[str, str] = {"_j": "J", "_s": "s", "_v": "V"}


def units_for(table: str, column: str) -> str | None:
    """The unit of `column` of the table at path `table`, or None when it has none known."""
    unit = UNITS.get((table.split("/", 1)[0], column))
    if unit is not None:
        return unit
    return next((u for suffix, u in UNIT_SUFFIXES.items() if column.endswith(suffix)), None)


def array_dims(name: str, ndim: int) -> tuple[str, ...]:
    """The dimension names of a snapshot's array `name`."""
    return tuple(f"{name}.dim{i}" for i in range(ndim))


TARGET_CHUNK_BYTES = 1 << 20
MAX_CHUNK_ROWS = 4096


class RunLogError(ValueError):
    """A run log cannot be created, read or resumed. The message names the path and the cause,
    in one line, fit for a command-line error."""


class RunExistsError(RunLogError):
    """`RunLog.create` found a run at the path (and was not told to overwrite it): the command
    line turns this into a message that names its own flags (--overwrite, --resume)."""


class RunLogCorrupt(RunLogError):
    """A chunk of the run log does not decode (its checksum does not match, or its compressed
    bytes are damaged): the message names the array and, when known, the chunk."""


def chunk_rows_for(row_bytes: int) -> int:
    """Rows per chunk: a power of two giving chunks of about `TARGET_CHUNK_BYTES`."""
    if row_bytes <= 0:
        return MAX_CHUNK_ROWS
    rows = TARGET_CHUNK_BYTES // row_bytes
    if rows < 1:
        return 1
    return min(MAX_CHUNK_ROWS, 1 << int(math.log2(rows)))


def fill_value_for(dtype: np.dtype) -> Any:
    """Fill of a row a column did not get: NaN for floats, -1 for signed ints, 0/False else."""
    if dtype.kind in "fc":
        return np.nan
    if dtype.kind == "i":
        return -1
    if dtype.kind == "b":
        return False
    return 0


def writable(array: zarr.Array) -> zarr.Array:
    """The same array with the write settings of the run log (the config is not persisted)."""
    return array.with_config(ARRAY_CONFIG)


def check_json(value: Any, what: str) -> None:
    """Raise RunLogError unless `value` is strict JSON (no NaN/inf, str keys, plain types)."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise RunLogError(f"{what} must be plain JSON (dict/list/str/number/bool/None): {exc}") from None
