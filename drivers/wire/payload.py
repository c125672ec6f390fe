"""Serialisation of the Device operations, shared by both wire protocols.

Every request and reply is a `Message`: a small JSON object (`meta`) for scalars and
structure, plus named arrays sent as raw little-endian bytes. The JSON carries the array
layout (``"arrays": [[name, dtype, shape], ...]``) so the bytes need no framing of their
own. SCPI sends the JSON and the array bytes as two IEEE 488.2 blocks; the framed
protocol packs them into one payload (`pack` / `unpack`).

Floats in JSON are written with Python's shortest round-trip repr, so scalars come back
bit-identical; ``NaN`` and ``Infinity`` are allowed tokens. No pickle anywhere.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
import sys
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np

from drivers.base import (
    BoardOwner,
    BoardStatus,
    DeviceInfo,
    Equilibrium,
    Identity,
    Limits,
    Meter,
    Nudge,
    ProgramReport,
    PulseReport,
    SafetyCounters,
    TileWear,
    Wear,
)
from drivers.capabilities import LOCK
from drivers.checks import check_state_range_voltage
from drivers.errors import ConfigurationError, LimitViolation, ProtocolError, distinct_numbers
from drivers.scalars import INT32_MAX, as_float, as_int
from drivers.topology import Coupling, SettleBudget, Topology

# dtype codes allowed on the wire (all little-endian): bulk data is f4 (states,
# conductances) and i4 (pulse counts); i8/f8 only for small metadata arrays.
DTYPES = {"f4": np.dtype("<f4"), "i4": np.dtype("<i4"), "i8": np.dtype("<i8"), "f8": np.dtype("<f8")}
MAX_JSON = 1 << 20
MAX_NDIM = 8  # dimensions of one array on the wire (the operations use at most 3)
MAX_ARRAYS = 4096  # arrays in one message (a settle carries a few per node group)
# Nesting of arrays and objects in one JSON text: the deepest message (a topology's conv
# coupling, an array layout) nests 4; deeper is refused before decoding (Python's decoder
# would recurse once per level and fail with a RecursionError)
MAX_JSON_DEPTH = 32
_LEN = struct.Struct("<I")


class Op(IntEnum):
    """Device operations; the values are the framed protocol's opcodes."""

    INFO = 0x10
    TOPOLOGY = 0x11
    CONFIGURE = 0x12
    PROGRAM = 0x13
    PULSE = 0x14
    READ_CONDUCTANCE = 0x15
    MVM = 0x16
    SETTLE = 0x17
    WAIT = 0x18
    SAFETY = 0x19
    RESET = 0x1A
    SAFE_STATE = 0x1B
    STATUS = 0x1C
    BEGIN = 0x1D
    COMMIT = 0x1E
    METER = 0x1F
    # ownership (capability "lock"; docs/protocol.md, "Ownership")
    ACQUIRE = 0x20
    OWNER = 0x21
    RELEASE = 0x22
    BREAK = 0x23
    # the devices' wear against a declared pulse endurance (docs/protocol.md, "Pulse endurance")
    WEAR = 0x24


# Operations a host may repeat after a link failure without changing the outcome. The
# others carry a request id ("rid") that the board remembers (docs/protocol.md, section 1).
IDEMPOTENT = frozenset(
    {
        Op.INFO, Op.TOPOLOGY, Op.CONFIGURE, Op.READ_CONDUCTANCE, Op.MVM, Op.SETTLE, Op.SAFETY,
        Op.RESET, Op.SAFE_STATE, Op.STATUS, Op.BEGIN, Op.COMMIT, Op.METER,
        Op.ACQUIRE, Op.OWNER, Op.RELEASE, Op.BREAK, Op.WEAR,
    }
)  # fmt: skip
# Of the others, operations whose repetition after a board reset is still right: program
# writes absolute targets; a pulse or a wait would be applied twice.
REPEATABLE_AFTER_RESET = frozenset({Op.PROGRAM})

# Ownership (docs/protocol.md, "Ownership"). The capability a board that implements it
# announces; the operations on the lock itself; and the operations any connection may run
# while another host owns the board: they read what the board says about itself and change
# nothing the owner relies on. Every other operation (configure, program, pulse,
# read_conductance, mvm, settle, wait, reset, safe_state, begin, commit) drives the array,
# changes its state or spends its clock, and is the owner's alone.
LOCK_CAPABILITY = LOCK
LOCK_OPS = frozenset({Op.ACQUIRE, Op.OWNER, Op.RELEASE, Op.BREAK})
OPEN_WHILE_OWNED = frozenset({Op.INFO, Op.TOPOLOGY, Op.SAFETY, Op.STATUS, Op.METER, Op.WEAR, *LOCK_OPS})
MAX_TOKEN = 100  # characters of an owner token (an error message that names it fits 255)
# The lease a host may ask for when it acquires (optional; without one, the board's own): at
# least 1 s, so a dropped link always leaves the owner time for its drivers' reconnect (the
# first attempt at once, the next ones up to 1 s apart); at most 600 s, so a host that died
# keeps its colleagues off the board ten minutes at most without `hil lock break`. The
# drivers' reconnect to a board that does not answer takes attempts x timeout (4 x 10 s by
# default): hosts with longer timeouts than the board's lease covers ask for a longer one.
LEASE_MIN_S = 1.0
LEASE_MAX_S = 600.0


def check_token(token: object) -> str:
    """An owner token: 1 to `MAX_TOKEN` printable ASCII characters (ValueError otherwise)."""
    if not isinstance(token, str) or not 1 <= len(token) <= MAX_TOKEN:
        raise ValueError(
            f"an owner token is a string of 1 to {MAX_TOKEN} characters, got {str(token)[:40]!r}"
        )
    if not all(" " <= ch <= "~" for ch in token):
        raise ValueError(f"an owner token is printable ASCII, got {token[:40]!r}")
    return token


@dataclass
class Message:
    meta: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def _code(arr: np.ndarray) -> str:
    kind, size = arr.dtype.kind, arr.dtype.itemsize
    if kind == "f":
        return "f8" if size == 8 else "f4"
    if kind in "iub":
        return "i8" if size == 8 else "i4"
    raise ProtocolError(f"cannot send an array of dtype {arr.dtype} on the wire")


def layout(arrays: dict[str, np.ndarray]) -> list[list[Any]]:
    return [[name, _code(a), list(a.shape)] for name, a in arrays.items()]


def array_buffers(arrays: dict[str, np.ndarray]) -> list[memoryview]:
    """The arrays' little-endian bytes, without copying arrays that are already so laid out."""
    flat = (np.ascontiguousarray(a, dtype=DTYPES[_code(a)]).reshape(-1) for a in arrays.values())
    return [memoryview(a).cast("B") for a in flat]


def pack_arrays(arrays: dict[str, np.ndarray]) -> bytes:
    return b"".join(array_buffers(arrays))


def unpack_arrays(spec: list[list[Any]], data: bytes | bytearray | memoryview) -> dict[str, np.ndarray]:
    """Arrays described by `spec` from `data`; views of `data` when it is writable."""
    view = memoryview(data)
    if view.readonly:
        view = memoryview(bytearray(view))
    out: dict[str, np.ndarray] = {}
    offset = 0
    if not isinstance(spec, list) or len(spec) > MAX_ARRAYS:
        raise ProtocolError(f"array layout must be a list of at most {MAX_ARRAYS} entries")
    for entry in spec:
        name, dtype, shape, count = _array_spec(entry)
        if name in out:  # the last would silently win: a peer that sends two means one of them
            raise ProtocolError(f"array layout names {name!r} twice: each array appears once")
        nbytes = count * dtype.itemsize  # Python ints: no overflow, checked before any view or copy
        if offset + nbytes > len(view):
            raise ProtocolError(f"array {name!r} runs past the end of the data ({len(view)} bytes)")
        out[name] = np.frombuffer(view, dtype, count, offset).reshape(shape)
        offset += nbytes
    if offset != len(view):
        raise ProtocolError(f"array data has {len(view)} bytes, the layout describes {offset}")
    return out


def _array_spec(entry: Any) -> tuple[str, np.dtype, tuple[int, ...], int]:
    """(name, dtype, shape, element count) of one ``[name, dtype, shape]`` layout entry from a
    peer: every dimension a JSON integer in [0, 2^31), at most `MAX_NDIM` of them."""
    if not isinstance(entry, list | tuple) or len(entry) != 3:
        raise ProtocolError(f"bad array layout entry {str(entry)[:80]}: expected [name, dtype, shape]")
    name, code, shape = entry
    if not isinstance(name, str) or not isinstance(code, str) or code not in DTYPES:
        raise ProtocolError(f"bad array layout entry {str(entry)[:80]}: name and a dtype of {sorted(DTYPES)}")
    if not isinstance(shape, list | tuple) or len(shape) > MAX_NDIM:
        raise ProtocolError(f"array {name!r}: shape must be a list of at most {MAX_NDIM} dimensions")
    dims = []
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= INT32_MAX:
            raise ProtocolError(f"array {name!r}: dimensions are integers in [0, 2^31), got {str(d)[:40]}")
        dims.append(d)
    count = 1
    for d in dims:
        count *= d
    return name, DTYPES[code], tuple(dims), count


MAX_REPLY = 1 << 28  # bytes of one reply a host takes (a board announcing more is refused unread)


def layout_size(spec: Any) -> int:
    """Bytes an array layout from a peer describes, each entry checked (`_array_spec`)."""
    if not isinstance(spec, list) or len(spec) > MAX_ARRAYS:
        raise ProtocolError(f"array layout must be a list of at most {MAX_ARRAYS} entries")
    total = 0
    for entry in spec:
        _, dtype, _, count = _array_spec(entry)
        total += count * dtype.itemsize  # Python ints: no overflow
    return total


_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)  # json.dumps would build one per call


def dumps(obj: Any) -> bytes:
    """Compact ASCII JSON (no raw newlines, so it is safe inside an SCPI line)."""
    return _JSON.encode(obj).encode("ascii")


# json's public raw decoder: one value from the start of the text, no whitespace skipping
def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object's members, refusing a key given twice: json keeps the last one, so a request
    could say one tile (or one count) to a check and another to the code after it."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ProtocolError(f"malformed JSON on the wire: the key {key!r} appears twice in one object")
        out[key] = value
    return out


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys)


def json_depth(text: str) -> int:
    """How deep arrays and objects nest in `text` (JSON, possibly malformed), without decoding
    it, in one vectorised pass: brackets inside strings do not count (a quote after an odd run
    of backslashes is inside its string)."""
    b = np.frombuffer(text.encode("utf-8", "replace"), np.uint8)
    if not b.size:
        return 0
    at = np.arange(b.size)
    backslash = b == 0x5C
    last_other = np.maximum.accumulate(np.where(backslash, -1, at))  # last non-backslash up to i
    run_before = np.empty(b.size, np.int64)  # backslashes right before each byte
    run_before[0] = 0
    run_before[1:] = at[:-1] - last_other[:-1]
    quote = (b == 0x22) & (run_before % 2 == 0)
    inside = (np.cumsum(quote) - quote) % 2 == 1  # after an odd number of quotes: in a string
    step = ((b == 0x5B) | (b == 0x7B)).astype(np.int64) - ((b == 0x5D) | (b == 0x7D))
    step[inside | quote] = 0
    return int(np.cumsum(step).max())


def loads(data: bytes | bytearray | memoryview) -> Any:
    """One JSON value, strictly UTF-8. The usual text (a value with nothing around it) goes
    through json.JSONDecoder.raw_decode alone; anything else (leading or trailing whitespace, a byte order
    mark, extra data, malformed text) through json.loads, which accepts or refuses it. Refused
    (ProtocolError naming what is allowed) before or instead of a decoder's own failure: arrays
    and objects nested deeper than `MAX_JSON_DEPTH`, integers of more digits than Python
    converts (4300; every field takes far fewer)."""
    try:
        text = str(data, "utf-8")
        # the usual message has fewer brackets than the limit: nothing to scan
        if (
            text.count("[") + text.count("{") > MAX_JSON_DEPTH
            and (depth := json_depth(text)) > MAX_JSON_DEPTH
        ):
            raise ProtocolError(
                f"malformed JSON on the wire: arrays and objects nested {depth} levels deep; a message "
                f"nests at most {MAX_JSON_DEPTH} (the protocol's own messages nest at most 4)"
            )
        try:
            obj, end = _DECODER.raw_decode(text)
        except json.JSONDecodeError:
            return json.loads(text, object_pairs_hook=_unique_keys)  # refuses it, or accepts e.g. whitespace
        return obj if end == len(text) else json.loads(text, object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"malformed JSON on the wire: {exc}") from exc
    except RecursionError:  # nesting within MAX_JSON_DEPTH on a thread with little stack left
        raise ProtocolError(
            f"malformed JSON on the wire: nested too deep to decode; a message nests at most {MAX_JSON_DEPTH}"
        ) from None
    except ValueError as exc:  # int(): a number of more digits than Python converts
        if "digits" not in str(exc):
            raise ProtocolError(f"malformed JSON on the wire: {exc}") from exc
        limit = sys.get_int_max_str_digits()
        where = _long_number_at(text, limit)
        raise ProtocolError(
            f"malformed JSON on the wire: an integer of more than {limit} digits{where}; "
            "integers on the wire are sizes, counts and ids, at most 2^63 (19 digits): send the field's "
            "value, not a longer number"
        ) from None


def _long_number_at(text: str, limit: int) -> str:
    """Where the first run of more than `limit` digits starts in `text`, and what comes before
    it (the field's key), in one vectorised pass."""
    b = np.frombuffer(text.encode("utf-8", "replace"), np.uint8)
    digit = np.concatenate([[False], (b >= 0x30) & (b <= 0x39), [False]])
    edges = np.flatnonzero(np.diff(digit.astype(np.int8)))
    starts, ends = edges[::2], edges[1::2]
    long = np.flatnonzero(ends - starts > limit)
    if not long.size:
        return ""
    at = int(starts[long[0]])
    return f" at character {at} (after {text[max(0, at - 40) : at]!r})"


def meta_json(msg: Message) -> bytes:
    """The JSON half of a message: its meta plus the array layout under ``"arrays"``."""
    if "arrays" in msg.meta:
        raise ProtocolError("'arrays' is a reserved meta key")
    return dumps({**msg.meta, "arrays": layout(msg.arrays)} if msg.arrays else msg.meta)


def from_parts(meta: Any, data: bytes | bytearray | memoryview = b"") -> Message:
    """Rebuild a message from its decoded JSON and its array bytes."""
    if not isinstance(meta, dict):
        raise ProtocolError(f"expected a JSON object, got {type(meta).__name__}")
    meta = dict(meta)
    if "arrays" not in meta:  # no layout (most replies): no array bytes may follow
        if len(data):
            raise ProtocolError(f"array data has {len(data)} bytes, the layout describes 0")
        return Message(meta)
    spec = meta.pop("arrays")
    return Message(meta, unpack_arrays(spec, data))


_EMPTY = _LEN.pack(2) + b"{}"  # the payload of an empty message (most requests: safety, status, ...)


def pack(msg: Message) -> bytes:
    """One payload: u32 JSON length, JSON, then the array bytes."""
    if not msg.meta and not msg.arrays:
        return _EMPTY
    head = meta_json(msg)
    if not msg.arrays:
        return _LEN.pack(len(head)) + head
    return _LEN.pack(len(head)) + head + pack_arrays(msg.arrays)


def unpack(payload: bytes | bytearray | memoryview) -> Message:
    if payload == _EMPTY:  # what `pack` makes of an empty message, read without the JSON decoder
        return Message()
    view = memoryview(payload)
    if len(view) < _LEN.size:
        raise ProtocolError(f"payload of {len(view)} bytes is too short for a message")
    (n,) = _LEN.unpack_from(view)
    if n > min(MAX_JSON, len(view) - _LEN.size):
        raise ProtocolError(f"JSON length {n} exceeds the payload ({len(view)} bytes)")
    return from_parts(loads(view[_LEN.size : _LEN.size + n]), view[_LEN.size + n :])


# ---- structured metadata -----------------------------------------------------------


def info_to_dict(info: DeviceInfo) -> dict[str, Any]:
    limits = dataclasses.asdict(info.limits)
    if limits["max_line_current_a"] == math.inf:  # not declared: omitted, as an older board omits it
        del limits["max_line_current_a"]
    if limits["pulse_endurance"] is None:  # the same
        del limits["pulse_endurance"]
    if not limits["one_sided"]:  # the same: omitted, as an older (two-sided) board omits it
        del limits["one_sided"]
    return {
        "identity": dataclasses.asdict(info.identity),
        "limits": limits,
        "capabilities": sorted(info.capabilities),
        "preset": info.preset,
        "extra": dict(info.extra),
    }


# What a peer may declare, per field of `Limits`: (lowest, highest). Integers are sizes,
# counts and budgets the host's checks compare in int32 (beyond: refused, never truncated);
# floats are finite. A board that declares a negative, zero-sized or NaN limit is broken, and
# the host's checks would pass or refuse everything against it.
_POSITIVE = 5e-324  # the smallest float above 0 (an open lower bound of 0)
_LIMIT_RANGES: dict[str, tuple[float, float]] = {
    "v_read": (_POSITIVE, math.inf),
    "v_read_max": (_POSITIVE, math.inf),
    "g_min": (0.0, math.inf),
    "g_max": (_POSITIVE, math.inf),
    "dac_bits": (1, 64),
    "adc_bits": (1, 64),
    "tile_rows_max": (1, INT32_MAX),
    "tile_cols_max": (1, INT32_MAX),
    "max_tiles": (1, INT32_MAX),
    "max_settle_steps": (1, INT32_MAX),
    "max_pulses": (0, INT32_MAX),
    "settle_step_s": (0.0, math.inf),
    "max_verify_iters": (1, INT32_MAX),
    "max_wait_s": (0.0, math.inf),
    "max_gain": (_POSITIVE, math.inf),
    "max_w_max": (_POSITIVE, math.inf),
    "max_beta": (0.0, math.inf),
    "max_drive": (0.0, math.inf),
    "max_batch": (1, INT32_MAX),
    "max_line_current_a": (_POSITIVE, math.inf),  # finite (as_float), > 0; omitted: not declared
    "pulse_endurance": (1, 10**15),  # pulses per device; omitted or null: not declared
}


def _limits_from_peer(d: Any) -> dict[str, Any]:
    """A peer's limits, every number checked by its field's type (ints are integers, floats
    are finite reals, ``| None`` fields may be null) and range (`_LIMIT_RANGES`), so that the
    host's checks compare numbers with numbers; fields the peer omits take their defaults
    (an older board without ``max_batch`` decodes), fields it adds are ignored."""
    if not isinstance(d, dict):
        raise ProtocolError(f"malformed device info: limits must be an object, got {str(d)[:40]}")
    kinds = {f.name: str(f.type) for f in dataclasses.fields(Limits)}
    out: dict[str, Any] = {}
    try:
        for name, value in d.items():
            kind = kinds.get(name)
            if kind is None:
                continue  # a newer peer's field this host does not know
            lo, hi = _LIMIT_RANGES.get(name, (-math.inf, math.inf))
            if value is None and kind.endswith("| None"):
                out[name] = None
            elif kind == "bool":
                if not isinstance(value, bool):
                    raise ConfigurationError(f"limits.{name} must be true or false, got {str(value)[:40]}")
                out[name] = value
            elif kind.startswith("int"):
                out[name] = as_int(f"limits.{name}", value, int(lo), int(hi))
            elif kind == "float":
                out[name] = as_float(f"limits.{name}", value, lo, hi)
            elif name == "adc_range":
                if not isinstance(value, list | tuple) or len(value) != 2:
                    raise ConfigurationError(f"limits.adc_range must be [low, high], got {str(value)[:40]}")
                a = as_float("limits.adc_range low", value[0], -math.inf, math.inf)
                out[name] = (a, as_float("limits.adc_range high", value[1], a, math.inf, lo_open=True))
        g_min, g_max = out.get("g_min", 0.0), out.get("g_max", math.inf)
        if "g_max" in out and not g_max > g_min:
            top, bottom = distinct_numbers(g_max, g_min)
            raise ConfigurationError(f"limits.g_max ({top}) must exceed limits.g_min ({bottom})")
        if {"v_read", "v_read_max", "adc_range"} <= out.keys():
            check_state_range_voltage(out["v_read"], out["v_read_max"], out["adc_range"])
    except (ConfigurationError, LimitViolation) as exc:
        raise ProtocolError(f"malformed device info: {exc}") from None
    return out


def info_from_dict(d: Any) -> DeviceInfo:
    if not isinstance(d, dict):
        raise ProtocolError(f"malformed device info: expected an object, got {type(d).__name__}")
    try:
        limits = _limits_from_peer(d["limits"])
        ident = d["identity"]
        if not isinstance(ident, dict) or not all(
            isinstance(ident.get(k), str) and len(ident[k]) <= 256 for k in _IDENTITY
        ):
            raise ProtocolError(
                f"malformed device info: identity must hold the strings {_IDENTITY} (at most 256 "
                f"characters each), got {str(ident)[:80]}"
            )
        caps = d["capabilities"]
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            raise ProtocolError(
                f"malformed device info: capabilities must be a list of names, got {str(caps)[:80]}"
            )
        preset = d.get("preset", "")
        extra = d.get("extra", {})
        if not isinstance(preset, str) or not isinstance(extra, dict):
            raise ProtocolError("malformed device info: preset must be a string and extra an object")
        return DeviceInfo(
            identity=Identity(*(ident[k] for k in _IDENTITY)),
            limits=Limits(**limits),
            capabilities=frozenset(caps),
            preset=preset,
            extra=dict(extra),
        )
    except (KeyError, TypeError) as exc:
        raise ProtocolError(f"malformed device info: missing or mistyped field {exc}") from exc


_IDENTITY = ("manufacturer", "model", "serial", "firmware")


def _coupling_to_dict(c: Coupling) -> dict[str, Any]:
    d = {"tile": c.tile, "rows": list(c.rows), "cols": list(c.cols), "kind": c.kind, "w_max": c.w_max}
    if c.kind == "conv":  # only conv couplings carry a geometry: older peers see what they know
        d.update(kernel=c.kernel, padding=c.padding, pool=c.pool)
        if c.pool_mode != "max":  # only average-pooled convs: older peers' payloads stay as they were
            d["pool_mode"] = c.pool_mode
        if c.pool_group:  # only the tiles of a split pooled conv (a node-side pool)
            d["pool_group"] = c.pool_group
    return d


def topology_to_dict(topo: Topology) -> dict[str, Any]:
    d = {
        "groups": dict(topo.groups),
        "couplings": [_coupling_to_dict(c) for c in topo.couplings],
        "gain": topo.gain,
        "activation": topo.activation.spec,
        "mode": topo.mode,
        "budget": dataclasses.asdict(topo.budget),
    }
    if topo.shapes:
        d["shapes"] = {g: list(shape) for g, shape in topo.shapes.items()}
    return d


_BUDGET_KEYS = tuple(f.name for f in dataclasses.fields(SettleBudget))


def _object(what: str, value: Any, takes: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ProtocolError(f"malformed topology: {what} must be an object of {takes}, got {str(value)[:60]}")
    return value


def topology_from_dict(d: dict[str, Any]) -> Topology:
    """Raises ProtocolError naming the field for a malformed one (a wrong type, a missing or
    unknown key), ConfigurationError (from Topology) for a consistent but invalid topology."""
    try:
        _object("the topology", d, "groups, couplings, gain, activation, mode, budget, shapes")
        groups = _object("groups", d["groups"], "group: size")
        budget = _object("budget", d.get("budget", {}), ", ".join(_BUDGET_KEYS))
        unknown = sorted(str(k) for k in budget if k not in _BUDGET_KEYS)
        if unknown:
            raise ProtocolError(
                f"malformed topology: budget has unknown keys {unknown[:4]}; a budget takes "
                f"{', '.join(_BUDGET_KEYS)} (each optional)"
            )
        shapes = _object("shapes", d.get("shapes", {}), "group: [channels, height, width]")
        if not isinstance(d["couplings"], list):
            raise ProtocolError(
                f"malformed topology: couplings must be a list, got {str(d['couplings'])[:60]}"
            )
        couplings = []
        for i, c in enumerate(d["couplings"]):
            c = _object(
                f"couplings[{i}]", c, "tile, rows, cols and optional kind, w_max, kernel, padding, pool"
            )
            for key in ("rows", "cols"):
                if key not in c:
                    raise ProtocolError(
                        f"malformed topology: couplings[{i}] lacks {key!r} (a list of group names)"
                    )
                if not isinstance(c[key], list):
                    raise ProtocolError(
                        f"malformed topology: couplings[{i}].{key} must be a list of group names, "
                        f"got {str(c[key])[:60]}"
                    )
            couplings.append(
                Coupling(
                    tile=c["tile"],
                    rows=tuple(c["rows"]),
                    cols=tuple(c["cols"]),
                    kind=c.get("kind", "bipartite"),
                    w_max=c.get("w_max", 1.0),
                    kernel=c.get("kernel", 0),
                    padding=c.get("padding", 0),
                    pool=c.get("pool", 1),
                    pool_mode=c.get("pool_mode", "max"),
                    pool_group=c.get("pool_group", ""),
                )
            )
        return Topology(
            groups={str(k): v for k, v in groups.items()},  # sizes checked (not truncated) by Topology
            couplings=tuple(couplings),
            gain=d.get("gain", 1.0),
            # the node curve by name (drivers.activation); an older host's message has none
            activation=d.get("activation", "hard_sigmoid"),
            mode=d.get("mode", "analog"),
            budget=SettleBudget(**budget),
            # a list of three sizes per group, checked by Topology (a non-list fails there too)
            shapes={str(g): tuple(v) for g, v in shapes.items()},
        )
    except KeyError as exc:
        raise ProtocolError(f"malformed topology: missing field {exc}") from exc
    except (TypeError, AttributeError) as exc:
        raise ProtocolError(f"malformed topology: {exc}") from exc


# ---- checks of a board's replies ------------------------------------------------------
# A buggy or hostile board (or a corrupted line that passed its check) must not hand the host
# a value of the wrong type, shape or range: every decoder below checks a reply against what
# was asked and what the board declared, and raises ProtocolError naming the operation, the
# field and what was wrong.

I64_MAX = 2**63 - 1


def _bad(op: str, what: str) -> ProtocolError:
    return ProtocolError(f"malformed {op} reply: {what}")


def _meta(op: str, msg: Message, *keys: str) -> dict[str, Any]:
    m = msg.meta
    if not isinstance(m, dict):
        raise _bad(op, f"expected a JSON object, got {type(m).__name__}")
    for k in keys:
        if k not in m:
            raise _bad(op, f"field {k!r} is missing")
    return m


def _int(op: str, name: str, value: object, lo: int = 0, hi: int = I64_MAX) -> int:
    try:
        return as_int(name, value, lo, hi)
    except (ConfigurationError, LimitViolation) as exc:
        raise _bad(op, str(exc)) from None


def _float(
    op: str, name: str, value: object, lo: float = 0.0, hi: float = math.inf, *, inf: bool = False
) -> float:
    """A finite float in [lo, hi] (with `inf`: +infinity allowed too)."""
    if inf and isinstance(value, float) and value == math.inf and hi == math.inf:
        return value
    try:
        return as_float(name, value, lo, hi)
    except (ConfigurationError, LimitViolation) as exc:
        raise _bad(op, str(exc)) from None


def _bool(op: str, name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise _bad(op, f"{name} must be a boolean, got {type(value).__name__} {str(value)[:40]}")
    return value


def _str(op: str, name: str, value: object, expected: str | None = None) -> str:
    if not isinstance(value, str):
        raise _bad(op, f"{name} must be a string, got {type(value).__name__}")
    if expected is not None and value != expected:
        raise _bad(op, f"{name} is {value[:40]!r}, the request was for {expected!r}")
    return value


def _array(
    op: str,
    arrays: dict[str, np.ndarray],
    name: str,
    shape: tuple[int | None, ...],
    dtype: np.dtype = DTYPES["f4"],
    bounds: tuple[float, float] | None = None,
) -> np.ndarray:
    """Array `name` of `dtype` and `shape` (None: any size in that dimension), finite, within
    `bounds`: one min and one max over it (a NaN shows in one of them)."""
    arr = arrays.get(name)
    if arr is None:
        raise _bad(op, f"array {name!r} is missing")
    if arr.dtype != dtype:
        raise _bad(op, f"array {name!r} has dtype {arr.dtype}, expected {dtype}")
    if arr.ndim != len(shape) or any(w is not None and w != n for w, n in zip(shape, arr.shape, strict=True)):
        want = tuple("*" if w is None else w for w in shape)
        raise _bad(op, f"array {name!r} has shape {arr.shape}, expected {want}")
    if arr.size and dtype.kind == "f":
        lo, hi = float(arr.min()), float(arr.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise _bad(op, f"array {name!r} contains NaN or infinite values{_byte_order_hint(arr, bounds)}")
        if bounds is not None and (lo < bounds[0] or hi > bounds[1]):
            raise _bad(
                op,
                f"array {name!r} holds values in [{lo:.6g}, {hi:.6g}], "
                f"outside [{bounds[0]:.6g}, {bounds[1]:.6g}]{_byte_order_hint(arr, bounds)}"
                f"{_unit_hint(lo, hi, bounds)}",
            )
    return arr


def _byte_order_hint(arr: np.ndarray, bounds: tuple[float, float] | None) -> str:
    """What to say when `arr` byte-swapped is finite and within `bounds` (or, with none, of a
    sane size): the peer sent big-endian numbers, and arrays are little-endian."""
    swapped = arr.byteswap()
    with np.errstate(invalid="ignore", over="ignore"):
        lo, hi = float(swapped.min()), float(swapped.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return ""
    ok = bounds[0] <= lo and hi <= bounds[1] if bounds is not None else max(-lo, hi) < 1e6
    if not ok:
        return ""
    return (
        f"; byte-swapped they would lie in [{lo:.6g}, {hi:.6g}]: the board sends big-endian numbers, and "
        "arrays are little-endian (docs/protocol.md, Arrays)"
    )


UNIT_PREFIXES = ((1e-6, "micro"), (1e-3, "milli"), (1e-9, "nano"))


def _unit_hint(lo: float, hi: float, bounds: tuple[float, float]) -> str:
    """What to say when values in [lo, hi] scaled by a unit prefix lie within `bounds`: the
    peer sent them in micro-, milli- or nano-units (uS for S), and arrays carry SI units."""
    for scale, prefix in UNIT_PREFIXES:
        if bounds[0] <= lo * scale and hi * scale <= bounds[1] and (lo, hi) != (0.0, 0.0):
            return (
                f"; times {scale:g} they would lie in [{lo * scale:.6g}, {hi * scale:.6g}]: the board "
                f"sends {prefix}-units (uS for siemens, mV for volts), and arrays are in SI units, "
                "siemens and volts (docs/protocol.md)"
            )
    return ""


def _unexpected(op: str, arrays: dict[str, np.ndarray], known: set[str]) -> None:
    extra = sorted(set(arrays) - known)
    if extra:
        raise _bad(op, f"unexpected arrays {extra[:4]}")


def conductance_bounds(limits: Limits | None) -> tuple[float, float] | None:
    """What a read of a conductance may return: the declared range widened by its span on each
    side (a read is noisy and not clipped; one off by more than the whole range is no read)."""
    if limits is None:
        return None
    span = limits.g_max - limits.g_min
    return limits.g_min - span, limits.g_max + span


# ---- requests and replies, one pair per operation ---------------------------------


def program_request(
    tile: str, g_plus: np.ndarray, g_minus: np.ndarray, verify: bool, tol: float | None, max_iters: int
) -> Message:
    meta = {"tile": tile, "verify": bool(verify), "tol": tol, "max_iters": int(max_iters)}
    return Message(meta, {"g_plus": g_plus, "g_minus": g_minus})


def program_reply(r: ProgramReport) -> Message:
    """The reply to a program; `gave_up` and `spent` go only when known (an unknown one is
    not sent)."""
    meta = {
        f.name: getattr(r, f.name)
        for f in dataclasses.fields(r)
        if f.name not in ("g_plus", "g_minus")
        and not (f.name in ("gave_up", "spent") and getattr(r, f.name) is None)
    }
    return Message(meta, {"g_plus": r.g_plus, "g_minus": r.g_minus})


def program_report(
    msg: Message,
    tile: str | None = None,
    shape: tuple[int, int] | None = None,
    limits: Limits | None = None,
    max_iters: int | None = None,
) -> ProgramReport:
    """The report of a `program` reply, checked against the request (`tile`, `shape`,
    `max_iters`) and the declared `limits` where given. `gave_up` and `spent` are optional
    (boards older than them, or without a pulse endurance, do not send them): absent or null,
    the report's field is None (unknown); else a count of at most the tile's 2 x rows x cols
    devices. Fields this host does not know are
    ignored."""
    op = "program"
    m = _meta(op, msg, "tile", "iterations", "pulses", "residual_max", "within_tol", "energy_j", "time_s")
    dims: tuple[int | None, ...] = shape if shape is not None else (None, None)
    bounds = conductance_bounds(limits)
    devices = I64_MAX if shape is None else 2 * shape[0] * shape[1]
    gave_up, spent = (
        None if m.get(k) is None else _int(op, k, m[k], 0, devices) for k in ("gave_up", "spent")
    )
    return ProgramReport(
        tile=_str(op, "tile", m["tile"], tile),
        g_plus=_array(op, msg.arrays, "g_plus", dims, bounds=bounds),
        g_minus=_array(op, msg.arrays, "g_minus", dims, bounds=bounds),
        iterations=_int(op, "iterations", m["iterations"], 0, INT32_MAX if max_iters is None else max_iters),
        pulses=_int(op, "pulses", m["pulses"]),
        residual_max=_float(op, "residual_max", m["residual_max"]),
        within_tol=_float(op, "within_tol", m["within_tol"], 0.0, 1.0),
        energy_j=_float(op, "energy_j", m["energy_j"]),
        time_s=_float(op, "time_s", m["time_s"]),
        gave_up=gave_up,
        spent=spent,
    )


def pulse_request(tile: str, counts_plus: np.ndarray, counts_minus: np.ndarray) -> Message:
    return Message({"tile": tile}, {"counts_plus": counts_plus, "counts_minus": counts_minus})


def pulse_reply(r: PulseReport) -> Message:
    return Message(dataclasses.asdict(r))


def pulse_report(msg: Message, tile: str | None = None) -> PulseReport:
    op = "pulse"
    m = _meta(op, msg, "tile", "pulses", "energy_j", "time_s")
    return PulseReport(
        tile=_str(op, "tile", m["tile"], tile),
        pulses=_int(op, "pulses", m["pulses"]),
        energy_j=_float(op, "energy_j", m["energy_j"]),
        time_s=_float(op, "time_s", m["time_s"]),
    )


def conductance_reply(g_plus: np.ndarray, g_minus: np.ndarray) -> Message:
    return Message({}, {"g_plus": g_plus, "g_minus": g_minus})


def conductances(
    msg: Message, shape: tuple[int, int], limits: Limits | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(G+, G-) of a `read_conductance` reply: f4 of the tile's shape, finite, within
    `conductance_bounds(limits)`."""
    op, bounds = "read_conductance", conductance_bounds(limits)
    gp = _array(op, msg.arrays, "g_plus", shape, bounds=bounds)
    gm = _array(op, msg.arrays, "g_minus", shape, bounds=bounds)
    return gp, gm


def mvm_result(msg: Message, batch: int, width: int) -> np.ndarray:
    """y of an `mvm` reply: f4 of shape (batch, width) as asked, finite."""
    return _array("mvm", msg.arrays, "y", (batch, width))


def mvm_request(tile: str, x: np.ndarray, transpose: bool) -> Message:
    return Message({"tile": tile, "transpose": bool(transpose)}, {"x": x})


def settle_request(
    clamp: dict[str, np.ndarray],
    nudge: dict[str, Nudge],
    init: dict[str, np.ndarray],
    trace: bool | int,
) -> Message:
    """Array names are ``clamp/<group>``, ``target/<group>``, ``grad/<group>``, ``init/<group>``."""
    arrays: dict[str, np.ndarray] = {f"clamp/{g}": x for g, x in clamp.items()}
    for g, n in nudge.items():
        if n.target is not None:
            arrays[f"target/{g}"] = n.target
        if n.grad is not None:
            arrays[f"grad/{g}"] = n.grad
    arrays.update({f"init/{g}": x for g, x in init.items()})
    meta = {
        "trace": trace if isinstance(trace, bool) else int(trace),
        "beta": {g: float(n.beta) for g, n in nudge.items()},
    }
    return Message(meta, arrays)


SETTLE_ARRAYS = ("clamp", "target", "grad", "init")  # the prefixes of a settle request's arrays
_SETTLE_TAKES = (
    "a settle takes the arrays clamp/<group>, init/<group>, and target/<group> and grad/<group> "
    "of a group nudged by beta[<group>]"
)


def _by_prefix(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k.split("/", 1)[1]: v for k, v in arrays.items() if k.split("/", 1)[0] == prefix}


def settle_args(msg: Message) -> dict[str, Any]:
    """Keyword arguments of `Device.settle` from a settle request. An array it would not use
    is refused (ProtocolError naming it): one of no known prefix, or a nudge's target or grad
    for a group without beta."""
    for name in msg.arrays:
        prefix, slash, _ = name.partition("/")
        if prefix not in SETTLE_ARRAYS or not slash:
            raise ProtocolError(f"settle request: unknown array {name[:60]!r}; {_SETTLE_TAKES}")
    targets, grads = _by_prefix(msg.arrays, "target"), _by_prefix(msg.arrays, "grad")
    betas = msg.meta.get("beta", {})
    if not isinstance(betas, dict):
        raise ProtocolError(f"settle beta must be an object of group: beta, got {str(betas)[:40]}")
    for kind, found in (("target", targets), ("grad", grads)):
        orphans = sorted(g for g in found if g not in betas)
        if orphans:
            raise ProtocolError(
                f"settle request: array '{kind}/{orphans[0][:40]}' without a beta for its group: a nudge "
                f"is beta[<group>] in the JSON with its target/<group> or grad/<group>; send "
                f'"beta": {{"{orphans[0][:40]}": ...}} or leave the array out'
            )
    # beta passes as sent: the device checks its type and range (a float() would take "nan")
    nudge = {g: Nudge(b, targets.get(g), grads.get(g)) for g, b in betas.items()}
    trace = msg.meta.get("trace", False)
    if not isinstance(trace, bool | int):
        raise ProtocolError(f"settle trace must be a boolean or an integer, got {trace!r}")
    return {
        "clamp": _by_prefix(msg.arrays, "clamp"),
        "nudge": nudge or None,
        "init": _by_prefix(msg.arrays, "init") or None,
        "trace": trace,
    }


# The arrays of the other requests that carry any (a settle's are checked by `settle_args`).
REQUEST_ARRAYS: dict[Op, tuple[str, ...]] = {
    Op.PROGRAM: ("g_plus", "g_minus"),
    Op.PULSE: ("counts_plus", "counts_minus"),
    Op.MVM: ("x",),
}


def check_request_arrays(op: Op, msg: Message) -> None:
    """A request of `op` other than settle carries exactly the arrays it takes (none but
    those of `REQUEST_ARRAYS`): an extra one would be silently ignored (ProtocolError naming
    it and what the request takes); a missing one is the caller's KeyError."""
    takes = REQUEST_ARRAYS.get(op, ())
    extra = [name for name in msg.arrays if name not in takes]
    if extra:
        what = f"the arrays {', '.join(takes)}" if takes else "no arrays"
        raise ProtocolError(
            f"{op.name.lower()} request: unknown array {extra[0][:60]!r}; a {op.name.lower()} takes {what}"
        )


def equilibrium_reply(eq: Equilibrium) -> Message:
    arrays = {f"state/{g}": s for g, s in eq.states.items()}
    if eq.energy is not None:
        arrays["energy/"] = eq.energy
    for k, v in (eq.trace or {}).items():
        arrays[f"trace/{k}"] = v
    meta = {
        "steps": eq.steps,
        "converged": eq.converged,
        "residual": eq.residual,
        "settle_time_s": eq.settle_time_s,
        "energy_j": eq.energy_j,
        "has_trace": eq.trace is not None,
    }
    return Message(meta, arrays)


def equilibrium(
    msg: Message,
    groups: dict[str, int] | None = None,
    batch: int | None = None,
    every: int = 0,
    max_steps: int | None = None,
) -> Equilibrium:
    """The equilibrium of a `settle` reply. With `groups` (the topology's node groups) and
    `batch`, every group's state must be there as f4 (batch, n), finite; with `every` (the
    trace interval asked, 0: none) the trace must be there or absent as asked, of at most
    `max_steps // every + 2` records; `steps` is at most `max_steps`."""
    op = "settle"
    m = _meta(op, msg, "steps", "converged", "residual", "settle_time_s", "energy_j")
    steps = _int(op, "steps", m["steps"], 0, INT32_MAX if max_steps is None else max_steps)
    arrays = msg.arrays
    states = _by_prefix(arrays, "state")
    if groups is not None:
        missing = sorted(set(groups) - set(states))
        if missing:
            raise _bad(op, f"no state for the groups {missing[:4]}")
        _unexpected(op, states, set(groups))
        states = {g: _array(op, arrays, f"state/{g}", (batch, groups[g])) for g in states}  # board's order
    energy = None
    if "energy/" in arrays:
        energy = _array(op, arrays, "energy/", (batch,))
    has_trace = _bool(op, "has_trace", m.get("has_trace", False))
    trace = None
    if groups is not None and has_trace != bool(every):
        raise _bad(op, f"has_trace is {has_trace}, the request asked for {'a' if every else 'no'} trace")
    if has_trace:
        trace = _by_prefix(arrays, "trace")
        if groups is not None:
            t_max = (INT32_MAX if max_steps is None else max_steps) // max(every, 1) + 2
            step = _array(op, arrays, "trace/step", (None,), DTYPES["i8"])
            t = len(step)
            if t > t_max:
                raise _bad(op, f"trace of {t} records, at most {t_max} for {every}-step records")
            _unexpected(op, trace, {"step", "energy", *groups})
            for k in trace:  # in the board's order
                if k == "energy":
                    trace[k] = _array(op, arrays, "trace/energy", (t, batch))
                elif k != "step":
                    trace[k] = _array(op, arrays, f"trace/{k}", (t, batch, groups[k]))
            trace["step"] = step
    return Equilibrium(
        states=states,
        steps=steps,
        converged=_bool(op, "converged", m["converged"]),
        residual=_float(op, "residual", m["residual"], inf=True),
        energy=energy,
        settle_time_s=_float(op, "settle_time_s", m["settle_time_s"]),
        energy_j=_float(op, "energy_j", m["energy_j"]),
        trace=trace,
    )


def safety_reply(s: SafetyCounters) -> Message:
    return Message({"refused": s.refused, "violations": s.violations})  # not asdict: it deep-copies


def safety_counters(msg: Message) -> SafetyCounters:
    m = _meta("safety", msg, "refused", "violations")
    return SafetyCounters(
        _int("safety", "refused", m["refused"]), _int("safety", "violations", m["violations"])
    )


ARRAYS_MAX = (1 << 53) - 1  # STATUS `arrays_id`: an integer JSON carries exactly


def status_reply(s: BoardStatus) -> Message:
    """`arrays_id` only where the board keeps it (older firmware never sends it)."""
    m = {f.name: getattr(s, f.name) for f in dataclasses.fields(s)}
    if s.arrays_id is None:
        del m["arrays_id"]
    return Message(m)


def board_status(msg: Message) -> BoardStatus:
    op = "status"
    m = _meta(op, msg, "epoch")
    tx = m.get("transaction")
    if tx is not None and (not isinstance(tx, str) or len(tx) > 256):
        raise _bad(op, f"transaction must be null or a tag of at most 256 characters, got {str(tx)[:40]}")
    arrays_id = m.get("arrays_id")  # optional: absent from firmware that does not keep it
    return BoardStatus(
        _int(op, "epoch", m["epoch"], -I64_MAX - 1),
        tx,
        _bool(op, "configured", m.get("configured", False)),
        None if arrays_id is None else _int(op, "arrays_id", arrays_id, 0, ARRAYS_MAX),
    )


def meter_reply(m: Meter) -> Message:
    return Message({"clock_s": m.clock_s, "energy_j": m.energy_j, "mvm_calls": m.mvm_calls})


def meter(msg: Message) -> Meter:
    op = "meter"
    m = _meta(op, msg, "clock_s", "energy_j", "mvm_calls")
    return Meter(
        _float(op, "clock_s", m["clock_s"]),
        _float(op, "energy_j", m["energy_j"]),
        _int(op, "mvm_calls", m["mvm_calls"]),
    )


_TILE_WEAR = tuple(f.name for f in dataclasses.fields(TileWear))


def wear_reply(w: Wear) -> Message:
    tiles = {name: {k: getattr(t, k) for k in _TILE_WEAR} for name, t in w.tiles.items()}
    return Message({"endurance": w.endurance, "near_from": w.near_from, "tiles": tiles})


def wear(msg: Message, limits: Limits, shapes: dict[str, tuple[int, int]] | None = None) -> Wear:
    """A wear reply, checked against the board's declared limits: its `endurance` the declared
    one, `near_from` within it, at most `max_tiles` tiles, each count within its tile's devices
    (`shapes`, the host's topology; a tile it does not know, within the largest tile's), no device
    past the endurance and no more devices spent than near their end."""
    op = "wear"
    m = _meta(op, msg, "endurance", "near_from", "tiles")
    declared = limits.pulse_endurance
    endurance = _int(op, "endurance", m["endurance"], 1, 10**15)
    if endurance != declared:
        raise _bad(op, f"endurance {endurance} is not the board's declared pulse_endurance {declared}")
    near_from = _int(op, "near_from", m["near_from"], 0, endurance)
    tiles = m["tiles"]
    if not isinstance(tiles, dict) or len(tiles) > limits.max_tiles:
        raise _bad(op, f"tiles must be an object of at most {limits.max_tiles} tiles, got {str(tiles)[:60]}")
    out = {}
    for name, t in tiles.items():
        if not isinstance(t, dict) or set(t) != set(_TILE_WEAR):
            raise _bad(op, f"tile {name[:60]!r} must hold {', '.join(_TILE_WEAR)}, got {str(t)[:60]}")
        rows, cols = (shapes or {}).get(name, (limits.tile_rows_max, limits.tile_cols_max))
        near = _int(op, f"{name[:60]}.near_end", t["near_end"], 0, 2 * rows * cols)
        out[name] = TileWear(
            max_wear=_int(op, f"{name[:60]}.max_wear", t["max_wear"], 0, endurance),
            near_end=near,
            spent=_int(op, f"{name[:60]}.spent", t["spent"], 0, near),
        )
    return Wear(endurance, near_from, out)


def owner_reply(o: BoardOwner) -> Message:
    return Message({f.name: getattr(o, f.name) for f in dataclasses.fields(o)})


def board_owner(msg: Message) -> BoardOwner:
    op = "owner"
    m = _meta(op, msg, "token")
    token = m["token"]
    if token is not None:
        try:
            check_token(token)
        except ValueError as exc:
            raise _bad(op, str(exc)) from None
    since, lapses = m.get("since"), m.get("lapses_in")
    return BoardOwner(
        token,
        None if since is None else _float(op, "since", since),
        _int(op, "connections", m.get("connections", 0)),
        _float(op, "lease_s", m.get("lease_s", 0.0)),
        None if lapses is None else _float(op, "lapses_in", lapses),
    )
