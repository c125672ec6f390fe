"""Hostile peers against the real servers over sockets (issue 16, classes 4 and 5).

Raw sockets play the attacker; each test then shows a well-formed peer is still served."""

from __future__ import annotations

import contextlib
import functools
import socket
import struct
import time
from collections.abc import Iterator

import numpy as np
import pytest

from drivers import open_device
from drivers.base import Device
from drivers.topology import Topology
from drivers.wire import codes, frames
from drivers.wire import payload as pl
from drivers.wire.frames import Flag, LinkOp
from drivers.wire.link import Link
from drivers.wire.scpi import SETTLE_Q
from drivers.wire.scpi import block as scpi_block
from drivers.wire.scpi import short_form as scpi_short
from emulator.server import FramedServer, ScpiServer
from emulator.server import links as links_mod
from emulator.server import scpi as scpi_mod
from hil.testing import socket_link
from tests.raw_scpi import RawScpi
from tests.waiting import until

BOARD = "emulator://?preset=rram&seed=0"


@pytest.fixture
def device() -> Iterator[Device]:
    with open_device(BOARD) as dev:
        yield dev


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


@contextlib.contextmanager
def scpi_server(device: Device, **kw: int) -> Iterator[tuple[ScpiServer, int]]:
    with ScpiServer(device, **kw) as server:  # type: ignore[arg-type]
        yield server, server.listen_tcp()[1]


_until = functools.partial(until, timeout=3.0)  # most waits here are this long


def _framed_link(sock: socket.socket) -> Link:
    return socket_link(sock, ack_timeout=1.0, retries=3)


def _exchange(link: Link, opcode: int, body: bytes) -> tuple[frames.Frame, bytes]:
    seq = link.send(opcode, body)
    got = link.receive(5.0, response=True, ref=seq)
    assert got is not None, "no reply"
    return got


# ---- class 4: resource exhaustion ----------------------------------------------------


def test_oversize_framed_message_is_refused_and_the_link_lives_on(device: Device) -> None:
    with FramedServer(device, max_message=100_000) as server:
        port = server.listen_tcp()[1]
        with _connect(port) as sock:
            link = _framed_link(sock)
            first, body = _exchange(link, LinkOp.PING, b"x" * 200_000)  # 7 fragments, over the cap
            assert first.flags & Flag.ERROR
            err = pl.loads(body)
            assert err["code"] == codes.TOO_MUCH_DATA and "100000" in err["message"]
            first, body = _exchange(link, LinkOp.PING, b"y" * 90_000)  # under the cap: served
            assert not first.flags & Flag.ERROR and body == b"y" * 90_000
            first, body = _exchange(link, pl.Op.STATUS, pl.pack(pl.Message()))
            assert not first.flags & Flag.ERROR
        assert frames.MAX_MESSAGE >= 4 * 2 * 512 * 512 * 4  # a 512x512 f4 tile pair, 4 times over


def test_links_of_closed_connections_are_freed(device: Device) -> None:
    with FramedServer(device) as server:
        port = server.listen_tcp()[1]
        for _ in range(5):
            with _connect(port) as sock:
                _exchange(_framed_link(sock), LinkOp.PING, b"hi")
        assert _until(lambda: not server.links), f"{len(server.links)} links kept"


def test_scpi_connection_cap_refuses_with_an_error_line(device: Device) -> None:
    with scpi_server(device, max_connections=2) as (server, port):
        a, b = RawScpi(port), RawScpi(port)
        assert a.ask("*OPC?") == "1" and b.ask("*OPC?") == "1"
        c = RawScpi(port)
        line = c.line().decode()
        assert line.startswith(f"{codes.COMMUNICATION_ERROR},") and "too many connections (2)" in line
        assert c.at_end()  # then closed
        c.close()
        assert server.gate.refused == 1
        a.close()
        assert _until(lambda: server.gate.active == 1)
        d = RawScpi(port)
        assert d.ask("*OPC?") == "1"
        b.close()
        d.close()


def test_framed_connection_cap_closes_the_extra_connection(device: Device) -> None:
    with FramedServer(device, max_connections=1) as server:
        port = server.listen_tcp()[1]
        with _connect(port) as first:
            _exchange(_framed_link(first), LinkOp.PING, b"a")
            with _connect(port) as extra:
                assert extra.recv(100) == b""  # closed without a word
        assert _until(lambda: server.gate.active == 0)
        with _connect(port) as again:
            assert _exchange(_framed_link(again), LinkOp.PING, b"b")[1] == b"b"


def test_scpi_oversize_block_is_dropped_with_its_line(device: Device) -> None:
    with scpi_server(device, max_block=1000) as (_, port):
        peer = RawScpi(port)
        epoch = device.status().epoch
        data = (b"\n*RST\n" * 400)[:2000]  # newlines and commands inside the block are data
        peer.send(b'TILE:PULS? "t0",#42000' + data + b";*RST\n")
        code, text = peer.error()
        assert code == codes.TOO_MUCH_DATA and "2000" in text
        assert peer.error()[0] == codes.NO_ERROR
        assert device.status().epoch == epoch  # nothing of it ran
        assert peer.ask("*OPC?") == "1"
        peer.close()


def test_accept_loop_survives_a_failed_thread_start(device: Device, monkeypatch: pytest.MonkeyPatch) -> None:
    real = links_mod._start_thread
    calls = {"n": 0}

    def failing_once(*args: object) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("can't start new thread")
        real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(links_mod, "_start_thread", failing_once)
    with scpi_server(device) as (server, port):
        with _connect(port) as victim:
            assert victim.recv(100) == b""  # that connection is closed, not served
        peer = RawScpi(port)
        assert peer.ask("*OPC?") == "1"
        peer.close()
        assert server.listeners[0].failures == 1
        assert server.listeners[0].thread.is_alive()
        assert _until(lambda: server.gate.active == 0)  # the failed one was not counted


# ---- class 5: protocol edge semantics ------------------------------------------------


def test_overlong_scpi_line_is_dropped_whole(device: Device) -> None:
    with scpi_server(device) as (_, port):
        peer = RawScpi(port)
        epoch = device.status().epoch
        n = scpi_mod.MAX_LINE + (1 << 16)
        for k in range(0, n, 1 << 16):
            peer.send(b"A" * min(1 << 16, n - k))
        peer.send(b";*RST;*ESE 4\n")
        code, text = peer.error()
        assert code == codes.INPUT_BUFFER_OVERRUN
        assert len(text) <= scpi_mod.MAX_ERROR_TEXT + 40  # bounded, not the line
        assert peer.error()[0] == codes.NO_ERROR  # *RST would have cleared it; nothing more queued
        assert peer.ask("*ESE?") == "0"  # the tail did not run
        assert device.status().epoch == epoch
        assert peer.ask("*OPC?") == "1"
        peer.close()


def test_long_header_error_is_bounded(device: Device) -> None:
    with scpi_server(device) as (_, port):
        peer = RawScpi(port)
        peer.send(b"B" * 50_000 + b"\n")
        code, text = peer.error()
        assert code == codes.UNDEFINED_HEADER and len(text) <= scpi_mod.MAX_ERROR_TEXT + 40
        peer.close()


@pytest.mark.parametrize(
    ("line", "code"),
    [
        ("*ESE 300", codes.DATA_OUT_OF_RANGE),
        ("*SRE -1", codes.DATA_OUT_OF_RANGE),
        ("*ESE 1e400", codes.DATA_OUT_OF_RANGE),
        ("*ESE 99999999999999999999999", codes.DATA_OUT_OF_RANGE),
        ("*ESE 1.5", codes.NUMERIC_DATA_ERROR),
        ("*ESE abc", codes.NUMERIC_DATA_ERROR),
        ("SYST:WAIT inf", codes.DATA_OUT_OF_RANGE),
        ("SYST:WAIT nan", codes.ILLEGAL_PARAMETER_VALUE),
        ("SYST:WAIT 0.001,1e300", codes.DATA_OUT_OF_RANGE),
    ],
)
def test_numeric_errors_get_ieee_codes(device: Device, line: str, code: int) -> None:
    with scpi_server(device) as (_, port):
        peer = RawScpi(port)
        peer.send(line.encode() + b"\n")
        got, text = peer.error()
        assert got == code, text
        assert "Error:" not in text  # no Python exception names
        peer.close()


def test_overflow_maps_to_data_out_of_range() -> None:
    assert codes.code_for(OverflowError("int too large"))[0] == codes.DATA_OUT_OF_RANGE


def test_framed_state_changing_requests_need_a_request_id(device: Device) -> None:
    """A replayed older frame cannot rerun a pulse, program or wait: each must carry a rid
    (answered from the board's record when it ran before)."""
    with FramedServer(device) as server:
        port = server.listen_tcp()[1]
        with _connect(port) as sock:
            link = _framed_link(sock)
            first, body = _exchange(link, pl.Op.WAIT, pl.pack(pl.Message({"seconds": 0.0})))
            assert first.flags & Flag.ERROR and pl.loads(body)["code"] == codes.MISSING_PARAMETER
            before = server.cache.hits
            request = pl.pack(pl.Message({"seconds": 0.0, "rid": 12345}))
            for _ in range(2):  # the second copy is a replay: answered from the record
                first, _ = _exchange(link, pl.Op.WAIT, request)
                assert not first.flags & Flag.ERROR
            assert server.cache.hits == before + 1


def test_link_inbox_is_bounded_under_a_flood() -> None:
    """Frames that pile up while a link sends are capped (not acknowledged beyond the cap)."""
    chunks = iter(
        frames.encode(frames.Frame(LinkOp.PING, seq, Flag.MORE, b"x" * 10)) for seq in range(1, 200)
    )
    sent: list[bytes] = []
    link = Link(lambda _t: next(chunks, b""), sent.append, max_message=4 * frames.MAX_FRAGMENT)
    for _ in range(199):
        link._pump(0)
    assert len(link._inbox) <= 4 + 3
    assert link.stats.stale >= 190
    assert len(sent) <= 4 + 3  # only the frames kept were acknowledged


def test_a_peer_that_never_reads_is_disconnected(device: Device, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(links_mod, "WRITE_TIMEOUT_S", 0.5)
    with scpi_server(device, max_connections=1) as (server, port):
        hog = socket.socket()
        hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        hog.connect(("127.0.0.1", port))
        hog.settimeout(2)
        hog.sendall(b"*OPC?\n")
        assert hog.recv(10) == b"1\n" and server.gate.active == 1
        with contextlib.suppress(OSError):
            for _ in range(5000):  # queries whose answers it never reads, until the server hangs up
                hog.sendall(b"*IDN?;*IDN?;*IDN?;*IDN?\n" * 100)
        assert _until(lambda: server.gate.active == 0, timeout=8.0)
        hog.close()
        peer = RawScpi(port)
        assert peer.ask("*OPC?") == "1"
        peer.close()


@pytest.mark.parametrize(
    "theirs",
    [
        1e-12,
        0.0,
        -1.0,
        float("nan"),
        float("inf"),
        "x",
        pytest.param(10**400, id="1e400"),
        pytest.param(-(10**400), id="-1e400"),
    ],
)
def test_hello_cannot_negotiate_a_spinning_timer(device: Device, theirs: object) -> None:
    """Nor fail on a number no float holds (a JSON integer of 401 digits, found by
    tests/test_fuzz_servers.py): the board's own timeout then applies."""
    with FramedServer(device) as server:
        port = server.listen_tcp()[1]
        with _connect(port) as sock:
            link = _framed_link(sock)
            hello = pl.dumps({"piggyback": True, "ack_timeout": theirs})
            first, body = _exchange(link, LinkOp.HELLO, hello)
            assert not first.flags & Flag.ERROR
            assert pl.loads(body)["piggyback"] is (theirs != 1e-12)  # an unusable value: the board's own
            assert all(lk.ack_delay == 0 or lk.ack_delay >= 0.001 for lk in server.links)
            assert _exchange(link, LinkOp.PING, b"p")[1] == b"p"


# ---- the launcher, idle connections, the replay window -------------------------------


def test_launcher_serves_the_endpoints_asked_for_and_leaves_the_board_safe() -> None:
    from emulator.server.launch import serve

    calls: list[str] = []
    with serve(BOARD, scpi_pty=False, framed_port=None) as served:
        served.device.safe_state = lambda: calls.append("safe")  # type: ignore[method-assign]
        assert sorted(served.uris) == ["serial-pty", "visa-tcp"]
        assert served.scpi.cache is served.framed.cache  # one board, one record of request ids
        with open_device(served.uri("visa-tcp", timeout="2")) as dev:
            assert dev.info.identity.model == "emulator-rram"
        calls.clear()  # the client's own close asks for the safe state too
    assert calls == ["safe"]
    assert not served.scpi.listeners and not served.framed.ptys


def test_an_idle_connection_is_closed_and_frees_its_slot(device: Device) -> None:
    """The idle timeout is 1 s, not 0.3 s: the busy connection's requests come 0.1 s apart
    plus the round trip, and a server thread that a loaded machine runs late counts the idle
    time when it gets to run, so a 0.2 s stall closed the connection in use."""
    with ScpiServer(device, max_connections=1, idle_timeout_s=1.0) as server:
        port = server.listen_tcp()[1]
        t0 = time.monotonic()  # before the connect: the server's idle clock starts after it
        idle = _connect(port)
        assert idle.recv(1) == b""  # the server closed it: end of file
        assert 1.0 <= time.monotonic() - t0 < 3.0
        idle.close()
        assert _until(lambda: server.gate.active == 0)
        busy = RawScpi(port)
        for _ in range(12):  # a connection in use is not idle (1.2 s, past the idle timeout)
            time.sleep(0.1)
            assert busy.ask("*IDN?").startswith("xbar-hil,")
        busy.close()


def test_idle_timeout_must_be_positive(device: Device) -> None:
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="idle_timeout_s"):
            ScpiServer(device, idle_timeout_s=bad)


def test_a_replay_older_than_the_outcome_record_is_refused_not_run_again(device: Device) -> None:
    with scpi_server(device) as (server, port):
        peer = RawScpi(port)
        peer.send(b"SYST:WAIT 0.5,7\n")
        assert peer.error()[0] == 0 and device.meter().clock_s == pytest.approx(0.5)
        peer.send(b"SYST:WAIT 0.5,7\n")  # a replay the record still holds: answered, not run
        assert peer.error()[0] == 0 and device.meter().clock_s == pytest.approx(0.5)
        for rid in range(100, 100 + server.cache.size):  # the outcome of id 7 ages out
            peer.send(f"SYST:WAIT 0,{rid}\n".encode())
        assert peer.error()[0] == 0
        peer.send(b"SYST:WAIT 0.5,7\n")
        code, text = peer.error()
        assert code == codes.EXECUTION_ERROR and "already ran" in text
        assert device.meter().clock_s == pytest.approx(0.5)  # not waited twice
        assert server.cache.refused == 1
        peer.close()


@pytest.mark.parametrize("extra", [1, 10, 70_000])
def test_an_overlong_line_that_arrives_in_one_read_is_dropped_whole(device: Device, extra: int) -> None:
    """The length is checked when the terminator is found too, not only between reads."""
    from emulator.server.scpi import MAX_LINE, Connection

    conn = Connection(device)
    data = b"*ESE 0\n" + b"A" * (MAX_LINE + extra) + b";*ESE 4\n*ESE?\n"
    replies = [b"".join(a.reply) for a in conn.respond(data) if a.reply]
    assert replies == [b"0\n"]  # the tail did not run
    code, text = conn.session.errors.popleft()
    assert code == codes.INPUT_BUFFER_OVERRUN and "dropped whole" in text and len(text) <= 255
    assert not conn.session.errors


# ---- throttling peers that make errors -----------------------------------------------


def test_error_throttle_allowance() -> None:
    from emulator.server.throttle import MAX_PAUSE_S, ErrorThrottle

    t = ErrorThrottle(rate=10.0, burst=20.0)
    assert t.charge(20) == 0.0 and not t.spent(0)
    wait = t.charge(1)  # 1 over: 0.1 s at 10 a second
    assert 0.09 < wait <= 0.1 and t.spent(1)
    assert t.charge(5) == MAX_PAUSE_S  # 6 over would be 0.6 s: waited in pieces
    t.charge(10_000)
    assert t.tokens >= -20.0  # the debt is capped at one burst
    with pytest.raises(ValueError):
        ErrorThrottle(rate=0.0)


@pytest.mark.parametrize("kind", ["scpi", "framed"])
def test_a_flooding_peer_is_held_then_closed_while_others_are_served(
    device: Device, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from emulator.server import throttle

    monkeypatch.setattr(throttle, "ERROR_RATE", 20.0)
    monkeypatch.setattr(throttle, "ERROR_BURST", 20.0)
    monkeypatch.setattr(throttle, "KICK_AFTER_S", 0.6)
    server_cls = ScpiServer if kind == "scpi" else FramedServer
    with server_cls(device) as server:  # type: ignore[abstract]
        port = server.listen_tcp()[1]
        flood = _connect(port)
        if kind == "scpi":
            flood.sendall(b"FOO:BAR\n" * 5000)  # 5000 undefined headers: 5000 errors
        else:
            flood.sendall(bytes(range(1, 256)) * 2000)  # garbage between frames, 0.5 MB
        good = RawScpi(port) if kind == "scpi" else None
        t0 = time.monotonic()
        flood.settimeout(10)
        got = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := flood.recv(1 << 16):  # until the server closes it
                got += chunk
        held = time.monotonic() - t0
        assert 0.5 <= held < 5.0
        if good is not None:
            assert good.ask("*IDN?").startswith("xbar-hil,")  # the other connection is served
            good.close()
        else:
            with open_device(f"serial+socket://127.0.0.1:{port}") as dev:
                assert dev.safety().violations == 0
        assert _until(lambda: server.gate.active == 0)
        flood.close()


# ---- malformed payloads: a clear protocol error naming the field and what is allowed ----------

HOSTILE_TOPOLOGY = Topology.layered([3, 2])  # W0: 4 x 2 (bias row included)
DEEP = b"[" * 200_000 + b"]" * 200_000
LONG_INT = b'{"groups":' + b"9" * 5000 + b"}"
NO_BETA = {"trace": False, "beta": {}}  # a settle whose target/s1 has no beta


def _bogus_budget() -> bytes:
    t = pl.topology_to_dict(HOSTILE_TOPOLOGY)
    t["budget"]["bogus"] = 1
    return pl.dumps(t)


def _duplicate_key() -> bytes:
    text = pl.dumps(pl.topology_to_dict(HOSTILE_TOPOLOGY)).decode()
    return ('{"groups": {"s0": 1000000}, ' + text[1:]).encode()


def _settle_parts(arrays: list[tuple[str, int]], meta: dict[str, object]) -> tuple[bytes, bytes]:
    """JSON (with the layout of `arrays`: name, width; one sample of f4 each) and array bytes."""
    layout = [[name, "f4", [1, n]] for name, n in arrays]
    data = b"".join(np.full(n, 0.5, "<f4").tobytes() for _, n in arrays)
    return pl.dumps({**meta, "arrays": layout}), data


# (request, what the refusal must say), each answered before anything runs
SETTLES = {
    "target without beta": (
        _settle_parts([("clamp/s0", 3), ("target/s1", 2)], NO_BETA),
        "array 'target/s1' without a beta for its group",
    ),
    "unknown settle array": (
        _settle_parts([("clamp/s0", 3), ("bogus/s1", 2)], NO_BETA),
        "unknown array 'bogus/s1'; a settle takes the arrays clamp/<group>",
    ),
    "duplicate array": (
        _settle_parts([("clamp/s0", 3), ("clamp/s0", 3)], NO_BETA),
        "array layout names 'clamp/s0' twice",
    ),
}
CONFIGURES = {
    "deep": (DEEP, "nested 200000 levels deep; a message nests at most 32"),
    "long integer": (LONG_INT, "an integer of more than 4300 digits at character 10"),
    "budget key": (_bogus_budget(), "budget has unknown keys ['bogus']; a budget takes max_steps, tol"),
    # json keeps the last of two keys: a request could say one value to a check, another after it
    "duplicate key": (_duplicate_key(), "the key 'groups' appears twice in one object"),
}


@pytest.fixture
def configured(device: Device) -> Device:
    device.configure(HOSTILE_TOPOLOGY)
    return device


@pytest.mark.parametrize("case", [*CONFIGURES, *SETTLES])
def test_scpi_malformed_payloads_are_illegal_parameter_values_naming_the_field(
    configured: Device, case: str
) -> None:
    with scpi_server(configured) as (_, port):
        raw = RawScpi(port)
        try:
            if case in CONFIGURES:
                body, says = CONFIGURES[case]
                raw.send(b"CONF:TOP " + scpi_block(body) + b"\n")
            else:
                (meta, data), says = SETTLES[case]
                raw.send(
                    scpi_short(SETTLE_Q).encode() + b" " + scpi_block(meta) + b"," + scpi_block(data) + b"\n"
                )
                assert raw.line() == b"#10"  # a failed block query
            code, text = raw.error()
            assert code == codes.ILLEGAL_PARAMETER_VALUE and says in text, text
            assert "Error:" not in text and "sys." not in text and "__init__" not in text  # no Python in it
            assert raw.error()[0] == 0
        finally:
            raw.close()
    assert configured.topology == HOSTILE_TOPOLOGY and configured.safety().violations == 0


def _program_with(extra: bool) -> bytes:
    g = np.full((4, 2), 5e-6, np.float32)
    msg = pl.program_request("W0", g, g, False, None, 1)
    msg.meta["rid"] = 4242 + extra
    if extra:
        msg.arrays["g_bogus"] = g
    return pl.pack(msg)


@pytest.mark.parametrize("case", [*CONFIGURES, *SETTLES, "program extra array"])
def test_framed_malformed_payloads_are_refused_naming_the_field(configured: Device, case: str) -> None:
    """Undecodable JSON and layouts are a frame error (110: an undecodable payload), JSON that
    decodes to a wrong request an illegal parameter value (-224)."""
    if case in CONFIGURES:
        (body, says), op = CONFIGURES[case], pl.Op.CONFIGURE
        payload = struct.pack("<I", len(body)) + body
    elif case in SETTLES:
        ((meta, data), says), op = SETTLES[case], pl.Op.SETTLE
        payload = struct.pack("<I", len(meta)) + meta + data
    else:
        op, payload = pl.Op.PROGRAM, _program_with(extra=True)
        says = "program request: unknown array 'g_bogus'; a program takes the arrays g_plus, g_minus"
    undecodable = case in ("deep", "long integer", "duplicate key", "duplicate array")
    with FramedServer(configured) as server:
        port = server.listen_tcp()[1]
        with _connect(port) as sock:
            link = _framed_link(sock)
            first, body = _exchange(link, op, payload)
            assert first.flags & Flag.ERROR, body[:200]
            err = pl.loads(body)
            assert err["code"] == (codes.FRAME_ERROR if undecodable else codes.ILLEGAL_PARAMETER_VALUE), err
            assert says in err["message"], err
            assert "Error:" not in err["message"] and "sys." not in err["message"]
            first, _ = _exchange(link, pl.Op.PROGRAM, _program_with(extra=False))  # the link lives on
            assert not first.flags & Flag.ERROR
    assert configured.topology == HOSTILE_TOPOLOGY and configured.safety().violations == 0
