"""A WAIT on hardware may let its seconds pass in real time before the board answers
(docs/protocol.md, "Wait"). The host then waits for the reply for the link's `timeout` plus
those seconds: a wait longer than the timeout is not taken for a dead link, resent, or
failed. Over the real SCPI server (pyvisa-py TCP) and the real framed server (TCP), serving a
board whose `wait` sleeps."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import pytest

from drivers import open_device
from drivers.base import Device
from drivers.wrapper import DeviceWrapper
from emulator.server import FramedServer, ScpiServer

TIMEOUT_S = 0.3  # the link's reply deadline
WAIT_S = 0.9  # three times it


class SleepingBoard(DeviceWrapper):
    """The emulator, but a wait sleeps its seconds before it returns, as hardware may."""

    def wait(self, seconds: float) -> None:
        time.sleep(seconds)
        super().wait(seconds)


@contextlib.contextmanager
def _host(kind: str, sleeps: bool = True) -> Iterator[tuple[Device, Device]]:
    with open_device("emulator://?preset=ideal&seed=0") as inner:
        board = SleepingBoard(inner) if sleeps else inner
        server_type = ScpiServer if kind == "scpi" else FramedServer
        with server_type(board) as server:  # type: ignore[arg-type]
            port = server.listen_tcp()[1]
            uri = (
                f"visa://TCPIP0::127.0.0.1::{port}::SOCKET"
                if kind == "scpi"
                else f"serial+socket://127.0.0.1:{port}"
            )
            with open_device(f"{uri}?attempts=2&timeout={TIMEOUT_S}") as dev:
                yield dev, inner


@pytest.mark.parametrize("kind", ["scpi", "framed"])
def test_a_wait_longer_than_the_timeout_is_waited_for_once(kind: str) -> None:
    with _host(kind) as (dev, inner):
        before = inner.meter()
        t0 = time.monotonic()
        dev.wait(WAIT_S)
        took = time.monotonic() - t0
        after = inner.meter()
        assert took >= WAIT_S
        assert dev.recovery.retries == 0 and dev.recovery.reconnects == 0  # type: ignore[attr-defined]
        assert before is not None and after is not None
        assert after.clock_s - before.clock_s == pytest.approx(WAIT_S)  # waited once, not resent
        assert dev.timeout == TIMEOUT_S  # type: ignore[attr-defined]  # the deadline is the wait's only
        dev.safety()  # and the link still answers


@pytest.mark.parametrize("kind", ["scpi", "framed"])
def test_the_longest_wait_the_board_allows_gives_a_deadline_the_link_takes(kind: str) -> None:
    """The emulator answers a wait at once; the deadline of its longest (`max_wait_s`, 1e9 s,
    past the 49.7 days that VISA counts in ms) is one pyvisa takes (as infinite)."""
    with _host(kind, sleeps=False) as (dev, _):
        longest = dev.info.limits.max_wait_s
        assert longest * 1000 > 0xFFFFFFFF
        dev.wait(longest)
        assert dev.timeout == TIMEOUT_S  # type: ignore[attr-defined]
        dev.safety()


@pytest.mark.parametrize("transport", ["serial-pty", "visa-asrl"])
def test_a_wait_longer_than_the_lease_on_a_serial_line_is_no_silence_of_the_owner(transport: str) -> None:
    """On a serial line the board takes a line silent for the owner's lease as its host gone
    (safe state, then the lock lapses); the host sends keep-alives, but not while an operation
    holds the device, and a hardware WAIT holds it for its seconds. The time the board spends
    answering is no silence of the host's, and the silence clock starts again at the reply:
    an owner with a 1 s lease that waits 2.5 s keeps its board, made safe never."""
    from emulator.server.launch import serve

    with open_device("emulator://?preset=ideal&seed=0") as inner:
        s = serve(SleepingBoard(inner), scpi_port=None, framed_port=None)
        try:
            with open_device(s.uri(transport, lease="1")) as dev:
                assert dev.owns  # type: ignore[attr-defined]
                dev.wait(2.5)
                time.sleep(0.5)  # the reply's own keep-alive window: a third of the lease and more
                assert s.lock is not None and s.lock.owner_gone == 0
                owner = s.lock.state()
                assert owner.token == dev.lock_token and owner.connections == 1  # type: ignore[attr-defined]
                dev.wait(0.0)  # still its board
        finally:
            s.close()
