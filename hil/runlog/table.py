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
is one preallocated numpy array per column covering the whole current chunk (its committed
rows too, so a flush writes the whole chunk and zarr need not read it back to merge the new
rows in): a row is a few slot assignments (no per-row objects for the garbage collector to
walk), and the buffer is written as soon as it reaches the chunk's end. The owner also flushes
it on a timer, at snapshots and at close. Chunks are written straight to the store where they
can be (`hil.runlog.chunks`: zarr's write path costs milliseconds of Python per array);
`RunLog.flush` writes the columns of all its tables, then commits each table's row count.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync

from hil.runlog.chunks import ChunkWriter, chunk_writer
from hil.runlog.layout import (
    ARRAY_CONFIG,
    COMPRESSORS,
    RunLogError,
    chunk_rows_for,
    column_dims,
    fill_value_for,
    units_for,
    writable,
)


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
        self._writers: dict[str, ChunkWriter | None] = {}  # hil.runlog.chunks: None = through zarr
        for name in attrs.get("columns", []):
            arr = writable(group[name])
            self.arrays[name] = arr
            self.schema[name] = Column(np.dtype(arr.dtype), tuple(arr.shape[1:]))
        self._buf: dict[str, np.ndarray] = {}
        self._stale = True  # the buffer is made at the first row: it reads the chunk's rows back
        self.buffered = 0

    @staticmethod
    def create(parent: zarr.Group, name: str) -> Table:
        group = parent.create_group(name, overwrite=True)
        group.update_attributes({"rows": 0, "columns": [], "chunk_rows": None, "labels": {}})
        return Table(group)

    # ------------------------------------------------------------------------------ writing
    @property
    def room(self) -> int:
        """Rows that fit in the buffer before it is written (the rest of the current chunk;
        unbounded until the first row sets the chunk size)."""
        if self.chunk_rows is None:
            return 2**62
        return self.chunk_rows - self.rows % self.chunk_rows - self.buffered

    @property
    def _pos(self) -> int:
        """Buffer index of the next row (the buffer starts at the current chunk's first row)."""
        assert self.chunk_rows is not None
        return self.rows % self.chunk_rows + self.buffered

    def label(self, column: str, label: str) -> int:
        """The integer code of `label` in a categorical column (new labels get the next code)."""
        names = self.labels.setdefault(column, [])
        if label not in names:
            names.append(label)
        return names.index(label)

    def append(self, row: Mapping[str, Any]) -> None:
        """Buffer one row; values are scalars or arrays of the column's row shape."""
        self._fresh()
        self._prepare(row, np.shape)
        i = self._pos
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
        self._fresh()
        self._prepare(block, lambda v: np.shape(v)[1:])
        done = 0
        while done < n:
            k = min(n - done, self.room)
            i = self._pos
            for name, buf in self._buf.items():
                part = block.get(name)
                buf[i : i + k] = self.schema[name].fill if part is None else part[done : done + k]
            done += k
            self._advance(k)

    def flush(self) -> None:
        """Write the buffered rows: arrays first, then the row count."""
        if not self.buffered:
            return
        self.create_columns()
        pending = self.write_chunks()
        if pending:
            sync(gather(pending))
        self.commit_written()

    def create_columns(self) -> None:
        """Create the arrays of columns that have none yet (before `write_chunks`)."""
        for name, col in self.schema.items():
            if name not in self.arrays:
                self._create_column(name, col)

    def write_chunks(self) -> list[Coroutine[Any, Any, None]]:
        """Write the current chunk of every column from the buffer: whole chunks (the buffer
        holds the chunk's committed rows too), each array grown to the chunk's end first.
        Chunks go straight to the store (`hil.runlog.chunks`) where they can; the writes that
        need zarr (growing an array, an array of an older store) come back as coroutines for
        the caller to run, concurrently, in zarr's event loop before it commits. Writes no row
        count: `commit_written` does, after."""
        if not self.buffered:
            return []
        assert self.chunk_rows is not None
        base = self.rows - self.rows % self.chunk_rows
        stop = base + self.chunk_rows
        pending = []
        for name, col in self.schema.items():
            array = self.arrays[name]
            if name not in self._writers:
                self._writers[name] = chunk_writer(array)
            direct = self._writers[name]
            grow = array.shape[0] < stop  # grow a chunk at a time: one metadata write per chunk
            if direct is not None and not grow:
                direct((base // self.chunk_rows, *(0 for _ in col.inner)), self._buf[name])
            else:
                pending.append(self._write_async(array, (stop, *col.inner) if grow else None, base, name))
        return pending

    async def _write_async(
        self, array: zarr.Array, shape: tuple[int, ...] | None, base: int, name: str
    ) -> None:
        arr = array._async_array
        if shape is not None:
            await arr.resize(shape)
        assert self.chunk_rows is not None
        direct = self._writers[name]
        if direct is None:
            await arr.setitem(slice(base, base + self.chunk_rows), self._buf[name])
        else:
            direct((base // self.chunk_rows, *(0 for _ in self.schema[name].inner)), self._buf[name])

    def commit_written(self) -> None:
        """After `write_chunks` (and its coroutines): commit the row count, then start the next
        chunk's buffer when this one is full (else keep it: its rows are the next flush's
        committed head)."""
        if not self.buffered:
            return
        assert self.chunk_rows is not None
        self._commit(self.rows + self.buffered)
        self.buffered = 0
        if self.rows % self.chunk_rows == 0:
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
        for name, col in new.items():  # earlier rows of a new column: fill
            self._buf[name] = np.full((self.chunk_rows, *col.inner), col.fill, dtype=col.dtype)

    def _fresh(self) -> None:
        if self._stale:
            self._allocate()

    def _allocate(self) -> None:
        """A fresh buffer for the current chunk: fill values, with the chunk's committed rows
        read back from the arrays (after reopening or truncating a table mid-chunk)."""
        self._stale = False
        if self.chunk_rows is None:
            return
        head = self.rows % self.chunk_rows
        self._buf = {}
        for name, col in self.schema.items():
            buf = np.full((self.chunk_rows, *col.inner), col.fill, dtype=col.dtype)
            if head and name in self.arrays:
                buf[:head] = self.arrays[name][self.rows - head : self.rows]
            self._buf[name] = buf

    def _advance(self, n: int) -> None:
        self.buffered += n
        if self.room == 0:
            self.flush()

    def _create_column(self, name: str, col: Column) -> zarr.Array:
        assert self.chunk_rows is not None
        # a column not in `columns` is new to the table; an array already there under its name is
        # the orphan of a flush cut before its commit (the process died between the two), holding
        # no committed row: it is replaced, as rows past the committed count are
        arr = self.group.create_array(
            name,
            overwrite=True,
            shape=(self.rows, *col.inner),
            chunks=(self.chunk_rows, *col.inner),
            dtype=col.dtype,
            fill_value=col.fill,
            compressors=COMPRESSORS,
            config=ARRAY_CONFIG,
            dimension_names=column_dims(self.group.path, name, 1 + len(col.inner)),
            attributes=None if (unit := units_for(self.group.path, name)) is None else {"units": unit},
        )
        if self.rows:  # earlier rows: written out, so every chunk below `rows` exists
            arr[:] = np.full((self.rows, *col.inner), col.fill, dtype=col.dtype)
        self.arrays[name] = arr
        return arr

    def _commit(self, rows: int) -> None:
        self.group.update_attributes(  # one metadata write (attrs.update writes one per key)
            {
                "rows": rows,
                "columns": list(self.arrays),
                "chunk_rows": self.chunk_rows,
                "labels": self.labels,
            }
        )
        self.rows = rows


async def gather(writes: list[Coroutine[Any, Any, Any]]) -> None:
    """Run `writes` concurrently (pass to zarr's ``sync``, which runs it in zarr's event loop)."""
    await asyncio.gather(*writes)
