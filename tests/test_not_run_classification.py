"""A request the board certainly did not run is not counted as one that may have run
(docs/protocol.md, "Checked mode": a message whose checksum fails "is not run at all"; the
board answers the empty checked response `0` and queues -360). Over pyvisa-py to the real
SCPI server, through a TCP proxy that corrupts one byte of the first pulse request and, before
passing it on, has another session reset the board (`*RST`, a new epoch): the host finds the
new epoch as it recovers. A pulse whose copy may have run raises `BoardReset` there (its
effect unknown); this one did not run, so it is sent again and runs once."""

from __future__ import annotations

import contextlib
import socket
import threading
import warnings
from collections.abc import Iterator

import numpy as np
import pytest

from drivers import Device, RetriesExhausted, SafeStateWarning, SettleBudget, Topology, open_device
from drivers.wire.payload import Op
from emulator.server.faults import FaultPlan
from emulator.server.harness import faulty_board
from emulator.server.launch import ServedBoard, serve
from tests.raw_scpi import RawScpi
from tests.waiting import until

TOPO = Topology.layered([6, 5, 3], budget=SettleBudget(max_steps=30))
COUNTS = (np.full((6, 3), 3, np.int32), np.zeros((6, 3), np.int32))


@contextlib.contextmanager
def _corrupting_proxy(scpi_port: int) -> Iterator[tuple[int, list[int]]]:
    """A proxy to `scpi_port` that flips a byte of the first message holding ``TILE:PULS``
    after resetting the board from a session of its own; yields its port and the count of
    messages it corrupted."""
    listener = socket.create_server(("127.0.0.1", 0))
    corrupted = [0]
    socks: list[socket.socket] = [listener]

    def pump(src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        with contextlib.suppress(OSError):
            while chunk := src.recv(65536):
                at = chunk.find(b"TILE:PULS")
                if upstream and at >= 0 and not corrupted[0]:
                    corrupted[0] += 1
                    with RawScpi(scpi_port) as other:  # another session resets the board
                        other.send(b"*RST;*OPC?\n")
                        assert other.line() == b"1"
                    chunk = chunk[:at] + b"X" + chunk[at + 1 :]  # its checksum now fails
                dst.sendall(chunk)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = listener.accept()
                board = socket.create_connection(("127.0.0.1", scpi_port))
                socks.extend((client, board))
                threading.Thread(target=pump, args=(client, board, True), daemon=True).start()
                threading.Thread(target=pump, args=(board, client, False), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield int(listener.getsockname()[1]), corrupted
    finally:
        for s in socks:
            s.close()


def test_a_checked_pulse_the_board_did_not_run_is_sent_again_after_a_reset() -> None:
    with faulty_board("emulator://?preset=ideal&seed=0", lock=False) as served:
        scpi_port = int(served.visa_uri.split("::")[2])
        query = served.visa_uri.split("?", 1)[1]
        with (
            _corrupting_proxy(scpi_port) as (port, corrupted),
            open_device(f"visa://TCPIP0::127.0.0.1::{port}::SOCKET?{query}") as dev,
        ):
            dev.configure(TOPO)
            before = dev.read_conductance("W1")
            dev.pulse("W1", *COUNTS)  # raised BoardReset: "whether it took effect is unknown"
            after = dev.read_conductance("W1")
            assert corrupted == [1] and dev.recovery.resets == 1
    with open_device("emulator://?preset=ideal&seed=0") as local:
        local.configure(TOPO)
        g0 = local.read_conductance("W1")
        local.pulse("W1", *COUNTS)
        want = local.read_conductance("W1")
    assert np.array_equal(before[0], g0[0])
    assert np.array_equal(after[0], want[0]) and np.array_equal(after[1], want[1])  # pulsed once


@pytest.mark.parametrize("transport", ["visa-tcp", "serial-socket"])
def test_a_pulse_never_sent_while_the_board_was_down_is_sent_to_the_board_that_comes_back(
    transport: str,
) -> None:
    """The link was already lost (a read gave up on a board that went away). The next pulse's
    first tries only reconnect, and fail (nothing listens): the pulse never leaves the host.
    A fresh board comes back on the same ports at another epoch (the old one had been reset;
    its arrays are taken as they are): the pulse is configured for and sent to it, and runs
    once. It raised BoardReset ("the board reset while pulse was in flight; whether it took
    effect is unknown") for a pulse that was never in flight."""
    board = "emulator://?preset=ideal&seed=0"
    first = serve(board, scpi_pty=False, framed_pty=False)
    uri = f"{first.uris[transport]}?timeout=0.5&attempts=6&backoff=0.3"
    scpi_port = int(first.uris["visa-tcp"].split("::")[2])
    framed_port = int(first.uris["serial-socket"].rsplit(":", 1)[1])
    again: list[ServedBoard] = []
    try:
        with open_device(uri) as dev:
            dev.configure(TOPO)
            dev.reset()  # the board's epoch moves on; a fresh board starts at its first again
            dev.configure(TOPO)
            dev.arrays_repair = lambda: None  # the fresh board's conductances are taken as they are
            first.close()
            dev.attempts = 2
            with pytest.raises(RetriesExhausted):
                dev.read_conductance("W1")
            dev.attempts = 6
            failures = dev.recovery.failures

            def come_back() -> None:  # once the pulse's first try has failed to reconnect
                assert until(lambda: dev.recovery.failures > failures, 5.0)
                again.append(
                    serve(
                        board, scpi_port=scpi_port, framed_port=framed_port, scpi_pty=False, framed_pty=False
                    )
                )

            helper = threading.Thread(target=come_back)
            helper.start()
            try:
                dev.pulse("W1", *COUNTS)
            finally:
                helper.join()
            got = dev.read_conductance("W1")
            assert dev.recovery.resets >= 1
    finally:
        for s in [first, *again]:
            s.close()
    with open_device(board) as local:
        local.configure(TOPO)
        local.pulse("W1", *COUNTS)
        want = local.read_conductance("W1")
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])  # pulsed once


class _HangUpOnEveryPulse(FaultPlan):
    """The board runs (or answers from its record) every pulse copy, then hangs up before replying."""

    def request_fault(self, op: int | None) -> str | None:
        return "close" if op == Op.PULSE else None


@pytest.mark.parametrize("transport", ["visa_uri", "serial_uri"])
def test_a_pulse_given_up_after_a_copy_ran_says_it_may_have_run_once(transport: str) -> None:
    """Every reply to the pulse is lost: RetriesExhausted, with a note that the pulse may have
    run, at most once, and what to do; the board shows it ran once."""
    with (
        faulty_board(
            "emulator://?preset=ideal&seed=0", _HangUpOnEveryPulse(p_close=1.0), attempts=2
        ) as served,
        open_device(getattr(served, transport)) as dev,
    ):
        dev.configure(TOPO)
        with pytest.raises(RetriesExhausted, match="pulse failed 2 time") as info:
            dev.pulse("W1", *COUNTS)
        got = dev.read_conductance("W1")
    (note,) = getattr(info.value, "__notes__", [])
    assert "the pulse may have run on the board at most once" in note and "read_conductance" in note, note
    with open_device("emulator://?preset=ideal&seed=0") as local:
        local.configure(TOPO)
        local.pulse("W1", *COUNTS)
        want = local.read_conductance("W1")
    assert np.array_equal(got[0], want[0])  # it did run, once


@contextlib.contextmanager
def _lost_board(transport: str) -> Iterator[Device]:
    """A configured device whose board's servers are then closed (closed without its safe
    state's warning at the end)."""
    served = serve("emulator://?preset=ideal&seed=0", scpi_pty=False, framed_pty=False)
    dev = open_device(f"{served.uris[transport]}?timeout=0.5&attempts=2&backoff=0")
    try:
        dev.configure(TOPO)
        served.close()
        yield dev
    finally:
        served.close()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SafeStateWarning)
            dev.close()


@pytest.mark.parametrize("transport", ["visa-tcp", "serial-socket"])
def test_a_pulse_given_up_without_reaching_the_board_says_it_did_not_run(transport: str) -> None:
    with _lost_board(transport) as dev:
        with pytest.raises(RetriesExhausted):  # the read finds the link lost
            dev.read_conductance("W1")
        with pytest.raises(RetriesExhausted, match="pulse failed 2 time") as info:
            dev.pulse("W1", *COUNTS)
    (note,) = getattr(info.value, "__notes__", [])
    assert note.startswith("the pulse did not run: no copy of it reached the board"), note


def test_an_idempotent_read_given_up_carries_no_outcome_note() -> None:
    with _lost_board("visa-tcp") as dev, pytest.raises(RetriesExhausted) as info:
        dev.read_conductance("W1")
    assert not getattr(info.value, "__notes__", [])
