"""A second, independent firmware: an MVM-only board speaking the framed protocol over TCP,
written from docs/protocol.md alone (after an audit's `fwboard.py`), with switches for
firmware bugs that the conformance suite must catch:

- `nofrag`: each frame is taken as a whole message (MORE ignored, every frame a START);
- `noack`: the board says `"piggyback": true` in its HELLO, then never sends an ACK frame (the
  host's acceptance of a reply as its request's ACK hides it until a request needs two
  fragments; a board that does not say so fails at open, tests/test_link_diagnostics.py);
- `norid`: no -109 for a program, pulse or wait without a request id, and no record of ids;
- `slack`: program targets checked with a slack of 0.1 % (up to 1.001 g_max taken), not the
  window of docs/protocol.md "Limits";
- `nolease` (with `lock=True`): a lock bound to the connection, not the token: the owner is
  dropped at once when its last connection closes without a release (no lease, no safe state
  of the board's own), so a killed host's colleagues may take a board it left driven;
- `noreturn` (with `lock=True`): an ordinary reconnect taken for a lost owner: the lock is kept
  for the lease and made safe as it should, but the owner's own token, presented again on a new
  connection within the lease (the host drivers' reconnect after a dropped link), is refused
  (`120`), so a host whose cable hiccuped loses its board for the lease;
- `crcpayload`: the frame CRC-32 over the payload alone, not the header and payload (both ways);
- `cobsff`: a COBS decoder that puts a zero after a 0xFF code block too (a run of 254 non-zero bytes);
- `bigendian`: reply arrays (a program's and a read's conductances, an mvm's y) sent big-endian;
- `colmajor`: a tile's conductances taken and returned in column-major order (a read gives back what
  was programmed, but the product runs through another arrangement of the devices);
- `gscale`: the mvm's W = w_max (G+ - G-) / g_max, not / (g_max - g_min);
- `coarseadc`: the mvm's ADC quantises y at 4 bits over +-(inputs x w_max) while the board declares 8;
- `batchge`: an mvm of exactly max_batch samples refused (>= where > belongs);
- `batchover`: an mvm of max_batch + 1 samples run (the board's own batch check one too loose);
- `clampstrict`: an mvm input exactly at clamp_max refused (x v_read >= v_read_max: equal must pass);
- `lineslack`: the line-current limit enforced with a slack of 5 %;
- `ridreset`: RESET keeps the record of request ids (an id from before it answered from the old epoch);
- `rid1`: the outcome of the last request id alone kept, not of the last 64;
- `meterrows`: the meter's mvm_calls counts samples, not requests;
- `lastref`: a reply's ref is the low byte of the seq of the request's last fragment, not its first;
- `code100`: a limit refusal answered 100 (configuration), not -222;
- `nowait`: WAIT returns at once, its seconds neither waited nor added to the board clock;
- `nowaitlimit`: WAIT takes any finite seconds, past max_wait_s too (this board's first version);
- `tilege`: a tile of exactly tile_rows_max rows refused (>= where > belongs);
- `adcrefuse`: an mvm whose output is past its read-out's range (+-64 w_max) refused (-240), not
  saturated at the rail;
- `noepoch`: RESET leaves the epoch as it was;
- `keeptopo`: RESET keeps the topology (STATUS still configured);
- `microsiemens`: conductances read back (a program's and a read's) in microsiemens, not siemens;
- `noconfcheck`: a topology's w_max, gain and activation taken as sent (this board's first version).

It shares no code with the emulator or the host drivers (framing, CRC, COBS, messages and
the board are its own), so tests that pass against both are tests of the spec. By default it is
a board without ownership (no capability `lock`: opcodes 0x20-0x23 are unknown, 110);
`FirmwareBoard(lock=True)` announces `lock` and keeps an owner as docs/protocol.md "Ownership"
and docs/bringup.md "Ownership (optional)" say (`Ownership` below: tokens, leases, error 120 before
the payload is read, break, and its own safe state when the owner's last connection closes or a
framed HELLO withdraws its token without a release). Where the docs are silent it chooses: a
release or break that ends a lease whose safe state failed tries the safe state again (the docs
name only the lapse; the emulator does not), and a RELEASE leaves the connection presenting its
token (the one it acquired with last, as the emulator does). Either way it is a board without a
pulse endurance (no `pulse`, no `pulse_endurance` limit: it counts no wear, so of the wear query,
opcode 0x24 WEAR, it has only what docs/protocol.md asks of such a board, error 101 at once, "this
board declares no pulse endurance and counts no wear"; a host does not ask it); its RESET keeps
what docs/bringup.md's RESET and SAFE_STATE table says (topology cleared, epoch advanced, the
record of request ids cleared, transaction tag and meter kept).
It declares `max_line_current_a` (a full 512-device line at g_max read at v_read) and refuses
(-222) an mvm whose driven or sensed line, a program whose read-back row (from its targets) or a
read whose row would carry more, in float64 from its float32 conductances; equal passes.
`FirmwareBoard(bug, lock=..., lease_s=...).start()` serves it on a free loopback port (`.uri`);
`.stop()` ends it."""

from __future__ import annotations

import contextlib
import json
import math
import select
import socket
import struct
import threading
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

BUGS = (
    "nofrag", "noack", "norid", "slack", "nolease", "noreturn", "crcpayload", "cobsff", "bigendian",
    "colmajor", "gscale", "coarseadc", "batchge", "batchover", "clampstrict", "lineslack", "ridreset",
    "rid1", "meterrows", "lastref", "code100", "nowait", "tilege", "adcrefuse", "noepoch", "keeptopo",
    "microsiemens", "noconfcheck", "nowaitlimit",
)  # fmt: skip

HDR = struct.Struct("<BBBBHH")
RESP, MORE, ERR, START = 1, 2, 4, 8
ACK, NACK, PING, HELLO, STATS = 1, 2, 3, 4, 5
FRAG = 32768
OPS = {
    0x10: "info", 0x11: "topology", 0x12: "configure", 0x13: "program", 0x14: "pulse",
    0x15: "read_conductance", 0x16: "mvm", 0x17: "settle", 0x18: "wait", 0x19: "safety",
    0x1A: "reset", 0x1B: "safe_state", 0x1C: "status", 0x1D: "begin", 0x1E: "commit", 0x1F: "meter",
    0x24: "wear",
}  # fmt: skip
LOCK_OPS = {0x20: "acquire", 0x21: "owner", 0x22: "release", 0x23: "break"}
NOT_IDEMPOTENT = ("program", "pulse", "wait")
# what drives or changes the board: refused (120) to a connection without the owner's token; the
# rest (info, topology query, status, safety, meter, wear, the lock commands) is open to everyone
DRIVES = frozenset(
    ("configure", "program", "pulse", "read_conductance", "mvm", "settle", "wait", "reset", "safe_state",
     "begin", "commit")
)  # fmt: skip
LOCKED = 120
LEASE_MIN_S, LEASE_MAX_S = 1.0, 600.0
BROKEN_KEPT = 16
LIM: dict[str, Any] = {
    "v_read": 0.2, "v_read_max": 0.25, "g_min": 1e-6, "g_max": 1e-5, "dac_bits": 8, "adc_bits": 8,
    "adc_range": [0.0, 1.0], "tile_rows_max": 512, "tile_cols_max": 512, "max_tiles": 16,
    "max_settle_steps": 100000, "max_pulses": 1000, "settle_step_s": 0.0, "max_verify_iters": 1000,
    "max_wait_s": 1e9, "max_gain": 100.0, "max_w_max": 1e4, "max_beta": 100.0, "max_drive": 1e6,
    "max_batch": 1024,
    # a full line of the largest tile at g_max read at v_read (docs/protocol.md "Line currents")
    "max_line_current_a": 512 * 1e-5 * 0.2,
}  # fmt: skip
F32 = np.float32


def cobs_encode(data: bytes) -> bytes:
    out, block = bytearray(), bytearray()
    for byte in data:
        if byte == 0:
            out += bytes([len(block) + 1]) + block
            block = bytearray()
        else:
            block.append(byte)
            if len(block) == 254:
                out += b"\xff" + block
                block = bytearray()
    return bytes(out + bytes([len(block) + 1]) + block)


def cobs_decode(data: bytes, bug: str | None = None) -> bytes:
    out, i = bytearray(), 0
    while i < len(data):
        code = data[i]
        if code == 0 or i + code > len(data):
            raise ValueError("bad COBS")
        out += data[i + 1 : i + code]
        i += code
        if (code < 255 or bug == "cobsff") and i < len(data):
            out.append(0)
    return bytes(out)


def frame(flags: int, op: int, ref: int, seq: int, payload: bytes = b"", bug: str | None = None) -> bytes:
    body = HDR.pack(1, flags, op, ref, seq & 0xFFFF, len(payload)) + payload
    crc = zlib.crc32(payload if bug == "crcpayload" else body)
    return b"\0" + cobs_encode(body + struct.pack("<I", crc)) + b"\0"


class Fail(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def message(
    meta: dict[str, Any], arrays: tuple[tuple[str, np.ndarray], ...] = (), dtype: str = "<f4"
) -> bytes:
    if arrays:
        meta = dict(meta, arrays=[[n, "f4", list(a.shape)] for n, a in arrays])
    text = json.dumps(meta, separators=(",", ":")).encode()
    data = b"".join(np.ascontiguousarray(a, dtype).tobytes() for _, a in arrays)
    return struct.pack("<I", len(text)) + text + data


def unmessage(payload: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    if len(payload) < 4:
        raise Fail(110, "short message")
    n = struct.unpack_from("<I", payload)[0]
    if n == 0 or 4 + n > len(payload):
        raise Fail(110, "bad json length")
    try:
        meta = json.loads(payload[4 : 4 + n])
    except ValueError as exc:
        raise Fail(-224, "malformed JSON") from exc
    if not isinstance(meta, dict):
        raise Fail(-224, "JSON is not an object")
    arrays, offset, data = {}, 0, payload[4 + n :]
    for name, dtype, shape in meta.get("arrays", []):
        if dtype not in ("f4", "i4", "i8", "f8") or any(not 0 <= d < 2**31 for d in shape):
            raise Fail(-224, f"bad layout for {name}")
        size = np.dtype("<" + dtype).itemsize * math.prod(shape)
        if offset + size > len(data):
            raise Fail(-224, "array bytes missing")
        arrays[name] = np.frombuffer(data, "<" + dtype, math.prod(shape), offset).reshape(shape)
        offset += size
    if offset != len(data):
        raise Fail(-224, "array bytes do not match layout")
    return meta, arrays


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _width_ok(text: str) -> bool:
    try:
        return 0.01 <= float(text) <= 0.25
    except ValueError:
        return False


@dataclass(eq=False)
class Session:
    """One connection: the token it presented (the one it acquired with last), or None."""

    token: str | None = None


def _when(unix: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(unix))


class Ownership:
    """The lock of a board that announces `lock` (docs/protocol.md, "Ownership"). Every method
    runs under the board's lock. `safe` is what SAFE_STATE runs on the board; `clock` the
    monotonic clock of leases (`since` is Unix time, the board's real-time clock)."""

    def __init__(
        self,
        safe: Callable[[], None],
        lease_s: float,
        clock: Callable[[], float],
        nolease: bool = False,
        noreturn: bool = False,
    ) -> None:
        self.safe, self.clock = safe, clock
        self.nolease = nolease  # the bug: a gone owner is dropped at once
        self.noreturn = noreturn  # the bug: a gone owner's token is refused during its lease
        self.own_lease_s = self.lease_s = float(lease_s)
        self.token: str | None = None
        self.since: float | None = None
        self.lapse_at: float | None = None  # set while no connection presents the owner's token
        self.retry_safe = False  # the owner-gone safe state failed: try again at the lapse
        self.sessions: list[Session] = []
        self.broken: deque[str] = deque(maxlen=BROKEN_KEPT)
        self.owner_gone = 0  # safe states applied because the owner was gone (applied, not tried)
        self.refusals: list[str] = []  # the operations refused with 120, in order

    # -- connections ------------------------------------------------------------------------
    def presenting(self) -> int:
        return sum(1 for s in self.sessions if self.token is not None and s.token == self.token)

    def opened(self, session: Session) -> None:
        self.sessions.append(session)

    def closed(self, session: Session) -> None:
        """A connection ended (its socket closed, the host killed or gone)."""
        if session in self.sessions:
            self.sessions.remove(session)
            self._withdrawn(session)

    def hello(self, session: Session) -> None:
        """A framed HELLO begins a new session on the link: the token it presented is withdrawn."""
        self._withdrawn(session)

    def _withdrawn(self, session: Session) -> None:
        token, session.token = session.token, None
        if token is None or token != self.token or self.presenting() > 0:
            return
        if self.nolease:  # the bug: the lock was the connection's, and goes with it
            self._free()
            return
        # the owner's last connection is gone without a release: the lease starts, and the board
        # makes itself safe now (the dead host cannot)
        self.lapse_at = self.clock() + self.lease_s
        self._apply_safe()

    def _apply_safe(self) -> None:
        try:
            self.safe()
        except Exception:  # the line drivers did not answer: tried again at the lapse
            self.retry_safe = True
        else:
            self.retry_safe = False
            self.owner_gone += 1

    def tick(self) -> None:
        """The lapse: a lease that ran out frees the board (a failed safe state is tried again)."""
        if self.lapse_at is not None and self.clock() >= self.lapse_at:
            if self.retry_safe:
                self._apply_safe()
            self._free()

    def _free(self) -> None:
        self.token = self.since = self.lapse_at = None
        self.lease_s = self.own_lease_s
        self.retry_safe = False

    # -- the check before a request that drives the board is read ---------------------------
    def check(self, session: Session, name: str) -> None:
        if session.token is not None and session.token in self.broken:
            said = (f"{name} refused: this host's lock on the board was broken (token {session.token!r}); "
                    "open the board again to take it")  # fmt: skip
        elif self.token is not None and session.token != self.token:
            said = f"{name} refused: {self.describe()}"
        else:
            return
        self.refusals.append(name)
        raise Fail(LOCKED, said)

    def describe(self) -> str:
        assert self.token is not None and self.since is not None
        said = f"the board is owned by {self.token!r} since {_when(self.since)}"
        if self.lapse_at is not None:
            left = max(self.lapse_at - self.clock(), 0.0)
            said += f"; no connection presents its token: free in {left:.1f} s"
        return said + " (SYST:LOCK:BRE, opcode 0x23, breaks it)"

    # -- the lock commands ------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        lapses_in = None if self.lapse_at is None else max(self.lapse_at - self.clock(), 0.0)
        return {"token": self.token, "since": self.since, "connections": self.presenting(),
                "lease_s": self.lease_s, "lapses_in": lapses_in}  # fmt: skip

    def acquire(self, session: Session, meta: dict[str, Any]) -> dict[str, Any]:
        token = _token(meta)
        lease = self.own_lease_s
        if "lease_s" in meta:
            asked = meta["lease_s"]
            if not isinstance(asked, int | float) or isinstance(asked, bool) or math.isnan(asked):
                raise Fail(-224, f"lease_s {asked!r} is not a number")  # NaN included (-Infinity: -222)
            if not LEASE_MIN_S <= asked <= LEASE_MAX_S:
                raise Fail(-222, f"lease_s {asked!r} outside [{LEASE_MIN_S:g}, {LEASE_MAX_S:g}] s")
            lease = float(asked)
        if token in self.broken:
            raise Fail(LOCKED, f"acquire refused: this host's lock on the board was broken (token {token!r})")
        if self.noreturn and self.lapse_at is not None and token == self.token:  # the bug
            raise Fail(
                LOCKED, f"acquire refused: the owner {token!r} is gone; its board is free at the lapse"
            )
        if self.token is not None and token != self.token and session.token != self.token:
            raise Fail(LOCKED, f"acquire refused: {self.describe()}")
        if token != self.token:  # a free board, or the owner's connection passes it on
            self.token, self.since = token, time.time()
        session.token = token
        self.lapse_at, self.retry_safe = None, False  # the owner is back: nothing (more) applied
        self.lease_s = lease
        return self.state()

    def release(self, meta: dict[str, Any]) -> None:
        if _token(meta) == self.token:
            self._end()

    def break_(self) -> None:
        if self.token is not None:
            self.broken.append(self.token)
            self._end()

    def _end(self) -> None:
        """A release or break ends the lock; one that ends a lease whose safe state failed tries
        it again, as the lapse it forestalls would have (the docs name only the lapse)."""
        if self.retry_safe:
            self._apply_safe()
        self._free()


def _token(meta: dict[str, Any]) -> str:
    if "token" not in meta:
        raise Fail(-109, "missing token")
    token = meta["token"]
    if not isinstance(token, str) or not 1 <= len(token) <= 100 or not all(" " <= c <= "~" for c in token):
        raise Fail(-224, f"token {token!r}: 1 to 100 printable ASCII characters")
    return token


class Board:
    """The board: tiles of (G+, G-) float32 with write and read noise; mvm only. `line_v` is
    the largest voltage the board leaves on a line after an operation (its DACs hold the last
    input); SAFE_STATE, RESET and a gone owner's safe state bring every line to 0 V."""

    def __init__(
        self,
        norid: bool = False,
        seed: int = 0,
        lock: bool = False,
        lease_s: float = 15.0,
        slack: bool = False,
        nolease: bool = False,
        noreturn: bool = False,
        bug: str | None = None,
    ) -> None:
        self.bug = bug
        self.norid = norid
        self.slack = slack
        self.rng = np.random.default_rng(seed)
        self.g: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.shapes: dict[str, tuple[int, int, float]] = {}
        self.topology: dict[str, Any] | None = None
        self.epoch, self.transaction = 1, None
        self.refused = self.mvm_calls = 0
        self.clock = self.energy = 0.0
        self.outcomes: OrderedDict[int, tuple[str, Any]] = OrderedDict()
        self.seen: OrderedDict[int, None] = OrderedDict()
        self.lock = threading.Lock()
        self.line_v = 0.0
        self.safe_states: list[float] = []  # monotonic times the lines were brought to 0 V
        own = Ownership(self.lines_to_zero, lease_s, time.monotonic, nolease, noreturn) if lock else None
        self.ownership = own

    def lines_to_zero(self) -> None:
        """What SAFE_STATE runs: every line to 0 V (requests run one at a time under `lock`, so
        nothing else is in flight)."""
        self.line_v = 0.0
        self.safe_states.append(time.monotonic())

    def knows(self, op: int) -> bool:
        return op in OPS or (self.ownership is not None and op in LOCK_OPS)

    def refuse(self, text: str) -> Fail:
        self.refused += 1
        return Fail(100 if self.bug == "code100" else -222, text)

    def out(
        self, meta: dict[str, Any], arrays: tuple[tuple[str, np.ndarray], ...], tile: bool = True
    ) -> bytes:
        """A reply with arrays (`colmajor`: a tile's conductances written column-major; `bigendian`)."""
        if self.bug == "microsiemens" and tile:
            arrays = tuple((n, a * F32(1e6)) for n, a in arrays)
        if self.bug == "colmajor" and tile:
            arrays = tuple((n, a.ravel(order="F").reshape(a.shape)) for n, a in arrays)
        return message(meta, arrays, ">f4" if self.bug == "bigendian" else "<f4")

    def op_info(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
        identity = {"manufacturer": "TestLab", "model": "fw-reference", "serial": "R-0001", "firmware": "0.1"}
        caps = ["mvm"] if self.ownership is None else ["lock", "mvm"]
        return message(
            {"identity": identity, "limits": LIM, "capabilities": caps, "preset": "test", "extra": {}}
        )

    def op_topology(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
        return message({"topology": self.topology})

    def op_configure(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
        groups, couplings = meta.get("groups"), meta.get("couplings")
        if not isinstance(groups, dict) or not isinstance(couplings, list):
            raise Fail(100, "groups/couplings missing")
        if len(couplings) > LIM["max_tiles"]:
            raise self.refuse(f"{len(couplings)} tiles > max_tiles")
        if self.bug != "noconfcheck":
            self._check_settle_fields(meta)
        shapes = {}
        for c in couplings:
            if c.get("kind") not in ("bipartite", "dense"):
                raise Fail(100, f"unsupported kind {c.get('kind')!r}")
            if any(g not in groups and g != "bias" for g in c["rows"]) or any(
                g not in groups for g in c["cols"]
            ):
                raise Fail(100, f"tile {c['tile']}: unknown group")
            rows = sum(1 if g == "bias" else groups[g] for g in c["rows"])
            cols = sum(groups[g] for g in c["cols"])
            if rows > LIM["tile_rows_max"] - (self.bug == "tilege") or cols > LIM["tile_cols_max"]:
                raise self.refuse(f"tile {c['tile']} {rows}x{cols} too large")
            w_max = c.get("w_max")
            if self.bug != "noconfcheck" and not (_is_number(w_max) and 0 < w_max <= LIM["max_w_max"]):
                raise self.refuse(
                    f"tile {c['tile']}: w_max {w_max!r} outside (0, max_w_max {LIM['max_w_max']!r}]"
                )
            shapes[c["tile"]] = (rows, cols, float(w_max))
        self.topology, self.shapes = meta, shapes
        for name, (rows, cols, _) in shapes.items():
            if name not in self.g or self.g[name][0].shape != (rows, cols):
                self.g[name] = (
                    self.rng.uniform(2e-6, 9e-6, (rows, cols)).astype(F32),
                    self.rng.uniform(2e-6, 9e-6, (rows, cols)).astype(F32),
                )
        return message({})

    def _check_settle_fields(self, meta: dict[str, Any]) -> None:
        """docs/protocol.md, Topology: a board without settle validates gain, activation and budget
        as one that settles would (and only stores them): 100 for a rule, -222 for a declared limit."""
        gain, activation = meta.get("gain", 1.0), meta.get("activation", "hard_sigmoid")
        if not _is_number(gain) or not 0 < gain <= LIM["max_gain"]:
            if _is_number(gain) and gain > 0:
                raise self.refuse(f"gain {gain!r} > max_gain {LIM['max_gain']!r}")
            raise Fail(100, f"gain {gain!r}: finite and > 0")
        name, _, width = str(activation).partition(":")
        known = (name in ("hard_sigmoid", "logistic") and not width) or name == "soft_sigmoid"
        if not isinstance(activation, str) or not known or (width and not _width_ok(width)):
            raise Fail(
                100,
                f"activation {activation!r}: hard_sigmoid, logistic or soft_sigmoid[:W], W in [0.01, 0.25]",
            )
        steps = meta.get("budget", {}).get("max_steps", 1) if isinstance(meta.get("budget"), dict) else None
        if not _is_int(steps) or steps < 1:
            raise Fail(100, f"budget max_steps {steps!r}: an integer >= 1")
        if steps > LIM["max_settle_steps"]:
            raise self.refuse(f"budget max_steps {steps} > max_settle_steps {LIM['max_settle_steps']}")

    def _tile(self, meta: dict[str, Any]) -> tuple[str, tuple[int, int, float]]:
        if self.topology is None:
            raise Fail(100, "no topology configured")
        tile = meta.get("tile")
        if tile not in self.shapes:
            raise Fail(100, f"unknown tile {tile!r}")
        return tile, self.shapes[tile]

    def _read(self, tile: str) -> tuple[np.ndarray, np.ndarray]:
        gp, gm = self.g[tile]
        return (gp + self.rng.normal(0, 1e-8, gp.shape)).astype(F32), (
            gm + self.rng.normal(0, 1e-8, gm.shape)
        ).astype(F32)

    def _check_lines(
        self, g: tuple[np.ndarray, np.ndarray], volts: np.ndarray, transpose: bool, what: str
    ) -> None:
        """docs/protocol.md "Line currents": G+ and G- each its own crossbar; driven line i carries
        V_i sum_j G_ij, sensed line j sum_i V_i G_ij, in float64 from the float32 conductances and
        the float64 volts (|x| v_read); each at most max_line_current_a, equal passes."""
        limit = LIM["max_line_current_a"] * (1.05 if self.bug == "lineslack" else 1.0)
        for side, gg in zip(("G+", "G-"), g, strict=True):
            g64 = gg.astype(np.float64)
            driven = volts * (g64.sum(axis=0) if transpose else g64.sum(axis=1))
            sensed = g64 @ volts if transpose else volts @ g64
            worst = max(float(driven.max(initial=0.0)), float(sensed.max(initial=0.0)))
            if not worst <= limit:
                raise self.refuse(f"line current {worst!r} A on {side} ({what}) over {limit!r} A")

    def op_program(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
        tile, (rows, cols, _) = self._tile(meta)
        if meta.get("verify"):
            raise Fail(101, "program_verify not supported: program with verify=False")
        gp, gm = arrays.get("g_plus"), arrays.get("g_minus")
        if gp is None or gm is None or gp.shape != (rows, cols) or gm.shape != (rows, cols):
            raise Fail(100, f"program {tile}: need g_plus, g_minus f4 of shape {(rows, cols)}")
        if self.bug == "colmajor":
            gp, gm = (g.ravel().reshape((rows, cols), order="F") for g in (gp, gm))
        # docs/protocol.md, "Limits": the window's ends rounded to float32, each widened by 4
        # float32 steps of its own, never below 0 (a slack of 0.1 % took 1.001 g_max)
        lo32, hi32 = F32(LIM["g_min"]), F32(LIM["g_max"])
        low = max(float(lo32) - 4 * float(np.spacing(lo32)), 0.0)
        high = float(hi32) + 4 * float(np.spacing(hi32))
        if self.slack:
            low, high = LIM["g_min"] * 0.999, LIM["g_max"] * 1.001
        for g in (gp, gm):
            if not np.all(np.isfinite(g)) or float(g.min()) < low or float(g.max()) > high:
                raise self.refuse("conductance target outside [g_min, g_max]")
        # the read-back reads one row at a time at v_read: from the targets, before anything is written
        for side, g in (("G+", gp), ("G-", gm)):
            row = LIM["v_read"] * float(g.astype(np.float64).sum(axis=1).max(initial=0.0))
            if not row <= LIM["max_line_current_a"]:
                raise self.refuse(f"line current {row!r} A on a {side} row (the reads of a program)")
        self.g[tile] = tuple(  # type: ignore[assignment]
            np.clip(g + self.rng.normal(0, 4.5e-8, g.shape), LIM["g_min"], LIM["g_max"]).astype(F32)
            for g in (gp, gm)
        )
        self.clock += 1e-6 * rows * cols
        self.line_v = LIM["v_read"]  # the read-back's read voltage stays on the lines
        rp, rm = self._read(tile)
        residual = float(np.maximum(abs(rp - gp), abs(rm - gm)).max())
        report = {"tile": tile, "iterations": 0, "pulses": 2 * rows * cols, "residual_max": residual,
                  "within_tol": 1.0, "energy_j": 0.0, "time_s": 1e-6 * rows * cols}  # fmt: skip
        return self.out(report, (("g_plus", rp), ("g_minus", rm)))

    def op_read_conductance(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
        tile, _ = self._tile(meta)
        for side, g in zip(("G+", "G-"), self.g[tile], strict=True):  # a read drives a row at v_read
            row = LIM["v_read"] * float(g.astype(np.float64).sum(axis=1).max(initial=0.0))
            if not row <= LIM["max_line_current_a"]:
                raise self.refuse(f"line current {row!r} A on a {side} row (a read)")
        rp, rm = self._read(tile)
        return self.out({}, (("g_plus", rp), ("g_minus", rm)))

    def op_mvm(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
        tile, (rows, cols, w_max) = self._tile(meta)
        x, transpose = arrays.get("x"), bool(meta.get("transpose"))
        n = cols if transpose else rows
        if x is None or x.ndim != 2 or x.shape[1] != n:
            raise Fail(100, f"mvm {tile}: x must be f4 B x {n}")
        if x.shape[0] > LIM["max_batch"] + {"batchge": -1, "batchover": 1}.get(self.bug or "", 0):
            raise self.refuse("batch > max_batch")
        peak = float(np.abs(x).max(initial=0)) * LIM["v_read"]
        over = peak >= LIM["v_read_max"] if self.bug == "clampstrict" else peak > LIM["v_read_max"]
        if not np.all(np.isfinite(x)) or over:
            raise self.refuse("mvm input beyond clamp_max")
        volts = np.abs(x).max(axis=0, initial=0.0).astype(np.float64) * LIM["v_read"]
        self._check_lines(self.g[tile], volts, transpose, "mvm")
        gp, gm = self._read(tile)
        self.line_v = float(np.abs(x[-1]).max(initial=0)) * LIM["v_read"]  # the last row stays held
        span = LIM["g_max"] - (0.0 if self.bug == "gscale" else LIM["g_min"])
        w = w_max * (gp.astype(np.float64) - gm) / span
        self.mvm_calls += len(x) if self.bug == "meterrows" else 1
        y = x @ (w.T if transpose else w)
        if self.bug == "adcrefuse" and float(np.abs(y).max(initial=0.0)) > 64 * w_max:
            raise Fail(-240, f"mvm read-out over range: |y| {float(np.abs(y).max())!r} > {64 * w_max!r}")
        if self.bug == "coarseadc":  # 4 bits over +-(inputs x w_max)
            full = n * w_max
            step = 2 * full / 15
            y = np.clip(np.round(y / step) * step, -full, full)
        return self.out({}, (("y", y.astype(F32)),), tile=False)

    def op_settle(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
        raise Fail(101, "settle not supported: settle on the host with mvm")

    def op_pulse(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
        raise Fail(101, "pulse not supported: program instead")

    def op_wait(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
        seconds = meta.get("seconds")
        if not isinstance(seconds, int | float) or isinstance(seconds, bool) or not 0 <= seconds < math.inf:
            raise Fail(100, "seconds")
        if seconds > LIM["max_wait_s"] and self.bug != "nowaitlimit":
            raise self.refuse(f"wait {seconds!r} s > max_wait_s {LIM['max_wait_s']!r}")
        if self.bug != "nowait":
            self.clock += seconds
        return message({})

    def op_safety(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
        return message({"refused": self.refused, "violations": 0})

    def op_reset(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
        if self.bug != "keeptopo":
            self.topology, self.shapes = None, {}
        self.epoch += self.bug != "noepoch"
        self.line_v = 0.0  # the lock (if any) stays: only the owner sends RESET
        if self.bug != "ridreset":
            self.outcomes.clear()
            self.seen.clear()
        return message({})

    def op_safe_state(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
        self.lines_to_zero()
        return message({})

    def op_status(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
        status = {
            "epoch": self.epoch,
            "transaction": self.transaction,
            "configured": self.topology is not None,
        }
        return message(status)

    def op_begin(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
        self.transaction = meta.get("tag")
        return message({})

    def op_commit(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
        if self.transaction is not None and meta.get("tag") != self.transaction:
            raise Fail(100, f"commit {meta.get('tag')!r}: the open transaction is {self.transaction!r}")
        self.transaction = None
        return message({})

    def op_meter(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
        return message({"clock_s": self.clock, "energy_j": self.energy, "mvm_calls": self.mvm_calls})

    def op_wear(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
        raise Fail(101, "this board declares no pulse endurance and counts no wear")

    def handle(self, op: int, payload: bytes, session: Session) -> tuple[str, Any]:
        """("ok", reply message) or ("err", Fail); program, pulse and wait at most once by id.
        On a board with ownership, a request that drives the board is checked against the owner
        first, before its payload is read (docs/protocol.md, "The order of the checks")."""
        own = self.ownership
        if own is not None:
            own.tick()
            if op in LOCK_OPS:
                return "ok", self.lock_op(own, LOCK_OPS[op], payload, session)
            if OPS[op] in DRIVES:
                own.check(session, OPS[op])
        name = OPS[op]
        meta, arrays = unmessage(payload)
        run = getattr(self, f"op_{name}")
        if name not in NOT_IDEMPOTENT or self.norid:
            return "ok", run(meta, arrays)
        rid = meta.get("rid")
        if not _is_int(rid) or not 0 <= rid < 2**53:
            raise Fail(-109, "missing request id (rid)")
        if rid in self.outcomes:
            return self.outcomes[rid]
        if rid in self.seen:
            raise Fail(-200, "already ran; its outcome is no longer held")
        try:
            outcome: tuple[str, Any] = ("ok", run(meta, arrays))
        except Fail as exc:
            outcome = ("err", exc)
        self.outcomes[rid], self.seen[rid] = outcome, None
        while len(self.outcomes) > (1 if self.bug == "rid1" else 64):
            self.outcomes.popitem(last=False)
        while len(self.seen) > 4096:
            self.seen.popitem(last=False)
        return outcome

    def lock_op(self, own: Ownership, name: str, payload: bytes, session: Session) -> bytes:
        meta, _ = unmessage(payload)
        if name == "acquire":
            return message(own.acquire(session, meta))
        if name == "owner":
            return message(own.state())
        if name == "release":
            own.release(meta)
        else:
            own.break_()
        return message({})


class Link:
    """One connection's link engine: stop-and-wait, fragments, ACKs, duplicate filter."""

    def __init__(self, sock: socket.socket, board: Board, bug: str | None) -> None:
        self.sock, self.board, self.bug = sock, board, bug
        self.buf = bytearray()
        self.seq, self.last_rx = 0, -1
        self.assembly: list[Any] | None = None  # [op, ref, bytearray]
        self.outq: list[tuple[int, int, int, bytes]] = []
        self.sent_at, self.tries = 0.0, 0
        self.session = Session()

    def send(self, data: bytes, ack: bool = False) -> None:
        if ack and self.bug == "noack":
            return
        self.sock.sendall(data)

    def reply(self, op: int, ref: int, payload: bytes, error: bool = False) -> None:
        if error:
            self.outq = [(RESP | ERR | START, op, ref, payload)]
        else:
            parts = [payload[i : i + FRAG] for i in range(0, max(len(payload), 1), FRAG)]
            last = len(parts) - 1
            self.outq = [
                (RESP | (START if i == 0 else 0) | (MORE if i < last else 0), op, ref, p)
                for i, p in enumerate(parts)
            ]
        self.push()

    def push(self, again: bool = False) -> None:
        if not self.outq:
            return
        flags, op, ref, payload = self.outq[0]
        if not again:
            self.seq, self.tries = (self.seq + 1) & 0xFFFF, 0
        self.send(frame(flags, op, ref, self.seq, payload, self.bug))
        self.sent_at = time.monotonic()

    def nack(self, reason: int) -> None:
        self.send(frame(RESP, NACK, 0, 0xFFFF, bytes([reason]), self.bug))

    def on_chunk(self, chunk: bytes) -> None:
        try:
            body = cobs_decode(chunk, self.bug)
        except ValueError:
            return self.nack(1)
        if len(body) < 12:
            return self.nack(2)
        version, flags, op, _, seq, length = HDR.unpack_from(body)
        if length != len(body) - 12:
            return self.nack(3)
        if (
            zlib.crc32(body[8:-4] if self.bug == "crcpayload" else body[:-4])
            != struct.unpack_from("<I", body, len(body) - 4)[0]
        ):
            return self.nack(4)
        if version != 1:
            return self.nack(5)
        payload = body[8:-4]
        if op == ACK:
            if self.outq and seq == self.seq:
                self.outq.pop(0)
                self.push()
            return None
        if op == NACK:
            if self.outq and seq in (self.seq, 0xFFFF):
                self.push(again=True)
            return None
        self.send(frame(RESP, ACK, 0, seq, b"", self.bug), ack=True)
        if op != HELLO and seq == self.last_rx:
            return None  # a retransmission whose ACK was lost
        self.last_rx = seq
        if op == HELLO:
            self.last_rx = -1
            if self.board.ownership is not None:
                with self.board.lock:
                    self.board.ownership.hello(self.session)
            agreed = self.bug == "noack"  # it may hold ACKs back for replies, so it skips them all
            hello = {"version": 1, "max_fragment": FRAG, "piggyback": agreed, "request_acks": False}
            return self.reply(op, seq & 0xFF, json.dumps(hello).encode())
        self.outq = []  # rule 6: a new request ends a reply in flight
        if self.bug == "nofrag":
            flags = (flags | START) & ~MORE
        if flags & START:
            self.assembly = [op, seq & 0xFF, bytearray()]
        if self.assembly is None or self.assembly[0] != op:
            return None
        self.assembly[2] += payload
        if self.bug == "lastref":
            self.assembly[1] = seq & 0xFF
        if flags & MORE:
            return None
        op, ref, data = self.assembly
        self.assembly = None
        return self.answer(op, ref, bytes(data))

    def answer(self, op: int, ref: int, data: bytes) -> None:
        if op == PING:
            return self.reply(op, ref, data)
        if op == STATS:
            return self.reply(op, ref, b"{}")
        if not self.board.knows(op):
            return self.reply(
                op, ref, json.dumps({"code": 110, "message": f"unknown opcode {op:#x}"}).encode(), True
            )
        try:
            with self.board.lock:
                kind, out = self.board.handle(op, data, self.session)
        except Fail as exc:
            kind, out = "err", exc
        if kind == "ok":
            return self.reply(op, ref, out)
        return self.reply(op, ref, json.dumps({"code": out.code, "message": str(out)}).encode(), True)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            readable, _, _ = select.select([self.sock], [], [], 0.05)
            if readable:
                data = self.sock.recv(65536)
                if not data:
                    return
                self.buf += data
                while (i := self.buf.find(0)) >= 0:
                    chunk, self.buf = bytes(self.buf[:i]), self.buf[i + 1 :]
                    if chunk:
                        self.on_chunk(chunk)
            if self.outq and time.monotonic() - self.sent_at > 0.25:
                self.tries += 1
                if self.tries > 5:
                    self.outq = []
                else:
                    self.push(again=True)


class FirmwareBoard:
    """The board served on a loopback TCP port, one thread per connection."""

    def __init__(self, bug: str | None = None, lock: bool = False, lease_s: float = 15.0) -> None:
        """`lock`: announce the capability and keep an owner, whose lease (when no host asks for
        one) is `lease_s` seconds; without it, a board without ownership, as before."""
        if bug is not None and bug not in BUGS:
            raise ValueError(f"unknown bug {bug!r}; one of {BUGS}")
        self.bug = bug
        if bug in ("nolease", "noreturn") and not lock:
            raise ValueError(f"the bug {bug!r} is one of ownership: serve it with lock=True")
        self.board = Board(
            norid=bug == "norid",
            lock=lock,
            lease_s=lease_s,
            slack=bug == "slack",
            nolease=bug == "nolease",
            noreturn=bug == "noreturn",
            bug=bug,
        )
        self.stop_event = threading.Event()
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(4)
        self.server.settimeout(0.1)
        self.uri = f"serial+socket://127.0.0.1:{self.server.getsockname()[1]}"
        self.threads: list[threading.Thread] = []
        self.conns: set[socket.socket] = set()  # open connections (under conns_lock)
        self.conns_lock = threading.Lock()

    def start(self) -> FirmwareBoard:
        thread = threading.Thread(target=self._accept, daemon=True)
        thread.start()
        self.threads.append(thread)
        return self

    def _accept(self) -> None:
        while not self.stop_event.is_set():
            self._tick()
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _tick(self) -> None:
        """A lease lapses on time even when no request comes (the accept loop wakes every 0.1 s)."""
        if self.board.ownership is not None:
            with self.board.lock:
                self.board.ownership.tick()

    def hang_up(self) -> int:
        """End every open connection from the board's side (a cable pulled, a switch rebooted):
        their hosts see the link fail; returns how many there were."""
        with self.conns_lock:
            conns = list(self.conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        return len(conns)

    def _serve(self, conn: socket.socket) -> None:
        with self.conns_lock:
            self.conns.add(conn)
        link = Link(conn, self.board, self.bug)
        own = self.board.ownership
        if own is not None:
            with self.board.lock:
                own.opened(link.session)
        try:
            link.run(self.stop_event)
        except OSError:
            pass
        finally:
            with self.conns_lock:
                self.conns.discard(conn)
            conn.close()
            if own is not None:  # the connection is gone: so is the token it presented
                with self.board.lock:
                    own.closed(link.session)

    def stop(self) -> None:
        self.stop_event.set()
        self.server.close()
        for thread in self.threads:
            thread.join(timeout=2)
