"""A gone owner (capability ``lock``, docs/protocol.md "Ownership", Lease and "A gone owner's
board is made safe by the board"): an owner whose last connection closes without a release
keeps the board for its lease, and the board frees it when the lease lapses, with no request.

What the wire shows, over TCP (a serial line has no connection of its own that closes): the
suite's connection owns the board, so it hands the board over rather than releasing it (the
board is never free but at the lapse under test, where a shared lab board is free for one
poll of the owner query and one reconnect). A raw connection presents the suite's token
(the owner's reconnect), acquires with a fresh conformance token and the shortest lease a host
may ask (`LEASE_MIN_S`, so the board passes to it), and closes without a release, as a killed
host's socket closes. A looking connection (``lock=0``) must then see the conformance token
with 0 connections and `lapses_in` within the lease; another token's take is refused (120); a
new raw connection presenting the conformance token (the gone owner's ordinary reconnect, what
the host drivers do after a dropped link) must get the board back, its lease stopped, and
closes again without a release; the owner query must show the board free within the lease
plus 2 s of that second close, and the suite's own connection takes it back (`reconnect`,
which presents its token again). The safe state the
board must apply when its owner goes is not visible on the wire: not checked here."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol

from drivers.base import BoardOwner, Device
from drivers.errors import BoardLocked, DeviceError, ProtocolError
from drivers.uri import looking_uri, open_device, parse_options
from drivers.wire import codes, scpi
from drivers.wire import payload as pl
from drivers.wire.frames import Flag
from hil.conformance.ownership import serial_line
from hil.conformance.report import Check, Mismatch
from hil.conformance.session import Session
from hil.testing import socket_link

NAME = "owner gone"
SPEC = (
    f"an owner whose last connection closes without a release (lease {pl.LEASE_MIN_S:g} s asked) keeps "
    "the board: its token, 0 connections, lapses_in within the lease; another token's take is refused "
    "(120); the owner's reconnect within the lease gets it back (its lease stopped); after the lease "
    "that its second close starts the board is free with no request but the owner query, and takeable. Its "
    "own safe state at that moment is not visible on the wire: not checked"
)
SLACK_S = 2.0  # how long past the lease the board may take to show itself free
POLL_S = 0.02  # between two owner queries
EARLY_S = 0.05  # clock rounding: a board seen free sooner than the lease less this freed it early


class RawLink(Protocol):
    """A connection of its own to the board, below the host drivers (no release at close)."""

    def acquire(self, token: str, lease_s: float | None = None) -> BoardOwner: ...

    def release(self, token: str) -> None: ...

    def close(self) -> None: ...


def checks(sess: Session) -> None:
    uri = sess.report.uri
    if pl.LOCK_CAPABILITY not in sess.caps:
        sess.add(Check(NAME, "SKIP", "-", "-", f"{pl.LOCK_CAPABILITY!r} not in the declared capabilities"))
        return
    if not uri or serial_line(uri):
        why = (
            "a serial line: no connection of its own closes (the board sees its owner gone only at a "
            "framed HELLO or the next host's take; docs/protocol.md, 'Ownership')"
        )
        sess.add(Check(NAME, "SKIP", "-", "-", why))
        return
    opener = raw_opener(uri)
    if isinstance(opener, str):
        sess.add(Check(NAME, "SKIP", "-", "-", opener))
        return
    mine = getattr(sess.dev, "lock_token", None)
    if (
        not getattr(sess.dev, "owns", False)
        or not isinstance(mine, str)
        or not hasattr(sess.dev, "reconnect")
    ):
        why = "this connection does not own the board (opened with lock=0): it has no lock to hand over"
        sess.add(Check(NAME, "SKIP", "-", "-", why))
        return
    sess.run(NAME, SPEC, lambda sent: _owner_gone(sess, sent, opener, mine))


def raw_opener(uri: str) -> Callable[[], RawLink] | str:
    """What opens a raw connection to the board `uri` names, or why there is none: raw SCPI
    for ``visa://TCPIP...::PORT::SOCKET``, a framed link for ``serial+socket://HOST:PORT``."""
    scheme, target, options = parse_options(uri)
    timeout = float(getattr(options, "timeout", 10.0))
    parts = target.split("::")
    if (
        scheme == "visa"
        and len(parts) == 4
        and parts[0].upper().startswith("TCPIP")
        and parts[3].upper() == "SOCKET"
    ):
        host, port = parts[1], int(parts[2])
        return lambda: RawScpi(host, port, timeout)
    if scheme == "serial+socket":
        host, _, port = target.rpartition(":")
        return lambda: RawFramed(host.strip("[]"), int(port), timeout)
    return (
        f"no raw TCP link to {scheme}://{target} (raw SCPI needs a TCPIP...::PORT::SOCKET resource, a framed "
        "link serial+socket://HOST:PORT): a connection closed without a release cannot be made here"
    )


def _owner_gone(sess: Session, sent: list[str], opener: Callable[[], RawLink], mine: str) -> str:
    gone_token = f"hil-conformance:owner-gone:{os.urandom(4).hex()}"
    other_token = f"hil-conformance:other-host:{os.urandom(4).hex()}"
    looking: Device = open_device(looking_uri(sess.report.uri))
    handed = False
    try:
        taker = opener()  # opened before the lease starts: the take must come within it
        try:
            sent.append(
                f"a raw connection presents this one's token, acquires with {gone_token!r} and lease "
                f"{pl.LEASE_MIN_S:g} s, closes without a release"
            )
            gone = opener()
            try:
                gone.acquire(mine)  # the owner's own reconnect: the board passes on from it
                gone.acquire(gone_token, pl.LEASE_MIN_S)
                handed = True
            finally:
                gone.close()
            closed = time.monotonic()
            seen = _leased(looking, gone_token, closed)
            sent.append(f"another raw connection acquires with {other_token!r}")
            _refused(taker, other_token)
        finally:
            taker.close()
        sent.append(
            f"a new raw connection presents {gone_token!r} again (the owner's reconnect), then closes "
            "without a release"
        )
        back = opener()
        try:
            returned = _returned(back, gone_token)
        finally:
            back.close()
        closed = time.monotonic()
        sent.append(
            f"a looking connection (lock=0) polls the owner query for up to the lease + {SLACK_S:g} s"
        )
        freed = _freed(looking, gone_token, closed)
    except BaseException:
        if handed:
            with contextlib.suppress(Exception):
                _take_back(sess, looking, opener, mine, (gone_token, other_token))
        looking.close_link()
        raise
    try:
        sent.append("this connection reconnects and presents its token")
        back = _take_back(sess, looking, opener, mine, (gone_token, other_token))
    finally:
        looking.close_link()
    return f"{seen}; the take refused (120); {returned}; {freed}; {back}"


def _leased(looking: Device, token: str, closed: float) -> str:
    """The owner query until it counts no connection of `token` (the board may see the close a
    moment after it happened): the token kept, its lapse within the lease."""
    while True:
        owner = looking.owner()
        if owner is None or owner.token != token:
            raise Mismatch(
                f"{time.monotonic() - closed:.2f} s after its connection closed, the owner query shows "
                f"{owner}: the board dropped the gone owner at once instead of keeping it for its lease"
            )
        if owner.connections == 0:
            break
        if time.monotonic() - closed > pl.LEASE_MIN_S:
            raise Mismatch(f"{pl.LEASE_MIN_S:g} s after its connection closed the board still counts {owner}")
        time.sleep(POLL_S)
    if owner.lapses_in is None or not 0.0 < owner.lapses_in <= pl.LEASE_MIN_S:
        raise Mismatch(f"{owner}: lapses_in must be within the lease of {pl.LEASE_MIN_S:g} s")
    if owner.lease_s != pl.LEASE_MIN_S:
        raise Mismatch(f"{owner}: lease_s is not the {pl.LEASE_MIN_S:g} s asked for")
    return f"kept: 0 connections, lapses in {owner.lapses_in:.2f} s"


def _refused(taker: RawLink, token: str) -> None:
    try:
        taker.acquire(token)
    except BoardLocked:
        return
    except DeviceError as exc:
        raise Mismatch(
            f"another token's take during the lease: {type(exc).__name__} ({exc}), not 120"
        ) from exc
    raise Mismatch("another token took the board during the gone owner's lease")


def _returned(back: RawLink, token: str) -> str:
    """The gone owner's reconnect within its lease: its token presented again must get the board
    back (a board that takes an ordinary reconnect for a lost owner fails here)."""
    try:
        owner = back.acquire(token, pl.LEASE_MIN_S)
    except BoardLocked as exc:
        raise Mismatch(
            f"the owner's reconnect within its lease was refused ({exc}): the board took an ordinary "
            "reconnect (a dropped link, the host drivers presenting the token again) for a lost owner; "
            "a token presented again within its lease must get the board back"
        ) from exc
    if owner.token != token or owner.lapses_in is not None or owner.connections < 1:
        raise Mismatch(
            f"the owner's reconnect within its lease got {owner}: the board must be its own again, "
            "presented by this connection, with no lease running"
        )
    return "the owner's reconnect within the lease got it back"


def _freed(looking: Device, token: str, closed: float) -> str:
    """The owner query until the board is free, for at most the lease + SLACK_S after the close,
    and not before the lease (which began no earlier than the close seen here) lapsed."""
    deadline = closed + pl.LEASE_MIN_S + SLACK_S
    while True:
        owner = looking.owner()
        now = time.monotonic()
        if owner is None or owner.token is None:
            break
        if owner.token != token:
            raise Mismatch(f"during the gone owner's lease the board passed to {owner.token!r}")
        if now > deadline:
            raise Mismatch(
                f"{now - closed:.2f} s after the close the board is still owned ({owner}): it must free "
                f"a lease of {pl.LEASE_MIN_S:g} s when it lapses, with no request"
            )
        time.sleep(POLL_S)
    if now - closed < pl.LEASE_MIN_S - EARLY_S:
        raise Mismatch(
            f"free {now - closed:.2f} s after the close: before its lease of {pl.LEASE_MIN_S:g} s lapsed"
        )
    return f"free {now - closed:.2f} s after the close"


def _take_back(
    sess: Session, looking: Device, opener: Callable[[], RawLink], mine: str, ours: tuple[str, ...]
) -> str:
    """This connection takes its board again; a lock a failed check left with one of `ours` is
    released first."""
    owner = looking.owner()
    if owner is not None and owner.token in ours:
        link = opener()
        try:
            link.release(owner.token)
        finally:
            link.close()
    try:
        sess.dev.reconnect()  # type: ignore[attr-defined]
    except BoardLocked as exc:
        raise Mismatch(
            f"another host took the board while it was free ({exc}); the checks that follow cannot drive it"
        ) from exc
    now = sess.dev.owner()
    if now is None or now.token != mine:
        raise Mismatch(f"this connection presented its token again and the board shows {now}")
    return "taken back by this connection's token"


class RawScpi:
    """Raw SCPI over a TCP socket: the lock commands, their replies read as lines."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def _line(self, text: str) -> str:
        self.sock.sendall(text.encode("ascii") + b"\n")
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ProtocolError(f"the board closed the connection after {text.split(' ', 1)[0]}")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode("ascii", "replace").strip()

    def acquire(self, token: str, lease_s: float | None = None) -> BoardOwner:
        lease = "" if lease_s is None else f",{scpi.number(lease_s)}"
        what = scpi.short_form(scpi.LOCK_ACQUIRE_Q)
        reply = self._line(f"{what} {scpi.quote(token)}{lease}")
        if reply == "#10":  # a failed block query: its error is queued
            raise codes.error_for(*scpi.parse_error(self._line("SYST:ERR?")))
        try:
            body = scpi.parse_block(reply.encode("ascii"))
        except ValueError as exc:
            raise ProtocolError(f"{what} answered {reply[:60]!r}: {exc}") from exc
        return pl.board_owner(pl.Message(pl.loads(body)))

    def release(self, token: str) -> None:
        self.sock.sendall(f"{scpi.short_form(scpi.LOCK_RELEASE)} {scpi.quote(token)}\n".encode("ascii"))
        code, message = scpi.parse_error(self._line("SYST:ERR?"))  # answered once the release ran
        if code != 0:
            raise codes.error_for(code, message)

    def close(self) -> None:
        self.sock.close()


class RawFramed:
    """A framed link of its own over a TCP socket: the lock operations as single requests."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.timeout = timeout
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.link = socket_link(self.sock, seq0=int.from_bytes(os.urandom(2), "little"))

    def _call(self, op: pl.Op, meta: dict[str, Any]) -> pl.Message:
        seq = self.link.send(op, pl.pack(pl.Message(meta)))
        got = self.link.receive(self.timeout, response=True, ref=seq, opcode=op)
        if got is None:
            raise ProtocolError(f"no reply to {op.name} within {self.timeout:g} s")
        frame, reply = got
        if frame.flags & Flag.ERROR:
            err = pl.loads(reply)
            raise codes.error_for(int(err.get("code", codes.EXECUTION_ERROR)), str(err.get("message", "")))
        return pl.unpack(reply)

    def acquire(self, token: str, lease_s: float | None = None) -> BoardOwner:
        meta: dict[str, Any] = {"token": token} if lease_s is None else {"token": token, "lease_s": lease_s}
        return pl.board_owner(self._call(pl.Op.ACQUIRE, meta))

    def release(self, token: str) -> None:
        self._call(pl.Op.RELEASE, {"token": token})

    def close(self) -> None:
        self.link.close()
        self.sock.close()
