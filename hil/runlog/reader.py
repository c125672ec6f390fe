"""Reading a run log: open and validate a store, read its tables and snapshots.

`open_run` checks what a reader relies on before anything is read: the folder is a zarr v3
group written by this module (``format`` attribute), every table's committed rows are backed
by its arrays and every chunk file of those rows exists, and every committed snapshot is
complete. Whatever is wrong is raised as one `RunLogError` line naming the path.

Every chunk carries a CRC-32C (docs/runlog.md, "Checksums"): a chunk that does not decode is
raised as `RunLogCorrupt` naming the array and the chunk, by every read (`table`,
`load_snapshot`) and, for the whole store, by `verify` (``open_run(path, verify=True)``, what
`hil inspect` does). Stores written before the checksum are read unchecked.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from hil.runlog.layout import (
    FORMAT,
    FORMAT_VERSION,
    SNAPSHOTS,
    TABLE_GROUPS,
    TRACES,
    RunLogCorrupt,
    RunLogError,
)
from hil.runlog.state import decode_state


class Run:
    """A read-only view of one run log. Use `open_run`; `mode="r+"` is for the writer."""

    def __init__(self, path: str | Path, mode: str = "r") -> None:
        self.path = Path(path)
        self.root = _open_root(self.path, mode)
        self.attrs: dict[str, Any] = self.root.attrs.asdict()
        if self.attrs.get("format") != FORMAT:
            raise RunLogError(
                f"{self.path}: a zarr group but not an xbar-hil run log (no format={FORMAT!r} attribute)"
            )
        version = self.attrs.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise RunLogError(
                f"{self.path}: run-log format version {version!r}; this xbar-hil reads up to {FORMAT_VERSION}"
            )
        for key in ("status", "config", "versions"):
            if key not in self.attrs:
                raise RunLogError(f"{self.path}: root attribute {key!r} is missing (truncated store?)")

    # ------------------------------------------------------------------------------ attributes
    @property
    def status(self) -> str:
        return str(self.attrs["status"])

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete"))

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.attrs["config"])

    @property
    def device(self) -> dict[str, Any] | None:
        return self.attrs.get("device")

    @property
    def boards(self) -> list[dict[str, Any]]:
        """Which board held which EB block (`RunLog.set_boards`); [] if not recorded."""
        return list(self.attrs.get("boards", []))

    # ------------------------------------------------------------------------------ tables
    @cached_property
    def tables(self) -> dict[str, int]:
        """Every table's path (``metrics/train``, ``traces/points``, ``tiles/W0``, ...) and rows."""
        out = {}
        for top in TABLE_GROUPS:
            group = self._group(top)
            if group is None:
                continue
            try:
                names = sorted(group.group_keys())
            except Exception as exc:
                raise RunLogError(f"{self.path}: cannot list {top}: {_short(exc)}") from None
            for name in names:
                sub = self._group(f"{top}/{name}")
                if sub is not None and "rows" in sub.attrs:
                    out[f"{top}/{name}"] = int(sub.attrs["rows"])
        return out

    def streams(self, top: str) -> list[str]:
        """Table names under one top group, e.g. ``streams("metrics") == ["eval", "train"]``."""
        return [p.split("/", 1)[1] for p in self.tables if p.startswith(top + "/")]

    def table(self, path: str) -> dict[str, np.ndarray]:
        """The committed rows of every column of a table."""
        group = self._group(path)
        if group is None or "rows" not in group.attrs:
            raise RunLogError(f"{self.path}: no table {path!r}")
        rows = int(group.attrs["rows"])
        out = {}
        for name in group.attrs.get("columns", []):
            out[name] = self.read(f"{path}/{name}", rows)
        return out

    def read(self, path: str, rows: int | None = None) -> np.ndarray:
        """The first `rows` rows of the array at `path` (None: all of it). A chunk that does not
        decode raises `RunLogCorrupt` naming the array and the chunk."""
        arr = self._array(path)
        sel = Ellipsis if rows is None else slice(0, rows)
        try:
            return np.asarray(arr[sel])
        except Exception as exc:
            bad = self.damaged_chunk(path, rows)
            if bad is None:  # every chunk decodes on its own: not a damaged chunk
                raise RunLogError(f"{self.path}: cannot read {path}: {_short(exc)}") from None
            raise RunLogCorrupt(
                f"{self.path}: cannot read {path}: chunk {bad[0]} is damaged ({_short(exc)})"
            ) from None

    def damaged_chunk(self, path: str, rows: int | None = None) -> tuple[str, int] | None:
        """(chunk key, first row it holds) of the first chunk of the array at `path` (within
        its first `rows` rows; None: all) that does not decode, or None if all of them do."""
        arr = self._array(path)
        if arr.ndim == 0:
            coords: list[tuple[int, ...]] = [()]
        else:
            rows = arr.shape[0] if rows is None else min(rows, arr.shape[0])
            grid = (-(-rows // arr.chunks[0]), *arr.cdata_shape[1:])
            coords = list(np.ndindex(*grid)) if arr.size else []
        for c in coords:
            sel = tuple(slice(i * n, (i + 1) * n) for i, n in zip(c, arr.chunks, strict=True))
            try:
                arr[sel]
            except Exception:
                return arr.metadata.encode_chunk_key(c), (c[0] * arr.chunks[0] if c else 0)
        return None

    def labels(self, path: str, column: str) -> list[str]:
        group = self._group(path)
        return [] if group is None else list(group.attrs.get("labels", {}).get(column, []))

    # ------------------------------------------------------------------------------ snapshots
    @property
    def snapshots(self) -> list[str]:
        """Committed snapshot names, oldest first."""
        group = self._group(SNAPSHOTS)
        return [] if group is None else list(group.attrs.get("committed", []))

    def snapshot_attrs(self, name: str) -> dict[str, Any]:
        group = self._group(f"{SNAPSHOTS}/{name}")
        if group is None:
            raise RunLogError(f"{self.path}: snapshot {name!r} is listed but missing (truncated store?)")
        attrs = group.attrs.asdict()
        for key in ("step", "tables", "state"):
            if key not in attrs:
                raise RunLogError(f"{self.path}: snapshot {name!r} has no {key!r} attribute")
        return attrs

    def load_snapshot(self, name: str) -> tuple[int, dict[str, Any]]:
        """(step, state) of one snapshot, tensors as CPU torch tensors."""
        attrs = self.snapshot_attrs(name)
        group = self._group(f"{SNAPSHOTS}/{name}")
        assert group is not None

        def load(array: str) -> np.ndarray:
            return self.read(f"{SNAPSHOTS}/{name}/{array}")

        return int(attrs["step"]), decode_state(attrs["state"], load)

    def intact_rows(self, path: str) -> int:
        """How many leading committed rows of the table at `path` read back intact in every
        column (its ``rows`` when no chunk is damaged)."""
        rows = self.tables.get(path, 0)
        group = self._group(path)
        if group is None:
            return 0
        for name in group.attrs.get("columns", []):
            try:
                self._array(f"{path}/{name}")[:rows]
            except Exception:
                bad = self.damaged_chunk(f"{path}/{name}", rows)
                if bad is not None:
                    rows = min(rows, bad[1])
        return rows

    # ------------------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise RunLogError unless every committed row and snapshot is fully on disk."""
        for path, rows in self.tables.items():
            group = self._group(path)
            assert group is not None
            chunk = group.attrs.get("chunk_rows")
            for name in group.attrs.get("columns", []):
                arr = self._array(f"{path}/{name}")
                if arr.shape[0] < rows:
                    raise RunLogError(
                        f"{self.path}: {path}/{name} has {arr.shape[0]} rows, the table says {rows} "
                        "(truncated store)"
                    )
                n_chunks = -(-rows // int(chunk)) if rows else 0
                self._check_chunks(arr, [(i,) + (0,) * (arr.ndim - 1) for i in range(n_chunks)])
        starts = self.tables.get(f"{TRACES}/settles")
        if starts:
            settles = self.table(f"{TRACES}/settles")
            end = int(np.max(settles["start"] + settles["length"]))
            if end > self.tables.get(f"{TRACES}/points", 0):
                raise RunLogError(f"{self.path}: traces/settles points past traces/points (truncated store)")
        for name in self.snapshots:
            problem = self.snapshot_problem(name)
            if problem is not None:
                raise RunLogError(f"{self.path}: {problem}")

    def snapshot_problem(self, name: str) -> str | None:
        """Why snapshot `name` is not whole on disk (unreadable metadata, a missing array or
        chunk), or None. A missing chunk would read back as zeros: a resume must not load it."""
        try:
            self.snapshot_attrs(name)
            group = self._group(f"{SNAPSHOTS}/{name}")
            if group is None:
                return f"{SNAPSHOTS}/{name} is missing (truncated store)"
            try:
                arrays = list(group.array_keys())
            except Exception as exc:
                return f"cannot list {SNAPSHOTS}/{name}: {_short(exc)}"
            for array in arrays:
                arr = self._array(f"{SNAPSHOTS}/{name}/{array}")
                self._check_chunks(arr, list(np.ndindex(*arr.cdata_shape)) if arr.size else [])
        except RunLogError as exc:
            return str(exc).removeprefix(f"{self.path}: ")
        return None

    def present_rows(self, path: str) -> tuple[int, str | None]:
        """How many leading committed rows of the table at `path` have every column's chunks
        on disk (a missing chunk reads back as fill values, not as an error), and what is
        missing first (None: nothing)."""
        rows, missing = self.tables.get(path, 0), None
        group = self._group(path)
        if group is None or not rows:
            return 0, None if group is not None else f"{path} is missing (truncated store)"
        chunk = int(group.attrs.get("chunk_rows") or rows)
        for name in group.attrs.get("columns", []):
            try:
                arr = self._array(f"{path}/{name}")
            except RunLogError as exc:
                return 0, str(exc).removeprefix(f"{self.path}: ")
            n = min(rows, arr.shape[0])
            for i in range(-(-n // chunk)):
                key = arr.metadata.encode_chunk_key((i,) + (0,) * (arr.ndim - 1))
                if not (self.path / arr.path / key).is_file():
                    n = i * chunk
                    missing = missing or f"chunk {arr.path}/{key} is missing (truncated store)"
                    break
            rows = min(rows, n)
        return rows, missing

    def verify(self) -> None:
        """`validate`, then decode every chunk of every committed row and snapshot: the first
        damaged one raises `RunLogCorrupt` naming its array and chunk."""
        self.validate()
        for path, rows in self.tables.items():
            group = self._group(path)
            assert group is not None
            for name in group.attrs.get("columns", []):
                self.read(f"{path}/{name}", rows)
        for name in self.snapshots:
            group = self._group(f"{SNAPSHOTS}/{name}")
            assert group is not None
            for array in sorted(group.array_keys()):
                self.read(f"{SNAPSHOTS}/{name}/{array}")

    def _check_chunks(self, arr: zarr.Array, coords: list[tuple[int, ...]]) -> None:
        for c in coords:
            key = arr.metadata.encode_chunk_key(c)
            if not (self.path / arr.path / key).is_file():
                raise RunLogError(f"{self.path}: chunk {arr.path}/{key} is missing (truncated store)")

    def _group(self, path: str) -> zarr.Group | None:
        try:
            node = self.root.get(path)
        except Exception as exc:
            raise RunLogError(f"{self.path}: cannot open {path}: {_short(exc)}") from None
        return node if isinstance(node, zarr.Group) else None

    def _array(self, path: str) -> zarr.Array:
        try:
            node = self.root.get(path)
        except Exception as exc:
            raise RunLogError(f"{self.path}: cannot open {path}: {_short(exc)}") from None
        if not isinstance(node, zarr.Array):
            raise RunLogError(f"{self.path}: array {path} is missing (truncated store)")
        return node


def open_run(path: str | Path, validate: bool = True, verify: bool = False) -> Run:
    """Open a run log for reading; `validate` checks every committed chunk is on disk, `verify`
    also decodes every one of them (checksums: a damaged chunk raises `RunLogCorrupt`)."""
    run = Run(path)
    if verify:
        run.verify()
    elif validate:
        run.validate()
    return run


def _open_root(path: Path, mode: str) -> zarr.Group:
    if not path.exists():
        raise RunLogError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise RunLogError(f"{path}: not a run log (a file, not a zarr store folder)")
    meta = path / "zarr.json"
    if not meta.is_file():
        hint = " (a zarr v2 store?)" if (path / ".zgroup").exists() else ""
        if (path / "run.zarr" / "zarr.json").is_file():  # the run folder `hil train --out` made
            hint = f" (a run folder: its run log is {path / 'run.zarr'}, which `hil inspect` finds by itself)"
        raise RunLogError(f"{path}: not a zarr v3 store (no zarr.json){hint}")
    try:
        root = zarr.open_group(str(path), mode=mode, zarr_format=3)
    except Exception as exc:
        raise RunLogError(f"{path}: unreadable zarr.json: {_short(exc)}") from None
    return root


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
