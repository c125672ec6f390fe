"""Writing whole chunks of run-log arrays straight to a local store, past zarr's write path.

A run log writes many small arrays at every snapshot (each table's current chunk, the
snapshot's arrays), and zarr-python spends about 1.5 ms of Python per array write (5 ms per
array created) whatever its size: a few seconds of a short training run. The chunks of a run
log's arrays are simple: codecs ``bytes`` (little endian), ``zstd`` (level 0, no checksum),
``crc32c`` (`layout.COMPRESSORS`), so a whole chunk is the zstd-compressed bytes of the chunk
followed by the CRC-32C of those bytes, and this module writes that file itself, atomically
(a temporary file in the same folder, then a rename, as zarr's LocalStore does). Readers
(zarr, `hil.runlog.reader`) see the same arrays. Any array this does not recognise (another
store, other codecs or chunk-key encoding: a run log written before the checksum) gets None
from `chunk_writer`, and the caller writes through zarr as before.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import google_crc32c
import numcodecs
import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec
from zarr.storage import LocalStore

ChunkWriter = Callable[[tuple[int, ...], np.ndarray], None]

_ZSTD = numcodecs.Zstd(level=0, checksum=False)


def chunk_writer(array: zarr.Array) -> ChunkWriter | None:
    """A function writing one whole chunk of `array` (chunk coordinates, data of the chunk's
    shape), or None when `array` is not a run-log array on a local store."""
    meta = array.metadata
    store = array.store_path.store
    if getattr(meta, "zarr_format", None) != 3 or not isinstance(store, LocalStore):
        return None
    codecs = tuple(meta.codecs)
    if not (
        len(codecs) == 3
        and isinstance(codecs[0], BytesCodec)
        and (codecs[0].endian is None or codecs[0].endian.value == "little")
        and isinstance(codecs[1], ZstdCodec)
        and codecs[1].level == 0
        and not codecs[1].checksum
        and isinstance(codecs[2], Crc32cCodec)
    ):
        return None
    chunks = tuple(meta.chunk_grid.chunk_shape)  # type: ignore[attr-defined]
    dtype = np.dtype(array.dtype).newbyteorder("<")
    folder = Path(store.root) / array.path

    def write(coords: tuple[int, ...], data: np.ndarray) -> None:
        if data.shape != chunks:
            raise ValueError(f"{array.path}: a chunk of shape {chunks} expected, got {data.shape}")
        raw = np.ascontiguousarray(data, dtype=dtype)
        atomic_write(folder / meta.encode_chunk_key(coords), encode_chunk(raw))

    return write


def encode_chunk(raw: np.ndarray) -> bytes:
    """The stored bytes of one chunk: zstd of its bytes, then their CRC-32C (as zarr's codecs)."""
    compressed = _ZSTD.encode(raw)
    return bytes(compressed) + np.uint32(google_crc32c.value(bytes(compressed))).tobytes()


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class ArrayCopier:
    """Writes new single-chunk arrays (a snapshot's) without zarr's array creation: the first
    array of each shape and dtype is created through zarr, and its metadata document (which
    names no path) is kept; later arrays of that shape and dtype get a copy of it, with their
    own ``dimension_names``, and their one chunk, written as `chunk_writer` does."""

    def __init__(self) -> None:
        self._meta: dict[tuple[tuple[int, ...], str], tuple[dict[str, Any], str] | None] = {}

    def write(
        self, group: zarr.Group, name: str, data: np.ndarray, dimension_names: tuple[str, ...] | None = None
    ) -> bool:
        """Write `data` as the array `name` of `group` (with `dimension_names`); False when it
        has to go through zarr (the caller then creates it and calls `learn`)."""
        known = self._meta.get(_signature(data))
        store = group.store_path.store
        if known is None or not isinstance(store, LocalStore):
            return False
        doc, key = known
        dims = None if dimension_names is None else list(dimension_names)
        meta = json.dumps({**doc, "dimension_names": dims})
        folder = Path(store.root) / group.path / name
        atomic_write(folder / "zarr.json", meta.encode())
        raw = np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("<"))
        atomic_write(folder / key, encode_chunk(raw))
        return True

    def learn(self, array: zarr.Array, data: np.ndarray) -> None:
        """Remember the metadata of `array`, just created through zarr from `data`, when it is
        a one-chunk run-log array on a local store."""
        sig = _signature(data)
        if sig in self._meta:
            return
        ok = (
            data.dtype.byteorder in "=<|"
            and chunk_writer(array) is not None
            and tuple(array.metadata.chunk_grid.chunk_shape) == data.shape  # type: ignore[attr-defined]
        )
        if not ok:
            self._meta[sig] = None
            return
        store = array.store_path.store
        assert isinstance(store, LocalStore)
        doc = json.loads((Path(store.root) / array.path / "zarr.json").read_bytes())
        self._meta[sig] = (doc, array.metadata.encode_chunk_key((0,) * data.ndim))


def _signature(data: np.ndarray) -> tuple[tuple[int, ...], str]:
    return tuple(data.shape), data.dtype.str
