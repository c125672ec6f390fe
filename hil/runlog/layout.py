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
CHECKSUM_CODEC = "crc32c"

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


def has_checksum(array: zarr.Array) -> bool:
    """True when every chunk of `array` carries a CRC-32C (stores before it: False)."""
    return any(getattr(c, "to_dict", lambda: {})().get("name") == CHECKSUM_CODEC for c in array.compressors)


def check_json(value: Any, what: str) -> None:
    """Raise RunLogError unless `value` is strict JSON (no NaN/inf, str keys, plain types)."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise RunLogError(f"{what} must be plain JSON (dict/list/str/number/bool/None): {exc}") from None
