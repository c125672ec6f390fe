"""The board makes itself safe when its owner is gone (docs/protocol.md, "Ownership", Lease):
a host killed with its board owned cannot send SAFE_STATE, so the board applies it when the
owner's last connection closes without a release; the lock still waits out its lease for a
reconnect, which finds the topology, the conductances and the open transaction as the host
left them. Through the real servers over TCP."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import pytest

from drivers import Topology, open_device, report_open_transactions
from drivers.errors import BoardLocked
from drivers.wire import payload as pl
from drivers.wire.frames import LinkOp
from hil.testing import BoardLock, BoardServers, socket_link
from tests.killed_host import killed_host
from tests.pty_host import PtyHost, count_safe_states
from tests.raw_scpi import RawScpi
from tests.waiting import until

BOARD = "emulator://?preset=ideal&seed=0"
TOPOLOGY = Topology.layered([6, 5, 3])


def _block_json(reply: bytes) -> dict[str, object]:
    digits = int(reply[1:2])
    return json.loads(reply[2 + digits :])


_until = functools.partial(until, timeout=2.0)  # most waits here are this long
LEASE_S = 3  # the killed owner's lease: what is checked during it has seconds to spare on a loaded machine


def _safe_state_fails_once(s: BoardServers) -> list[str]:
    """The served board's safe state fails the first time (its line drivers did not answer),
    then works: the calls, in order."""
    calls: list[str] = []

    def flaky() -> None:
        calls.append("safe")
        if len(calls) == 1:
            raise OSError("the line drivers did not answer")

    s.device.safe_state = flaky  # type: ignore[method-assign]
    return calls


@pytest.mark.parametrize("transport", ["visa-tcp", "serial-socket"])
def test_a_killed_owner_leaves_its_board_safe_and_locked_for_its_lease(
    transport: str, emulated_board: Callable[..., BoardServers]
) -> None:
    """The host asks for a 3 s lease: the looker's open, the refused open and the reconnect
    made during it took 0.66-0.81 s after the kill over visa-tcp on a loaded 2-core machine,
    0.2 s short of a 1 s lease."""
    s = emulated_board(BOARD)
    calls = count_safe_states(s)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    uri = s.uri(transport, lease=str(LEASE_S))
    host = subprocess.Popen(
        [sys.executable, "-c", killed_host("dev.lock_token"), uri], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert host.stdout is not None
        token = host.stdout.readline().strip()
        assert token and calls == []  # the host is alive, mid-transaction; nothing made it safe
    finally:
        host.send_signal(signal.SIGKILL)
        host.wait(timeout=10)
        host.stdout.close()  # type: ignore[union-attr]
    killed = time.monotonic()
    # the board applies its safe state as soon as the dead host's connection drops ...
    assert _until(lambda: len(calls) == 1), "the board did not apply its safe state"
    assert calls[0] - killed < 1.0 and s.lock is not None and s.lock.owner_gone == 1
    # ... and keeps the lock for the lease (3 s, the host's), for a reconnect
    with pytest.warns(RuntimeWarning, match="update-7"), open_device(s.uri("visa-tcp", lock="0")) as looker:
        owner = looker.owner()
        assert owner is not None and owner.token == token and owner.connections == 0
        assert owner.lapses_in is not None and 0.0 < owner.lapses_in <= LEASE_S
    with pytest.raises(BoardLocked, match="no connection presents its token: free in"):
        open_device(s.uri("serial-socket"))
    # the dead host's reconnect within the lease finds its board as it left it: SAFE_STATE keeps
    # the topology, the conductances, the transaction tag and the epoch (no reconfigure needed)
    with RawScpi(s.uris["visa-tcp"]) as again:
        owner_json = _block_json(again.query(f'SYST:LOCK:ACQ? "{token}",1'))
        assert owner_json["token"] == token and owner_json["lapses_in"] is None
        status = _block_json(again.query("SYST:STAT?"))
        assert type(status.pop("arrays_id")) is int  # the emulator keeps its arrays' generation
        assert status == {"epoch": 0, "transaction": "update-7", "configured": True}
        assert pl.topology_from_dict(_block_json(again.query("CONF:TOP?"))["topology"]) == TOPOLOGY  # type: ignore[arg-type]
        assert again.query("SYST:ERR?") == b'0,"No error"'
        assert len(calls) == 1  # the owner is back: nothing more applied
    # it dies again (its socket closed, no release): safe state again, then the lease lapses
    assert _until(lambda: len(calls) == 2)
    lim = s.device.info.limits
    g_plus, g_minus = s.device.read_conductance("W0")  # the board itself: kept throughout
    np.testing.assert_allclose(g_plus, lim.g_max, rtol=1e-6)
    np.testing.assert_allclose(g_minus, lim.g_min, rtol=1e-6)
    time.sleep(1.05)  # the lease its reconnect asked for (1 s) runs from the close, before the safe state
    # the next host finds the board free, configured, and the transaction the dead one left open
    with pytest.warns(RuntimeWarning, match="update-7"), open_device(s.uri(transport)) as dev:
        assert len(calls) == 2  # the lapse applied nothing more: the board was safe since
        assert dev.owns and dev.open_transaction == "update-7" and dev.topology == TOPOLOGY
        with pytest.warns(RuntimeWarning, match="'update-7' was begun and never committed"):
            assert len(report_open_transactions([dev])) == 1
    assert s.lock.owner_gone == 2


def test_a_release_a_board_nobody_owns_and_one_without_ownership_apply_nothing(
    emulated_board: Callable[..., BoardServers],
) -> None:
    s = emulated_board(BOARD, lock=BoardLock(lease_s=0.2))
    calls = count_safe_states(s)
    with RawScpi(s.uris["visa-tcp"]) as clean:  # an owner that releases (after its own SYST:SAFE)
        assert _block_json(clean.query('SYST:LOCK:ACQ? "clean:1:aa"'))["token"] == "clean:1:aa"
        clean.query('SYST:LOCK:REL "clean:1:aa";*OPC?')
    with RawScpi(s.uris["visa-tcp"]) as nobody:  # drives a free board, never owns it
        assert nobody.query("SYST:WAIT 0;*OPC?") == b"1"
    with RawScpi(s.uris["visa-tcp"]) as looker:  # hil info's queries
        assert _block_json(looker.query("SYST:LOCK:OWN?"))["token"] is None
    # the server has seen every close (a safe state it applied wrongly would be applied by then;
    # a loaded machine could outlast a bare 0.3 s sleep before it did) ...
    assert _until(lambda: s.scpi.gate.active == 0)
    time.sleep(0.3)  # ... and past any lease
    assert calls == [] and s.lock is not None and s.lock.owner_gone == 0
    unlocked = emulated_board(BOARD, lock=False)  # firmware without the capability
    calls = count_safe_states(unlocked)
    with RawScpi(unlocked.uris["visa-tcp"]) as raw:
        assert raw.query("SYST:WAIT 0;*OPC?") == b"1"
    assert _until(lambda: unlocked.scpi.gate.active == 0)
    time.sleep(0.2)
    assert calls == []


def test_a_framed_hello_that_withdraws_the_owners_token_makes_the_board_safe(
    emulated_board: Callable[..., BoardServers],
) -> None:
    """A framed HELLO begins a new session on its link (a serial line's next host): the token
    it presented is withdrawn, the lease starts, and the board applies its safe state then."""
    s = emulated_board(BOARD)
    calls = count_safe_states(s)
    host, port = s.uris["serial-socket"].split("://", 1)[1].rsplit(":", 1)
    import socket

    link = socket_link(socket.create_connection((host, int(port)), timeout=5), ack_timeout=1.0, retries=3)
    try:
        seq = link.send(int(pl.Op.ACQUIRE), pl.pack(pl.Message({"token": "pty:1:aa"})))
        assert link.receive(5.0, response=True, ref=seq, opcode=int(pl.Op.ACQUIRE)) is not None
        assert calls == []
        seq = link.send(LinkOp.HELLO, b"")
        assert link.receive(5.0, response=True, ref=seq, opcode=LinkOp.HELLO) is not None
        assert _until(lambda: len(calls) == 1)
        owner = s.lock.state()  # type: ignore[union-attr]
        assert owner.token == "pty:1:aa" and owner.connections == 0 and owner.lapses_in is not None
    finally:
        link.close()


def test_a_safe_state_that_fails_is_tried_again_when_the_lease_lapses(
    emulated_board: Callable[..., BoardServers],
) -> None:
    """The lease is 2 s, so that the check made during it (0.3 s in) holds on a loaded CI
    machine; with 0.3 s, a first safe state seen late let the lease lapse before the check."""
    s = emulated_board(BOARD, lock=BoardLock(lease_s=2.0))
    calls = _safe_state_fails_once(s)
    with RawScpi(s.uris["visa-tcp"]) as dead:
        assert _block_json(dead.query('SYST:LOCK:ACQ? "dead:1:00"'))["token"] == "dead:1:00"
    assert _until(lambda: calls == ["safe"])  # tried at once, failed
    assert s.lock is not None and s.lock.owner_gone == 0
    time.sleep(0.3)
    assert calls == ["safe"] and s.lock.state().token == "dead:1:00"  # nothing more during the lease
    assert until(lambda: calls == ["safe", "safe"], timeout=6.0)  # at the lapse: applied
    assert s.lock.owner_gone == 1 and s.lock.state().token is None
    time.sleep(0.1)
    assert calls == ["safe", "safe"]


@pytest.mark.parametrize("ended_by", ["break", "release"])
def test_a_failed_safe_state_is_tried_again_when_a_break_or_release_ends_the_lease_early(
    emulated_board: Callable[..., BoardServers], ended_by: str
) -> None:
    """The retry waited for the lapse; a colleague's BREAK (or a RELEASE sent for the gone
    owner's token) ended the lease first, cleared the mark, and the lines stayed as the dead
    host left them (one attempt, never again)."""
    s = emulated_board(BOARD, lock=BoardLock(lease_s=30.0))
    calls = _safe_state_fails_once(s)
    with RawScpi(s.uris["visa-tcp"]) as dead:
        assert _block_json(dead.query('SYST:LOCK:ACQ? "dead:1:00"'))["token"] == "dead:1:00"
    assert _until(lambda: calls == ["safe"])  # tried at once, failed; the lapse is 30 s away
    assert s.lock is not None and s.lock.owner_gone == 0
    with RawScpi(s.uris["visa-tcp"]) as colleague:
        command = "SYST:LOCK:BRE" if ended_by == "break" else 'SYST:LOCK:REL "dead:1:00"'
        assert colleague.query(command + ";SYST:ERR?") == b'0,"No error"'
    assert _until(lambda: calls == ["safe", "safe"])  # at once, not at the lapse
    assert s.lock.owner_gone == 1 and s.lock.state().token is None


def _kill_an_idle_owner(s: BoardServers, transport: str, lease: str = "1") -> tuple[list[float], str, float]:
    """A host process owns `s` over the serial `transport` with a 1 s lease and sits idle (it
    sleeps between two tiles) for three leases, which its keep-alives must hold the board
    through (no safe state, one connection, no lapse running); then it is SIGKILLed. The safe
    states the board applies (times, growing), the host's token and the time of the kill."""
    assert s.lock is not None
    calls = count_safe_states(s)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    host = subprocess.Popen(
        [sys.executable, "-c", killed_host("dev.lock_token"), s.uri(transport, lease=lease)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert host.stdout is not None
        token = host.stdout.readline().strip()
        assert token
        assert not until(lambda: len(calls) > 0, 3.0), "the board made a live, idle owner's board safe"
        assert s.lock.owner_gone == 0
        owner = s.lock.state()
        assert owner.token == token and owner.connections == 1 and owner.lapses_in is None
    finally:
        killed = time.monotonic()
        host.send_signal(signal.SIGKILL)
        host.wait(timeout=10)
        host.stdout.close()  # type: ignore[union-attr]
    return calls, token, killed


def test_a_host_killed_on_a_serial_line_leaves_its_board_safe_and_then_free(
    emulated_board: Callable[..., BoardServers],
) -> None:
    """A serial line has no close the board could see: a host killed on it (or whose cable was
    pulled) kept the board locked and its lines driven for ever (before, nothing but the next
    host's HELLO or a break ended it). Now a line silent for the owner's lease counts as closed:
    the board applies its safe state and the lock lapses a lease later. A live host that owns
    the board over the line and sits idle sends keep-alives (framed PING), so it keeps its
    board, unsafe-made never, however long it computes between requests."""
    s = emulated_board(BOARD)
    calls, token, killed = _kill_an_idle_owner(s, "serial-pty")
    # silent for its lease (1 s, counted from its last keep-alive, at most a third of it before
    # the kill): the board makes itself safe, and keeps the lock one lease more
    assert until(lambda: len(calls) == 1, 3.0), "a host killed on a serial line left its board driven"
    assert 0.6 < calls[0] - killed < 2.5 and s.lock.owner_gone == 1
    owner = s.lock.state()
    assert owner.token in (token, None) and owner.connections == 0
    # a host that looks meanwhile (HELLO, a new session on the line) neither brings the dead
    # one's token back nor makes the board safe a second time, nor starts its lease again
    if owner.token is not None:
        with pytest.warns(RuntimeWarning, match="update-7"):  # the dead host's open transaction
            looker = open_device(s.uri("serial-pty", lock="0"))
        try:
            seen = looker.owner()
        finally:
            looker.close_link()  # no safe state of its own: not its board
        assert seen is not None and seen.connections == 0 and seen.lapses_in is not None
        assert len(calls) == 1 and s.lock.owner_gone == 1
    assert until(lambda: s.lock.state().token is None, 3.0), "a host killed on a serial line kept the board"
    # the next host on the line takes the board and finds the dead one's open transaction
    with pytest.warns(RuntimeWarning, match="update-7"), open_device(s.uri("serial-pty")) as dev:
        assert dev.owns and dev.status().transaction == "update-7"


def test_a_host_that_dies_before_acknowledging_a_reply_on_a_serial_line_is_silent_from_then(
    emulated_board: Callable[..., BoardServers],
) -> None:
    """A host that owns the board over a framed serial line sends a keep-alive PING and dies
    before it acknowledges the reply: the board resends the reply until its ACK retries are
    spent (6 tries of 0.25 s), and the line is silent from the host's PING on. The board
    counted the silence from a poll after it gave up (the PING's frame was counted then as
    news), so the safe state came a lease plus 1.5 s after the host's last frame: 2.52 s after
    the kill in the test above under load, past its 2.5 s bound (seen failing once in three
    runs), and 2.6 s here every time. Now an unacknowledged reply is silence from when it was
    ready: the safe state comes when the resends end (1.5 s, the longer of the two), not a
    lease after that."""
    s = emulated_board(BOARD)
    calls = count_safe_states(s)
    with PtyHost(s) as host:
        host.acquire("t1", 1.0)
        host.die_after_next_write()  # dead once its PING is out: the reply's ACK never comes
        pinged = time.monotonic()
        host.link.send(LinkOp.PING, b"")  # the board ACKs it and replies; the host died after its PING
        assert until(lambda: len(calls) == 1, 4.0), "the board never made a silent owner's board safe"
        assert 1.0 < calls[0] - pinged < 2.1, calls[0] - pinged  # 1.56 s (was 2.6 s)


def test_a_host_killed_on_an_scpi_serial_line_leaves_its_board_safe_and_then_free(
    emulated_board: Callable[..., BoardServers],
) -> None:
    """SCPI over a serial line (VISA ASRL, the emulator's SCPI pty) has no close the board could
    see either: a host killed on it kept the board locked and its lines driven for ever. Now the
    SCPI server takes a line silent for the owner's lease as closed (`BoardLock.silence`, as the
    framed server does), and a VisaDevice that owns the board over ASRL sends a keep-alive
    ``*OPC?`` after a third of its lease without a message, so a live idle owner keeps it."""
    s = emulated_board(BOARD)
    calls, token, killed = _kill_an_idle_owner(s, "visa-asrl")
    # silent for its lease (1 s, from its last message, a third of it or a little more before
    # the kill on busy cores): the board makes itself safe, and keeps the lock one lease more
    assert until(lambda: len(calls) == 1, 3.0), "a host killed on an SCPI serial line left its board driven"
    assert 0.4 < calls[0] - killed < 2.5 and s.lock.owner_gone == 1
    owner = s.lock.state()
    assert owner.token in (token, None) and owner.connections == 0
    assert until(lambda: s.lock.state().token is None, 3.0), "an SCPI serial line kept a dead host's board"
    assert len(calls) == 1
    # the next host on the line takes the board and finds the dead one's open transaction
    with pytest.warns(RuntimeWarning, match="update-7"), open_device(s.uri("visa-asrl")) as dev:
        assert dev.owns and dev.status().transaction == "update-7"


def test_a_looker_on_an_scpi_serial_line_does_not_revive_a_dead_owners_lock(
    emulated_board: Callable[..., BoardServers],
) -> None:
    """An SCPI serial line is one session for its whole life, so the dead owner's token stays
    with it. Before, the first byte of the next host brought the token back: a host that opened
    the line with ``lock=0`` (it takes nothing) then drove the board with the dead owner's
    rights, and every request it made kept the dead lock from lapsing. Now a line that fell
    silent for the lease presents the token again only through an acquire with it (the owner's
    driver presents its token again after a failed link): a looker's request that drives the
    board is refused (120) and the lock lapses a lease after the safe state, however much the
    looker talks."""
    s = emulated_board(BOARD)
    calls, token, _ = _kill_an_idle_owner(s, "visa-asrl", lease="4")
    assert until(lambda: len(calls) == 1, 8.0), "a host killed on an SCPI serial line left its board driven"
    assert s.lock is not None and s.lock.state().token == token  # the lease runs: 4 s
    with pytest.warns(RuntimeWarning, match="update-7"):
        looker = open_device(s.uri("visa-asrl", lock="0"))
    try:
        with pytest.raises(BoardLocked, match="owned by"):
            looker.wait(0.0)  # drives the board: the dead owner's, not the looker's
        seen = looker.owner()
        assert (
            seen is not None and seen.token == token and seen.connections == 0 and seen.lapses_in is not None
        )
        # the looker keeps talking (a status every 0.1 s): the lock still lapses with its lease
        assert until(lambda: looker.owner().token is None, 8.0), "a looker's bytes kept a dead owner's lock"  # type: ignore[union-attr]
        assert len(calls) == 1
    finally:
        looker.close_link()


def test_an_scpi_serial_owner_taken_for_gone_presents_its_token_again(
    emulated_board: Callable[..., BoardServers], caplog: pytest.LogCaptureFixture
) -> None:
    """The other side of the looker's case: an owner whose SCPI serial line fell silent for its
    lease (its keep-alives stopped: a paused process) is refused (120) by the board, which made
    itself safe; its driver, refused as the owner it is, presents its token again (an acquire,
    as after a reconnect), says so, and the request runs. A looker has no token to present."""
    s = emulated_board(BOARD)
    assert s.lock is not None
    dev = open_device(s.uri("visa-asrl", lease="1"))
    try:
        dev._stopping.set()  # type: ignore[attr-defined]  # its keep-alives stop, as in a paused process
        assert until(lambda: s.lock.state().connections == 0, 5.0)  # type: ignore[union-attr]
        assert s.lock.owner_gone == 1  # the board made itself safe
        with caplog.at_level("WARNING"):
            dev.wait(0.0)
        assert "took this host for gone" in caplog.text
        owner = s.lock.state()
        assert owner.token == dev.lock_token and owner.connections == 1  # type: ignore[attr-defined]
    finally:
        dev.close_link()  # type: ignore[attr-defined]
