"""Board ownership (capability ``lock``; docs/protocol.md, "Ownership"): one owner per board.

A host takes the board with a token it chose (ACQUIRE); from then on every request that
drives or changes the board (`drivers.wire.payload.OPEN_WHILE_OWNED` lists the ones that do
not) is refused with error 120 unless it comes over a connection that presented that token.
The lock belongs to the token, not to a connection: a host that lost its link and reconnects
presents the token again and still owns the board. While at least one open connection
presents the token the lock holds; once none does (the owner closed without RELEASE, or its
process died), it lapses `lease_s` seconds later unless the token is presented again in the
meantime. BREAK ends it at once, whoever asks (a lab admin whose colleague went home); the
board then refuses the broken token (its host's next request, and its reconnect), so that
host cannot go on unnoticed or take the board back without opening it again. A reboot of the
board (`reboot`: power-on, a watchdog reset, the fault plan's injected reset; not the RESET
command, `*RST`, which the owner sends and which keeps the lock) forgets it all: it lives in RAM. A
connection that presents the owner's token may acquire with another token: the board passes
to it (an SCPI serial line is one session for as long as the board is powered, so the next
host on that line takes the board over from the one before).

An owner that is gone cannot make the board safe (a host killed, without power or without its
cable sends no SAFE_STATE), so the board does: the moment no connection presents the owner's
token any more without a RELEASE (its last one closed, a framed HELLO began a new session on
it, or its serial line fell silent for the lease, `silence`: the moment the lease starts), the
board applies its safe state, as SAFE_STATE does and by the same path (`attach`), and keeps the
lock for its lease as before. A reconnect within the
lease finds everything the owner left but the lines, which SAFE_STATE drives to 0 V: topology,
conductances, transaction tag, epoch, request-id record. Should that safe state fail, the board
tries again when the lease lapses. A RELEASE (the host made the board safe itself before it)
applies nothing; a board nobody owns applies nothing when a connection closes.

One `BoardLock` per board, shared by all its servers and connections; one `LockSession`
per connection (or pty session), holding the token that connection presented.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable

from drivers.base import BoardOwner
from drivers.errors import DeviceFault
from drivers.wire import codes
from drivers.wire.payload import LEASE_MAX_S, LEASE_MIN_S, OPEN_WHILE_OWNED, Op, check_token

# how long a token no connection presents keeps the board: the host drivers' reconnect takes a
# few seconds at most (attempts with backoff up to 1 s); a crashed run resumed at once waits this
DEFAULT_LEASE_S = 15.0
BROKEN_KEPT = 16  # broken tokens the board refuses (their hosts open the board again, with new ones)

log = logging.getLogger(__name__)


class LockSession:
    """One connection's side of the lock: the token it presented (None: none)."""

    def __init__(self, lock: BoardLock) -> None:
        self.lock = lock
        self.token: str | None = None
        # a link that cannot close (a serial line) on which nothing came for the owner's lease:
        # it presents its token no more until it speaks again (`BoardLock.silence`)
        self.silent = False

    def heard(self) -> None:
        """Something came over this framed connection: a silent one presents its token again
        (a framed link's next host begins with HELLO, which withdraws the token first). An SCPI
        serial line does not call this: it cannot tell its next host from the one before, so a
        silent one presents the token again only by acquiring with it (`BoardLock.acquire`)."""
        if self.silent:
            self.lock.heard(self)

    def withdraw(self) -> None:
        """The connection stops presenting its token (it closed, or a framed link began a new
        session with HELLO); the lease starts if no other connection presents it."""
        self.lock.withdraw(self)

    def close(self) -> None:
        self.lock.leave(self)


def check_lease(lease: object) -> float:
    """A lease a host asked for: a number of seconds (-224 otherwise) within [LEASE_MIN_S,
    LEASE_MAX_S] (-222 otherwise)."""
    if isinstance(lease, bool) or not isinstance(lease, int | float) or math.isnan(lease):
        raise DeviceFault(
            codes.ILLEGAL_PARAMETER_VALUE, f"a lease is a number of seconds, got {str(lease)[:40]!r}"
        )
    if not LEASE_MIN_S <= lease <= LEASE_MAX_S:
        raise DeviceFault(
            codes.DATA_OUT_OF_RANGE,
            f"a lease of {lease:g} s is outside [{LEASE_MIN_S:g}, {LEASE_MAX_S:g}] s: ask for one within "
            "it, or for none (the board's own)",
        )
    return float(lease)


class BoardLock:
    """The board's owner, shared by every connection of every server of one board.

    `lease_s` is the board's lease, what an owner that asked for none gets; an owner that
    asked for one (`acquire(..., lease_s=)`, within [LEASE_MIN_S, LEASE_MAX_S]) gets its own.
    `takes_lease` False is firmware from before the host could ask (tests of older boards):
    SCPI refuses the parameter (-108), the framed ACQUIRE's ``lease_s`` is ignored."""

    takes_lease = True

    def __init__(
        self,
        lease_s: float = DEFAULT_LEASE_S,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if not lease_s >= 0:
            raise ValueError(f"lease_s must be >= 0 seconds, got {lease_s}")
        self.lease_s = float(lease_s)
        self._lease = self.lease_s  # the owner's lease (the board's unless it asked for one)
        self._clock = clock
        self._wall = wall
        self._mutex = threading.Lock()
        self._sessions: set[LockSession] = set()
        self._token: str | None = None
        self._since: float | None = None  # wall-clock time the owner took the board
        self._left_at: float | None = None  # clock time the last connection presenting it left
        self.broken = 0  # locks broken (BREAK) since the board started
        self._broken: deque[str] = deque(maxlen=BROKEN_KEPT)  # tokens whose lock was broken
        # the board's own safe state for an owner that is gone (`attach`; None: none applied)
        self._board: tuple[contextlib.AbstractContextManager[object], Callable[[], None]] | None = None
        self._unsafe = False  # the owner left without RELEASE and the board is not safe since
        self._gone: str | None = None  # the token of the owner that left last (for the log)
        self._retry: threading.Timer | None = None  # a failed safe state tried again at the lapse
        self.owner_gone = 0  # safe states applied because the owner was gone, since the board started

    def attach(
        self, serialize: contextlib.AbstractContextManager[object], safe_state: Callable[[], None]
    ) -> None:
        """The board's safe state (what SAFE_STATE runs, `safe_state`) and what serializes it
        with the board's requests (`serialize`, the device's lock), applied when the owner is
        gone (the module's docstring). The servers attach their board; a lock no board is
        attached to (unit tests of the lock alone) applies nothing."""
        self._board = (serialize, safe_state)

    def session(self) -> LockSession:
        s = LockSession(self)
        with self._mutex:
            self._sessions.add(s)
        return s

    # -- state (call with the mutex held)
    def _presenting(self) -> int:
        return sum(
            1 for s in self._sessions if s.token is not None and s.token == self._token and not s.silent
        )

    def _expire(self) -> bool:
        """Drop an owner whose lease ran out (no connection presented its token for lease_s).
        True: the lease started now (the owner is gone and the board is not safe since)."""
        if self._token is None or self._presenting():
            self._left_at = None
            if self._token is not None:
                self._unsafe = False  # its owner is there (again) to drive it
            return False
        now = self._clock()
        started = self._left_at is None
        if started:
            self._left_at = now
            self._unsafe = True
            self._gone = self._token
        if now - self._left_at >= self._lease:
            self._drop()
        return started

    def _drop(self) -> None:
        """Free the board. `_unsafe` stays: a gone owner's board whose safe state failed is
        still to be made safe, whether its lease lapsed or a RELEASE or BREAK ended it early
        (`release` and `break_` try it again at once; only a reboot, the power-on, makes it safe)."""
        self._token = self._since = self._left_at = None
        self._lease = self.lease_s

    def _state(self) -> BoardOwner:
        self._expire()
        if self._token is None:
            return BoardOwner(None, None, 0, self.lease_s, None)
        left = None if self._left_at is None else max(0.0, self._lease - (self._clock() - self._left_at))
        return BoardOwner(self._token, self._since, self._presenting(), self._lease, left)

    def _broken_refusal(self, what: str) -> DeviceFault:
        return DeviceFault(
            codes.LOCKED,
            f"{what} refused: this host's lock on the board was broken (SYST:LOCK:BRE, framed opcode "
            "0x23), someone else may be using it now; close and open the board again to take it",
        )

    def _refusal(self, what: str) -> DeviceFault:
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._since or 0.0))
        state = self._state()
        wait = (
            "wait for it to release the board"
            if state.lapses_in is None
            else f"no connection presents its token: free in {state.lapses_in:.1f} s"
        )
        return DeviceFault(
            codes.LOCKED,
            f"{what} refused: the board is owned by {self._token!r} since {since}; {wait}, or break "
            "the lock (SYST:LOCK:BRE, framed opcode 0x23)",
        )

    # -- the operations
    def acquire(self, session: LockSession, token: object, lease_s: object = None) -> BoardOwner:
        """Take the board for `token` (or present it again: the owner's reconnect), with the
        lease `lease_s` asked for (None: the board's); every acquire sets the owner's lease."""
        token = check_token(token)
        lease = self.lease_s if lease_s is None or not self.takes_lease else check_lease(lease_s)
        with self._mutex:
            if token in self._broken:
                raise self._broken_refusal("acquire")
            self._expire()
            taking_over = session.token is not None and session.token == self._token
            if self._token is not None and self._token != token and not taking_over:
                raise self._refusal("acquire")
            session.token = token  # a connection presents one token: the one it acquired with last
            session.silent = False  # presented now, on a line that had fallen silent too
            if self._token != token:  # a free board, or the owner's own connection passing it on
                self._token, self._since = token, self._wall()
            self._lease = lease
            self._expire()  # presented now: no lease running
            return self._state()

    def release(self, session: LockSession, token: object) -> None:
        """Give the board up; a token that does not own it releases nothing (a retried release)."""
        token = check_token(token)
        with self._mutex:
            if self._token == token:
                self._drop()
            if session.token == token:
                session.token = None
            unsafe = self._unsafe
        if unsafe:  # released on behalf of an owner that is gone, whose safe state failed
            self._make_safe()

    def break_(self) -> BoardOwner:
        """End the ownership whoever holds it; the owner as it was."""
        with self._mutex:
            before = self._state()
            if self._token is not None:
                self.broken += 1
                self._broken.append(self._token)
            self._drop()
            unsafe = self._unsafe
        if unsafe:  # the lease of a gone owner whose safe state failed, ended early: try it now
            self._make_safe()
        return before

    def state(self) -> BoardOwner:
        with self._mutex:
            return self._state()

    def reboot(self) -> None:
        """The board rebooted (power-on, a watchdog reset; not the RESET command): the lock
        lived in its RAM, so the owner, the broken tokens and the token every connection
        presented are forgotten (a real board's connections all go down with it; the
        emulator's other connections stay open and present nothing until they acquire again)."""
        with self._mutex:
            self._drop()
            self._unsafe = False  # the power-on state is the safe state
            self._broken.clear()
            self.broken = 0
            self.owner_gone = 0
            for s in self._sessions:
                s.token = None

    def check(self, session: LockSession, op: Op) -> None:
        """Raise DeviceFault(120) if `op` drives or changes a board another token owns."""
        if op in OPEN_WHILE_OWNED:
            return
        with self._mutex:
            # a silent line (its host taken for gone, `silence`) presents its token no more
            if session.token is not None and session.token == self._token and not session.silent:
                return
            if session.token is not None and session.token in self._broken:
                raise self._broken_refusal(op.name.lower())
            if self._token is None:
                return
            self._expire()
            if self._token is not None:
                raise self._refusal(op.name.lower())

    def withdraw(self, session: LockSession) -> None:
        with self._mutex:
            session.token = None
            session.silent = False
            gone = self._expire()  # starts the lease if that was the last connection presenting it
        if gone:
            self._make_safe()

    def silence(self, session: LockSession, quiet_s: float) -> None:
        """`session` is a link that cannot close (a serial line), and nothing came over it for
        `quiet_s` seconds: once that is the owner's lease, it counts as closed (a host that died
        on a serial line sends no FIN): the board applies its safe state and the lease runs, as
        when the last connection of a TCP owner closes. Host drivers that own a board over a
        serial line send a keep-alive (framed PING, SCPI `*OPC?`) well within the lease, so only a host that
        is gone falls silent; one that speaks again within the lease presents its token again:
        on a framed line by speaking (`LockSession.heard`), on an SCPI line by acquiring with it."""
        if session.silent or session.token is None:
            return
        with self._mutex:
            if session.token != self._token or quiet_s < self._lease:
                return
            session.silent = True
            gone = self._expire()
        if gone:
            self._make_safe()

    def heard(self, session: LockSession) -> None:
        with self._mutex:
            session.silent = False
            self._expire()  # presented again: no lease running

    def leave(self, session: LockSession) -> None:
        with self._mutex:
            session.token = None
            self._sessions.discard(session)
            gone = self._expire()
        if gone:
            self._make_safe()

    def _make_safe(self) -> None:
        """Apply the board's safe state if its owner is gone and it is not safe since; if that
        fails, try again when the lease lapses (`_retry`)."""
        board = self._board
        if board is None:
            return
        serialize, safe_state = board
        with serialize:  # between two requests: nothing of a returning owner's is running
            with self._mutex:
                self._expire()
                if not self._unsafe or self._board is None:
                    return  # the owner came back (its board to drive), it is safe already, or closed
                token = self._gone
            try:
                safe_state()
            except Exception as exc:
                with self._mutex:
                    again = self._token is not None  # the lease still runs: try again at its lapse
                    if again:
                        self._arm_retry()
                log.warning(
                    "the owner %r is gone; the board's safe state failed%s: %r",
                    token, ", tried again when its lease lapses" if again else "", exc,
                )  # fmt: skip
                return
            with self._mutex:
                self._unsafe = False
                self.owner_gone += 1
        log.info("the owner %r is gone: the board applied its safe state", token)

    def _arm_retry(self) -> None:
        """(With the mutex held, while the lease runs.) Try the safe state again when the
        lease lapses (once: a board whose safe state fails then too is left to its next owner)."""
        if self._retry is not None:
            self._retry.cancel()
        assert self._left_at is not None
        left = max(0.0, self._lease - (self._clock() - self._left_at))
        self._retry = threading.Timer(left + 0.01, self._make_safe)
        self._retry.daemon = True
        self._retry.start()

    def close(self) -> None:
        """The servers closed: the lock applies no safe state of its own from now on (one
        already running finishes; the board's close follows, with its own safe state)."""
        with self._mutex:
            if self._retry is not None:
                self._retry.cancel()
            self._board = None
