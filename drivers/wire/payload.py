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
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np

from drivers.base import (
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
)
from drivers.errors import ConfigurationError, ProtocolError
from drivers.scalars import INT32_MAX, as_float, as_int
from drivers.topology import Coupling, SettleBudget, Topology

# dtype codes allowed on the wire (all little-endian): bulk data is f4 (states,
# conductances) and i4 (pulse counts); i8/f8 only for small metadata arrays.
DTYPES = {"f4": np.dtype("<f4"), "i4": np.dtype("<i4"), "i8": np.dtype("<i8"), "f8": np.dtype("<f8")}
MAX_JSON = 1 << 20
MAX_NDIM = 8  # dimensions of one array on the wire (the operations use at most 3)
MAX_ARRAYS = 4096  # arrays in one message (a settle carries a few per node group)
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


# Operations a host may repeat after a link failure without changing the outcome. The
# others carry a request id ("rid") that the board remembers (docs/protocol.md, section 1).
IDEMPOTENT = frozenset(
    {
        Op.INFO, Op.TOPOLOGY, Op.CONFIGURE, Op.READ_CONDUCTANCE, Op.MVM, Op.SETTLE, Op.SAFETY,
        Op.RESET, Op.SAFE_STATE, Op.STATUS, Op.BEGIN, Op.COMMIT, Op.METER,
    }
)  # fmt: skip
# Of the others, operations whose repetition after a board reset is still right: program
# writes absolute targets; a pulse or a wait would be applied twice.
REPEATABLE_AFTER_RESET = frozenset({Op.PROGRAM})


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


def dumps(obj: Any) -> bytes:
    """Compact ASCII JSON (no raw newlines, so it is safe inside an SCPI line)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def loads(data: bytes | bytearray | memoryview) -> Any:
    try:
        return json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"malformed JSON on the wire: {exc}") from exc


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
    spec = meta.pop("arrays", [])
    return Message(meta, unpack_arrays(spec, data))


def pack(msg: Message) -> bytes:
    """One payload: u32 JSON length, JSON, then the array bytes."""
    head = meta_json(msg)
    return _LEN.pack(len(head)) + head + pack_arrays(msg.arrays)


def unpack(payload: bytes | bytearray | memoryview) -> Message:
    view = memoryview(payload)
    if len(view) < _LEN.size:
        raise ProtocolError(f"payload of {len(view)} bytes is too short for a message")
    (n,) = _LEN.unpack_from(view)
    if n > min(MAX_JSON, len(view) - _LEN.size):
        raise ProtocolError(f"JSON length {n} exceeds the payload ({len(view)} bytes)")
    return from_parts(loads(view[_LEN.size : _LEN.size + n]), view[_LEN.size + n :])


# ---- structured metadata -----------------------------------------------------------


def info_to_dict(info: DeviceInfo) -> dict[str, Any]:
    return {
        "identity": dataclasses.asdict(info.identity),
        "limits": dataclasses.asdict(info.limits),
        "capabilities": sorted(info.capabilities),
        "preset": info.preset,
        "extra": dict(info.extra),
    }


def _limits_from_peer(d: Any) -> dict[str, Any]:
    """A peer's limits, every number checked by its field's type (ints are integers, floats
    are finite reals, ``| None`` fields may be null) so that the host's checks compare
    numbers with numbers; fields the peer omits take their defaults."""
    if not isinstance(d, dict):
        raise ProtocolError(f"malformed device info: limits must be an object, got {str(d)[:40]}")
    out = dict(d)
    kinds = {f.name: str(f.type) for f in dataclasses.fields(Limits)}
    try:
        for name, value in d.items():
            kind = kinds.get(name)
            if kind is None or (value is None and kind.endswith("| None")):
                continue
            if kind.startswith("int"):
                out[name] = as_int(f"limits.{name}", value, -(2**63), 2**63 - 1)
            elif kind == "float":
                out[name] = as_float(f"limits.{name}", value, -math.inf, math.inf)
            elif name == "adc_range":
                lo, hi = value
                lo = as_float("limits.adc_range low", lo, -math.inf, math.inf)
                out[name] = (lo, as_float("limits.adc_range high", hi, lo, math.inf))
    except (ConfigurationError, TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed device info: {exc}") from None
    return out


def info_from_dict(d: dict[str, Any]) -> DeviceInfo:
    try:
        limits = _limits_from_peer(d["limits"])
        return DeviceInfo(
            identity=Identity(**d["identity"]),
            limits=Limits(**limits),
            capabilities=frozenset(d["capabilities"]),
            preset=d.get("preset", ""),
            extra=dict(d.get("extra", {})),
        )
    except (KeyError, TypeError) as exc:
        raise ProtocolError(f"malformed device info: {exc}") from exc


def topology_to_dict(topo: Topology) -> dict[str, Any]:
    return {
        "groups": dict(topo.groups),
        "couplings": [
            {"tile": c.tile, "rows": list(c.rows), "cols": list(c.cols), "kind": c.kind, "w_max": c.w_max}
            for c in topo.couplings
        ],
        "gain": topo.gain,
        "mode": topo.mode,
        "budget": dataclasses.asdict(topo.budget),
    }


def topology_from_dict(d: dict[str, Any]) -> Topology:
    """Raises ConfigurationError (from Topology) for a consistent but invalid topology."""
    try:
        couplings = tuple(
            Coupling(
                tile=c["tile"],
                rows=tuple(c["rows"]),
                cols=tuple(c["cols"]),
                kind=c.get("kind", "bipartite"),
                w_max=c.get("w_max", 1.0),
            )
            for c in d["couplings"]
        )
        return Topology(
            groups={str(k): v for k, v in d["groups"].items()},  # sizes checked (not truncated) by Topology
            couplings=couplings,
            gain=d.get("gain", 1.0),
            mode=d.get("mode", "analog"),
            budget=SettleBudget(**d.get("budget", {})),
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise ProtocolError(f"malformed topology: {exc}") from exc


# ---- requests and replies, one pair per operation ---------------------------------


def program_request(
    tile: str, g_plus: np.ndarray, g_minus: np.ndarray, verify: bool, tol: float | None, max_iters: int
) -> Message:
    meta = {"tile": tile, "verify": bool(verify), "tol": tol, "max_iters": int(max_iters)}
    return Message(meta, {"g_plus": g_plus, "g_minus": g_minus})


def program_reply(r: ProgramReport) -> Message:
    meta = {f.name: getattr(r, f.name) for f in dataclasses.fields(r) if f.name not in ("g_plus", "g_minus")}
    return Message(meta, {"g_plus": r.g_plus, "g_minus": r.g_minus})


def program_report(msg: Message) -> ProgramReport:
    return ProgramReport(g_plus=msg.arrays["g_plus"], g_minus=msg.arrays["g_minus"], **msg.meta)


def pulse_request(tile: str, counts_plus: np.ndarray, counts_minus: np.ndarray) -> Message:
    return Message({"tile": tile}, {"counts_plus": counts_plus, "counts_minus": counts_minus})


def pulse_reply(r: PulseReport) -> Message:
    return Message(dataclasses.asdict(r))


def pulse_report(msg: Message) -> PulseReport:
    return PulseReport(**msg.meta)


def conductance_reply(g_plus: np.ndarray, g_minus: np.ndarray) -> Message:
    return Message({}, {"g_plus": g_plus, "g_minus": g_minus})


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


def _by_prefix(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k.split("/", 1)[1]: v for k, v in arrays.items() if k.split("/", 1)[0] == prefix}


def settle_args(msg: Message) -> dict[str, Any]:
    """Keyword arguments of `Device.settle` from a settle request."""
    targets, grads = _by_prefix(msg.arrays, "target"), _by_prefix(msg.arrays, "grad")
    betas = msg.meta.get("beta", {})
    if not isinstance(betas, dict):
        raise ProtocolError(f"settle beta must be an object of group: beta, got {str(betas)[:40]}")
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


def equilibrium(msg: Message) -> Equilibrium:
    m = msg.meta
    return Equilibrium(
        states=_by_prefix(msg.arrays, "state"),
        steps=m["steps"],
        converged=m["converged"],
        residual=m["residual"],
        energy=msg.arrays.get("energy/"),
        settle_time_s=m["settle_time_s"],
        energy_j=m["energy_j"],
        trace=_by_prefix(msg.arrays, "trace") if m.get("has_trace") else None,
    )


def safety_reply(s: SafetyCounters) -> Message:
    return Message(dataclasses.asdict(s))


def safety_counters(msg: Message) -> SafetyCounters:
    return SafetyCounters(int(msg.meta["refused"]), int(msg.meta["violations"]))


def status_reply(s: BoardStatus) -> Message:
    return Message(dataclasses.asdict(s))


def board_status(msg: Message) -> BoardStatus:
    m = msg.meta
    try:
        tx = m.get("transaction")
        return BoardStatus(int(m["epoch"]), None if tx is None else str(tx), bool(m.get("configured", False)))
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed board status {m!r}: {exc}") from exc


def meter_reply(m: Meter) -> Message:
    return Message(dataclasses.asdict(m))


def meter(msg: Message) -> Meter:
    m = msg.meta
    try:
        return Meter(float(m["clock_s"]), float(m["energy_j"]), int(m["mvm_calls"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed meter reply {m!r}: {exc}") from None
