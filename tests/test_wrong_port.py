"""A URI aimed at the other protocol's port (the bring-up audit): the SCPI client on the framed
server, the framed client on the SCPI server, over TCP and over the ptys. The first contact
gets nothing (or bytes of the other protocol), which no retry changes: the open fails after
one attempt, naming the likely mismatch, where it took every attempt's timeout (4 x 10 s by
default) and blamed the firmware or the cable."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from drivers import DeviceTimeout, ProtocolError, RetriesExhausted, open_device
from drivers.wire import frames
from drivers.wire.frames import NO_SEQ, Reason
from hil.testing import BoardServers

BOARD = "emulator://?preset=rram&seed=0&capabilities=mvm,program_verify"
QUESTION = "`hil emulator serve` prints one URI per protocol"


def _port(uri: str) -> str:
    return uri.rsplit(":", 1)[1] if uri.startswith("serial+socket") else uri.split("::")[2]


def _pty(uri: str) -> str:
    return uri.removeprefix("serial://") if uri.startswith("serial://") else uri[len("visa://ASRL") : -7]


def _wrong(s: BoardServers, case: str) -> str:
    """The URI of `case`: a client of one protocol aimed at the other's server."""
    if case == "visa-tcp on the framed port":
        return f"visa://TCPIP0::127.0.0.1::{_port(s.uris['serial-socket'])}::SOCKET?timeout=1.5"
    if case == "visa-asrl on the framed pty":
        return f"visa://ASRL{_pty(s.uris['serial-pty'])}::INSTR?timeout=1.5"
    if case == "serial-socket on the SCPI port":
        return f"serial+socket://127.0.0.1:{_port(s.uris['visa-tcp'])}?ack_timeout=0.2"
    return f"serial://{_pty(s.uris['visa-asrl'])}?ack_timeout=0.2"


CASES = [
    "visa-asrl on the framed pty",
    "serial-pty on the SCPI pty",
]
TCP_CASES = [
    "visa-tcp on the framed port",
    "serial-socket on the SCPI port",
]


def _open_fails(uri: str, kind: type[Exception]) -> tuple[str, float]:
    t0 = time.monotonic()
    with pytest.raises(kind) as info:
        open_device(uri)
    return str(info.value), time.monotonic() - t0


@pytest.mark.parametrize("case", CASES)
def test_a_client_on_the_other_protocols_port_is_told_so_at_once(
    case: str, emulated_board: Callable[..., BoardServers]
) -> None:
    """One attempt, a DeviceTimeout naming the mismatch: the SCPI client waits its 1.5 s timeout
    and as long again for a late reply (a slow board's; at most 2 s), 3 s; the framed client
    sends its 6 HELLOs of 0.2 s, 1.2 s. The old code made 4 attempts: over 6 s and 4.8 s."""
    s = emulated_board(BOARD)
    text, seconds = _open_fails(_wrong(s, case), DeviceTimeout)
    assert "no reply at all" in text and "not a byte" in text, text
    mine, other = ("SCPI", "framed") if case.startswith("visa") else ("framed", "SCPI")
    assert f"is this the {mine} port or the {other} one?" in text and QUESTION in text, text
    assert "failed 4 time(s)" not in text
    assert seconds < (4.5 if case.startswith("visa") else 3.0), seconds
    with open_device(s.uris["visa-tcp" if case.startswith("visa") else "serial-socket"]) as dev:
        assert dev.info.capabilities  # the right port opens


@pytest.mark.parametrize("case", TCP_CASES)
def test_a_client_on_the_other_protocols_tcp_port_is_told_what_is_there_and_the_uri_to_open(
    case: str, emulated_board: Callable[..., BoardServers]
) -> None:
    """Over TCP the silent port is asked once, on a connection of its own, in the other
    protocol (a HELLO frame, or *IDN?): the error names that protocol and the URI that opens
    it, where it asked "is this the SCPI port or the framed one?". One attempt, and the probe's
    0.5 s at most on top: the SCPI client's 1.5 s timeout and as long again, the framed
    client's 6 HELLOs of 0.2 s."""
    s = emulated_board(BOARD)
    text, seconds = _open_fails(_wrong(s, case), ProtocolError)
    if case.startswith("visa"):
        right = s.uris["serial-socket"]
        assert "this is a framed port (a HELLO frame was answered with frames)" in text, text
    else:
        right = s.uris["visa-tcp"]
        assert "this is an SCPI port (*IDN? answered b'xbar-hil,emulator-rram" in text, text
    assert f"open it as {right}," in text and "failed 4 time(s)" not in text, text
    assert seconds < (4.0 if case.startswith("visa") else 2.5), seconds
    with open_device(right) as dev:
        assert dev.info.capabilities  # the URI it names opens


def test_a_framed_uri_on_a_web_port_is_told_it_answers_http(web_port: int) -> None:
    """A web server says nothing to HELLO frames (no line ends them): the open timed out asking
    which protocol's port it was. Asked *IDN? it answers with a page: said as HTTP."""
    text, seconds = _open_fails(f"serial+socket://127.0.0.1:{web_port}?ack_timeout=0.2", ProtocolError)
    assert "no reply at all to the HELLO" in text and "this port answers HTTP" in text, text
    assert "point the URI at the board's framed port" in text, text
    assert seconds < 2.5, seconds


@pytest.mark.parametrize("scheme", ["visa", "serial+socket"])
def test_a_port_silent_to_both_protocols_keeps_the_question(
    scheme: str, talker: Callable[[bytes], int]
) -> None:
    """A port that answers neither protocol (a board not running its server) is not named:
    the timeout's question stands."""
    port = talker(b"")
    if scheme == "visa":
        uri = f"visa://TCPIP0::127.0.0.1::{port}::SOCKET?timeout=0.5"
    else:
        uri = f"serial+socket://127.0.0.1:{port}?ack_timeout=0.1"
    text, _ = _open_fails(uri, DeviceTimeout)
    assert "no reply at all" in text and "not a byte" in text and "this is a" not in text, text


@pytest.fixture
def talker() -> Iterator[Callable[[bytes], int]]:
    """Factory: a TCP server on loopback that answers whatever arrives with `reply` (a board
    of another protocol than the client's); returns its port."""
    socks: list[socket.socket] = []

    def start(reply: bytes) -> int:
        srv = socket.create_server(("127.0.0.1", 0))
        socks.append(srv)

        def serve() -> None:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            socks.append(conn)
            while True:
                try:
                    if not conn.recv(4096):
                        return
                    conn.sendall(reply)
                except OSError:
                    return

        threading.Thread(target=serve, daemon=True).start()
        return int(srv.getsockname()[1])

    yield start
    for s in socks:
        s.close()


def test_frames_in_place_of_an_scpi_reply_are_named(talker: Callable[[bytes], int]) -> None:
    port = talker(frames.encode(frames.nack(NO_SEQ, Reason.COBS)))
    text, seconds = _open_fails(f"visa://TCPIP0::127.0.0.1::{port}::SOCKET?timeout=1", ProtocolError)
    assert "the first reply is not SCPI text" in text and "0x00-delimited frames" in text, text
    assert "is this the SCPI port or the framed one?" in text and QUESTION in text, text
    assert seconds < 3.0, seconds


def test_scpi_text_in_place_of_frames_is_named(talker: Callable[[bytes], int]) -> None:
    port = talker(b'-113,"Undefined header"\n')
    text, seconds = _open_fails(f"serial+socket://127.0.0.1:{port}?ack_timeout=0.2", ProtocolError)
    assert "bytes that hold no frame" in text and "Undefined header" in text, text
    assert "lines of text, as an SCPI board sends" in text, text
    assert "is this the framed port or the SCPI one?" in text and QUESTION in text, text
    assert seconds < 3.0, seconds


@pytest.fixture
def web_port() -> Iterator[int]:
    """A real web server (`python -m http.server`), as a board's web page port is."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "http.server did not start"
                time.sleep(0.05)
        yield port
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("check", ["0", "1"])
def test_a_visa_uri_on_a_web_port_is_told_it_answers_http(web_port: int, check: str) -> None:
    """An HTTP server answers SYST:INFO? (or the checked-mode request) with a web page: the open
    said "expected a block from SYST:INFO?, got b'<!D' ... Is the board powered" after 4
    attempts. It says at once that the port answers HTTP and which port to use."""
    uri = f"visa://TCPIP0::127.0.0.1::{web_port}::SOCKET?timeout=2&check={check}"
    text, seconds = _open_fails(uri, ProtocolError)
    assert "this port answers HTTP, not SCPI" in text and "SCPI port (5025 by default" in text, text
    assert "failed 4 time(s)" not in text and "powered" not in text, text
    assert "\n" not in text
    assert seconds < 2.0, seconds


def test_text_of_another_protocol_in_place_of_an_scpi_reply_is_named(talker: Callable[[bytes], int]) -> None:
    """A fresh TCP connection holds no stale reply: text that is no SCPI reply at first contact
    is a wrong port (here a mail server's greeting), said at once."""
    port = talker(b"220 mail.example.org ESMTP ready\r\n")
    text, seconds = _open_fails(f"visa://TCPIP0::127.0.0.1::{port}::SOCKET?timeout=1", ProtocolError)
    assert "the first reply is not SCPI's" in text and "220 mail.example.org" in text, text
    assert "SCPI port (5025 by default)" in text and "failed 4 time(s)" not in text, text
    assert seconds < 2.0, seconds


def test_a_slow_boards_late_first_reply_is_not_taken_for_another_protocol(
    emulated_board: Callable[..., BoardServers],
) -> None:
    """The first reply of a slow board comes after the timeout (a block, or checked mode's `0`):
    it is text, but the board's own, so the open retries and ends on the timeout; it is not
    told that the port speaks another protocol."""
    s = emulated_board(BOARD)
    # every answer held back (unchecked, *CLS's silent one too): the first reply comes 0.5 s
    # (unchecked: *CLS, then SYST:INFO?) or 0.6 s (checked mode's `0`) after its request, past
    # the 0.4 s timeout and within the late wait after it (0.4 s more)
    for check, delay in (("0", 0.25), ("1", 0.6)):
        s.plan.reply_delay_s = delay
        with pytest.raises(RetriesExhausted) as info:
            open_device(s.uri("visa-tcp", timeout="0.4", attempts="2", backoff="0", check=check))
        assert isinstance(info.value.last, DeviceTimeout), str(info.value)
        assert "not SCPI" not in str(info.value) and "no reply at all" not in str(info.value)
    s.plan.reply_delay_s = 0.0
