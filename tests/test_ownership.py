"""Board ownership (capability ``lock``, docs/protocol.md "Ownership") through the real
servers: raw SCPI and framed bytes, and the drivers over pyvisa-py TCP and pyserial sockets."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Callable

import pytest

from drivers import ConfigurationError, open_device
from drivers.base import BoardOwner
from drivers.errors import BoardLocked
from drivers.uri import replace_params
from drivers.wire import codes
from drivers.wire import payload as pl
from drivers.wire.frames import Flag
from drivers.wire.link import Link
from hil.testing import BoardLock, BoardServers, FaultPlan, socket_link
from tests.raw_scpi import RawScpi
from tests.waiting import until

BOARD = "emulator://?preset=ideal&seed=0"
TRANSPORTS = ["visa-tcp", "serial-socket"]


def _block_json(reply: bytes) -> dict[str, object]:
    digits = int(reply[1:2])
    assert reply[:1] == b"#" and int(reply[2 : 2 + digits]) == len(reply) - 2 - digits
    return json.loads(reply[2 + digits :])


# ---- SCPI, byte by byte --------------------------------------------------------------


def test_scpi_lock_commands_byte_exact(emulated_board: Callable[..., BoardServers]) -> None:
    s = emulated_board(BOARD)
    a, b = RawScpi(s.uris["visa-tcp"]), RawScpi(s.uris["visa-tcp"])
    try:
        free = b'{"token":null,"since":null,"connections":0,"lease_s":15.0,"lapses_in":null}'
        assert a.query("SYST:LOCK:OWN?") == b"#275" + free
        got = a.query('SYST:LOCK:ACQ? "alice:1:aa"')  # its time stamp's length varies
        body = got[2 + int(got[1:2]) :]
        assert body.startswith(b'{"token":"alice:1:aa","since":') and body.endswith(
            b',"connections":1,"lease_s":15.0,"lapses_in":null}'
        )
        assert _block_json(got)["since"] == pytest.approx(time.time(), abs=60)
        # the second connection: everything that drives the board is refused with 120 ...
        for command in ("SYST:WAIT 0", "SYST:SAFE", "*RST", "SYST:TRAN:BEG 'x'", "CONF:TOP #12{}"):
            assert b.query(f"{command};SYST:ERR?").startswith(b'120,"Board locked;')
        assert b.query('TILE:COND? "W0"') == b"#10"
        code, message = b.error()
        assert code == codes.LOCKED and "owned by 'alice:1:aa'" in message and "SYST:LOCK:BRE" in message
        assert b.query('SYST:LOCK:ACQ? "bob:2:bb"') == b"#10" and b.error()[0] == codes.LOCKED
        # ... what reads stays open (hil info's queries)
        assert b.query("*IDN?").startswith(b"xbar-hil,emulator-ideal,")
        assert b.query("SYST:SAF?") == b"0,0"
        assert _block_json(b.query("SYST:STAT?"))["epoch"] == 0
        assert b.query("SYST:MET?") == b"0.0,0.0,0"
        assert _block_json(b.query("SYST:INFO?"))["capabilities"] == [  # type: ignore[comparison-overlap]
            "lock", "mvm", "preset_state", "program_verify", "pulse", "settle", "trace",
        ]  # fmt: skip
        assert _block_json(b.query("SYST:LOCK:OWN?"))["token"] == "alice:1:aa"
        assert b.query("SYST:ERR?") == b'0,"No error"'
        # the owner is served; a release by the wrong token releases nothing
        assert a.query("SYST:WAIT 0;SYST:ERR?") == b'0,"No error"'
        assert b.query('SYST:LOCK:REL "bob:2:bb";SYST:ERR?') == b'0,"No error"'
        assert _block_json(b.query("SYST:LOCK:OWN?"))["token"] == "alice:1:aa"
        assert a.query('SYST:LOCK:REL "alice:1:aa";SYST:ERR?') == b'0,"No error"'
        assert a.query("SYST:LOCK:OWN?") == b"#275" + free
        assert _block_json(b.query('SYST:LOCK:ACQ? "bob:2:bb"'))["token"] == "bob:2:bb"
        # a break frees the board and refuses the broken token from then on
        assert a.query("SYST:LOCK:BRE;SYST:ERR?") == b'0,"No error"'
        assert a.query("SYST:LOCK:OWN?") == b"#275" + free
        assert b.query("SYST:WAIT 0;SYST:ERR?").startswith(b'120,"Board locked;wait refused: this host')
        assert b.query('SYST:LOCK:ACQ? "bob:2:bb"') == b"#10" and b.error()[0] == codes.LOCKED
        assert b.query('SYST:LOCK:ACQ? "";SYST:ERR?').startswith(b'#10;-224,"Illegal parameter value;')
    finally:
        a.close()
        b.close()


def test_a_board_without_ownership_answers_the_lock_commands_as_unknown(
    emulated_board: Callable[..., BoardServers],
) -> None:
    s = emulated_board(BOARD, lock=False)
    raw = RawScpi(s.uris["visa-tcp"])
    try:
        assert raw.query("SYST:LOCK:OWN?;SYST:ERR?") == b';-113,"Undefined header;SYST:LOCK:OWN?"'
        assert "lock" not in _block_json(raw.query("SYST:INFO?"))["capabilities"]  # type: ignore[operator]
    finally:
        raw.close()
    link = _framed(s)
    flags, body = _exchange(link, pl.Op.OWNER, pl.pack(pl.Message()))
    assert flags & Flag.ERROR and json.loads(body)["code"] == codes.FRAME_ERROR


# ---- framed, byte by byte ------------------------------------------------------------


def _framed(s: BoardServers) -> Link:
    host, port = s.uris["serial-socket"].split("://", 1)[1].rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=5)
    return socket_link(sock, ack_timeout=1.0, retries=3)


def _exchange(link: Link, op: int, body: bytes) -> tuple[int, bytes]:
    seq = link.send(op, body)
    got = link.receive(5.0, response=True, ref=seq, opcode=op)
    assert got is not None, "no reply"
    return int(got[0].flags), got[1]


def test_framed_lock_opcodes_byte_exact(emulated_board: Callable[..., BoardServers]) -> None:
    s = emulated_board(BOARD)
    assert [int(op) for op in (pl.Op.ACQUIRE, pl.Op.OWNER, pl.Op.RELEASE, pl.Op.BREAK)] == [
        0x20,
        0x21,
        0x22,
        0x23,
    ]
    acquire = pl.pack(pl.Message({"token": "alice:1:aa"}))
    assert acquire == b'\x16\x00\x00\x00{"token":"alice:1:aa"}'
    empty = pl.pack(pl.Message())
    assert empty == b"\x02\x00\x00\x00{}"
    a, b = _framed(s), _framed(s)
    flags, body = _exchange(a, 0x21, empty)
    free = b'{"token":null,"since":null,"connections":0,"lease_s":15.0,"lapses_in":null}'
    assert flags == Flag.RESPONSE | Flag.START and body == b"\x4b\x00\x00\x00" + free
    flags, body = _exchange(a, 0x20, acquire)
    assert not flags & Flag.ERROR and pl.unpack(body).meta["token"] == "alice:1:aa"
    # the second link: WAIT refused with 120
    flags, body = _exchange(b, int(pl.Op.WAIT), pl.pack(pl.Message({"seconds": 0.0, "rid": 7})))
    error = json.loads(body)
    assert flags == Flag.RESPONSE | Flag.ERROR | Flag.START and error["code"] == 120
    assert error["message"].startswith("wait refused: the board is owned by 'alice:1:aa' since ")
    flags, body = _exchange(b, int(pl.Op.SAFETY), empty)
    assert not flags & Flag.ERROR and pl.unpack(body).meta == {"refused": 0, "violations": 0}
    # the owner is served; release (0x22) frees the board and break (0x23) ends another's lock
    flags, body = _exchange(a, int(pl.Op.WAIT), pl.pack(pl.Message({"seconds": 0.0, "rid": 8})))
    assert not flags & Flag.ERROR and body == empty
    assert _exchange(a, 0x22, acquire) == (Flag.RESPONSE | Flag.START, empty)
    assert _exchange(b, 0x21, empty)[1] == b"\x4b\x00\x00\x00" + free
    assert not _exchange(b, 0x20, pl.pack(pl.Message({"token": "bob"})))[0] & Flag.ERROR
    assert _exchange(a, 0x23, empty) == (Flag.RESPONSE | Flag.START, empty)
    assert _exchange(a, 0x21, empty)[1] == b"\x4b\x00\x00\x00" + free
    flags, body = _exchange(b, int(pl.Op.WAIT), pl.pack(pl.Message({"seconds": 0.0, "rid": 9})))
    assert json.loads(body)["code"] == 120 and "was broken" in json.loads(body)["message"]


# ---- the order of the checks: a non-owner gets 120 before its parameters are read ----------


# requests that drive the board, each malformed, and what the board says to its owner
SCPI_MALFORMED = [
    ("SYST:WAIT", codes.MISSING_PARAMETER),
    ("SYST:WAIT abc", codes.NUMERIC_DATA_ERROR),
    ("SYST:WAIT 0,1,2", codes.PARAMETER_NOT_ALLOWED),
    ("*RST 1", codes.PARAMETER_NOT_ALLOWED),
    ("CONF:TOP #15{x:1}", codes.ILLEGAL_PARAMETER_VALUE),
    ('TILE:PROG? "nope",1,DEF,5,#10', codes.CONFIGURATION),  # the board's state: no such tile
    ('TILE:PULS? "W0",#14abcd', codes.CONFIGURATION),
    ('TILE:MVM? "W0",1,#10', codes.CONFIGURATION),
    ("TILE:COND?", codes.MISSING_PARAMETER),
    ("NET:SETT? #10,#10", codes.ILLEGAL_PARAMETER_VALUE),
]


def _answered(raw: RawScpi, command: str) -> list[int]:
    """Send `command` (then *OPC?, so a command without a reply is answered too) and read back
    every error it queued."""
    raw.query(f"{command};*OPC?")
    found = []
    while (error := raw.error())[0] != codes.NO_ERROR:
        found.append(error[0])
    return found


def test_scpi_a_non_owner_gets_120_whatever_its_parameters(
    emulated_board: Callable[..., BoardServers],
) -> None:
    """docs/protocol.md "Ownership", the order of the checks. The non-owner got the owner's
    answers here (100 "the device has no topology yet" for a program, pulse or mvm: the SCPI
    server looked the tile up before the lock, where the framed server answered 120)."""
    s = emulated_board(BOARD)
    owner, other = RawScpi(s.uris["visa-tcp"]), RawScpi(s.uris["visa-tcp"])
    try:
        assert _block_json(owner.query('SYST:LOCK:ACQ? "alice:1:aa"'))["token"] == "alice:1:aa"
        for command, code in SCPI_MALFORMED:
            assert _answered(owner, command) == [code], command
            assert _answered(other, command) == [codes.LOCKED], command
        # what the board must read to know the operation comes first, for everyone: the message's
        # grammar (no unit of it runs) and the header
        for command, code in (
            ("SYST:WAIT 0 1", codes.INVALID_SEPARATOR),
            ("SYST:WAIT 0,", codes.MISSING_PARAMETER),
        ):
            for raw in (owner, other):
                raw.sock.sendall(command.encode() + b"\n")
                assert raw.error()[0] == code and raw.error()[0] == codes.NO_ERROR, command
        assert _answered(other, "FOO:BAR") == [codes.UNDEFINED_HEADER]
        # an open query's parameters are read as before
        assert _answered(other, "SYST:STAT? 1") == [codes.PARAMETER_NOT_ALLOWED]
    finally:
        owner.close()
        other.close()


def test_framed_a_non_owner_gets_120_whatever_its_payload(
    emulated_board: Callable[..., BoardServers],
) -> None:
    """The same order over the framed link: the opcode, then ownership, then the payload."""
    s = emulated_board(BOARD)
    owner, other = _framed(s), _framed(s)
    assert (
        not _exchange(owner, int(pl.Op.ACQUIRE), pl.pack(pl.Message({"token": "alice:1:aa"})))[0] & Flag.ERROR
    )
    malformed = [
        (pl.Op.WAIT, pl.pack(pl.Message({"seconds": 0.0})), codes.MISSING_PARAMETER),  # no request id
        (pl.Op.WAIT, b"not a message", codes.FRAME_ERROR),  # an undecodable payload
        (pl.Op.PROGRAM, pl.pack(pl.Message({"tile": "nope", "rid": 1})), codes.MISSING_PARAMETER),
        (pl.Op.CONFIGURE, pl.pack(pl.Message({"groups": 3})), codes.ILLEGAL_PARAMETER_VALUE),
    ]
    for op, body, code in malformed:
        for link, expected in ((owner, code), (other, codes.LOCKED)):
            flags, reply = _exchange(link, int(op), body)
            assert flags & Flag.ERROR and json.loads(reply)["code"] == expected, (op, reply)
    flags, reply = _exchange(other, 0x7E, b"")  # an unknown opcode: before ownership
    assert flags & Flag.ERROR and json.loads(reply)["code"] == codes.FRAME_ERROR


# ---- the drivers over pyvisa-py TCP and pyserial sockets -----------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_second_host_is_refused_while_the_first_owns_the_board(
    transport: str, emulated_board: Callable[..., BoardServers]
) -> None:
    s = emulated_board(BOARD)
    other_transport = TRANSPORTS[1 - TRANSPORTS.index(transport)]  # the lock is the board's, not a server's
    with open_device(s.uri(transport)) as first:
        assert "lock" in first.info.capabilities and first.owns
        owner = first.owner()
        assert owner is not None and owner.token == first.lock_token and owner.connections == 1
        for uri in (s.uri(transport), s.uri(other_transport)):
            with pytest.raises(BoardLocked) as refused:
                open_device(uri)
            assert refused.value.code == codes.LOCKED == 120
            assert first.lock_token in str(refused.value) and "hil lock break" in str(refused.value)
        looker = open_device(s.uri(other_transport, lock="0"))  # as hil info opens it
        try:
            assert not looker.owns
            assert looker.status().epoch == 0 and looker.safety().violations == 0
            assert looker.meter() is not None and looker.info.identity.model == "emulator-ideal"
            assert looker.owner() == first.owner()
            for call in (lambda: looker.wait(0.0), looker.safe_state, looker.reset):
                with pytest.raises(BoardLocked, match="owned by"):
                    call()
        finally:
            looker.close()  # its safe state is refused (120) and swallowed: close still closes
        first.wait(0.0)  # the owner is served throughout
    with open_device(s.uri(other_transport)) as second:  # the first released the board on close
        assert second.owns and second.owner().token == second.lock_token  # type: ignore[union-attr]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_the_owner_keeps_the_board_across_a_reconnect(
    transport: str, emulated_board: Callable[..., BoardServers]
) -> None:
    s = emulated_board(BOARD)
    with open_device(s.uri(transport, timeout="2")) as dev:
        dev.reconnect()  # a new connection: the old one closes, the token is presented again
        assert dev.recovery.reconnects == 1
        dev.wait(0.0)
        owner = dev.owner()
        assert owner is not None and owner.token == dev.lock_token and owner.lapses_in is None
        with pytest.raises(BoardLocked):
            open_device(s.uri(transport))


def test_the_owner_keeps_the_board_across_a_lost_connection(
    emulated_board: Callable[..., BoardServers],
) -> None:
    s = emulated_board(BOARD, plan=pytest.importorskip("hil.testing").FaultPlan(hang_up_after=8))
    with open_device(s.uri("visa-tcp", timeout="2")) as dev:  # 5 messages: *CLS, INFO, ACQ, TOP, STAT
        dev.wait(0.0)
        dev.wait(0.0)  # answered, then the server hangs up
        # fails on the link: reconnected (INFO read again, ACQ with the same token), sent again.
        # A reconnect reads INFO again (a board with other limits is BoardChanged): one request
        # more on the new connection, which at hang_up_after 7 reached it within this wait
        dev.wait(0.0)
        assert (dev.recovery.reconnects, dev.recovery.retries) == (1, 1)
        assert dev.owner().token == dev.lock_token  # type: ignore[union-attr]
        with pytest.raises(BoardLocked):
            open_device(s.uri("serial-socket"))


def test_a_dead_owners_lease_lapses_and_frees_the_board(emulated_board: Callable[..., BoardServers]) -> None:
    s = emulated_board(BOARD, lock=BoardLock(lease_s=2.0))  # the two opens during it fit on a loaded machine
    dead = RawScpi(s.uris["visa-tcp"])  # a host that takes the board and dies without releasing it
    assert _block_json(dead.query('SYST:LOCK:ACQ? "dead:1:00"'))["token"] == "dead:1:00"
    dead.close()
    time.sleep(0.1)  # the server sees the connection end
    with pytest.raises(BoardLocked, match="dead:1:00"):
        open_device(s.uri("serial-socket"))
    with open_device(s.uri("serial-socket", lock="0")) as looker:
        owner = looker.owner()
        assert owner is not None and owner.connections == 0 and owner.lapses_in is not None
        assert 0.0 < owner.lapses_in <= 2.0
    time.sleep(2.1)
    with open_device(s.uri("serial-socket")) as dev:
        assert dev.owns


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_break_frees_the_board_and_refuses_the_old_owner(
    transport: str, emulated_board: Callable[..., BoardServers]
) -> None:
    s = emulated_board(BOARD)
    gone = open_device(s.uri(transport))  # a colleague who went home
    admin = open_device(s.uri(transport, lock="0"))
    before = admin.break_lock()
    assert before.token == gone.lock_token
    assert admin.owner().token is None  # type: ignore[union-attr]
    admin.close_link()
    with pytest.raises(BoardLocked, match="was broken"):
        gone.reconnect()  # a new connection presenting the broken token: refused
    assert not gone.owns
    with open_device(s.uri(transport)) as mine:  # the board is free for the next host
        mine.wait(0.0)
        with pytest.raises(BoardLocked, match=f"owned by '{mine.lock_token}'"):
            gone.wait(0.0)
    gone.close()


def _reboot_through(transport: str, s: BoardServers) -> None:
    """A program request over `transport` (SCPI or framed) that the fault plan turns into a
    reboot of the board instead: it is not run, so its content does not matter."""
    if transport == "visa-tcp":
        RawScpi(s.uris["visa-tcp"]).sock.sendall(b'TILE:PROG? "W0",1,DEF,5,#10\n')
    else:
        _framed(s).send(int(pl.Op.PROGRAM), pl.pack(pl.Message({"rid": 1})))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_reboot_forgets_the_lock_and_the_reset_command_keeps_it(
    transport: str, emulated_board: Callable[..., BoardServers]
) -> None:
    """The lock lives in the board's RAM (docs/protocol.md, "Ownership"): the RESET command
    (`*RST`, 0x1A) the owner sends keeps it; a reboot (the fault plan's injected reset: a
    power cycle, a watchdog reset) forgets it. The emulator kept it through a reboot."""
    s = emulated_board(BOARD, plan=FaultPlan(p_reset=1.0, limit=1))
    other = TRANSPORTS[1 - TRANSPORTS.index(transport)]
    owner = open_device(s.uri(transport, timeout="2"))
    looker = open_device(s.uri(other, lock="0"))
    try:
        owner.reset()
        assert looker.status().epoch == 1 and looker.owner().token == owner.lock_token  # type: ignore[union-attr]
        _reboot_through(transport, s)
        deadline = time.monotonic() + 5
        while looker.status().epoch == 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert looker.status().epoch == 2 and s.plan.injected["reset"] == 1
        freed = looker.owner()
        assert freed is not None and (freed.token, freed.connections, freed.lapses_in) == (None, 0, None)
        with open_device(s.uri(other)) as taker:  # the next host takes the rebooted board ...
            assert taker.owns
            with pytest.raises(BoardLocked, match=f"owned by '{taker.lock_token}'"):
                owner.wait(0.0)  # ... and the old owner's run stops instead of driving it
    finally:
        looker.close()
        owner.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_an_old_board_without_ownership_still_opens(
    transport: str, emulated_board: Callable[..., BoardServers]
) -> None:
    s = emulated_board(BOARD, lock=False)
    with open_device(s.uri(transport)) as one, open_device(s.uri(transport)) as two:
        assert "lock" not in one.info.capabilities and not one.owns
        assert one.owner() is None and two.owner() is None
        one.wait(0.0)
        two.wait(0.0)


def _dead_host_with_lease(s: BoardServers, transport: str, token: str, lease: float) -> None:
    """A host that takes the board asking for `lease` seconds and dies without releasing it."""
    if transport == "visa-tcp":
        raw = RawScpi(s.uris["visa-tcp"])
        assert _block_json(raw.query(f'SYST:LOCK:ACQ? "{token}",{lease!r}'))["lease_s"] == lease
        raw.close()
        return
    host, port = s.uris["serial-socket"].split("://", 1)[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        request = pl.pack(pl.Message({"token": token, "lease_s": lease}))
        flags, body = _exchange(socket_link(sock, ack_timeout=1.0, retries=3), int(pl.Op.ACQUIRE), request)
        assert not flags & Flag.ERROR and pl.unpack(body).meta["lease_s"] == lease


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_host_chooses_its_lease_within_the_bounds(
    transport: str, emulated_board: Callable[..., BoardServers]
) -> None:
    """`lease=S` (LEASE_MIN_S to LEASE_MAX_S seconds) in the URI: the board keeps the host's
    lock that long for its reconnect, instead of the board's own 15 s."""
    s = emulated_board(BOARD)
    other = TRANSPORTS[1 - TRANSPORTS.index(transport)]
    with open_device(s.uri(other, lock="0")) as looker:
        with open_device(s.uri(transport, lease="60")) as dev:
            assert dev.owner().lease_s == looker.owner().lease_s == 60.0  # type: ignore[union-attr]
            dev.reconnect()  # the reconnect asks for it again
            assert looker.owner().lease_s == 60.0 and looker.owner().token == dev.lock_token  # type: ignore[union-attr]
        assert looker.owner().lease_s == 15.0  # released: a free board shows its own lease  # type: ignore[union-attr]
        # a dead host that asked for the shortest lease frees the board in 1 s, not 15
        _dead_host_with_lease(s, transport, "dead:1:00", pl.LEASE_MIN_S)
        # asked from when the server has seen the close (the lease runs), not after a 0.1 s sleep
        # that a loaded machine can outlast (lapses_in None) or eat half the lease after
        seen: list[BoardOwner | None] = []

        def lapsing() -> bool:
            seen.append(looker.owner())
            return seen[-1] is not None and seen[-1].lapses_in is not None

        assert until(lapsing, 5.0)
        owner = seen[-1]
        assert owner is not None and owner.token == "dead:1:00" and 0.5 < owner.lapses_in <= 1.0  # type: ignore[operator]
        time.sleep(1.0)
        assert looker.owner().token is None  # type: ignore[union-attr]
    for bad in ("0.5", "601", "nan"):  # refused before anything is sent
        with pytest.raises(ConfigurationError, match=r"lease=.*(>= 1.0 and <= 600.0|finite number)"):
            open_device(s.uri(transport, lease=bad))


def test_the_board_refuses_a_lease_outside_the_bounds(emulated_board: Callable[..., BoardServers]) -> None:
    s = emulated_board(BOARD)
    raw = RawScpi(s.uris["visa-tcp"])
    try:
        for lease, code in (
            ("0.5", codes.DATA_OUT_OF_RANGE),
            ("601", codes.DATA_OUT_OF_RANGE),
            ("abc", -120),
        ):
            assert raw.query(f'SYST:LOCK:ACQ? "x:1:aa",{lease}') == b"#10"
            code_got, message = raw.error()
            assert code_got == code, (lease, message)
        assert "outside [1, 600] s" in (raw.query('SYST:LOCK:ACQ? "x:1:aa",0') and raw.error()[1])
    finally:
        raw.close()
    link = _framed(s)
    for lease, code in (
        (1000.0, codes.DATA_OUT_OF_RANGE),
        ("60", codes.ILLEGAL_PARAMETER_VALUE),
        (True, -224),
    ):
        flags, body = _exchange(
            link, int(pl.Op.ACQUIRE), pl.pack(pl.Message({"token": "x:1:aa", "lease_s": lease}))
        )
        assert flags & Flag.ERROR and json.loads(body)["code"] == code, (lease, body)
    assert _exchange(link, int(pl.Op.OWNER), pl.pack(pl.Message()))[1].endswith(
        b'"lease_s":15.0,"lapses_in":null}'
    )


class _NoLease(BoardLock):
    """Firmware from before a host could ask for a lease: it keeps its own."""

    takes_lease = False


@pytest.mark.parametrize(
    ("transport", "says"),
    [("visa-tcp", "takes no lease from the host;"), ("serial-socket", "(it keeps its own 15 s)")],
)
def test_a_lease_asked_of_older_firmware_is_refused_clearly(
    transport: str, says: str, emulated_board: Callable[..., BoardServers]
) -> None:
    """Older firmware refuses the SCPI parameter (-108) or ignores the framed field: the host
    says so and leaves the board free, rather than run on a lease it does not have. Without
    lease= it opens as before."""
    s = emulated_board(BOARD, lock=_NoLease())
    with pytest.raises(ConfigurationError, match=re.escape(says) + ".*open it without lease="):
        open_device(s.uri(transport, lease="60"))
    with open_device(s.uri(transport)) as dev:
        assert dev.owns and dev.owner().lease_s == 15.0  # type: ignore[union-attr]


def test_the_lock_option_is_validated_and_written_back() -> None:
    uri = "visa://TCPIP0::127.0.0.1::5025::SOCKET"
    assert replace_params(uri, lock=False) == uri + "?lock=0"
    assert replace_params(uri + "?lock=0", lock=True) == uri
    assert (
        replace_params("serial+socket://127.0.0.1:7000", lock="no") == "serial+socket://127.0.0.1:7000?lock=0"
    )
    with pytest.raises(ConfigurationError, match=r"lock='maybe': expected 0 or 1"):
        replace_params(uri, lock="maybe")


def test_cli_info_and_lock_status_and_break(emulated_board: Callable[..., BoardServers]) -> None:
    """`hil info`, `hil lock status` and `hil lock break` as another host sees the owned board:
    each command opens its own connection with its own token (`owner_token` draws a random part
    per connection), so they run in this process (the CLI's own app, as tests/test_info_cmd.py
    runs it), not as four interpreters starting torch."""
    from typer.testing import CliRunner

    from hil.cli import app

    s = emulated_board(BOARD)
    with open_device(s.uri("visa-tcp")) as dev:  # leaving the block after the break only closes

        def hil(*args: str) -> str:
            done = CliRunner().invoke(app, list(args))
            assert done.exit_code == 0, (done.output, done.exception)
            return done.stdout

        info = hil("info", s.uris["serial-socket"])
        assert f"owner         {dev.lock_token} since " in info and "1 connection(s)" in info
        assert dev.lock_token in hil("lock", "status", s.uris["visa-tcp"])
        assert f"broke the lock of {dev.lock_token}" in hil("lock", "break", "--yes", s.uris["serial-socket"])
        assert "owner         nobody" in hil("lock", "status", s.uris["visa-tcp"])
        with pytest.raises(BoardLocked, match="was broken"):
            dev.wait(0.0)


class _AnnouncedNotEnforced(BoardLock):
    """Firmware that announces ``lock`` and answers its commands, but refuses nothing."""

    def check(self, session: object, op: object) -> None:  # type: ignore[override]
        return None


@pytest.mark.parametrize("enforced", [True, False])
def test_conformance_checks_ownership_over_tcp(
    enforced: bool, emulated_board: Callable[..., BoardServers]
) -> None:
    from hil.conformance.suite import run_conformance

    s = emulated_board(BOARD, lock=BoardLock() if enforced else _AnnouncedNotEnforced())
    with open_device(s.uris["serial-socket"]) as dev:
        report = run_conformance(dev, s.uris["serial-socket"])
    found = [c for c in report.checks if c.operation == "ownership"]
    assert len(found) == 1
    if enforced:
        assert found[0].status == "PASS", found[0].got
    else:
        assert found[0].status == "FAIL" and "ran while this one owns the board" in found[0].got
