"""SCPI server over any Device, on TCP (VISA ``TCPIP::...::SOCKET``) and on a pty (``ASRL``).

Each connection (or pty) is a session with its own error queue and status registers.
Malformed input never stops a session: the parser reports the SCPI error, drops the rest
of that message and carries on with the next line.
"""

from __future__ import annotations

import math
import re
import socket
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np

from drivers.base import Device
from drivers.errors import ConfigurationError, DeviceFault, ProtocolError
from drivers.wire import codes, scpi
from drivers.wire import payload as pl
from drivers.wire.payload import Message, Op
from drivers.wire.scpi import MAX_LINE, Param, ParseError, Unit, parse_message
from emulator.server.dispatch import ReplayCache, execute, guard, reboot
from emulator.server.faults import HANG_UPS, REBOOTS, FaultPlan, FaultyStream, closable
from emulator.server.links import (
    IDLE_TIMEOUT_S,
    MAX_CONNECTIONS,
    POLL_S,
    EndpointServer,
    Stream,
    keepalive_within,
)
from emulator.server.ownership import BoardLock, LockSession
from emulator.server.throttle import ErrorThrottle

MAX_BLOCK_IN = 16 << 20  # bytes of one block a connection may send (8 x a 512x512 f4 tile pair)
MAX_ERROR_TEXT = 255  # characters of a queued error message (SCPI-99 21.8); input is never echoed whole
QUEUE_SIZE = 32
HEADER_CACHE = 256  # distinct headers a session remembers the command of
INT_MIN, INT_MAX = -(1 << 63), (1 << 63) - 1  # any integer parameter (commands narrow it)


class MessageSplitter:
    """Cuts a byte stream into program messages at newlines outside blocks.

    Strings cannot hold a newline: a stray quote in garbage must not swallow the commands
    that follow. Quotes are still tracked so that a '#' inside a string is not a block.

    A line of over `MAX_LINE` bytes outside blocks, or one with a block of over
    `max_block` bytes, raises ParseError once and is then dropped whole, up to and including
    its terminator (the rest of an over-size block by its declared length first), without
    buffering it: nothing of it runs."""

    def __init__(self, max_block: int = MAX_BLOCK_IN) -> None:
        self.buf = bytearray()
        self.pos = 0
        self.quote = 0
        self.block_end = 0
        self.max_block = max_block
        self.discard = 0  # bytes of a refused block still to come
        self.skipping = False  # dropping the rest of a refused line

    def feed(self, data: bytes) -> None:
        self.buf += data

    def _skip(self) -> bool:
        """Drop input owed to a refused line; True once all of it has gone."""
        buf = self.buf
        if self.discard:
            k = min(self.discard, len(buf))
            del buf[:k]
            self.discard -= k
            if self.discard:
                return False
        if self.skipping:
            j = buf.find(b"\n")
            if j < 0:
                buf.clear()
                return False
            del buf[: j + 1]
            self.skipping = False
        return True

    def _refuse(self, upto: int) -> None:
        """Drop the current line: `upto` bytes now and later, then up to its terminator."""
        self.discard = max(0, upto - len(self.buf))
        del self.buf[:upto]
        self.skipping = True
        self.pos = self.block_end = self.quote = 0

    def next(self) -> bytes | None:
        if (self.discard or self.skipping) and not self._skip():
            return None
        buf = self.buf
        if not buf:  # all taken (the call after each message): nothing to scan
            return None
        if self.block_end > len(buf):
            return None
        i = max(self.pos, self.block_end)
        if not self.quote and not self.block_end:  # a line without quotes or blocks: no byte loop
            end = buf.find(b"\n", i)
            if (
                end >= 0
                and buf.find(b"#", i, end) < 0
                and buf.find(b'"', i, end) < 0
                and buf.find(b"'", i, end) < 0
            ):
                return self._take(end)
        n = len(buf)
        while i < n:
            c = buf[i]
            if self.quote and c != 0x0A:  # a newline ends the message even inside quotes
                if c == self.quote:
                    self.quote = 0
            elif c in (0x22, 0x27):
                self.quote = c
            elif c == 0x23 and i > 0 and buf[i - 1] in b", \t":
                try:
                    extent = scpi.block_extent(buf, i)
                except scpi.BlockError:
                    extent = (i + 1, i + 1)  # not a block: the parser will say why
                if extent is None:
                    self.pos = i
                    return None
                if extent[1] - extent[0] > self.max_block:
                    size = extent[1] - extent[0]
                    self._refuse(extent[1])
                    raise ParseError(
                        codes.TOO_MUCH_DATA,
                        f"block of {size} bytes exceeds {self.max_block}; the message was dropped",
                    )
                self.block_end = extent[1]
                if extent[1] > n:
                    self.pos = i
                    return None
                i = extent[1]
                continue
            elif c == 0x0A:
                return self._take(i)
            i += 1
        self.pos = i
        if self.pos - self.block_end > MAX_LINE:
            head = bytes(buf[:40])
            self._refuse(len(buf))
            raise ParseError(
                codes.INPUT_BUFFER_OVERRUN,
                f"line of over {MAX_LINE} bytes without a terminator dropped whole: {head!r}...",
            )
        return None

    def _take(self, end: int) -> bytes:
        """The message before the terminator at `end`, removed from the buffer. A line whose
        text after its last block is over `MAX_LINE` is dropped whole (ParseError), however
        it arrived: in pieces, or in one read together with its terminator."""
        buf = self.buf
        text = end - self.block_end
        over = text > MAX_LINE
        msg = bytes(buf[:40] if over else buf[:end])
        del buf[: end + 1]
        self.pos = self.block_end = self.quote = 0
        if over:
            message = f"line of {text} bytes (over {MAX_LINE}) dropped whole: {msg!r}..."
            raise ParseError(codes.INPUT_BUFFER_OVERRUN, message)
        return msg

    def clear(self) -> None:
        self.buf.clear()
        self.pos = self.block_end = self.quote = 0
        self.discard, self.skipping = 0, False


PARSE_CACHE = 256  # short messages without parameters whose headers a session remembers
PARSE_CACHE_LINE = 64  # bytes: a longer message is parsed every time


class MessageParser:
    """`parse_message` that parses a short message without parameters (``*OPC?``,
    ``SYST:SAF?``, ``SYST:ERR?``: most of a session) once: its headers are kept and its
    units built anew on every call. At most `PARSE_CACHE` messages are kept: a new one that
    finds the cache full empties it first, so a peer sending endless new messages can
    neither grow it nor keep the session's common messages out of it for good (they come
    back at their next use). Parsing is a function of the bytes alone, so a cached message
    gets the same units; malformed messages are never cached. One per `ScpiSession`."""

    def __init__(self) -> None:
        self.headers: dict[bytes, tuple[str, ...]] = {}  # message -> its headers (messages that parsed)

    def parse(self, msg: bytes) -> list[Unit]:
        headers = self.headers.get(msg) if type(msg) is bytes else None
        if headers is not None:
            return [Unit(h, []) for h in headers]
        units = parse_message(msg)
        short = type(msg) is bytes and len(msg) <= PARSE_CACHE_LINE
        if short and not any(u.params for u in units):
            if len(self.headers) >= PARSE_CACHE:
                self.headers.clear()
            self.headers[msg] = tuple(u.header for u in units)
        return units


# ---- parameter conversion ------------------------------------------------------------


def _want(params: list[Param], count: int, header: str) -> None:
    if len(params) < count:
        raise ParseError(codes.MISSING_PARAMETER, f"{header} needs {count} parameter(s), got {len(params)}")
    if len(params) > count:
        raise ParseError(
            codes.PARAMETER_NOT_ALLOWED, f"{header} takes {count} parameter(s), got {len(params)}"
        )


def _want_rid(params: list[Param], count: int, header: str) -> int | None:
    """Check for `count` parameters plus an optional trailing request id; return the id."""
    if len(params) == count + 1:
        rid = _int(params[-1])
        del params[-1]
        if not 0 <= rid < 1 << 53:
            raise ParseError(codes.ILLEGAL_PARAMETER_VALUE, f"request id {rid} is not in [0, 2^53)")
        return rid
    _want(params, count, header)
    return None


def _with_rid(meta: dict[str, object], rid: int | None) -> dict[str, object]:
    return meta if rid is None else {**meta, "rid": rid}


def _string(p: Param) -> str:
    if p.kind == "block":
        raise ParseError(codes.DATA_TYPE_ERROR, "expected a string, got a block")
    return str(p.value)


def _block(p: Param) -> bytes:
    if p.kind != "block":
        raise ParseError(codes.DATA_TYPE_ERROR, f"expected a definite-length block, got {p.value!r}")
    return bytes(p.value)


_INTEGER = re.compile(r"[+-]?[0-9]+")


def _shown(p: Param) -> str:
    text = repr(p.value)
    return text if len(text) <= 42 else text[:40] + "..."


# a decimal number as SCPI writes it (<NRf>: sign, digits, point, exponent), or the words for an
# infinity and NaN that float() reads (refused by their own codes below); float() alone also took
# `1_000` (Python's digit separators) as a number
_NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[+-]?(?:inf|infinity|nan)", re.I)


def _float(p: Param) -> float:
    """A finite decimal number: not a number -120, infinite -222, NaN -224."""
    text = _string(p).strip()
    try:
        if not _NUMBER.fullmatch(text):
            raise ValueError(text)
        x = float(text)
    except ValueError:
        raise ParseError(codes.NUMERIC_DATA_ERROR, f"{_shown(p)} is not a number") from None
    if math.isnan(x):
        raise ParseError(codes.ILLEGAL_PARAMETER_VALUE, f"{_shown(p)} is not a number (NaN)")
    if math.isinf(x):
        raise ParseError(codes.DATA_OUT_OF_RANGE, f"{_shown(p)} is out of range (not finite)")
    return x


def _int(p: Param, lo: int = INT_MIN, hi: int = INT_MAX) -> int:
    """An integer in [lo, hi] (exact for integer literals): not an integer -120, outside -222."""
    text = _string(p).strip()
    if _INTEGER.fullmatch(text):
        value = int(text)
    else:
        x = _float(p)
        if x != int(x):
            raise ParseError(codes.NUMERIC_DATA_ERROR, f"{_shown(p)} is not an integer")
        value = int(x)
    if not lo <= value <= hi:
        raise ParseError(codes.DATA_OUT_OF_RANGE, f"{_shown(p)} is outside [{lo}, {hi}]")
    return value


def _bool(p: Param) -> bool:
    text = _string(p).upper()
    if text in ("ON", "1"):
        return True
    if text in ("OFF", "0"):
        return False
    raise ParseError(codes.ILLEGAL_PARAMETER_VALUE, f"expected ON/OFF/1/0, got {p.value!r}")


def _json(p: Param) -> dict[str, object]:
    try:
        meta = pl.loads(_block(p))
    except ProtocolError as exc:
        raise ParseError(codes.ILLEGAL_PARAMETER_VALUE, str(exc)) from None
    if not isinstance(meta, dict):
        raise ParseError(codes.ILLEGAL_PARAMETER_VALUE, "expected a JSON object")
    return meta


def _split_tile(device: Device, tile: str, data: bytes, dtype: str, what: str) -> tuple[np.ndarray, ...]:
    topo = device.topology
    if topo is None:
        raise ConfigurationError("the device has no topology yet; send CONF:TOP first")
    rows, cols = topo.tile_shape(tile)
    arr = np.frombuffer(bytearray(data), dtype)
    if arr.size != 2 * rows * cols:
        raise ConfigurationError(
            f"{what} {tile!r}: the block holds {arr.size} values, the tile needs 2 x {rows} x {cols}"
        )
    return arr[: rows * cols].reshape(rows, cols), arr[rows * cols :].reshape(rows, cols)


# ---- the session ---------------------------------------------------------------------


Buffer = bytes | memoryview
Reply = bytes | list[Buffer] | None  # a list: pieces of one response unit, sent without joining
# a command: its header, its handler, whether its empty reply is a block, the device operation
# it runs (None: what belongs to the session alone, e.g. SYST:ERR?, FETC:DATA?)
Command = tuple[scpi.Header, Callable[[list[Param], str], Reply], bool, Op | None]
_OP_OF_SPEC = {spec: op for op, spec in scpi.OP_HEADERS.items()}


def _block_reply(parts: list[memoryview]) -> list[Buffer]:
    return [scpi.block_header(sum(len(p) for p in parts)), *parts]


def _coalesce(pieces: list[Buffer], small: int = 1 << 16) -> list[Buffer]:
    """Join runs of small pieces (fewer writes); large ones go out as they are (no copy)."""
    out: list[Buffer] = []
    run: list[Buffer] = []
    for p in pieces:
        if len(p) < small:
            run.append(p)
            continue
        if run:
            out.append(b"".join(run))
            run = []
        out.append(p)
    if run:
        out.append(b"".join(run))
    return out


class ScpiSession:
    """One client's view of the instrument: error queue, status registers, last data."""

    def __init__(
        self, device: Device, cache: ReplayCache | None = None, lock: LockSession | None = None
    ) -> None:
        self.device = device
        self.cache = cache
        self.lock = lock  # this session's side of the board's owner (None: a board without ownership)
        self.checked = False  # checked mode: CRC-32 on every message and response
        self.errors_pushed = 0  # errors queued since the session began (the server's throttle)
        self.errors: deque[tuple[int, str]] = deque()
        self.esr = 0
        self.ese = 0
        self.sre = 0
        self.data: list[memoryview] | None = None
        self.commands: list[Command] = []
        for spec, fn, block_reply in self._table():
            self.commands.append((scpi.Header(spec), fn, block_reply, _OP_OF_SPEC.get(spec)))
        self._known: dict[str, Command] = {}
        self._parser = MessageParser()

    def _table(self) -> list[tuple[str, Callable[[list[Param], str], Reply], bool]]:
        owned = [
            (scpi.LOCK_ACQUIRE_Q, self._lock_acquire_q, True),
            (scpi.LOCK_OWNER_Q, self._lock_owner_q, True),
            (scpi.LOCK_RELEASE, self._lock_release, False),
            (scpi.LOCK_BREAK, self._lock_break, False),
        ]
        return (owned if self.lock is not None else []) + [
            (scpi.IDN, self._idn, False),
            (scpi.RST, self._rst, False),
            (scpi.CLS, self._cls, False),
            (scpi.OPC, self._opc, False),
            (scpi.OPC_Q, self._opc_q, False),
            (scpi.WAI, self._nothing, False),
            (scpi.STB_Q, self._stb_q, False),
            (scpi.ESR_Q, self._esr_q, False),
            (scpi.ESE, self._ese, False),
            (scpi.ESE_Q, self._ese_q, False),
            (scpi.SRE, self._sre, False),
            (scpi.SRE_Q, self._sre_q, False),
            (scpi.TST_Q, self._tst_q, False),
            (scpi.ERROR_Q, self._error_q, False),
            (scpi.ERROR_COUNT_Q, self._error_count_q, False),
            (scpi.INFO_Q, self._info_q, True),
            (scpi.SAFETY_Q, self._safety_q, False),
            (scpi.SAFE, self._safe, False),
            (scpi.WAIT, self._wait, False),
            (scpi.TOPOLOGY, self._configure, False),
            (scpi.TOPOLOGY_Q, self._topology_q, True),
            (scpi.PROGRAM_Q, self._program_q, True),
            (scpi.PULSE_Q, self._pulse_q, True),
            (scpi.CONDUCTANCE_Q, self._conductance_q, True),
            (scpi.MVM_Q, self._mvm_q, True),
            (scpi.SETTLE_Q, self._settle_q, True),
            (scpi.FETCH_DATA_Q, self._fetch_q, True),
            (scpi.STATE_Q, self._state_q, True),
            (scpi.METER_Q, self._meter_q, False),
            (scpi.WEAR_Q, self._wear_q, True),
            (scpi.BEGIN, self._begin, False),
            (scpi.COMMIT, self._commit, False),
            (scpi.CHECK_MODE, self._check_mode, False),
            (scpi.CHECK_MODE_Q, self._check_mode_q, False),
            (scpi.CHECKSUM, self._checksum, False),
        ]

    # -- error queue and status
    def push_error(self, code: int, message: str) -> None:
        self.errors_pushed += 1
        if len(message) > MAX_ERROR_TEXT:  # never echo a long input back whole
            message = message[: MAX_ERROR_TEXT - 3] + "..."
        if len(self.errors) >= QUEUE_SIZE:
            self.errors[-1] = (codes.QUEUE_OVERFLOW, "")
        else:
            self.errors.append((code, message))
        if -199 <= code <= -100:
            self.esr |= scpi.ESR_CME
        elif -299 <= code <= -200:
            self.esr |= scpi.ESR_EXE
        elif -499 <= code <= -400:
            self.esr |= scpi.ESR_QYE
        else:
            self.esr |= scpi.ESR_DDE

    def stb(self) -> int:
        status = scpi.STATUS_EAV if self.errors else 0
        if self.esr & self.ese:
            status |= scpi.STATUS_ESB
        return status

    # -- running messages
    def handle(self, msg: bytes) -> list[Buffer] | None:
        """Run one program message; the pieces of the response message (with terminator).

        In checked mode the message must end with a valid checksum trailer (else nothing of
        it runs and -360 is queued), and every message gets a response, sealed with its own
        CRC-32."""
        replies: list[Reply] = []
        units: list[Unit] = []
        if self.checked and not self._verify(msg):
            msg = b""
        elif self.checked:
            msg = msg[: msg.rfind(scpi.CHECK_TRAILER)]
        try:
            units = self._parser.parse(msg)
        except ParseError as exc:
            self.push_error(exc.code, str(exc))
        for unit in units:
            reply = self._run(unit)
            if reply is not None:
                replies.append(reply)
        if not self.checked and len(replies) == 1 and type(replies[0]) is bytes and len(replies[0]) < 1 << 16:
            return [replies[0] + scpi.TERMINATOR]  # one short reply: what _coalesce makes of it
        pieces: list[Buffer] = []
        for k, reply in enumerate(replies):
            if k:
                pieces.append(b";")
            pieces.extend(reply if isinstance(reply, list) else [reply])  # type: ignore[list-item]
        if self.checked:
            crc = 0
            for piece in pieces:
                crc = zlib.crc32(piece, crc)
            pieces.append(scpi.response_check(crc, empty=not any(len(p) for p in pieces)))
        elif not replies:
            return None
        else:
            pieces.append(scpi.TERMINATOR)
        return _coalesce(pieces)

    def _verify(self, msg: bytes) -> bool:
        at = msg.rfind(scpi.CHECK_TRAILER)
        tail = msg[at + len(scpi.CHECK_TRAILER) :] if at >= 0 else b""
        if at < 0 or not tail.isdigit() or len(tail) > 10 or int(tail) != zlib.crc32(msg[:at]):
            self.push_error(codes.COMMUNICATION_ERROR, "checksum mismatch: the message was not run")
            return False
        return True

    def _find(self, header: str) -> Command | None:
        """The command a header names; headers seen before are looked up in a dict (at most
        `HEADER_CACHE` of them: a peer sending endless new headers cannot grow it)."""
        found = self._known.get(header)
        if found is None:
            found = next((c for c in self.commands if c[0].matches(header)), None)
            if found is not None and len(self._known) < HEADER_CACHE:
                self._known[header] = found
        return found

    def _run(self, unit: Unit) -> Reply:
        query = unit.header.endswith("?")
        found = self._find(unit.header)
        if found is None:
            self.push_error(codes.UNDEFINED_HEADER, unit.header)
            return b"" if query else None
        _, fn, block_reply, op = found
        try:
            if op is not None and self.lock is not None:
                # ownership before any parameter is read (docs/protocol.md, "Ownership": the
                # order of the checks): a non-owner's request that drives the board is 120,
                # whatever its parameters, so nothing of the board's state answers it
                self.lock.lock.check(self.lock, op)
            return fn(unit.params, unit.header)
        except ParseError as exc:
            self.push_error(exc.code, f"{unit.header}: {exc}")
        except Exception as exc:  # every device error goes to the queue; the session lives on
            self.push_error(*codes.code_for(exc))
        if query:
            return scpi.block(b"") if block_reply else b""
        return None

    def _op(self, op: Op, request: Message) -> Message:
        self.data = None
        return execute(self.device, op, request, self.cache, self.lock)

    def _with_data(self, reply: Message) -> bytes:
        """The JSON block of a reply; its arrays wait for FETC:DATA?."""
        self.data = pl.array_buffers(reply.arrays) if reply.arrays else None
        return scpi.block(pl.meta_json(reply))

    # -- IEEE 488.2 commons
    def _idn(self, params: list[Param], h: str) -> Reply:
        _want(params, 0, h)
        return self.device.info.identity.idn().encode()

    def _rst(self, params: list[Param], h: str) -> Reply:
        _want(params, 0, h)
        self._op(Op.RESET, Message())
        self.errors.clear()
        return None

    def _cls(self, params: list[Param], h: str) -> Reply:
        _want(params, 0, h)
        self.errors.clear()
        self.esr = 0
        return None

    def _opc(self, params: list[Param], h: str) -> Reply:
        _want(params, 0, h)
        self.esr |= scpi.ESR_OPC
        return None

    def _opc_q(self, params: list[Param], h: str) -> Reply:
        _want(params, 0, h)
        return b"1"

    def _nothing(self, params: list[Param], h: str) -> Reply:
        _want(params, 0, h)
        return None

    def _stb_q(self, params: list[Param], h: str) -> Reply:
        _want(params, 0, h)
        return str(self.stb()).encode()

    def _esr_q(self, params: list[Param], h: str) -> Reply:
        _want(params, 0, h)
        value, self.esr = self.esr, 0
        return str(value).encode()

    def _ese(self, params: list[Param], h: str) -> Reply:
        _want(params, 1, h)
        self.ese = _int(params[0], 0, 255)
        return None

    def _ese_q(self, params: list[Param], h: str) -> Reply:
        _want(params, 0, h)
        return str(self.ese).encode()

    def _sre(self, params: list[Param], h: str) -> Reply:
        _want(params, 1, h)
        self.sre = _int(params[0], 0, 255)
        return None

    def _sre_q(self, params: list[Param], h: str) -> Reply:
        _want(params, 0, h)
        return str(self.sre).encode()

    def _tst_q(self, params: list[Param], h: str) -> Reply:
        _want(params, 0, h)
        return b"0"

    def _error_q(self, params: list[Param], h: str) -> Reply:
        _want(params, 0, h)
        code, message = self.errors.popleft() if self.errors else (codes.NO_ERROR, "")
        return scpi.error_string(code, message).encode()

    def _error_count_q(self, params: list[Param], h: str) -> Reply:
        _want(params, 0, h)
        return str(len(self.errors)).encode()

    # -- device operations
    def _info_q(self, params: list[Param], h: str) -> Reply:
        _want(params, 0, h)
        return scpi.block(pl.meta_json(self._op(Op.INFO, Message())))

    def _safety_q(self, params: list[Param], h: str) -> Reply:
        _want(params, 0, h)
        s = pl.safety_counters(self._op(Op.SAFETY, Message()))
        return f"{s.refused},{s.violations}".encode()

    def _safe(self, params: list[Param], h: str) -> Reply:
        _want(params, 0, h)
        self._op(Op.SAFE_STATE, Message())
        return None

    def _wait(self, params: list[Param], h: str) -> Reply:
        rid = _want_rid(params, 1, h)
        self._op(Op.WAIT, Message(_with_rid({"seconds": _float(params[0])}, rid)))
        return None

    def _configure(self, params: list[Param], h: str) -> Reply:
        _want(params, 1, h)
        self._op(Op.CONFIGURE, Message(_json(params[0])))
        return None

    def _topology_q(self, params: list[Param], h: str) -> Reply:
        _want(params, 0, h)
        return scpi.block(pl.meta_json(self._op(Op.TOPOLOGY, Message())))

    def _program_q(self, params: list[Param], h: str) -> Reply:
        rid = _want_rid(params, 5, h)
        tile = _string(params[0])
        tol_text = _string(params[2]).upper()
        tol = None if tol_text in ("DEF", "DEFAULT") else _float(params[2])
        gp, gm = _split_tile(self.device, tile, _block(params[4]), "<f4", "program")
        meta = {"tile": tile, "verify": _bool(params[1]), "tol": tol, "max_iters": _int(params[3])}
        request = Message(_with_rid(meta, rid), {"g_plus": gp, "g_minus": gm})
        return self._with_data(self._op(Op.PROGRAM, request))

    def _pulse_q(self, params: list[Param], h: str) -> Reply:
        rid = _want_rid(params, 2, h)
        tile = _string(params[0])
        cp, cm = _split_tile(self.device, tile, _block(params[1]), "<i4", "pulse")
        request = Message(_with_rid({"tile": tile}, rid), {"counts_plus": cp, "counts_minus": cm})
        reply = self._op(Op.PULSE, request)
        return scpi.block(pl.meta_json(reply))

    def _conductance_q(self, params: list[Param], h: str) -> Reply:
        _want(params, 1, h)
        reply = self._op(Op.READ_CONDUCTANCE, Message({"tile": _string(params[0])}))
        return _block_reply(pl.array_buffers(reply.arrays))

    def _mvm_q(self, params: list[Param], h: str) -> Reply:
        _want(params, 3, h)
        tile, transpose = _string(params[0]), _bool(params[1])
        topo = self.device.topology
        if topo is None:
            raise ConfigurationError("the device has no topology yet; send CONF:TOP first")
        rows, cols = topo.tile_shape(tile)
        width = cols if transpose else rows
        x = np.frombuffer(bytearray(_block(params[2])), "<f4")
        if x.size % width:
            raise ConfigurationError(f"mvm {tile!r}: {x.size} values are not a whole batch of width {width}")
        reply = self._op(Op.MVM, Message({"tile": tile, "transpose": transpose}, {"x": x.reshape(-1, width)}))
        return _block_reply(pl.array_buffers(reply.arrays))

    def _settle_q(self, params: list[Param], h: str) -> Reply:
        _want(params, 2, h)
        try:
            request = pl.from_parts(_json(params[0]), bytearray(_block(params[1])))
        except ProtocolError as exc:
            raise ParseError(codes.ILLEGAL_PARAMETER_VALUE, str(exc)) from None
        return self._with_data(self._op(Op.SETTLE, request))

    def _fetch_q(self, params: list[Param], h: str) -> Reply:
        _want(params, 0, h)
        if self.data is None:
            raise DeviceFault(codes.DATA_STALE, "no data: the last operation returned no arrays or failed")
        return _block_reply(self.data)

    def _state_q(self, params: list[Param], h: str) -> Reply:
        _want(params, 0, h)
        return scpi.block(pl.meta_json(self._op(Op.STATUS, Message())))

    def _meter_q(self, params: list[Param], h: str) -> Reply:
        _want(params, 0, h)
        m = pl.meter(self._op(Op.METER, Message()))
        return f"{scpi.number(m.clock_s)},{scpi.number(m.energy_j)},{m.mvm_calls}".encode()

    def _wear_q(self, params: list[Param], h: str) -> Reply:
        _want(params, 0, h)
        return scpi.block(pl.meta_json(self._op(Op.WEAR, Message())))

    def _begin(self, params: list[Param], h: str) -> Reply:
        _want(params, 1, h)
        self._op(Op.BEGIN, Message({"tag": _string(params[0])}))
        return None

    def _commit(self, params: list[Param], h: str) -> Reply:
        _want(params, 1, h)
        self._op(Op.COMMIT, Message({"tag": _string(params[0])}))
        return None

    # -- ownership
    def _lock_acquire_q(self, params: list[Param], h: str) -> Reply:
        """``SYST:LOCK:ACQ? <token>[,<lease_s>]`` (the lease: firmware that takes one)."""
        meta: dict[str, object] = {}
        if len(params) == 2 and self.lock is not None and self.lock.lock.takes_lease:
            meta["lease_s"] = _float(params.pop())
        _want(params, 1, h)
        meta["token"] = _string(params[0])
        return scpi.block(pl.meta_json(self._op(Op.ACQUIRE, Message(meta))))

    def _lock_owner_q(self, params: list[Param], h: str) -> Reply:
        _want(params, 0, h)
        return scpi.block(pl.meta_json(self._op(Op.OWNER, Message())))

    def _lock_release(self, params: list[Param], h: str) -> Reply:
        _want(params, 1, h)
        self._op(Op.RELEASE, Message({"token": _string(params[0])}))
        return None

    def _lock_break(self, params: list[Param], h: str) -> Reply:
        _want(params, 0, h)
        self._op(Op.BREAK, Message())
        return None

    def _check_mode(self, params: list[Param], h: str) -> Reply:
        _want(params, 1, h)
        self.checked = _bool(params[0])
        return None

    def _check_mode_q(self, params: list[Param], h: str) -> Reply:
        _want(params, 0, h)
        return b"1" if self.checked else b"0"

    def _checksum(self, params: list[Param], h: str) -> Reply:
        """Outside checked mode a trailer is accepted and ignored (checked mode strips it)."""
        _want(params, 1, h)
        return None


def messages(session: ScpiSession, splitter: MessageSplitter) -> Iterator[bytes]:
    """Every complete program message in the splitter. An overlong line (or one with an
    over-size block) goes to the error queue once and is dropped whole, up to its terminator;
    the lines after it run."""
    while True:
        try:
            msg = splitter.next()
        except ParseError as exc:
            session.push_error(exc.code, str(exc))
            continue
        if msg is None:
            return
        yield msg


_OP_HEADERS = [(op, scpi.Header(spec)) for op, spec in scpi.OP_HEADERS.items()]


def _op_of(msg: bytes) -> Op | None:
    """The device operation of the message's first unit (what the request faults look at)."""
    head = msg[:64].split(b" ", 1)[0].split(b";", 1)[0]
    try:
        header = head.decode("ascii")
    except UnicodeDecodeError:
        return None
    return next((op for op, pattern in _OP_HEADERS if pattern.matches(header)), None)


class Answer(NamedTuple):
    reply: list[Buffer] | None  # the response pieces (None: the message has no response)
    fault: str | None  # the request fault that struck the message (`FaultPlan.request_fault`)


class Connection:
    """One SCPI connection: its session, its message splitter and the fault plan.
    `respond` is everything the server does with received bytes, so the fuzz tests drive
    the same code as a socket does."""

    def __init__(
        self,
        device: Device,
        cache: ReplayCache | None = None,
        plan: FaultPlan | None = None,
        max_block: int = MAX_BLOCK_IN,
        lock: BoardLock | None = None,
    ) -> None:
        self.device = device
        self.cache = cache
        self.plan = plan or FaultPlan()
        self.max_block = max_block
        self.lock = lock
        self._start()

    def _start(self) -> None:
        lock = None if self.lock is None else self.lock.session()
        self.session = ScpiSession(self.device, self.cache, lock)
        self.splitter = MessageSplitter(self.max_block)
        self.errors_charged = 0  # of the session's errors, those charged to the throttle

    def renew(self) -> None:
        """A new session (what a pty gets after a reset or a hang-up): empty error queue and
        status registers, buffered input dropped, no owner token presented."""
        self.close()
        self._start()

    def close(self) -> None:
        """The session ends: the owner token it presented (if any) starts its lease."""
        if self.session.lock is not None:
            self.session.lock.close()

    def respond(self, data: bytes) -> Iterator[Answer]:
        """Feed received bytes and run every complete program message, yielding each one's
        answer. After a `reset` or `close` fault it stops: the link and the input behind the
        message are gone."""
        self.splitter.feed(data)
        plan = self.plan
        active = plan.active  # a property over five rates: once per read, not once per message
        for msg in messages(self.session, self.splitter):
            fault = plan.request_fault(_op_of(msg)) if active else None
            ran = fault not in REBOOTS or plan.reset_after
            reply = self.session.handle(msg) if ran else None
            if fault in REBOOTS:  # the board reboots (instead of or after running the message)
                reboot(self.device, self.lock, arrays_lost=fault == "lose")
            yield Answer(reply, fault)
            if fault in HANG_UPS:
                return


class ScpiServer(EndpointServer):
    """Serves one Device over SCPI on any number of TCP ports and ptys.

    `plan`: the faults to inject (`emulator.server.faults.FaultPlan`), shared by all
    connections. `cache` remembers the outcomes of requests that carry a request id, shared
    by all sessions. A TCP connection that sends and receives nothing for `idle_timeout_s`
    is closed (None: never), so idle peers cannot hold the connection slots. `lock`: the
    board's owner (`emulator.server.ownership`), shared with its other servers; None serves
    a board without ownership (firmware without the capability)."""

    def __init__(
        self,
        device: Device,
        *,
        plan: FaultPlan | None = None,
        cache: ReplayCache | None = None,
        max_connections: int = MAX_CONNECTIONS,
        max_block: int = MAX_BLOCK_IN,
        idle_timeout_s: float | None = IDLE_TIMEOUT_S,
        lock: BoardLock | None = None,
    ) -> None:
        self.device = device
        self.lock = lock
        self.plan = plan or FaultPlan()
        self.cache = cache or ReplayCache()
        self.max_block = max_block
        guard(device, lock)  # the board makes itself safe when its owner is gone
        # a TCP owner that lost power (no FIN) is dropped within about the lease: its lease runs
        super().__init__(
            max_connections, idle_timeout_s, keepalive_within(None if lock is None else lock.lease_s)
        )

    def _refuse(self, conn: socket.socket) -> None:
        """A connection over the cap reads one error line, then the server closes it."""
        limit = self.gate.limit
        line = scpi.error_string(codes.COMMUNICATION_ERROR, f"too many connections ({limit}); closing")
        conn.sendall(line.encode() + scpi.TERMINATOR)

    def _handler(self, stream: Stream, stopping: threading.Event) -> None:
        plan = self.plan
        if plan.active:
            stream = FaultyStream(stream, plan)
        conn = Connection(self.device, self.cache, plan, self.max_block, self.lock)
        try:
            self._serve_connection(conn, stream, stopping)
        finally:
            conn.close()  # the owner token it presented (if any) starts its lease

    def _serve_connection(self, conn: Connection, stream: Stream, stopping: threading.Event) -> None:
        plan = self.plan
        throttle = ErrorThrottle()
        served = 0
        backlog = False  # complete messages may wait in the splitter (the allowance ran out)
        # a serial line never closes: a host that died on it is seen by its silence (the
        # owner's lease without a byte; `BoardLock.silence`), as on the framed server's pty
        serial_line = conn.lock is not None and not closable(stream)
        quiet_since = time.monotonic()
        while not stopping.is_set():
            wait = throttle.charge(conn.session.errors_pushed - conn.errors_charged)
            conn.errors_charged = conn.session.errors_pushed
            if wait:  # a peer making errors by the hundred: not read until its allowance refills
                if throttle.kick and closable(stream):
                    return
                throttle.hold(wait, stopping)
                quiet_since = time.monotonic()  # not read meanwhile: no silence of the host's
                continue
            data = b"" if backlog else stream.read(POLL_S)
            if not data and not backlog:
                owner = conn.session.lock
                if serial_line and owner is not None and owner.token is not None:
                    owner.lock.silence(owner, time.monotonic() - quiet_since)
                continue
            if data:
                # a silent session stays silent: the bytes may be the next host's (a looker's,
                # lock=0), which must not drive the board with the dead owner's token nor keep
                # its lock from lapsing; the token is presented again by an acquire with it
                quiet_since = time.monotonic()
            backlog = False
            for answer in conn.respond(data):
                if answer.fault in HANG_UPS:
                    if closable(stream):
                        return
                    conn.renew()  # a pty stays: a new session, the reply and any buffered input lost
                    break
                delay = (plan.delay_s if answer.fault == "delay" else 0.0) + plan.reply_delay_s
                if delay and stopping.wait(delay):
                    return  # the server closed while the reply was held back: nobody waits for it
                for piece in answer.reply or ():
                    stream.write(piece)
                served += 1
                if plan.hang_up_after and served >= plan.hang_up_after:
                    return
                if throttle.spent(conn.session.errors_pushed - conn.errors_charged):
                    backlog = True  # the rest of what it sent waits until its allowance refills
                    break
            quiet_since = time.monotonic()  # a long request is no silence of the host's
