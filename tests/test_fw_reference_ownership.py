"""Ownership on the second, independent firmware (tests/fw_reference_board.py with `lock=True`,
written from docs/protocol.md "Ownership" and docs/bringup.md alone) driven by the host's real
drivers and by raw frames over TCP: a second host refused while the board is owned, the board's
own safe state when its owner's connection dies (a SIGKILLed host, a socket closed without a
RELEASE), the lock kept for the lease, the owner's reconnect with its token, and the lapse."""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from drivers import ConfigurationError, Topology, open_device
from drivers.errors import BoardLocked
from drivers.uri import replace_params
from drivers.wire import payload as pl
from drivers.wire.frames import Flag, LinkOp
from drivers.wire.link import Link
from hil.testing import socket_link
from tests.fw_reference_board import LIM, FirmwareBoard
from tests.killed_host import killed_host
from tests.waiting import until

LOCKED = 120
EMPTY = pl.pack(pl.Message())


@pytest.fixture
def served() -> Iterator[Callable[..., FirmwareBoard]]:
    """A factory of reference boards with ownership, stopped at the end of the test."""
    boards: list[FirmwareBoard] = []

    def start(lease_s: float = 15.0) -> FirmwareBoard:
        boards.append(FirmwareBoard(lock=True, lease_s=lease_s).start())
        return boards[-1]

    yield start
    for board in boards:
        board.stop()


def _uri(board: FirmwareBoard, **params: object) -> str:
    return replace_params(board.uri, timeout=3, attempts=2, **params)


class Raw:
    """A host played frame by frame through the host's link codec, on its own TCP socket."""

    def __init__(self, board: FirmwareBoard) -> None:
        host, port = board.uri.split("://", 1)[1].rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=5)
        self.link: Link = socket_link(self.sock, ack_timeout=1.0, retries=3)

    def ask(self, op: int, body: bytes = EMPTY) -> tuple[int, bytes]:
        seq = self.link.send(op, body)
        got = self.link.receive(5.0, response=True, ref=seq, opcode=op)
        assert got is not None, "no reply"
        return int(got[0].flags), got[1]

    def meta(self, op: int, meta: dict[str, object] | None = None) -> dict[str, object]:
        flags, body = self.ask(op, pl.pack(pl.Message(meta or {})))
        assert not flags & Flag.ERROR, body
        return dict(pl.unpack(body).meta)

    def error(self, op: int, body: bytes) -> tuple[int, str]:
        flags, reply = self.ask(op, body)
        assert flags & Flag.ERROR, reply
        said = json.loads(reply)
        return said["code"], said["message"]

    def close(self) -> None:  # no RELEASE: the connection just ends
        self.sock.close()


_until = functools.partial(until, timeout=2.0)  # most waits here are this long


def test_the_lock_board_announces_lock_and_answers_its_opcodes_byte_exact(
    served: Callable[..., FirmwareBoard],
) -> None:
    board = served()
    raw = Raw(board)
    try:
        assert raw.meta(int(pl.Op.INFO))["capabilities"] == ["lock", "mvm"]
        free = b'{"token":null,"since":null,"connections":0,"lease_s":15.0,"lapses_in":null}'
        assert raw.ask(0x21) == (Flag.RESPONSE | Flag.START, b"\x4b\x00\x00\x00" + free)
        owner = raw.meta(0x20, {"token": "alice:1:aa"})
        assert owner["token"] == "alice:1:aa" and owner["connections"] == 1 and owner["lapses_in"] is None
        assert owner["since"] == pytest.approx(time.time(), abs=60) and owner["lease_s"] == 15.0
        assert raw.meta(0x20, {"token": "alice:1:aa"}) == owner  # presented again: the same reply
        raw.meta(int(pl.Op.RESET))  # the owner's RESET is not a reboot: the lock stays
        assert raw.meta(int(pl.Op.STATUS))["epoch"] == 2 and raw.meta(0x21) == owner
        assert raw.ask(0x22, pl.pack(pl.Message({"token": "bob"}))) == (Flag.RESPONSE | Flag.START, EMPTY)
        assert raw.meta(0x21)["token"] == "alice:1:aa"  # a release by another token: nothing
        assert raw.ask(0x22, pl.pack(pl.Message({"token": "alice:1:aa"})))[1] == EMPTY
        assert raw.ask(0x21)[1] == b"\x4b\x00\x00\x00" + free
        for bad in ("", "x" * 101, "tab\there", 7, None):
            assert raw.error(0x20, pl.pack(pl.Message({"token": bad})))[0] == -224, bad
        assert raw.error(0x20, EMPTY)[0] == -109
        for lease, code in (
            (1000.0, -222), (0.5, -222), (float("inf"), -222),
            ("60", -224), (True, -224), (float("nan"), -224),
        ):  # fmt: skip
            assert raw.error(0x20, pl.pack(pl.Message({"token": "x:1:aa", "lease_s": lease})))[0] == code
        assert raw.meta(0x21)["token"] is None  # a refused acquire took nothing
    finally:
        raw.close()


def test_the_board_without_lock_stays_as_it_was() -> None:
    board = FirmwareBoard().start()
    raw = Raw(board)
    try:
        assert raw.meta(int(pl.Op.INFO))["capabilities"] == ["mvm"]
        for op in (0x20, 0x21, 0x22, 0x23):
            assert raw.error(op, EMPTY)[0] == 110  # unknown opcode
        with open_device(_uri(board)) as one, open_device(_uri(board)) as two:
            assert not one.owns and one.owner() is None
            one.wait(0.0)
            two.wait(0.0)
    finally:
        raw.close()
        board.stop()


def test_a_second_host_is_refused_while_the_first_owns_the_board(
    served: Callable[..., FirmwareBoard],
) -> None:
    board = served()
    fw_own = board.board.ownership
    assert fw_own is not None
    with open_device(_uri(board)) as first:
        assert "lock" in first.info.capabilities and first.owns
        owner = first.owner()
        assert owner is not None and owner.token == first.lock_token and owner.connections == 1
        with pytest.raises(BoardLocked) as refused:
            open_device(_uri(board))
        assert refused.value.code == LOCKED
        said = str(refused.value)
        assert f"owned by {first.lock_token!r}" in said and "hil lock break" in said
        looker = open_device(_uri(board, lock=False))  # as `hil info` opens it
        try:
            assert not looker.owns and looker.owner() == first.owner()
            assert looker.status().configured is False and looker.safety().refused == 0
            assert looker.meter() is not None and looker.info.identity.model == "fw-reference"
            before = list(board.board.safe_states)
            for call in (lambda: looker.wait(0.0), looker.safe_state, looker.reset):
                with pytest.raises(BoardLocked, match=f"owned by {first.lock_token!r} since "):
                    call()
            assert board.board.safe_states == before and board.board.epoch == 1  # nothing ran
            assert looker.safety().refused == 0  # a 120 is not a refusal by the limits
        finally:
            looker.close()
        # leaving a looking session sends SAFE_STATE all the same: refused (120), and close closes
        assert fw_own.refusals == ["wait", "safe_state", "reset", "safe_state"]
        assert board.board.safe_states == before
        first.wait(0.0)  # the owner is served throughout
    with open_device(_uri(board)) as second:  # the first released the board when it closed
        assert second.owns and second.owner().token == second.lock_token  # type: ignore[union-attr]


def test_a_non_owner_gets_120_before_its_payload_is_read(served: Callable[..., FirmwareBoard]) -> None:
    """docs/protocol.md "The order of the checks": the opcode (110), then ownership (120), then
    the payload (undecodable 110, missing request id -109) and the board's state (100)."""
    board = served()
    owner, other = Raw(board), Raw(board)
    try:
        owner.meta(0x20, {"token": "alice:1:aa"})
        malformed = [
            (pl.Op.WAIT, pl.pack(pl.Message({"seconds": 0.0})), -109),  # no request id
            (pl.Op.WAIT, b"not a message", 110),  # an undecodable payload
            (pl.Op.MVM, pl.pack(pl.Message({"tile": "W0"})), 100),  # no topology
        ]
        for op, body, code in malformed:
            assert owner.error(int(op), body)[0] == code, op
            code, said = other.error(int(op), body)
            assert code == LOCKED and "owned by 'alice:1:aa' since " in said, (op, said)
        assert other.error(0x7E, b"")[0] == 110  # an unknown opcode: before ownership
        assert other.meta(int(pl.Op.STATUS))["configured"] is False  # the open queries answer
    finally:
        owner.close()
        other.close()


def test_a_sigkilled_owner_leaves_its_board_safe_and_locked_for_its_lease(
    served: Callable[..., FirmwareBoard],
) -> None:
    board = served()
    fw = board.board
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    uri = _uri(board, lease=2)  # 2 s: room for a loaded machine, and still seconds
    host = subprocess.Popen(
        [sys.executable, "-c", killed_host("dev.lock_token"), uri], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert host.stdout is not None
        token = host.stdout.readline().strip()
        assert token and fw.safe_states == [] and fw.line_v > 0  # alive, mid-transaction, lines driven
    finally:
        host.send_signal(signal.SIGKILL)
        host.wait(timeout=10)
        host.stdout.close()  # type: ignore[union-attr]
    killed = time.monotonic()
    assert _until(lambda: len(fw.safe_states) == 1), "the board did not apply its safe state"
    assert fw.safe_states[0] - killed < 1.0 and fw.line_v == 0.0
    assert fw.ownership is not None and fw.ownership.owner_gone == 1
    # the lock is kept for the lease the host asked for (2 s)
    with pytest.warns(RuntimeWarning, match="update-7"), open_device(_uri(board, lock=False)) as looker:
        owner = looker.owner()
        assert owner is not None and owner.token == token and owner.connections == 0
        assert owner.lapses_in is not None and 0.0 < owner.lapses_in <= 2.0 and owner.lease_s == 2.0
    with pytest.raises(BoardLocked, match="no connection presents its token: free in"):
        open_device(_uri(board))
    # the dead host's reconnect with its token within the lease resumes: the same epoch, the
    # topology, the conductances and the open transaction, as SAFE_STATE keeps them
    again = Raw(board)
    resumed = again.meta(0x20, {"token": token, "lease_s": 2.0})
    assert resumed["token"] == token and resumed["connections"] == 1 and resumed["lapses_in"] is None
    assert again.meta(int(pl.Op.STATUS)) == {"epoch": 1, "transaction": "update-7", "configured": True}
    flags, body = again.ask(int(pl.Op.READ_CONDUCTANCE), pl.pack(pl.Message({"tile": "W0"})))
    assert not flags & Flag.ERROR
    got = pl.unpack(body).arrays
    np.testing.assert_allclose(got["g_plus"], LIM["g_max"], rtol=0.05)
    np.testing.assert_allclose(got["g_minus"], LIM["g_min"], rtol=0.5)
    assert len(fw.safe_states) == 1  # the owner is back: nothing more applied
    # it dies again (its socket closed, no RELEASE): safe state again, then the lease lapses
    again.close()
    assert _until(lambda: len(fw.safe_states) == 2) and fw.ownership.owner_gone == 2
    assert fw.ownership.token == token and fw.ownership.presenting() == 0  # kept for the lease ...
    assert _until(lambda: fw.ownership.token is None, timeout=3.0)  # ... then lapsed, no request needed
    with pytest.warns(RuntimeWarning, match="update-7"), open_device(_uri(board)) as dev:
        assert dev.owns and dev.open_transaction == "update-7"
        assert len(fw.safe_states) == 2  # the lapse applied nothing more: the board was safe since
    assert fw.ownership.owner_gone == 2  # the next host released it: no owner-gone safe state


def test_the_lapse_frees_the_board_and_returns_it_to_its_own_lease(
    served: Callable[..., FirmwareBoard],
) -> None:
    board = served(lease_s=1.5)  # long enough that the open during it is refused on a loaded machine
    fw = board.board
    dead = Raw(board)
    assert dead.meta(0x20, {"token": "dead:1:00"})["lease_s"] == 1.5
    dead.close()
    assert _until(lambda: len(fw.safe_states) == 1)
    with pytest.raises(BoardLocked, match="dead:1:00"):
        open_device(_uri(board))
    assert _until(lambda: fw.ownership is not None and fw.ownership.token is None, timeout=5.0)
    looker = open_device(_uri(board, lock=False))
    try:
        owner = looker.owner()
        assert owner is not None and (owner.token, owner.connections, owner.lapses_in) == (None, 0, None)
        assert owner.lease_s == 1.5
        with open_device(_uri(board, lease=60)) as dev:  # a host asks for its own lease
            assert dev.owns and looker.owner().lease_s == 60.0  # type: ignore[union-attr]
        assert looker.owner().lease_s == 1.5  # type: ignore[union-attr]
    finally:
        looker.close_link()  # as `hil info` closes: no SAFE_STATE
    assert len(fw.safe_states) == 2  # the one gone owner's, and the SAFE_STATE dev sent at close


def test_nothing_is_applied_after_a_release_or_when_a_free_boards_connection_closes(
    served: Callable[..., FirmwareBoard],
) -> None:
    board = served(lease_s=0.2)
    fw = board.board
    clean = Raw(board)
    clean.meta(0x20, {"token": "clean:1:aa"})
    clean.ask(0x22, pl.pack(pl.Message({"token": "clean:1:aa"})))
    clean.close()
    nobody = Raw(board)  # drives a free board, never owns it
    nobody.meta(int(pl.Op.WAIT), {"seconds": 0.0, "rid": 1})
    nobody.close()
    # the board has seen both closes (a safe state it applied wrongly would be applied by then;
    # a loaded machine could outlast a bare 0.3 s sleep before it did) ...
    assert fw.ownership is not None and _until(lambda: not fw.ownership.sessions)  # type: ignore[union-attr]
    time.sleep(0.3)  # ... and past the lease
    assert fw.safe_states == [] and fw.ownership is not None and fw.ownership.owner_gone == 0


def test_a_framed_hello_withdraws_the_owners_token_and_makes_the_board_safe(
    served: Callable[..., FirmwareBoard],
) -> None:
    board = served()
    fw = board.board
    raw = Raw(board)
    try:
        raw.meta(0x20, {"token": "pty:1:aa"})
        assert fw.safe_states == []
        raw.ask(LinkOp.HELLO, b"")
        assert len(fw.safe_states) == 1
        owner = raw.meta(0x21)
        assert owner["token"] == "pty:1:aa" and owner["connections"] == 0 and owner["lapses_in"] is not None
        code, said = raw.error(int(pl.Op.WAIT), pl.pack(pl.Message({"seconds": 0.0, "rid": 2})))
        assert code == LOCKED and "free in" in said  # the link presents nothing any more
    finally:
        raw.close()


def test_a_safe_state_that_fails_is_tried_again_when_the_lease_lapses(
    served: Callable[..., FirmwareBoard],
) -> None:
    board = served(lease_s=2.0)  # the check made during it (0.3 s in) must hold on a loaded machine
    fw = board.board
    own = fw.ownership
    assert own is not None
    tries: list[float] = []

    def flaky() -> None:
        tries.append(time.monotonic())
        if len(tries) == 1:
            raise OSError("the line drivers did not answer")

    own.safe = flaky
    dead = Raw(board)
    dead.meta(0x20, {"token": "dead:1:00"})
    dead.close()
    assert _until(lambda: len(tries) == 1) and own.owner_gone == 0
    time.sleep(0.3)
    assert len(tries) == 1 and own.token == "dead:1:00"  # nothing more during the lease
    assert _until(lambda: len(tries) == 2, timeout=6.0)  # at the lapse: applied
    assert own.owner_gone == 1 and own.token is None
    # a break that ends such a lease before it lapses tries it again too (the lapse never comes)
    dead = Raw(board)
    dead.meta(0x20, {"token": "dead:2:00"})
    tries.clear()
    dead.close()
    assert _until(lambda: len(tries) == 1) and own.owner_gone == 1
    admin = Raw(board)
    try:
        admin.ask(0x23)
        assert len(tries) == 2 and own.owner_gone == 2 and own.token is None
    finally:
        admin.close()


def test_break_frees_the_board_and_refuses_the_old_owner(served: Callable[..., FirmwareBoard]) -> None:
    board = served()
    gone = open_device(_uri(board))  # a colleague who went home
    admin = open_device(_uri(board, lock=False))
    before = admin.break_lock()
    assert before.token == gone.lock_token and admin.owner().token is None  # type: ignore[union-attr]
    admin.close_link()
    with pytest.raises(BoardLocked, match="was broken"):
        gone.reconnect()  # a new connection presenting the broken token: refused
    assert not gone.owns
    with open_device(_uri(board)) as mine:  # the board is free for the next host
        mine.wait(0.0)
        with pytest.raises(BoardLocked, match=f"owned by {mine.lock_token!r}"):
            gone.wait(0.0)
    gone.close()
    # a connection that still presents a broken token is refused even on a free board
    raw = Raw(board)
    try:
        raw.meta(0x20, {"token": "late:1:aa"})
        raw.ask(0x23)
        assert raw.meta(0x21)["token"] is None
        code, said = raw.error(int(pl.Op.WAIT), pl.pack(pl.Message({"seconds": 0.0, "rid": 3})))
        assert code == LOCKED and "was broken" in said
        assert raw.error(0x20, pl.pack(pl.Message({"token": "late:1:aa"})))[0] == LOCKED
        assert raw.meta(0x20, {"token": "late:2:bb"})["token"] == "late:2:bb"  # a new token takes it
        raw.meta(int(pl.Op.WAIT), {"seconds": 0.0, "rid": 4})
    finally:
        raw.close()


def test_a_lease_asked_of_the_board_is_validated_by_the_host_first(
    served: Callable[..., FirmwareBoard],
) -> None:
    board = served()
    for bad in ("0.5", "601"):
        with pytest.raises(ConfigurationError, match="lease="):
            open_device(_uri(board, lease=bad))
    assert board.board.ownership is not None and board.board.ownership.token is None


def test_a_looking_session_leaving_its_with_block_makes_a_free_board_safe(
    served: Callable[..., FirmwareBoard],
) -> None:
    """What the host does when a `lock=0` session leaves a `with` block, as the board sees it: it
    sends SAFE_STATE (refused, 120, while another host owns the board; applied on a free board).
    docs/protocol.md section 4 said such a session "only closes"."""
    board = served()
    fw = board.board
    with open_device(_uri(board, lock=False)) as looker:
        assert not looker.owns
    assert len(fw.safe_states) == 1 and fw.ownership is not None and fw.ownership.refusals == []


def test_the_owners_reconnect_through_the_drivers_keeps_the_board(
    served: Callable[..., FirmwareBoard],
) -> None:
    """The host's own reconnect (a new connection; the old one closes): the token is presented
    again first, so the board stays the host's, and another host is still refused."""
    board = served(lease_s=1.0)
    with open_device(_uri(board)) as dev:
        dev.configure(Topology.layered([3, 2]))
        dev.reconnect()
        assert dev.recovery.reconnects == 1
        owner = dev.owner()
        assert owner is not None and owner.token == dev.lock_token
        assert owner.connections == 1 and owner.lapses_in is None
        assert dev.status().configured and dev.status().epoch == 1  # nothing to configure again
        dev.wait(0.0)
        with pytest.raises(BoardLocked):
            open_device(_uri(board))
    assert board.board.ownership is not None and board.board.ownership.token is None


def test_a_host_whose_connection_the_board_lost_resumes_with_its_token(
    served: Callable[..., FirmwareBoard],
) -> None:
    """The board ends the owner's connection (a cable pulled): it applies its safe state and keeps
    the lock; the host's drivers reconnect on their next request, present the token within the
    lease and go on where they were (the same epoch and topology: nothing to configure again)."""
    board = served(lease_s=2.0)
    fw = board.board
    with open_device(_uri(board)) as dev:
        dev.configure(Topology.layered([3, 2]))
        x = np.full((1, 4), 0.5, np.float32)
        y = dev.mvm("W0", x)
        assert fw.line_v > 0
        assert board.hang_up() == 1
        assert _until(lambda: len(fw.safe_states) == 1) and fw.line_v == 0.0
        assert fw.ownership is not None and fw.ownership.owner_gone == 1
        assert fw.ownership.token == dev.lock_token and fw.ownership.lapse_at is not None
        np.testing.assert_allclose(dev.mvm("W0", x), y, atol=0.02)  # reconnected, resumed (read noise)
        assert dev.recovery.reconnects == 1 and dev.owns
        owner = dev.owner()
        assert owner is not None and owner.token == dev.lock_token and owner.lapses_in is None
        assert dev.status().epoch == 1 and len(fw.safe_states) == 1
    assert fw.ownership.token is None and fw.ownership.owner_gone == 1  # released at close
