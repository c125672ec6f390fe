"""A buggy or hostile board against the host (issue 16): replies of the wrong type, shape,
size or range reach the host over the real transports (pyvisa-py over TCP for SCPI,
pyserial's socket:// for the framed protocol) and are refused with a ProtocolError that
names the operation and the field, never an uncaught TypeError/KeyError/MemoryError and
never a wrong value passed up.

A real emulator server answers; a relay socket between the host and it rewrites chosen
replies as a bad board would send them. The hypothesis tests at the end feed the reply
decoders generated garbage directly."""

from __future__ import annotations

import contextlib
import json
import math
import re
import socket
import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivers import open_device
from drivers.base import Device
from drivers.errors import DeviceError, ProtocolError, RetriesExhausted
from drivers.topology import Topology
from drivers.wire import frames
from drivers.wire import payload as pl
from drivers.wire.frames import Flag
from drivers.wire.payload import Message, Op
from emulator.server import FramedServer, ScpiServer

BOARD = "emulator://?preset=rram&seed=0"
TOPO = Topology.layered([3, 4, 2])  # groups s0 (3), s1 (4), s2 (2); tiles W0 (4 x 4), W1 (5 x 2)
BATCH = 5
X = np.full((BATCH, 4), 0.5, np.float32)  # an mvm input to W0 (3 inputs and the bias)
CLAMP = {"s0": np.full((BATCH, 3), 0.5, np.float32)}
BAD = (ProtocolError, RetriesExhausted)  # a bad reply on open is retried, then reported with its cause


# ---- a relay that rewrites replies -----------------------------------------------------------

Rewrite = Callable[[str, bytes], bytes]  # (request header or op name, reply bytes) -> bytes


class Relay:
    """Listens on loopback, forwards each connection to `upstream`, host to board unchanged
    and board to host through a per-connection parser (`scpi_parser` / `framed_parser`)."""

    def __init__(self, upstream: int, parser: Callable[[], Any]) -> None:
        self.upstream = upstream
        self.parser = parser
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.closed = False
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                host, _ = self.sock.accept()
            except OSError:
                return
            board = socket.create_connection(("127.0.0.1", self.upstream))
            for s in (host, board):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.conns += [host, board]
            p = self.parser()
            threading.Thread(target=self._pump, args=(host, board, p.up), daemon=True).start()
            threading.Thread(target=self._pump, args=(board, host, p.down), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, feed: Callable[[bytes], bytes]) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(feed(data))
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.closed = True
        self.sock.close()
        for s in self.conns:
            with contextlib.suppress(OSError):
                s.close()


class ScpiParser:
    """Splits the host's program messages (blocks and strings skipped) to know which query each
    reply answers, and the board's response messages (a line, or a block and its newline)."""

    def __init__(self, rewrite: Rewrite) -> None:
        self.rewrite = rewrite
        self.queries: deque[str] = deque()
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.lock = threading.Lock()

    def up(self, data: bytes) -> bytes:
        self.inbuf += data
        while (end := _message_end(self.inbuf)) is not None:
            msg = bytes(self.inbuf[:end])
            del self.inbuf[: end + 1]
            header = msg.split(b" ", 1)[0].split(b";", 1)[0].decode("ascii", "replace").upper()
            if b"?" in msg.split(b" ", 1)[0] or msg.rstrip().endswith(b"?"):
                with self.lock:
                    self.queries.append(header)
        return data

    def down(self, data: bytes) -> bytes:
        self.outbuf += data
        out = bytearray()
        while (end := _reply_end(self.outbuf)) is not None:
            reply = bytes(self.outbuf[:end])
            del self.outbuf[:end]
            with self.lock:
                header = self.queries.popleft() if self.queries else ""
            out += self.rewrite(header, reply)
        return bytes(out)


def _message_end(buf: bytearray) -> int | None:
    """Index of the newline ending the first program message in `buf` (None: incomplete)."""
    i = 0
    while i < len(buf):
        c = buf[i]
        if c == 0x23 and i + 1 < len(buf) and 0x31 <= buf[i + 1] <= 0x39:  # a block: skip its bytes
            nd = buf[i + 1] - 0x30
            if i + 2 + nd > len(buf):
                return None
            i += 2 + nd + int(buf[i + 2 : i + 2 + nd])
            continue
        if c == 0x22:  # a string
            j = buf.find(b'"', i + 1)
            if j < 0:
                return None
            i = j + 1
            continue
        if c == 0x0A:
            return i
        i += 1
    return None


def _reply_end(buf: bytearray) -> int | None:
    """End (exclusive, newline included) of the first response message in `buf`."""
    if buf[:1] == b"#" and len(buf) >= 2:
        nd = buf[1] - 0x30
        if len(buf) < 2 + nd:
            return None
        end = 2 + nd + int(buf[2 : 2 + nd]) + 1
        return end if len(buf) >= end else None
    j = buf.find(b"\n")
    return None if j < 0 else j + 1


def block(data: bytes) -> bytes:
    return b"#" + str(len(str(len(data)))).encode() + str(len(data)).encode() + data + b"\n"


def block_data(reply: bytes) -> bytes:
    nd = reply[1] - 0x30
    return reply[2 + nd : -1]


class FramedParser:
    """Rewrites the payload of the board's single-fragment replies (frames re-encoded with the
    same sequence numbers, so the link layer sees nothing wrong)."""

    def __init__(self, rewrite: Callable[[Op, Message], Message | bytes]) -> None:
        self.rewrite = rewrite
        self.deframer = frames.Deframer()

    def up(self, data: bytes) -> bytes:
        return data

    def down(self, data: bytes) -> bytes:
        out = bytearray()
        for chunk in self.deframer.feed(data):
            f = frames.decode(chunk)
            if f.flags & Flag.RESPONSE and f.opcode in Op._value2member_map_ and not f.flags & Flag.ERROR:
                assert not f.flags & Flag.MORE, "keep rewritten replies to one fragment"
                new = self.rewrite(Op(f.opcode), pl.unpack(f.payload))
                body = new if isinstance(new, bytes) else pl.pack(new)
                f = frames.Frame(f.opcode, f.seq, f.flags, body, f.ref)
            out += frames.encode(f)
        return bytes(out)


@pytest.fixture(scope="module")
def board() -> Iterator[Device]:
    with open_device(BOARD) as dev:
        yield dev


@contextlib.contextmanager
def scpi_host(
    board: Device, rewrite: Rewrite, configure: bool = True, timeout: float = 3
) -> Iterator[Device]:
    """A VISA host talking to the real SCPI server through a relay that applies `rewrite`."""
    with ScpiServer(board) as server:  # type: ignore[call-arg]
        relay = Relay(server.listen_tcp()[1], lambda: ScpiParser(rewrite))
        try:
            dev = open_device(f"visa://TCPIP0::127.0.0.1::{relay.port}::SOCKET?attempts=1&timeout={timeout}")
            try:
                if configure:
                    dev.configure(TOPO)
                yield dev
            finally:
                dev.close()
        finally:
            relay.close()


@contextlib.contextmanager
def framed_host(
    board: Device, rewrite: Callable[[Op, Message], Message | bytes], configure: bool = True
) -> Iterator[Device]:
    with FramedServer(board) as server:  # type: ignore[call-arg]
        relay = Relay(server.listen_tcp()[1], lambda: FramedParser(rewrite))
        try:
            dev = open_device(f"serial+socket://127.0.0.1:{relay.port}?attempts=1&timeout=3")
            try:
                if configure:
                    dev.configure(TOPO)
                yield dev
            finally:
                dev.close()
        finally:
            relay.close()


def _refused(opening: Callable[[], object], pattern: str) -> None:
    """`opening` fails with a ProtocolError (or retries exhausted on one) matching `pattern`."""
    with pytest.raises(BAD) as info:
        opening()
    exc = info.value
    cause = exc.last if isinstance(exc, RetriesExhausted) else exc
    assert isinstance(cause, ProtocolError), repr(cause)
    assert re.search(pattern, str(cause)), str(cause)


# ---- the device information --------------------------------------------------------------------


def _info_with(change: Callable[[dict[str, Any]], object]) -> Callable[[Any, Any], Any]:
    """A rewrite of the info reply (SCPI block or framed message) by `change` of its JSON."""

    def scpi(header: str, reply: bytes) -> bytes:
        if header != "SYST:INFO?":
            return reply
        d = json.loads(block_data(reply))
        d = change(d) or d
        return block(json.dumps(d).encode())

    return scpi


INFO_CASES = [
    ("nan limit", lambda d: d["limits"].update(v_read=math.nan), r"limits\.v_read must be finite"),
    ("negative size", lambda d: d["limits"].update(tile_rows_max=-4), r"limits\.tile_rows_max must be >= 1"),
    ("huge int", lambda d: d["limits"].update(max_tiles=10**30), r"limits\.max_tiles must be <= 2147483647"),
    (
        "string number",
        lambda d: d["limits"].update(max_pulses="1000"),
        r"limits\.max_pulses must be an integer",
    ),
    ("bool for int", lambda d: d["limits"].update(max_batch=True), r"limits\.max_batch must be an integer"),
    ("zero batch", lambda d: d["limits"].update(max_batch=0), r"limits\.max_batch must be >= 1"),
    ("g_max below g_min", lambda d: d["limits"].update(g_max=1e-7), r"g_max .* must exceed"),
    ("infinite gain", lambda d: d["limits"].update(max_gain=math.inf), r"limits\.max_gain must be finite"),
    ("adc range", lambda d: d["limits"].update(adc_range=[1.0]), r"adc_range must be \[low, high\]"),
    ("list for dict", lambda d: d.update(limits=[1, 2]), r"limits must be an object"),
    ("identity", lambda d: d.update(identity={"model": 3}), r"identity must hold the strings"),
    ("capabilities", lambda d: d.update(capabilities="mvm"), r"capabilities must be a list"),
    (
        "missing limits",
        lambda d: d.pop("limits") and None,
        r"malformed device info: missing or mistyped field .limits.",
    ),
    ("not an object", lambda d: [d], r"malformed device info: expected an object"),
]


@pytest.mark.parametrize(("case", "change", "pattern"), INFO_CASES, ids=[c[0] for c in INFO_CASES])
def test_scpi_info_absurd(board: Device, case: str, change: Callable, pattern: str) -> None:
    _refused(lambda: scpi_host(board, _info_with(change)).__enter__(), pattern)


def test_info_without_max_batch_decodes(board: Device) -> None:
    """An older board that does not declare max_batch gets the default; one that adds fields
    this host does not know is still understood."""

    def change(d: dict[str, Any]) -> None:
        d["limits"].pop("max_batch")
        d["limits"]["max_future_thing"] = 3

    with scpi_host(board, _info_with(change)) as dev:
        assert dev.info.limits.max_batch == 1024
        assert dev.mvm("W0", X).shape == (BATCH, 4)


def test_framed_info_absurd(board: Device) -> None:
    def rewrite(op: Op, msg: Message) -> Message:
        if op is Op.INFO:
            msg.meta["limits"]["max_settle_steps"] = -1
        return msg

    _refused(lambda: framed_host(board, rewrite).__enter__(), r"limits\.max_settle_steps must be >= 1")


# ---- mvm and read_conductance over SCPI ---------------------------------------------------------


def _on(header: str, make: Callable[[bytes], bytes]) -> Rewrite:
    return lambda h, reply: make(reply) if h == header else reply


def _f4(a: Any) -> bytes:
    return np.asarray(a, "<f4").tobytes()


MVM_CASES = [
    (
        "bigger batch",
        lambda r: block(_f4(np.zeros((BATCH + 1, 4)))),
        r"TILE:MVM\? announced a block of 96 bytes, at most 80",
    ),
    ("smaller width", lambda r: block(_f4(np.zeros((BATCH, 3)))), r"mvm block of 15 values, expected 20"),
    (
        "nan",
        lambda r: block(_f4(np.full((BATCH, 4), np.nan))),
        r"malformed mvm reply: array 'y' contains NaN",
    ),
    ("inf", lambda r: block(_f4(np.full((BATCH, 4), np.inf))), r"array 'y' contains NaN or infinite"),
    ("10 GB header", lambda r: b"#9999999999\n", r"announced a block of 999999999 bytes, at most 80"),
    ("not a block", lambda r: b"1,2,3\n", r"expected a block from TILE:MVM\?"),
]


@pytest.mark.parametrize(("case", "make", "pattern"), MVM_CASES, ids=[c[0] for c in MVM_CASES])
def test_scpi_mvm_reply(board: Device, case: str, make: Callable, pattern: str) -> None:
    with scpi_host(board, _on("TILE:MVM?", make)) as dev:
        _refused(lambda: dev.mvm("W0", X), pattern)


COND_CASES = [
    (
        "nan",
        lambda r: block(_f4(np.full(32, np.nan))),
        r"read_conductance reply: array 'g_plus' contains NaN",
    ),
    (
        "one siemens",
        lambda r: block(_f4(np.full(32, 1.0))),
        r"array 'g_plus' holds values in \[1, 1\], outside",
    ),
    ("short", lambda r: block(_f4(np.zeros(31))), r"conductance block of 31 values, expected 32"),
    (
        "big-endian",  # a firmware that sends its numbers in its own byte order: the message says so
        lambda r: block(np.linspace(3.7e-6, 7.75e-6, 32).astype(">f4").tobytes()),
        r"byte-swapped they would lie in \[3.7e-06, 5.6\d*e-06\]: the board sends big-endian numbers",
    ),
    (
        "microsiemens",  # a firmware that sends conductances in uS: the message names the unit
        lambda r: block(_f4(np.linspace(3.7, 7.75, 32))),
        r"times 1e-06 they would lie in \[3.7e-06, 5.6\d*e-06\]: the board sends micro-units",
    ),
]


def test_a_query_left_unanswered_names_the_ieee_habit(board: Device) -> None:
    """IEEE 488.2 lets a failed query answer nothing; this protocol does not. The timeout says
    so besides asking about the cable (a lab's firmware did exactly this)."""
    with (
        scpi_host(board, _on("TILE:COND?", lambda r: b""), timeout=0.5) as dev,
        pytest.raises(DeviceError) as info,
    ):
        dev.read_conductance("W0")
    text = str(info.value)
    assert "no reply to" in text and "IEEE 488.2" in text and "#10 for a block" in text, text
    assert text.rstrip().endswith("resource string right?")


@pytest.mark.parametrize(("case", "make", "pattern"), COND_CASES, ids=[c[0] for c in COND_CASES])
def test_scpi_conductance_reply(board: Device, case: str, make: Callable, pattern: str) -> None:
    with scpi_host(board, _on("TILE:COND?", make)) as dev:
        _refused(lambda: dev.read_conductance("W0"), pattern)


# ---- settle and program over SCPI: the JSON report and the arrays it announces ------------------


def _json_edit(change: Callable[[dict[str, Any]], object]) -> Callable[[bytes], bytes]:
    def make(reply: bytes) -> bytes:
        if reply == b"#10\n":
            return reply
        d = json.loads(block_data(reply))
        d = change(d) or d
        return block(json.dumps(d).encode())

    return make


def _layout(name: str, **kw: Any) -> Callable[[dict[str, Any]], None]:
    """Change the layout entry of array `name`: its name, dtype or shape."""

    def change(d: dict[str, Any]) -> None:
        for entry in d["arrays"]:
            if entry[0] == name:
                entry[0] = kw.get("rename", entry[0])
                entry[1] = kw.get("dtype", entry[1])
                entry[2] = kw.get("shape", entry[2])

    return change


SETTLE_CASES = [
    (
        "missing group",
        _layout("state/s1", rename="state/zz"),
        r"settle reply: no state for the groups \['s1'\]",
    ),
    (
        "wrong width",
        _layout("state/s1", shape=[2 * BATCH, 2]),
        r"'state/s1' has shape \(10, 2\), expected \(5, 4\)",
    ),
    ("wrong dtype", _layout("state/s2", dtype="i4"), r"'state/s2' has dtype int32, expected float32"),
    (
        "huge layout",
        _layout("state/s2", shape=[2**31 - 1, 2**31 - 1]),
        r"announce \d+ bytes, the request can",
    ),
    ("steps string", lambda d: d.update(steps="5"), r"settle reply: steps must be an integer, got str"),
    ("steps float", lambda d: d.update(steps=5.0), r"steps must be an integer, got float"),
    ("steps huge", lambda d: d.update(steps=10**30), r"steps must be <= 100"),
    ("converged int", lambda d: d.update(converged=1), r"converged must be a boolean"),
    ("residual nan", lambda d: d.update(residual=math.nan), r"residual must be finite"),
    ("energy negative", lambda d: d.update(energy_j=-1.0), r"energy_j must be >= 0"),
    ("energy list", lambda d: d.update(energy_j=[1]), r"energy_j must be a real number, got list"),
    ("missing steps", lambda d: d.pop("steps") and None, r"field 'steps' is missing"),
    (
        "unasked trace",
        lambda d: d.update(has_trace=True),
        r"has_trace is True, the request asked for no trace",
    ),
]


@pytest.mark.parametrize(("case", "change", "pattern"), SETTLE_CASES, ids=[c[0] for c in SETTLE_CASES])
def test_scpi_settle_reply(board: Device, case: str, change: Callable, pattern: str) -> None:
    with scpi_host(board, _on("NET:SETT?", _json_edit(change))) as dev:
        _refused(lambda: dev.settle(CLAMP), pattern)


def test_scpi_settle_nan_state(board: Device) -> None:
    """The arrays fetched after the report: a NaN state is refused, not passed up."""

    def make(reply: bytes) -> bytes:
        data = bytearray(block_data(reply))
        data[:4] = _f4([np.nan])
        return block(bytes(data))

    with scpi_host(board, _on("FETC:DATA?", make)) as dev:
        _refused(lambda: dev.settle(CLAMP), r"settle reply: array '(state|energy)/\w*' contains NaN")


PROGRAM_CASES = [
    (
        "iterations string",
        lambda d: d.update(iterations="3"),
        r"program reply: iterations must be an integer",
    ),
    ("iterations beyond", lambda d: d.update(iterations=21), r"iterations must be <= 20"),
    ("other tile", lambda d: d.update(tile="W1"), r"tile is 'W1', the request was for 'W0'"),
    ("within_tol", lambda d: d.update(within_tol=2.0), r"within_tol must be <= 1"),
    ("wrong shape", _layout("g_plus", shape=[2, 8]), r"'g_plus' has shape \(2, 8\), expected \(4, 4\)"),
]


@pytest.mark.parametrize(("case", "change", "pattern"), PROGRAM_CASES, ids=[c[0] for c in PROGRAM_CASES])
def test_scpi_program_reply(board: Device, case: str, change: Callable, pattern: str) -> None:
    lim = board.info.limits
    g = np.full((4, 4), 0.5 * (lim.g_min + lim.g_max), np.float32)
    with scpi_host(board, _on("TILE:PROG?", _json_edit(change))) as dev:
        _refused(lambda: dev.program("W0", g, g, verify=True, max_iters=20), pattern)


TEXT_CASES = [
    ("SYST:SAF?", b"1,x\n", lambda d: d.safety(), r"malformed safety reply '1,x'"),
    ("SYST:SAF?", b"1,-5\n", lambda d: d.safety(), r"safety reply: violations must be >= 0"),
    ("SYST:SAF?", b"99999999999999999999999,0\n", lambda d: d.safety(), r"refused must be <= "),
    ("SYST:MET?", b"nan,0,1\n", lambda d: d.meter(), r"meter reply: clock_s must be finite"),
    ("SYST:MET?", b"1,2,3.5\n", lambda d: d.meter(), r"malformed meter reply"),
]


@pytest.mark.parametrize(("header", "line", "call", "pattern"), TEXT_CASES)
def test_scpi_text_replies(board: Device, header: str, line: bytes, call: Callable, pattern: str) -> None:
    with scpi_host(board, _on(header, lambda r: line)) as dev:
        _refused(lambda: call(dev), pattern)


def test_scpi_status_and_topology(board: Device) -> None:
    """The status and topology a board reports when the host connects."""

    def status(d: dict[str, Any]) -> None:
        d["epoch"] = "3"

    _refused(
        lambda: scpi_host(board, _on("SYST:STAT?", _json_edit(status))).__enter__(),
        r"status reply: epoch must be an integer",
    )

    def topo(d: dict[str, Any]) -> None:
        d["topology"] = {"groups": {"a": -3}, "couplings": []}

    _refused(lambda: scpi_host(board, _on("CONF:TOP?", _json_edit(topo))).__enter__(), r"malformed topology")


def test_scpi_good_replies_pass(board: Device) -> None:
    """The relay itself changes nothing when told to: every operation works through it."""
    with scpi_host(board, lambda h, r: r) as dev:
        assert dev.mvm("W0", X).shape == (BATCH, 4)
        eq = dev.settle(CLAMP, trace=2)
        assert eq.states["s2"].shape == (BATCH, 2) and eq.trace is not None
        gp, gm = dev.read_conductance("W0")
        assert gp.shape == (4, 4)
        dev.program("W0", gp.clip(1e-6, 1e-5), gm.clip(1e-6, 1e-5))
        assert dev.safety().violations == 0


# ---- the framed protocol ----------------------------------------------------------------------


def _framed(op: Op, edit: Callable[[Message], Message | bytes]) -> Callable[[Op, Message], Message | bytes]:
    return lambda o, msg: edit(msg) if o is op else msg


def _arrays(**arrays: np.ndarray) -> Callable[[Message], Message]:
    def edit(msg: Message) -> Message:
        msg.arrays.update(arrays)
        return msg

    return edit


def _huge_layout(msg: Message) -> bytes:
    """A layout that declares a 2^62-element array with none of its bytes."""
    head = pl.dumps({**msg.meta, "arrays": [["y", "f4", [2**31 - 1, 2**31 - 1]]]})
    return pl._LEN.pack(len(head)) + head


FRAMED_MVM = [
    (
        "bigger batch",
        _arrays(y=np.zeros((BATCH + 1, 4), np.float32)),
        r"'y' has shape \(6, 4\), expected \(5, 4\)",
    ),
    ("f8", _arrays(y=np.zeros((BATCH, 4), np.float64)), r"'y' has dtype float64, expected float32"),
    ("nan", _arrays(y=np.full((BATCH, 4), np.nan, np.float32)), r"mvm reply: array 'y' contains NaN"),
    ("missing", lambda m: Message(m.meta), r"mvm reply: array 'y' is missing"),
    ("huge layout", _huge_layout, r"array 'y' runs past the end of the data"),
]


@pytest.mark.parametrize(("case", "edit", "pattern"), FRAMED_MVM, ids=[c[0] for c in FRAMED_MVM])
def test_framed_mvm_reply(board: Device, case: str, edit: Callable, pattern: str) -> None:
    with framed_host(board, _framed(Op.MVM, edit)) as dev:
        _refused(lambda: dev.mvm("W0", X), pattern)


def _drop_state(msg: Message) -> Message:
    del msg.arrays["state/s1"]
    return msg


def _meta(**kw: Any) -> Callable[[Message], Message]:
    def edit(msg: Message) -> Message:
        msg.meta.update(kw)
        return msg

    return edit


FRAMED_SETTLE = [
    ("missing group", _drop_state, r"no state for the groups \['s1'\]"),
    ("extra group", _arrays(**{"state/zz": np.zeros((BATCH, 1), np.float32)}), r"unexpected arrays \['zz'\]"),
    ("wrong batch", _arrays(**{"state/s2": np.zeros((BATCH + 2, 2), np.float32)}), r"expected \(5, 2\)"),
    ("energy shape", _arrays(**{"energy/": np.zeros((2, BATCH), np.float32)}), r"'energy/' has shape"),
    ("steps bool", _meta(steps=True), r"steps must be an integer, got the boolean"),
    ("settle time inf", _meta(settle_time_s=math.inf), r"settle_time_s must be finite"),
]


@pytest.mark.parametrize(("case", "edit", "pattern"), FRAMED_SETTLE, ids=[c[0] for c in FRAMED_SETTLE])
def test_framed_settle_reply(board: Device, case: str, edit: Callable, pattern: str) -> None:
    with framed_host(board, _framed(Op.SETTLE, edit)) as dev:
        _refused(lambda: dev.settle(CLAMP), pattern)


def test_framed_trace_too_long(board: Device) -> None:
    """A trace of more records than the budget allows at the interval asked."""

    def edit(msg: Message) -> Message:
        t = 200
        msg.arrays = {k: v for k, v in msg.arrays.items() if not k.startswith("trace/")}
        msg.arrays["trace/step"] = np.arange(t, dtype=np.int64)
        return msg

    with framed_host(board, _framed(Op.SETTLE, edit)) as dev:
        _refused(lambda: dev.settle(CLAMP, trace=1), r"trace of 200 records, at most 102")


def test_framed_pulse_and_error_replies(board: Device) -> None:
    zeros = np.zeros((4, 4), np.int32)
    with framed_host(board, _framed(Op.PULSE, _meta(pulses=-1))) as dev:
        _refused(lambda: dev.pulse("W0", zeros, zeros), r"pulse reply: pulses must be >= 0")
    with framed_host(board, _framed(Op.SAFETY, _meta(refused=[1]))) as dev:
        _refused(lambda: dev.safety(), r"safety reply: refused must be an integer, got list")


def test_framed_error_frame_garbage(board: Device) -> None:
    """An ERROR reply whose code is not an integer."""

    class Parser(FramedParser):
        def down(self, data: bytes) -> bytes:
            out = bytearray()
            for chunk in self.deframer.feed(data):
                f = frames.decode(chunk)
                if f.flags & Flag.RESPONSE and f.opcode == Op.MVM:
                    body = pl.dumps({"code": "x", "message": 3})
                    f = frames.Frame(f.opcode, f.seq, f.flags | Flag.ERROR, body, f.ref)
                out += frames.encode(f)
            return bytes(out)

    with FramedServer(board) as server:  # type: ignore[call-arg]
        relay = Relay(server.listen_tcp()[1], lambda: Parser(lambda o, m: m))
        try:
            with open_device(f"serial+socket://127.0.0.1:{relay.port}?attempts=1&timeout=3") as dev:
                dev.configure(TOPO)
                _refused(lambda: dev.mvm("W0", X), r"malformed error reply to request 0x16")
        finally:
            relay.close()


def test_framed_good_replies_pass(board: Device) -> None:
    with framed_host(board, lambda o, m: m) as dev:
        assert dev.mvm("W0", X).shape == (BATCH, 4)
        assert dev.settle(CLAMP, trace=3).trace is not None
        assert dev.safety().violations == 0


# ---- property tests of the decoders ----------------------------------------------------------

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

GARBAGE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, -1, 2**31, 2**63, 2**64, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 5e-324, 1e308, -0.0]),
    st.text(max_size=5),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)
GROUPS = {"s0": 3, "s1": 4, "s2": 2}


def _decoded(fn: Callable[[], Any]) -> tuple[bool, Any]:
    try:
        return True, fn()
    except ProtocolError as exc:
        return False, exc


def _valid_settle_meta() -> dict[str, Any]:
    return {"steps": 5, "converged": True, "residual": 0.0, "settle_time_s": 1e-6, "energy_j": 1e-9}


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    shape = draw(st.sampled_from([(BATCH, 4), (BATCH, 2), (BATCH,), (BATCH + 1, 4), (0, 4), (BATCH, 4, 1)]))
    dtype = draw(st.sampled_from([np.float32, np.float64, np.int32, np.int64]))
    fill = draw(st.sampled_from([0.5, math.nan, math.inf, -math.inf, 5e-324, 3e38, 1e300, 0.0]))
    with np.errstate(over="ignore", invalid="ignore"):
        return np.full(shape, fill).astype(dtype)


@SETTINGS
@given(field=st.sampled_from([*sorted(_valid_settle_meta()), "has_trace"]), value=GARBAGE, arr=arrays())
def test_equilibrium_decoder(field: str, value: object, arr: np.ndarray) -> None:
    meta = {**_valid_settle_meta(), field: value}
    states = {f"state/{g}": np.full((BATCH, n), 0.5, np.float32) for g, n in GROUPS.items()}
    states["state/s1"] = arr
    ok, res = _decoded(lambda: pl.equilibrium(Message(meta, states), GROUPS, BATCH, 0, 100))
    if ok:
        eq = res
        assert type(eq.steps) is int and 0 <= eq.steps <= 100
        assert type(eq.converged) is bool and eq.trace is None
        assert not math.isnan(eq.residual) and eq.residual >= 0
        for x in (eq.settle_time_s, eq.energy_j):
            assert type(x) is float and math.isfinite(x) and x >= 0
        for g, n in GROUPS.items():
            s = eq.states[g]
            assert s.dtype == np.float32 and s.shape == (BATCH, n) and np.isfinite(s).all()


@SETTINGS
@given(arr=arrays(), transpose=st.booleans())
def test_mvm_decoder(arr: np.ndarray, transpose: bool) -> None:
    width = 2 if transpose else 4
    ok, res = _decoded(lambda: pl.mvm_result(Message({}, {"y": arr}), BATCH, width))
    assert ok == (arr.dtype == np.float32 and arr.shape == (BATCH, width) and bool(np.isfinite(arr).all()))
    if ok:
        assert res is arr


@SETTINGS
@given(
    field=st.sampled_from(
        ["iterations", "pulses", "residual_max", "within_tol", "energy_j", "time_s", "tile"]
    ),
    value=GARBAGE,
    fill=st.sampled_from([5e-6, math.nan, 1.0, -1e-5, 0.0, 2.4e-5, math.inf]),
)
def test_program_decoder(board: Device, field: str, value: object, fill: float) -> None:
    lim = board.info.limits
    meta = {"tile": "W0", "iterations": 3, "pulses": 10, "residual_max": 1e-7, "within_tol": 1.0}
    meta.update(energy_j=1e-12, time_s=1e-6)
    meta[field] = value
    g = np.full((4, 4), fill, np.float32)
    ok, res = _decoded(
        lambda: pl.program_report(Message(meta, {"g_plus": g, "g_minus": g}), "W0", (4, 4), lim, 20)
    )
    if ok:
        span = lim.g_max - lim.g_min
        assert res.tile == "W0" and type(res.iterations) is int and 0 <= res.iterations <= 20
        assert type(res.pulses) is int and res.pulses >= 0
        assert 0 <= res.within_tol <= 1 and math.isfinite(res.residual_max + res.energy_j + res.time_s)
        assert lim.g_min - span <= float(res.g_plus.min()) <= float(res.g_plus.max()) <= lim.g_max + span


@SETTINGS
@given(
    which=st.sampled_from(["safety", "meter", "status", "pulse"]),
    field=st.sampled_from(
        [
            "refused",
            "violations",
            "clock_s",
            "energy_j",
            "mvm_calls",
            "epoch",
            "transaction",
            "configured",
            "arrays_id",
            "pulses",
            "time_s",
            "tile",
        ]
    ),
    value=GARBAGE,
)
def test_small_reply_decoders(which: str, field: str, value: object) -> None:
    base = {
        "safety": {"refused": 0, "violations": 0},
        "meter": {"clock_s": 1.0, "energy_j": 0.0, "mvm_calls": 3},
        "status": {"epoch": 1, "transaction": None, "configured": True},
        "pulse": {"tile": "W0", "pulses": 3, "energy_j": 0.0, "time_s": 0.0},
    }[which]
    meta = {**base, field: value}
    decode = {
        "safety": pl.safety_counters,
        "meter": pl.meter,
        "status": pl.board_status,
        "pulse": lambda m: pl.pulse_report(m, "W0"),
    }[which]
    ok, res = _decoded(lambda: decode(Message(meta)))
    if ok:
        for k, v in vars(res).items():
            if k in ("tile", "transaction"):
                assert v is None or isinstance(v, str)
            elif k == "configured":
                assert type(v) is bool
            elif k == "epoch":
                assert type(v) is int
            elif k == "arrays_id":  # optional: None where the board does not send it
                assert v is None or (type(v) is int and 0 <= v < 2**53), v
            else:
                assert type(v) in (int, float) and math.isfinite(v) and v >= 0, (k, v)


LIMIT_FIELDS = [f for f in pl._LIMIT_RANGES if f not in ("dac_bits", "adc_bits")] + ["adc_range"]


@SETTINGS
@given(field=st.sampled_from([*LIMIT_FIELDS, "dac_bits"]), value=GARBAGE)
def test_info_decoder(board: Device, field: str, value: object) -> None:
    """Declared limits that pass are of their field's type, finite and in range."""
    d = pl.info_to_dict(board.info)
    d["limits"][field] = value
    ok, res = _decoded(lambda: pl.info_from_dict(d))
    if ok:
        lim = res.limits
        for name, (lo, hi) in pl._LIMIT_RANGES.items():
            v = getattr(lim, name)
            if v is None:
                continue
            assert type(v) in (int, float) and math.isfinite(v) and lo <= v <= hi, (name, v)
        assert lim.g_max > lim.g_min and lim.adc_range[0] < lim.adc_range[1]


@SETTINGS
@given(
    meta=st.one_of(GARBAGE, st.dictionaries(st.sampled_from(["steps", "arrays", "x"]), GARBAGE)),
    data=st.binary(max_size=32),
)
def test_unpack_never_crashes(meta: object, data: bytes) -> None:
    """Any JSON and bytes from a peer: a Message or ProtocolError."""
    try:
        head = pl.dumps(meta)
    except (TypeError, ValueError):
        return
    try:
        msg = pl.unpack(pl._LEN.pack(len(head)) + head + data)
    except ProtocolError:
        return
    with contextlib.suppress(ProtocolError):
        pl.equilibrium(msg, GROUPS, BATCH, 0, 100)


def test_errors_are_device_errors() -> None:
    assert issubclass(ProtocolError, DeviceError)


@pytest.mark.parametrize(
    ("theirs", "delay"),
    [
        (0.1, 0.025),
        (10.0, 0.0625),
        (10**400, 0.0625),
        (-1, 0.0),
        (float("nan"), 0.0),
        (True, 0.0),
        ("1", 0.0),
    ],
    ids=["shorter", "longer", "1e400", "negative", "nan", "bool", "str"],
)
def test_a_hello_reply_sets_a_sane_ack_delay_whatever_its_ack_timeout(theirs: object, delay: float) -> None:
    """The board's HELLO reply names its ACK timeout; a value the host cannot use (not a
    positive number) means no held-back ACKs, and one no float holds (a JSON integer of 401
    digits) is longer than the host's own: a quarter of the host's 0.25 s."""
    from drivers.serial import SerialDevice

    host = SerialDevice("socket://127.0.0.1:9", name="unopened", ack_timeout=0.25)
    assert host._response_ack_delay({"request_acks": True, "ack_timeout": theirs}) == pytest.approx(delay)
