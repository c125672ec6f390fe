"""Tables: a zarr group of arrays that share their first (row) axis, appended through an
in-memory buffer.

A table's group attributes say how many rows are committed (``rows``), which arrays are its
columns (``columns``), the rows per chunk (``chunk_rows``) and the labels of categorical
columns (``labels``). A flush writes the arrays first (grown a chunk at a time, then the new
rows) and the attributes last, each file atomically (zarr's LocalStore writes a temporary file
and renames it), so a process killed at any point leaves the store consistent: readers take
``rows`` rows and ignore what lies past them (the rest of the last chunk, or rows of an
interrupted flush). Closing a run trims every column to ``rows``.

Why a buffer: a one-row zarr ``append`` costs milliseconds (it rewrites the array metadata
and the whole last chunk), far more than a training step can afford every step. The buffer
is one preallocated numpy array per column covering the rest of the current chunk: a row is
a few slot assignments (no per-row objects for the garbage collector to walk), and the buffer
is written as soon as it reaches the chunk's end, so full writes are whole, aligned chunks.
The owner also flushes it on a timer, at snapshots and at close.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from hil.runlog.layout import ARRAY_CONFIG, COMPRESSORS, RunLogError, chunk_rows_for, fill_value_for, writable


@dataclass(frozen=True)
class Column:
    dtype: np.dtype
    inner: tuple[int, ...]  # shape of one row

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.inner, dtype=np.int64)) * self.dtype.itemsize

    @property
    def fill(self) -> Any:
        return fill_value_for(self.dtype)


class Table:
    """The one writer of a table's arrays. Create with `Table.create`, reopen with `Table(group)`."""

    def __init__(self, group: zarr.Group) -> None:
        self.group = group
        attrs = group.attrs.asdict()
        self.rows = int(attrs.get("rows", 0))
        chunk = attrs.get("chunk_rows")
        self.chunk_rows: int | None = None if chunk is None else int(chunk)
        self.labels: dict[str, list[str]] = {k: list(v) for k, v in attrs.get("labels", {}).items()}
        self.arrays: dict[str, zarr.Array] = {}
        self.schema: dict[str, Column] = {}
        for name in attrs.get("columns", []):
            arr = writable(group[name])
            self.arrays[name] = arr
            self.schema[name] = Column(np.dtype(arr.dtype), tuple(arr.shape[1:]))
        self._buf: dict[str, np.ndarray] = {}
        self.buffered = 0
        self._allocate()

    @staticmethod
    def create(parent: zarr.Group, name: str) -> Table:
        group = parent.create_group(name, overwrite=True)
        group.attrs.update({"rows": 0, "columns": [], "chunk_rows": None, "labels": {}})
        return Table(group)

    # ------------------------------------------------------------------------------ writing
    @property
    def room(self) -> int:
        """Rows that fit in the buffer before it is written (the rest of the current chunk;
        unbounded until the first row sets the chunk size)."""
        if self.chunk_rows is None:
            return 2**62
        return self.chunk_rows - self.rows % self.chunk_rows - self.buffered

    def label(self, column: str, label: str) -> int:
        """The integer code of `label` in a categorical column (new labels get the next code)."""
        names = self.labels.setdefault(column, [])
        if label not in names:
            names.append(label)
        return names.index(label)

    def append(self, row: Mapping[str, Any]) -> None:
        """Buffer one row; values are scalars or arrays of the column's row shape."""
        self._prepare(row, np.shape)
        i = self.buffered
        for name, buf in self._buf.items():
            value = row.get(name)
            buf[i] = self.schema[name].fill if value is None else value
        self._advance(1)

    def extend(self, block: Mapping[str, np.ndarray], n: int) -> None:
        """Buffer `n` rows given as one array of shape ``(n, *row_shape)`` per column."""
        block = {k: np.asarray(v) for k, v in block.items()}
        for name, arr in block.items():
            if arr.shape[:1] != (n,):
                raise RunLogError(f"column {name!r}: {n} rows expected, got an array of shape {arr.shape}")
        self._prepare(block, lambda v: np.shape(v)[1:])
        done = 0
        while done < n:
            k = min(n - done, self.room)
            i = self.buffered
            for name, buf in self._buf.items():
                part = block.get(name)
                buf[i : i + k] = self.schema[name].fill if part is None else part[done : done + k]
            done += k
            self._advance(k)

    def flush(self) -> None:
        """Write the buffered rows: arrays first, then the row count."""
        if not self.buffered:
            return
        assert self.chunk_rows is not None
        end = self.rows + self.buffered
        for name, col in self.schema.items():
            arr = self.arrays.get(name)
            if arr is None:
                arr = self._create_column(name, col)
            if arr.shape[0] < end:  # grow a chunk at a time: one metadata write per chunk
                arr.resize((-(-end // self.chunk_rows) * self.chunk_rows, *col.inner))
            arr[self.rows : end] = self._buf[name][: self.buffered]
        self._commit(end)
        self.buffered = 0
        self._allocate()

    def truncate(self, rows: int) -> None:
        """Drop rows past `rows` (the count first, then the arrays) and the buffer."""
        if rows > self.rows:
            raise RunLogError(f"{self.group.path!r} has {self.rows} rows, cannot keep {rows}")
        self.buffered = 0
        if rows != self.rows:
            self._commit(rows)
            self.trim()
        self._allocate()

    def trim(self) -> None:
        """Cut every column to exactly the committed rows (done at close)."""
        for name, arr in self.arrays.items():
            if arr.shape[0] != self.rows:
                arr.resize((self.rows, *self.schema[name].inner))

    # ------------------------------------------------------------------------------ internals
    def _prepare(self, values: Mapping[str, Any], row_shape: Callable[[Any], tuple[int, ...]]) -> None:
        """Check values against the schema; add columns seen for the first time."""
        new = {}
        for name, value in values.items():
            col = self.schema.get(name)
            shape = tuple(row_shape(value))
            if col is None:
                dtype = np.asarray(value).dtype
                if dtype.kind not in "biufc":
                    raise RunLogError(f"column {name!r}: numeric values only, got dtype {dtype}")
                new[name] = Column(dtype, shape)
            elif shape != col.inner:
                raise RunLogError(
                    f"column {name!r} of {self.group.path!r}: rows of shape {col.inner} expected, got {shape}"
                )
        if not new:
            return
        self.schema.update(new)
        if self.chunk_rows is None:
            self.chunk_rows = chunk_rows_for(max(c.row_bytes for c in self.schema.values()))
        if not self._buf:
            self._allocate()
            return
        for name, col in new.items():  # earlier buffered rows of a new column: fill
            self._buf[name] = np.full((self._capacity(), *col.inner), col.fill, dtype=col.dtype)

    def _capacity(self) -> int:
        assert self.chunk_rows is not None
        return self.chunk_rows - self.rows % self.chunk_rows

    def _allocate(self) -> None:
        if self.chunk_rows is None:
            return
        cap = self._capacity()
        self._buf = {n: np.empty((cap, *c.inner), dtype=c.dtype) for n, c in self.schema.items()}

    def _advance(self, n: int) -> None:
        self.buffered += n
        if self.room == 0:
            self.flush()

    def _create_column(self, name: str, col: Column) -> zarr.Array:
        assert self.chunk_rows is not None
        arr = self.group.create_array(
            name,
            shape=(self.rows, *col.inner),
            chunks=(self.chunk_rows, *col.inner),
            dtype=col.dtype,
            fill_value=col.fill,
            compressors=COMPRESSORS,
            config=ARRAY_CONFIG,
        )
        if self.rows:  # earlier rows: written out, so every chunk below `rows` exists
            arr[:] = np.full((self.rows, *col.inner), col.fill, dtype=col.dtype)
        self.arrays[name] = arr
        return arr

    def _commit(self, rows: int) -> None:
        self.group.attrs.update(
            {
                "rows": rows,
                "columns": list(self.arrays),
                "chunk_rows": self.chunk_rows,
                "labels": self.labels,
            }
        )
        self.rows = rows
