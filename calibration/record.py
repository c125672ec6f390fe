"""The calibration record: what a session measured on one board, and its Zarr store.

Layout of ``cal.zarr`` (format ``xbar-hil-calibration``, version `FORMAT_VERSION`)::

    /                         attrs: format, version, identity {manufacturer, model, serial,
                              firmware}, idn, created (UTC ISO 8601), routines, limits,
                              channel_map (text), session {options, durations, software}
    /converters/<bank>/       bank in dac | adc | mvm; arrays gain, offset, gain_se,
                              offset_se (C,), valid (C,) bool; attrs lsb, units, transfer,
                              info; raw/ the measurements the fit used
    /tiles/<position>/        attrs shape (rows, cols); one subgroup per routine:
        gmap/                 target, mean, std (2, rows, cols); attrs reads, read_noise, ...
        stuck/                stuck (bool), value, low, high (2, rows, cols); attrs ...
        pulse/                g_lo, g_hi, dw_up, dw_down and their *_se, valid (2, rows, cols);
                              attrs kind, one_sided, gamma_up, gamma_down, summary;
                              raw/ sampled pulse-response curves
    /settle/                  attrs summary; arrays residual (steps,), steps (settles,)

Every per-device array is indexed ``[0]`` for G+ and ``[1]`` for G-. A tile is identified by
its position in the topology's couplings and its shape: that is how the board allocates
physical tiles, and a record applies to a host tile only when both match.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from drivers import DeviceInfo, Identity

FORMAT = "xbar-hil-calibration"
FORMAT_VERSION = 1

CHANNEL_MAP = (
    "node k of the configured topology (groups concatenated in declared order) uses DAC "
    "channel k and state-ADC channel k; mvm input line i uses DAC channel i; mvm output "
    "line j uses mvm-ADC channel j"
)


class CalibrationError(ValueError):
    """A record that cannot be read, or cannot be applied to what it is asked to correct."""


class CalibrationMismatch(CalibrationError):
    """A record applied to a board other than the one it was measured on."""


@dataclass
class ChannelCal:
    """Per-channel transfer ``out = gain * in + offset`` of one converter bank.

    For a DAC, ``in`` is the requested value and ``out`` what reaches the lines; for an ADC,
    ``in`` is the true value and ``out`` the reading. Offsets are in the bank's `units`;
    `lsb` is one converter step in the same units. Channels with ``valid`` False could not be
    measured (the apply functions treat them as ideal)."""

    bank: str
    gain: np.ndarray
    offset: np.ndarray
    gain_se: np.ndarray
    offset_se: np.ndarray
    valid: np.ndarray
    lsb: float
    units: str
    info: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return int(self.gain.shape[0])


@dataclass
class ConductanceMap:
    """Mean and spread of repeated reads of a tile programmed to `target` (direct writes)."""

    target: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    reads: int
    read_noise: float  # pooled read-noise std over all devices (S)
    read_noise_se: float
    write_noise: float  # robust std of (mean - target) over working devices (S)


@dataclass
class StuckMap:
    """Devices that do not follow a low and a high direct write."""

    stuck: np.ndarray  # bool
    value: np.ndarray  # mean of the two pattern reads (S): where a stuck device sits
    low: np.ndarray  # mean read after writing the low pattern
    high: np.ndarray  # mean read after writing the high pattern
    threshold: float  # a device is stuck when high - low < threshold (S)
    margin: float  # smallest |high - low - threshold| over devices, in noise standard deviations

    @property
    def count(self) -> int:
        return int(self.stuck.sum())


@dataclass
class PulseModel:
    """A pulse-response model per tile with per-device parameters (see `calibration.pulse_fit`).

    Mean step of one pulse, with ``u`` the fraction of its own window ``[g_lo, g_hi]`` that a
    device has travelled from the bound its pulse moves away from: ``dw * f(u)``, with f one
    of constant 1, soft_bounds ``1 - u``, linear ``max(1 - gamma u, 0)``, exponential
    ``exp(-gamma u)``. A one-sided device has no gradual down step: a negative pulse count
    RESETs it to about ``g_lo + reset_noise * sqrt(2/pi)``."""

    kind: str
    one_sided: bool
    gamma_up: float
    gamma_down: float
    g_lo: np.ndarray
    g_hi: np.ndarray
    g_lo_se: np.ndarray
    g_hi_se: np.ndarray
    dw_up: np.ndarray
    dw_up_se: np.ndarray
    dw_down: np.ndarray  # NaN on one-sided devices
    dw_down_se: np.ndarray
    valid: np.ndarray  # bool: device moved and was fitted
    summary: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class TileCalibration:
    position: int
    shape: tuple[int, int]
    gmap: ConductanceMap | None = None
    stuck: StuckMap | None = None
    pulse: PulseModel | None = None


@dataclass
class SettleProfile:
    """How the board's settles converge on a random layered network (see `calibration.settling`)."""

    summary: dict[str, Any]
    residual: np.ndarray  # median over settles of max |s_t - s_{t-1}| per step of a long traced settle
    steps: np.ndarray  # steps taken by each settle under the default budget


@dataclass
class CalibrationRecord:
    identity: Identity
    created: str
    limits: dict[str, Any]
    routines: tuple[str, ...]
    converters: dict[str, ChannelCal] = field(default_factory=dict)
    tiles: dict[int, TileCalibration] = field(default_factory=dict)
    settle: SettleProfile | None = None
    session: dict[str, Any] = field(default_factory=dict)
    version: int = FORMAT_VERSION
    fingerprint: str = ""  # `board_fingerprint` of the board measured ("": an older record)
    configuration: str = ""  # the board's own configuration fingerprint (DeviceInfo.extra["config"])

    def __repr__(self) -> str:
        """One line (the dataclass's own repr prints every array); `report.summary` says more."""
        banks = ", ".join(f"{b} {c.channels}" for b, c in self.converters.items()) or "none"
        tiles = ", ".join(f"{k}: {t.shape[0]}x{t.shape[1]}" for k, t in sorted(self.tiles.items())) or "none"
        return (
            f"CalibrationRecord({self.identity.idn()!r}, created {self.created}, routines "
            f"{','.join(self.routines)}; converter channels {banks}; tiles {tiles})"
        )

    @property
    def partial(self) -> bool:
        """Whether the session was stopped part-way (`run_session`'s `partial`): the record
        holds the routines that had finished (`routines`); ``session["stopped_in"]`` names
        the part that was running."""
        return bool(self.session.get("partial", False))

    def check_board(self, info: DeviceInfo) -> None:
        """Refuse a board other than the one measured (`check_identity`), or the same board in
        another configuration: converter resolution or ranges, tile limits, or (where the
        board reports one, as the emulator does) the fingerprint of its device and converter
        setup. A record made before fingerprints existed is checked by identity alone."""
        self.check_identity(info.identity)
        now = board_fingerprint(info)
        if not self.fingerprint or now == self.fingerprint:
            return
        limits, before = _jsonable(dataclasses.asdict(info.limits)), _jsonable(self.limits)
        changed = [k for k in sorted(set(limits) | set(before)) if limits.get(k) != before.get(k)]
        what = (
            "limits " + ", ".join(f"{k} {before.get(k)!r} -> {limits.get(k)!r}" for k in changed[:4])
            if changed
            else f"device and converter setup {self.configuration!r} -> {info.extra.get('config', '')!r}"
        )
        raise CalibrationMismatch(
            f"this calibration record was measured on {self.identity.idn()!r} in configuration "
            f"{self.fingerprint}, and this board reports configuration {now} ({what}): a record "
            "does not carry over to another configuration of the same board; calibrate it as it "
            "is set up now with `hil calibrate`"
        )

    def check_identity(self, identity: Identity) -> None:
        """Refuse a board other than the one measured. Manufacturer, model and serial must
        match; a firmware change is refused too, since firmware sets the converters' trims."""
        if identity != self.identity:
            raise CalibrationMismatch(
                f"this calibration record belongs to board {self.identity.idn()!r}, "
                f"not to {identity.idn()!r}: use it with the board it belongs to (hil train: --set "
                "device=URI, whose default is the ideal emulator), or calibrate this board with "
                "`hil calibrate`"
            )

    def tile(self, position: int, shape: tuple[int, int]) -> TileCalibration:
        """The calibration of the physical tile at `position` with `shape`."""
        cal = self.tiles.get(position)
        if cal is None:
            raise CalibrationError(
                f"the record has no tile at position {position}; calibrated positions: {sorted(self.tiles)}"
            )
        if tuple(cal.shape) != tuple(shape):
            raise CalibrationError(
                f"tile position {position} was calibrated with shape {tuple(cal.shape)}, "
                f"not {tuple(shape)}: the board allocates a different physical array per shape"
            )
        return cal

    @property
    def wire_resistance(self) -> float | None:
        """Ohms per wire segment the mvm routine measured (`calibration.mvm.measure_mvm`),
        or None where the record has no mvm routine (or one from before it measured them)."""
        cal = self.converters.get("mvm")
        r = None if cal is None else cal.info.get("wire_resistance")
        return None if r is None else float(r)

    def bank(self, name: str) -> ChannelCal:
        cal = self.converters.get(name)
        if cal is None:
            raise CalibrationError(
                f"the record has no {name!r} calibration (banks present: {sorted(self.converters)}); "
                f"run the session with that routine"
            )
        return cal


# ------------------------------------------------------------------------------- Zarr I/O


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None if np.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def _write_section(group: zarr.Group, obj: Any) -> None:
    """Arrays of a dataclass become arrays, `raw` a subgroup of arrays, the rest attributes."""
    attrs: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, np.ndarray):
            group.create_array(f.name, data=np.ascontiguousarray(value))
        elif f.name == "raw":
            raw = group.create_group("raw")
            for key, arr in value.items():
                raw.create_array(key, data=np.ascontiguousarray(arr))
        else:
            attrs[f.name] = _jsonable(value)
    group.attrs.update(attrs)


def _unjson(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _unjson(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unjson(v) for v in value]
    if value is None:
        return float("nan")
    if value in ("inf", "-inf"):
        return float(value)
    return value


def _session(stored: dict[str, Any]) -> dict[str, Any]:
    """The session attribute read back: None is NaN in numbers (`_jsonable`), but the
    ``stopped_in`` of a session stopped between routines is None, not NaN (which is truthy,
    and read "stopped in nan")."""
    session = _unjson(stored)
    if "stopped_in" in stored and stored["stopped_in"] is None:
        session["stopped_in"] = None
    return session


def _read_section(group: zarr.Group, cls: type) -> Any:
    attrs = dict(group.attrs)
    kwargs: dict[str, Any] = {}
    arrays = dict(group.arrays())
    for f in dataclasses.fields(cls):
        if f.name in arrays:
            kwargs[f.name] = np.asarray(arrays[f.name][...])
        elif f.name == "raw":
            raw = group.get("raw")
            kwargs["raw"] = {} if raw is None else {k: np.asarray(a[...]) for k, a in raw.arrays()}
        elif f.name in attrs:
            kwargs[f.name] = _unjson(attrs[f.name])
    return cls(**kwargs)


def board_fingerprint(info: DeviceInfo) -> str:
    """The configuration a record is bound to besides the identity: the board's limits
    (converter bits and ranges, tile and settle limits) and the configuration fingerprint the
    board reports, if any (`DeviceInfo.extra["config"]`), hashed."""
    text = json.dumps(
        {"limits": _jsonable(dataclasses.asdict(info.limits)), "config": str(info.extra.get("config", ""))},
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write(record: CalibrationRecord, path: str | Path) -> Path:
    """Write `record` to a new Zarr store at `path` (an existing store there is replaced).

    Atomic: the store is written to a temporary store beside `path` (``.NAME.tmp-PID``) and
    renamed into place only once complete, so an interrupted write (Ctrl-C, SIGTERM, a full
    disk) leaves whatever was at `path` before, untouched, and no half-written record."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    for stale in (tmp, old):
        _remove(stale)
    try:
        _write_store(record, tmp)
        if path.is_dir() and not path.is_symlink():
            os.replace(path, old)
        elif path.exists() or path.is_symlink():
            path.unlink()
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        if old.exists() and not path.exists():
            os.replace(old, path)  # interrupted between the two renames: put the old one back
        raise
    _remove(old)
    return path


def _missing_record(path: Path) -> str:
    """What to say of a record that is not at `path`: a write killed between its two renames
    (SIGKILL, power loss: nothing could put the old store back) leaves the previous record at
    ``.NAME.old-PID`` and the new one, complete, at ``.NAME.tmp-PID``; name them and the rename
    that restores either."""
    olds = sorted(path.parent.glob(f".{path.name}.old-*"))
    if not olds:
        return (
            f"no calibration record at {str(path)!r}; `hil calibrate URI --out {path}` writes one for "
            "the board at URI"
        )
    old = olds[-1]
    tmp = path.with_name(f".{path.name}.tmp-{old.name.rsplit('-', 1)[1]}")
    new = (
        f"the new record, complete, is at {str(tmp)!r} (`mv {tmp} {path}` keeps it) and "
        if tmp.is_dir()
        else ""
    )
    return (
        f"no calibration record at {str(path)!r}: a write of a new record there was stopped between "
        f"its two renames (the process killed); {new}the previous record is at {str(old)!r} "
        f"(`mv {old} {path}` restores it)"
    )


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _write_store(record: CalibrationRecord, path: Path) -> None:
    root = zarr.open_group(str(path), mode="w")
    root.attrs.update(
        {
            "format": FORMAT,
            "version": record.version,
            "identity": dataclasses.asdict(record.identity),
            "idn": record.identity.idn(),
            "created": record.created,
            "routines": list(record.routines),
            "limits": _jsonable(record.limits),
            "channel_map": CHANNEL_MAP,
            "session": _jsonable(record.session),
            "fingerprint": record.fingerprint,
            "configuration": record.configuration,
            "partial": record.partial,
        }
    )
    conv = root.create_group("converters")
    for name, cal in record.converters.items():
        _write_section(conv.create_group(name), cal)
    tiles = root.create_group("tiles")
    for position, tile in record.tiles.items():
        g = tiles.create_group(str(position))
        g.attrs.update({"position": position, "shape": list(tile.shape)})
        for name in ("gmap", "stuck", "pulse"):
            part = getattr(tile, name)
            if part is not None:
                _write_section(g.create_group(name), part)
    if record.settle is not None:
        _write_section(root.create_group("settle"), record.settle)


def load(
    path: str | Path, identity: Identity | None = None, *, board: DeviceInfo | None = None
) -> CalibrationRecord:
    """Read a record; with `board` (a device's `info`), refuse it unless it was measured on
    that board in its present configuration (`CalibrationRecord.check_board`); with
    `identity` alone, unless it was measured on that board."""
    path = Path(path)
    if not path.exists():
        raise CalibrationError(_missing_record(path))
    try:
        root = zarr.open_group(str(path), mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, NotADirectoryError) as exc:
        raise CalibrationError(
            f"{str(path)!r} is not a calibration record (a Zarr store written by `hil calibrate "
            f"URI --out RECORD`; its PNG report sits next to it): {type(exc).__name__}"
        ) from None
    attrs = dict(root.attrs)
    if attrs.get("format") != FORMAT:
        raise CalibrationError(f"{str(path)!r} is not a calibration record (format {attrs.get('format')!r})")
    version = int(attrs.get("version", 0))
    if version > FORMAT_VERSION:
        raise CalibrationError(
            f"{str(path)!r} has record format version {version}; this toolkit reads up to "
            f"{FORMAT_VERSION}: upgrade xbar-hil"
        )
    try:
        return _read_record(root, attrs, version, identity, board)
    except CalibrationError:
        raise
    except (TypeError, KeyError, ValueError, OSError) as exc:
        raise CalibrationError(
            f"{str(path)!r} is a damaged calibration record (a section is missing or incomplete, as "
            f"when its write was interrupted: {type(exc).__name__}: {exc}); rerun the session with "
            f"`hil calibrate URI --out {path} --overwrite`"
        ) from None


def _read_record(
    root: zarr.Group,
    attrs: dict[str, Any],
    version: int,
    identity: Identity | None,
    board: DeviceInfo | None,
) -> CalibrationRecord:
    converters = {}
    if "converters" in root:
        for name, g in root["converters"].groups():
            converters[name] = _read_section(g, ChannelCal)
    tiles: dict[int, TileCalibration] = {}
    if "tiles" in root:
        for key, g in root["tiles"].groups():
            shape = tuple(int(v) for v in g.attrs["shape"])
            tile = TileCalibration(int(key), (shape[0], shape[1]))
            for name, cls in (("gmap", ConductanceMap), ("stuck", StuckMap), ("pulse", PulseModel)):
                if name in g:
                    setattr(tile, name, _read_section(g[name], cls))
            tiles[int(key)] = tile
    settle = _read_section(root["settle"], SettleProfile) if "settle" in root else None
    record = CalibrationRecord(
        identity=Identity(**attrs["identity"]),
        created=str(attrs["created"]),
        limits=_unjson(attrs.get("limits", {})),
        routines=tuple(attrs.get("routines", ())),
        converters=converters,
        tiles=tiles,
        settle=settle,
        session=_session(attrs.get("session", {})),
        version=version,
        fingerprint=str(attrs.get("fingerprint", "")),
        configuration=str(attrs.get("configuration", "")),
    )
    if board is not None:
        record.check_board(board)
    elif identity is not None:
        record.check_identity(identity)
    return record
