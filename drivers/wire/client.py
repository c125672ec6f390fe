"""The transport-independent half of a remote Device (used by drivers.visa and drivers.serial).

`RemoteDevice` implements every Device method as: host-side limit checks (the same
`drivers.checks` the in-process backend runs), encode, one transaction over the link,
decode. A subclass supplies the transaction (`_call`) and the link (`_connect`,
`_disconnect`). Transactions hold the device lock and are never cut in half by Ctrl-C (the
interrupt is delivered after the transaction, once the board is in its safe state).

Recovery (docs/reliability.md): a transaction that fails on the link (timeout, I/O error,
malformed or corrupted reply) is retried up to `attempts` times in all, with exponential
backoff, each time after reconnecting. Idempotent operations are simply sent again;
non-idempotent ones (program, pulse, wait) carry a random request id that the board
remembers, so a resent request whose first copy did run is answered from the board's
record rather than run twice. After every reconnect the board's epoch is compared with the
one last seen: if the board reset, the host's topology is configured again (conductances
are non-volatile) and an in-flight pulse or wait, whose effect is then unknown, raises
`BoardReset` instead of being repeated. An exhausted budget raises `RetriesExhausted`
naming the operation, the attempts and the last cause.

Logging (standard `logging`, nothing configured here): the logger ``drivers.wire`` gets a
DEBUG line per transaction (operation, request fields, the arrays' shapes, its reply time),
a WARNING for every failed attempt of a session's request that is retried and every board
reset found, so a run through a flaky link says so, and INFO for reconnects, retried opens
and a request given up (the exception it raises says so); the transports log their raw traffic
on their own loggers (``drivers.visa``: each SCPI line sent and received; ``drivers.serial``:
each message's operation and size).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
import warnings
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from types import TracebackType
from typing import Any, TypeVar

import numpy as np

from drivers import checks
from drivers.base import (
    BoardOwner,
    BoardStatus,
    Device,
    DeviceInfo,
    Equilibrium,
    Meter,
    Nudge,
    ProgramReport,
    PulseReport,
    SafetyCounters,
    Wear,
)
from drivers.errors import (
    ArraysLost,
    BoardChanged,
    BoardLocked,
    BoardReset,
    ConfigurationError,
    DeviceError,
    DeviceFault,
    DeviceTimeout,
    LimitViolation,
    NotSupported,
    OpenTransactionWarning,
    ProtocolError,
    RetriesExhausted,
    SafeStateWarning,
)
from drivers.topology import Topology
from drivers.wire import codes
from drivers.wire import payload as pl
from drivers.wire.payload import (
    IDEMPOTENT,
    LEASE_MAX_S,
    LEASE_MIN_S,
    LOCK_CAPABILITY,
    MAX_TOKEN,
    REPEATABLE_AFTER_RESET,
    Message,
    Op,
)

log = logging.getLogger("drivers.wire")

# a host that owns a board over a serial line (which has no close the board could see) sends a
# keep-alive when it has sent nothing for this share of its lease (docs/protocol.md,
# "Ownership": the board takes a serial line silent for a whole lease as a host that died)
KEEPALIVE_SHARE = 1 / 3
KEEPALIVE_POLL_S = 0.05  # the keep-alive thread's shortest wait


def _summary(request: Message) -> str:
    """A request for the log: its fields (long values cut) and its arrays' shapes."""
    meta = ", ".join(f"{k}={str(v)[:60]}" for k, v in request.meta.items())
    arrays = ", ".join(f"{k}{list(a.shape)}" for k, a in request.arrays.items())
    return "; ".join(p for p in (meta, arrays) if p) or "-"


def describe_request(op: Op, request: Message) -> str:
    """A request as error messages name it: the operation and its tile, if it has one
    (``program 'W0'``, ``settle``)."""
    tile = request.meta.get("tile")
    return f"{op.name.lower()} {tile!r}" if isinstance(tile, str) else op.name.lower()


def message_too_large(name: str, what: str, size: int, limit: int) -> LimitViolation:
    """The host's refusal of a request larger than the board's HELLO ``max_message``."""
    exc = LimitViolation("max_message", size, limit)
    exc.args = (
        f"{what}: the request is {size} bytes, over the {limit}-byte max_message that {name} "
        "declared in its HELLO; it was not sent. Use a smaller batch (an mvm input is 4*B*R bytes) "
        "or smaller tiles (a program request is 8*R*C bytes + JSON); docs/protocol.md, section 3",
    )
    return exc


def other_port(mine: str, other: str) -> str:
    """The question a first contact that got nothing, or bytes of another protocol, asks."""
    return (
        f"is this the {mine} port or the {other} one? `hil emulator serve` prints one URI per "
        "protocol (docs/bringup.md)"
    )


def other_protocol(data: bytes) -> str | None:
    """The protocol whose reply `data` starts, where it is one a board's ports are often
    confused with (a board's web page, a login port): "HTTP", "SSH"; None if none of them."""
    head = bytes(data).lstrip()[:16].lower()
    if head.startswith((b"http/", b"<!doctype", b"<html", b"<?xml", b"<head", b"<body")):
        return "HTTP"  # a status line, or an HTTP/0.9 reply (its body alone) to a line that is no request
    if head.startswith(b"ssh-"):
        return "SSH"
    return None


PROBE_S = 0.5  # how long a probe of a silent port waits for the other protocol's answer


def probe_tcp(host: str, port: int, send: bytes, wait: float = PROBE_S) -> bytes:
    """What a TCP port answers `send` with, on a connection of its own, within `wait` seconds
    (b"" if nothing, or if it cannot be reached). For a first contact that got no byte at all:
    asking in the other protocol names what is on the other end (an SCPI board answers
    ``*IDN?``, a framed board a HELLO, a web server with its page) instead of a question. Both
    probes only read (a HELLO begins a session on the probe's own connection, closed after)."""
    got = b""
    try:
        with socket.create_connection((host, port), timeout=wait) as sock:
            sock.sendall(send)
            end = time.monotonic() + wait
            while len(got) < 4096 and (left := end - time.monotonic()) > 0:
                sock.settimeout(left)
                chunk = sock.recv(4096)
                if not chunk:
                    break
                got += chunk
                if (b"\n" in got and is_text(got)) or got.count(b"\x00") >= 2:
                    break  # a line, or a whole frame: enough to tell
    except OSError:
        pass
    return got


def is_text(data: bytes) -> bool:
    """Whether `data` is printable ASCII lines, as an SCPI board sends (not frames)."""
    return all(32 <= b < 127 or b in b"\r\n\t" for b in data)


def preview(data: bytes, n: int = 48) -> str:
    """The first bytes of `data` for a message."""
    return repr(bytes(data[:n])) + (" ..." if len(data) > n else "")


def _outcome_note(what: str, maybe_ran: bool, rid: bool) -> str:
    """What a program, pulse or wait given up on did to the board, as far as the host knows."""
    if not maybe_ran:
        return (
            f"the {what} did not run: no copy of it reached the board whole (the link could not be "
            "opened again, the board refused the copies it received unrun, or every copy was given "
            "up before its last fragment went out)"
        )
    once = " at most once (every copy carried the same request id)" if rid else ""
    then = {
        "pulse": "read the tile's conductances (read_conductance) before pulsing it again",
        "program": "program the tile again (its targets are absolute: a second run does no harm)",
    }.get(what, "check the board's state before sending it again")
    return (
        f"the {what} may have run on the board{once}: a copy was sent and its outcome is "
        f"unknown (the link failed before its reply was read); {then}"
    )


def _name_operation(exc: DeviceError, what: str) -> None:
    """Prefix an error the board reported with the request it answered (once)."""
    text = str(exc)
    if not text.startswith(f"{what}: "):
        exc.args = (f"{what}: {text}",)


try:  # the C function under signal.signal, which wraps handlers in enums (7 us a swap, not 1)
    from _signal import signal as _set_handler
except ImportError:  # pragma: no cover - interpreters without it
    _set_handler = signal.signal

DEFAULT_ATTEMPTS = 4
# what a first open that could not connect at all adds to its ConfigurationError, on every
# transport: it is raised at once, where a reconnect of a link that was up retries
NOT_RETRIED = (
    "A first connection is not retried (another try finds the same address): attempts= retries a "
    "link that was up. A board still starting: open it again once it serves."
)
DEFAULT_BACKOFF_S = 0.05
MAX_BACKOFF_S = 1.0
# declared bounds of a link's URI parameters (each sets how long a host may go on before it
# reports a board it cannot reach): a reply deadline of a day (a WAIT's seconds come on top),
# an ACK deadline of a minute, at most 1000 attempts of an operation and 1000 retransmissions
# of a frame (a typo of attempts=4000000 retried a lost board for days without a word)
MAX_TIMEOUT_S = 86_400.0
MAX_ACK_TIMEOUT_S = 60.0
MAX_ATTEMPTS = 1000
_NEEDS_TOPOLOGY = frozenset({Op.PROGRAM, Op.PULSE, Op.READ_CONDUCTANCE, Op.MVM, Op.SETTLE})
_UNKNOWN_OP = (codes.UNDEFINED_HEADER, codes.FRAME_ERROR)  # a board without STATUS answers so


@dataclass
class RecoveryStats:
    """What recovery did on this device (kept across reconnects)."""

    failures: int = 0  # transactions that failed on the link (or met a reset board)
    retries: int = 0  # transactions sent again
    reconnects: int = 0
    resets: int = 0  # board resets detected (epoch changed)
    reconfigured: int = 0  # topologies configured again after a reset
    arrays_lost: int = 0  # reconnects that found the arrays lost (STATUS `arrays_id` changed)
    exhausted: int = 0  # operations given up (RetriesExhausted)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _backoff(base: float, attempt: int) -> float:
    """Seconds to wait after failed attempt `attempt` (1, 2, ...): the first retry at once (a
    lost frame or a dropped connection needs no pause), then base, 2 base, 4 base ... up to
    MAX_BACKOFF_S (a board that is rebooting or a cable being replugged does)."""
    return 0.0 if attempt <= 1 else min(base * 2 ** (attempt - 2), MAX_BACKOFF_S)


def check_timeout(name: str, seconds: object) -> float:
    """A link's reply timeout as a float: a finite number of seconds above 0 (a URI's
    ``timeout=`` is checked by its options; this checks one set on an open device)."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 < seconds < float("inf"):
        raise ConfigurationError(f"{name}: timeout must be a finite number of seconds > 0, got {seconds!r}")
    return float(seconds)


def owner_token() -> str:
    """A token naming this process: ``host:pid:random`` (printable ASCII, at most MAX_TOKEN
    characters), what a colleague reads in the refusal to find who holds the board."""
    host = "".join(ch if " " < ch <= "~" and ch != ":" else "_" for ch in socket.gethostname()) or "host"
    tail = f":{os.getpid()}:{os.urandom(4).hex()}"
    return host[: MAX_TOKEN - len(tail)] + tail


def _request_id() -> int:
    """A random 53-bit id: unique across sessions, exact in a JSON double."""
    return int.from_bytes(os.urandom(7), "little") >> 3


T = TypeVar("T")


class _InterruptGuard:
    """Defers SIGINT in the main thread while active; `fired` tells whether one came."""

    def __init__(self) -> None:
        self.fired = False
        self.previous: Any = None

    def _handler(self, signum: int, frame: object) -> None:
        # a process that ignores SIGINT (a background job of a non-interactive shell) goes on
        # ignoring it: nothing to deliver, and its failing transactions retried as ever
        self.fired = self.fired or self.previous != signal.SIG_IGN

    def active(self) -> _Deferring:
        """A context manager: SIGINT is deferred inside it (a class, not a generator: this
        wraps every transaction, and a generator-based one costs a few microseconds)."""
        return _Deferring(self)

    def deliver(self) -> None:
        """Hand the deferred interrupt to whoever handled SIGINT before us."""
        self.fired = False
        previous = self.previous
        if callable(previous):
            previous(signal.SIGINT, None)
        elif previous != signal.SIG_IGN:
            raise KeyboardInterrupt


class _Deferring:
    __slots__ = ("guard", "installed")

    def __init__(self, guard: _InterruptGuard) -> None:
        self.guard = guard
        self.installed = False

    def __enter__(self) -> None:
        if threading.current_thread() is threading.main_thread():
            try:
                self.guard.previous = _set_handler(signal.SIGINT, self.guard._handler)
                self.installed = True
            except ValueError:  # not the interpreter's main thread (embedded interpreters)
                self.installed = False

    def __exit__(self, *exc: object) -> None:
        if self.installed:
            _set_handler(signal.SIGINT, self.guard.previous)


class RemoteDevice(Device):
    """A Device whose board sits at the other end of a link."""

    def __init__(
        self,
        name: str,
        *,
        attempts: int = DEFAULT_ATTEMPTS,
        backoff: float = DEFAULT_BACKOFF_S,
        lock: bool = True,
        lease: float | None = None,
    ) -> None:
        """`lock`: take the board (docs/protocol.md, "Ownership") when it announces the
        capability ``lock``, so no other host drives it while this one is open. `lease`: the
        seconds the board keeps it for this host when no connection of it is open (its
        reconnect), within [LEASE_MIN_S, LEASE_MAX_S]; None: the board's own."""
        super().__init__()
        if attempts < 1:
            raise ConfigurationError(f"{name}: attempts must be >= 1, got {attempts}")
        if lease is not None and not LEASE_MIN_S <= lease <= LEASE_MAX_S:
            raise ConfigurationError(
                f"{name}: lease={lease!r}: a lease is {LEASE_MIN_S:g} to {LEASE_MAX_S:g} seconds "
                "(docs/protocol.md, 'Ownership'); leave it out for the board's own"
            )
        if not backoff >= 0:
            raise ConfigurationError(f"{name}: backoff must be >= 0 seconds, got {backoff}")
        self.name = name
        self.attempts = attempts
        self.backoff = backoff
        self.recovery = RecoveryStats()
        self._epoch: int | None = None  # the board's epoch as last seen (None: no STATUS support)
        self._counted_epoch: int | None = None  # the last epoch counted as a reset
        self._arrays: int | None = None  # STATUS `arrays_id` as last seen (None: the board does not say)
        self.open_transaction: str | None = None  # found open on the board when the session began
        self._info: DeviceInfo | None = None
        self._topology: Topology | None = None
        self._refused = 0  # requests refused here, before they reached the link
        self._wear = checks.SessionWear()  # this session's pulses per device (endurance)
        self._broken = False
        self._closed = False
        self._depth = 0
        self._guard = _InterruptGuard()
        self._safe = False  # the last transaction was a successful safe_state
        self._unsafe_told = False  # the last transaction was a safe_state() whose failure was raised
        self.take_lock = lock
        self.lease = lease
        self.lock_token = owner_token()  # presented on every (re)connect while this host owns the board
        self._owns = False  # this host took the board (and presents its token after a reconnect)
        self.owner_lease_s: float | None = None  # the lease the board gave this host's lock
        self._sent_at = time.monotonic()  # when this host last wrote to the link (the keep-alive's clock)
        self.keepalives = 0  # keep-alives sent (an owner idle on a serial line)
        self._keepalive: threading.Thread | None = None
        self._stopping = threading.Event()
        # set by a close() waiting for the lock: the request in flight is not retried (a hung
        # board would otherwise hold the close for the request's whole budget, attempts x timeout)
        self._closing = threading.Event()

    # -- what a transport provides
    @abstractmethod
    def _connect(self) -> None:
        """Open the link and greet the board."""

    @abstractmethod
    def _disconnect(self) -> None:
        """Close the link (must not raise)."""

    @abstractmethod
    def _call(self, op: Op, request: Message) -> Message:
        """One complete transaction; raise `drivers.errors` exceptions."""

    def _serial_line(self) -> bool:
        """Whether the link is a serial line, which has no close the board could see: the board
        takes it silent for the owner's lease as a host that died, so this host keeps it
        talking while it owns the board (`_keep_alive`). False for a transport over TCP."""
        return False

    def _send_keepalive(self) -> None:
        """One keep-alive exchange that changes nothing on the board (the device lock held);
        raise `drivers.errors` exceptions. Transports whose `_serial_line` can be True
        provide it."""
        raise NotImplementedError(f"{type(self).__name__} has no keep-alive for a serial line")

    def _start_keepalive(self) -> None:
        """Once this host owns the board over a serial line: the keep-alive thread."""
        if self._owns and self._keepalive is None and not self._stopping.is_set() and self._serial_line():
            self._keepalive = threading.Thread(
                target=self._keep_alive, name=f"keepalive-{self.name}", daemon=True
            )
            self._keepalive.start()

    def _keep_alive(self) -> None:
        """While this host owns the board: a keep-alive (`_send_keepalive`) when nothing was
        sent for KEEPALIVE_SHARE of the lease (skipped while an operation holds the device
        lock: that one talks for it). One that fails leaves the link to be opened again by the
        next operation."""
        while True:
            every = (self.owner_lease_s or LEASE_MIN_S) * KEEPALIVE_SHARE
            if self._stopping.wait(max(every - (time.monotonic() - self._sent_at), KEEPALIVE_POLL_S)):
                return
            if time.monotonic() - self._sent_at < every or not self.lock.acquire(blocking=False):
                continue
            try:
                if self._closed or self._stopping.is_set():
                    return
                if self._owns and not self._broken and self._info is not None:
                    try:
                        self._send_keepalive()
                        self.keepalives += 1
                    except DeviceError as exc:
                        self._broken = True  # the next operation reconnects (and says why if it cannot)
                        log.info("%s: keep-alive failed: %s", self.name, exc)
            finally:
                self.lock.release()

    def _first_contact_failed(self, exc: DeviceTimeout | ProtocolError) -> DeviceError | None:
        """The error to raise at once (no retry) when the first open attempt failed with `exc`
        before the board said anything in this transport's protocol: it said nothing at all,
        or sent bytes of another protocol (a wrong port). None: retry as for any link failure.
        Called before the link is closed, so what arrived on it can be looked at."""
        return None

    # -- connection management
    def open(self) -> RemoteDevice:
        """Connect, read the board's information, topology and status. An open programming
        transaction (a host died mid-sequence) is kept in `open_transaction` and warned of."""
        with self.lock:
            self._refuse_if_closed()
            t0 = time.monotonic()
            for attempt in range(1, self.attempts + 1):
                greeted = False  # the board answered this connection in its protocol
                try:
                    self._connect()
                    self._info = pl.info_from_dict(self._call(Op.INFO, Message()).meta)
                    greeted = True
                    if self.take_lock and LOCK_CAPABILITY in self._info.capabilities:
                        self._acquire()
                    self._topology = self._remote_topology()
                    status = self._board_status()
                    break
                except (DeviceTimeout, ProtocolError) as exc:
                    # a first contact that got nothing, or only bytes of another protocol, is a
                    # wrong port (or a dead board), not a flaky link: another try gets the same
                    wrong = None if greeted or attempt > 1 else self._first_contact_failed(exc)
                    self._disconnect()
                    self.recovery.failures += 1
                    if wrong is not None:
                        raise wrong from exc
                    if attempt == self.attempts:
                        raise RetriesExhausted("open", attempt, time.monotonic() - t0, exc) from exc
                    self.recovery.retries += 1
                    pause = _backoff(self.backoff, attempt)
                    log.info(  # not a warning: an open that fails for good raises, naming the cause
                        "%s: open failed (%s); attempt %d of %d in %.2f s", self.name, exc, attempt + 1,
                        self.attempts, pause,
                    )  # fmt: skip
                    time.sleep(pause)
                except BoardLocked as exc:
                    self._disconnect()
                    raise self._locked(exc) from None
                except BaseException:
                    self._disconnect()
                    raise
            self._broken = False
            self._epoch = None if status is None else status.epoch
            self._arrays = None if status is None else status.arrays_id
            self.open_transaction = None if status is None else status.transaction
        if self.open_transaction is not None:
            warnings.warn(
                f"{self.name}: programming transaction {self.open_transaction!r} was begun and never "
                "committed (a host stopped mid-sequence or the board reset): the conductances may mix "
                "old and new targets; program the tiles again (hil train ... resume does) and commit",
                OpenTransactionWarning,
                stacklevel=2,
            )
        return self

    def _locked(self, exc: BoardLocked) -> BoardLocked:
        """The refusal, naming this board's URI in its fix. Refused, this host does not own the
        board (whatever it thought: its lock may have been broken)."""
        mine = self._owns and self.lock_token in exc.message
        self._owns = False
        if mine:  # the board took this host for gone (its serial line silent for the lease)
            exc = BoardLocked(
                exc.code,
                f"{exc.message}; that token is this host's own: the board took this host for gone "
                "(nothing came over its serial line for the lease, e.g. the process was paused) and "
                "applied its safe state; close the device and open the board again",
                exc.uri,
            )
        return exc if exc.uri is not None else BoardLocked(exc.code, exc.message, self.name)

    def _acquire(self) -> None:
        """Take the board with this host's token, or present the token again (a reconnect),
        with the lease asked for. A board whose firmware takes no lease from the host (it
        refuses the parameter, or keeps its own) is given back and refused here."""
        request = {"token": self.lock_token}
        if self.lease is not None:
            request["lease_s"] = self.lease
        try:
            owner = pl.board_owner(self._call(Op.ACQUIRE, Message(request)))
        except DeviceFault as exc:
            if self.lease is None or exc.code != codes.PARAMETER_NOT_ALLOWED:
                raise
            raise self._no_lease(None) from None
        if self.lease is not None and owner.lease_s != self.lease:
            with contextlib.suppress(DeviceError):
                self._call(Op.RELEASE, Message({"token": self.lock_token}))
            raise self._no_lease(owner.lease_s)
        self._owns = True
        self.owner_lease_s = owner.lease_s
        self._start_keepalive()

    def _no_lease(self, kept: float | None) -> ConfigurationError:
        has = "" if kept is None else f" (it keeps its own {kept:g} s)"
        return ConfigurationError(
            f"{self.name}: lease={self.lease:g} asked for, but this board's firmware takes no lease "
            f"from the host{has}; open it without lease= to accept the board's own"
        )

    def _release(self) -> None:
        """Give the board up (closing); a link that fails leaves it to the board's lease."""
        if self._owns and not self._broken:
            with contextlib.suppress(DeviceError):
                self._run(Op.RELEASE, Message({"token": self.lock_token}), attempts=1)
        self._owns = False

    def owner(self) -> BoardOwner | None:
        """Who owns the board; None for a board without ownership (capability ``lock``)."""
        if LOCK_CAPABILITY not in self.info.capabilities:
            return None
        return pl.board_owner(self._transact(Op.OWNER, Message()))

    @property
    def owns(self) -> bool:
        """Whether this host holds the board (it took it when it opened)."""
        return self._owns

    def break_lock(self) -> BoardOwner:
        """End whoever's ownership of the board (an admin's tool: `hil lock break URI`); the
        owner as it was. The host that held it is refused from its next request on."""
        if LOCK_CAPABILITY not in self.info.capabilities:
            raise NotSupported(
                f"{self.name}: the board has no ownership (capability 'lock'); nothing to break"
            )
        with self.lock:
            before = self.owner()
            self._transact(Op.BREAK, Message())
            self._owns = False
            assert before is not None
            return before

    def reconnect(self) -> None:
        """Drop the link and open it again; if the board reset meanwhile, configure it again."""
        with self.lock:
            self._refuse_if_closed()
            try:
                self._recover()
            except BoardLocked as exc:
                raise self._locked(exc) from None

    def _refuse_if_closed(self) -> None:
        """A closed device opens nothing again (a connection opened after `close` would be
        left open: every call on the device refuses to run)."""
        if self._closed:
            raise DeviceError(f"{self.name} is closed; open a new device with open_device()")

    def _remote_topology(self) -> Topology | None:
        return self._board_topology(self._call(Op.TOPOLOGY, Message()).meta.get("topology"))

    def _board_topology(self, t: Any) -> Topology | None:
        """The topology a board reports; one that fails the topology's own rules (or the
        board's declared limits) is a malformed reply, not the host's configuration error."""
        if t is None:
            return None
        if not isinstance(t, dict):
            raise ProtocolError(f"malformed topology reply: expected an object or null, got {str(t)[:40]}")
        try:
            topo = pl.topology_from_dict(t)
            if self._info is not None:
                checks.check_topology(topo, self._info.limits)
        except (ConfigurationError, LimitViolation) as exc:
            raise ProtocolError(f"malformed topology reply: {exc}") from None
        return topo

    def _board_status(self) -> BoardStatus | None:
        """The board's status, or None if it does not implement STATUS."""
        try:
            return pl.board_status(self._call(Op.STATUS, Message()))
        except DeviceFault as exc:
            if exc.code in _UNKNOWN_OP:
                return None
            raise

    def _recover(self) -> None:
        """Reconnect; if the board's epoch changed, or it holds no topology while the host has
        one (a board powered up again may start at the epoch it had before), or, without
        STATUS, its topology is not the host's: count a reset and configure the host's
        topology again."""
        self._disconnect()
        self._broken = True
        self.recovery.reconnects += 1
        try:
            self._connect()
        except ConfigurationError as exc:
            # a link that opened before and cannot be opened again (the board's server is down,
            # its serial port gone while it reboots) is a failure of the link, retried with the
            # rest of the budget; on a first open the same error means a wrong URI and stays one
            self._disconnect()
            detail = str(exc).removeprefix(f"{self.name}: ").replace(f" {NOT_RETRIED}", "")
            raise ProtocolError(
                f"{self.name}: the link worked, and reconnecting it failed: {detail}"
            ) from exc
        self._board_info()
        if self._owns:  # the lock is the token's: present it again on the new connection
            self._acquire()
        status = self._board_status()
        reset = status is not None and self._epoch is not None and status.epoch != self._epoch
        if status is not None and not status.configured and self._topology is not None:
            reset = True
        if status is None and self._topology is not None:
            reset = self._remote_topology() != self._topology
        log.info("%s: reconnected (%d reconnects in this session)", self.name, self.recovery.reconnects)
        if reset and (status is None or status.epoch != self._counted_epoch):
            self.recovery.resets += 1
            self._counted_epoch = None if status is None else status.epoch
            log.warning(
                "%s: the board reset (epoch %s, before %s)%s", self.name,
                None if status is None else status.epoch, self._epoch,
                "; configuring its topology again (the conductances are whatever it kept: "
                "a board whose arrays lost them needs programming again)" if self._topology else "",
            )  # fmt: skip
        if reset and self._topology is not None:
            checks.check_topology(self._topology, self.info.limits)  # as `configure` checks it
            self._call(Op.CONFIGURE, Message(pl.topology_to_dict(self._topology)))
            self.recovery.reconfigured += 1
        if status is not None:
            self._epoch = status.epoch
        self._broken = False
        if status is not None:
            self._check_arrays(status)

    def _board_info(self, meta: dict[str, Any] | None = None, *, at_configure: bool = False) -> None:
        """After a reconnect (or before a configure, `at_configure`): the board's INFO read
        again (`meta`: already read). A board that declares other limits than the ones the
        host has checked every request against since `open` (another board behind the
        address, an emulator started again with other settings) is `BoardChanged`: its limits
        become the host's, and the request in flight, checked against the old ones, is not
        sent (it could pass a limit the new board declares)."""
        info = pl.info_from_dict(self._call(Op.INFO, Message()).meta if meta is None else meta)
        before, self._info = self._info, info
        if before is None or before.limits == info.limits:
            return
        changed = [
            f"{f.name} {getattr(before.limits, f.name)!r} -> {getattr(info.limits, f.name)!r}"
            for f in fields(info.limits)
            if getattr(before.limits, f.name) != getattr(info.limits, f.name)
        ]
        answered, unsent = (
            ("the configure (powered up again or swapped behind the link)", "the configure was not sent")
            if at_configure
            else (
                "the reconnect",
                "the request in flight was checked against the old limits and was not sent again",
            )
        )
        raise BoardChanged(
            f"{self.name}: the board that answered {answered} declares other limits than the one "
            f"opened ({'; '.join(changed)}; *IDN {info.identity.idn()!r}, before "
            f"{before.identity.idn()!r}): {unsent}. Its limits are the host's from now on; reopen the "
            "board and start again (a training run: its --resume command, which programs every tile)"
        )

    def _same_board(self) -> BoardStatus | None:
        """Before a configure: is the board behind the link the one whose limits the host
        checks against? A serial line does not break when its board is power-cycled or swapped
        for a spare, and a fresh board may start at the epoch the host last saw; once the host
        holds a topology the board's "no topology" refusal shows it (`_silently_reset`), but a
        configure itself needs none, so a board swapped before the host configured it (or
        between two configures) took the configure and every request after it checked against
        the old limits. STATUS tells: an `arrays_id` or epoch other than the one seen means
        another power-up, and the board's INFO is read again (`BoardChanged`, nothing sent, if
        it declares other limits). A board without STATUS has its INFO read before the first
        configure. One small exchange per configure (twice a training step with separate
        free and nudged budgets). Returns the STATUS of a board powered up again with the same
        limits (None otherwise), whose arrays `configure` checks once it is configured."""
        if self._broken:
            return None  # the transaction's own recovery reads STATUS and INFO again
        try:  # with the transactions' recovery: a link that fails here is retried as ever
            status: BoardStatus | None = pl.board_status(self._transact(Op.STATUS, Message()))
        except DeviceFault as exc:
            if exc.code not in _UNKNOWN_OP:
                raise
            status = None
        if status is None:
            if self._topology is None:
                self._board_info(self._transact(Op.INFO, Message()).meta, at_configure=True)
            return None
        epoch = self._epoch is not None and status.epoch != self._epoch
        arrays = (
            self._arrays is not None and status.arrays_id is not None and status.arrays_id != self._arrays
        )
        if not (epoch or arrays):
            return None
        log.warning(
            "%s: the board behind the link was powered up again or swapped (epoch %s, before %s; "
            "arrays_id %s, before %s); reading its INFO again before configuring it", self.name,
            status.epoch, self._epoch, status.arrays_id, self._arrays,
        )  # fmt: skip
        self._board_info(self._transact(Op.INFO, Message()).meta, at_configure=True)  # BoardChanged?
        self._epoch = status.epoch
        return status

    def _check_arrays(self, status: BoardStatus, *, repair: bool = True) -> None:
        """After a reconnect or a reset: if the board's STATUS `arrays_id` is not the value seen
        before, its devices no longer hold what was programmed. With a repair set
        (`drivers.base.repair_lost_arrays`) it programs every tile again, and the caller goes
        on; without one (or with `repair` False: after a RESET, which leaves no topology to
        program), `ArraysLost`, so nothing carries on with the devices' own values."""
        before, now = self._arrays, status.arrays_id
        if now is not None:
            self._arrays = now
        if before is None or now is None or now == before:
            return
        self.recovery.arrays_lost += 1
        fix = self.arrays_repair if repair else None
        log.warning(
            "%s: the board's arrays were lost (STATUS arrays_id %d, before %d): its conductances are not "
            "what was programmed%s", self.name, status.arrays_id, before,
            "; programming every tile again from the host's weights" if fix is not None else "",
        )  # fmt: skip
        if fix is not None:
            try:
                fix()
            except BaseException:
                self._arrays = before  # not repaired: a later recovery finds the loss again
                raise
            return
        raise ArraysLost(
            f"{self.name}: the board's arrays no longer hold what was programmed (STATUS arrays_id "
            f"{status.arrays_id}, before {before}: its arrays were re-formed or erased, the board or chip "
            "was swapped, or its emulator was started again); its conductances are lost"
            + (", its topology was configured again" if self._topology is not None else "")
            + ". Program every tile again from the host's weights before using it (a stopped "
            "training run: resume it with the --resume command it printed, which programs every tile)"
        )

    def send_unchecked(self, op: Op, request: Message, *, request_id: bool = True) -> Message:
        """Send one request exactly as given, without the host's capability and limit checks,
        and return the board's reply (its refusal raised as the matching `drivers.errors`
        exception). For conformance suites: the host refuses a bad request before sending it,
        so only an unchecked one shows whether the board refuses it too. Not for normal use.
        A program, pulse or wait gets a request id as always unless it carries one or
        `request_id` is False (then it goes without: a framed board must refuse it, -109)."""
        return self._transact(op, request, attempts=1, request_id=request_id)

    def _transact(
        self, op: Op, request: Message, attempts: int | None = None, request_id: bool = True
    ) -> Message:
        with self.lock:
            if self._closed:
                raise DeviceError(f"{self.name} is closed; open a new device with open_device()")
            self._depth += 1
            done = False
            try:
                if self._depth == 1:
                    with self._guard.active():
                        reply = self._run_presenting(op, request, attempts, request_id)
                else:
                    reply = self._run_presenting(op, request, attempts, request_id)
                done = True
            except BoardLocked as exc:
                raise self._locked(exc) from None
            finally:
                self._depth -= 1
                if not done and self._depth == 0 and self._guard.fired:
                    # it failed (a hung or dead board): the interrupt is delivered now, chained
                    # to the failure, not kept for whichever transaction next succeeds; the
                    # safe state tried once (the link has just failed: a hung board costs a timeout a try)
                    self._after_interrupt(attempts=1)
            if self._depth == 0 and self._guard.fired:
                self._after_interrupt()
            return reply

    def _run_presenting(
        self, op: Op, request: Message, attempts: int | None = None, request_id: bool = True
    ) -> Message:
        """`_run`; refused (120) as the owner it is, by a board that took this host for gone (an
        SCPI serial line silent for the lease: the process was paused, or its keep-alives could
        not run; the board applied its safe state, and such a line presents the token again
        only by an acquire), it presents its token again, as after a reconnect, and sends the
        request once more (it was refused, so it did not run)."""
        try:
            return self._run(op, request, attempts, request_id)
        except BoardLocked as exc:
            if not (self._owns and not self._broken and self.lock_token in exc.message):
                raise
            log.warning(
                "%s: the board took this host for gone (nothing came over its line for the lease) and "
                "applied its safe state (lines at 0 V; topology and conductances kept); presenting this "
                "host's token again", self.name,
            )  # fmt: skip
            self._acquire()
            return self._run(op, request, attempts, request_id)

    def _run(self, op: Op, request: Message, attempts: int | None = None, request_id: bool = True) -> Message:
        """One transaction with recovery (see the module docstring); `attempts` overrides the
        device's budget (closing a device whose board is gone should not take long);
        `request_id` False sends a non-idempotent request without an id (`send_unchecked`)."""
        budget = self.attempts if attempts is None else min(attempts, self.attempts)
        self._unsafe_told = False
        if request_id and op not in IDEMPOTENT and "rid" not in request.meta:
            request.meta["rid"] = _request_id()
        t0 = time.monotonic()
        unsafe = op not in IDEMPOTENT and op not in REPEATABLE_AFTER_RESET
        maybe_ran = False  # a copy was sent and its outcome is unknown (the link failed)
        epoch_sent = self._epoch  # the board's epoch when that copy was sent
        attempt = 0
        while True:
            attempt += 1
            self._safe = False
            sending = False  # this try got as far as sending its copy (a failed reconnect did not)
            try:
                if self._broken:
                    self._recover()
                    if maybe_ran and unsafe and self._epoch != epoch_sent:
                        raise BoardReset(
                            f"{self.name}: the board reset while {op.name.lower()} was in flight; "
                            "whether it took effect is unknown, so it was not sent again"
                        )
                if not maybe_ran:
                    epoch_sent = self._epoch
                debug = log.isEnabledFor(logging.DEBUG)
                if debug:
                    log.debug("%s -> %s %s", self.name, op.name.lower(), _summary(request))
                sent = time.monotonic()
                sending = True
                try:
                    reply = self._call(op, request)
                except (DeviceFault, LimitViolation, ConfigurationError, NotSupported) as exc:
                    _name_operation(exc, describe_request(op, request))  # the board refused it
                    raise
                except BaseException as exc:
                    if not isinstance(exc, DeviceError):  # cut half-way (a signal handler's raise:
                        # pytest-timeout, SystemExit): its reply may still come, where the next
                        # request would read it as its own; a new session first
                        self._broken = True
                    raise
                if debug:
                    ms = 1e3 * (time.monotonic() - sent)
                    log.debug("%s <- %s in %.2f ms", self.name, op.name.lower(), ms)
                self._safe = op is Op.SAFE_STATE
                return reply
            except (DeviceTimeout, ProtocolError, OSError) as exc:
                self._broken = True
                # a try that failed to reconnect sent nothing, a copy the board said it did not
                # run (checked mode's `0`, -360) did not run, and neither did a framed message
                # given up before its last fragment went out (`Link.send`): each leaves the
                # outcome as it was, so a pulse or wait is sent again after a reset, not given up
                not_run = isinstance(exc, DeviceError) and exc.not_run
                maybe_ran = maybe_ran or (sending and not not_run)
                last: BaseException = exc
                if isinstance(exc, OSError):
                    last = ProtocolError(f"{self.name}: link failed ({exc})")
            except ConfigurationError as exc:  # this copy was refused, so it did not run
                if op not in _NEEDS_TOPOLOGY or not self._silently_reset():
                    raise
                self._broken = True  # the board lost its configuration: recover, then retry
                last = exc
            self.recovery.failures += 1
            what = op.name.lower()
            closing = self._closing.is_set()
            # Ctrl-C, or a close() from another thread waiting for this request: no more tries
            if attempt >= budget or (self._guard.fired and self._depth > 0) or closing:
                self.recovery.exhausted += 1
                log.info("%s: %s failed %d time(s); giving up: %s", self.name, what, attempt, last)  # raised
                gave_up = RetriesExhausted(op.name.lower(), attempt, time.monotonic() - t0, last)
                if closing and attempt < budget:
                    gave_up.add_note("not retried: close() was called from another thread meanwhile")
                if op not in IDEMPOTENT:  # did it change the board? what a user needs to go on
                    gave_up.add_note(_outcome_note(what, maybe_ran, "rid" in request.meta))
                raise gave_up from last
            self.recovery.retries += 1
            pause = _backoff(self.backoff, attempt)
            log.warning(
                "%s: %s failed (%s); reconnecting, attempt %d of %d in %.2f s",
                self.name, op.name.lower(), last, attempt + 1, budget, pause,
            )  # fmt: skip
            time.sleep(pause)

    def _silently_reset(self) -> bool:
        """After a configuration error from the board: did it reset behind our back? A new
        epoch says so, and so does a board that holds no topology while the host configured
        one, whatever its epoch (as `_recover` takes it): a board powered up again, or another
        board swapped in behind a serial line that never broke, may start at the epoch the host
        last saw (0 on a fresh board); the recovery then reads its INFO again (`BoardChanged`
        if it declares other limits), where before the host went on with the old ones."""
        try:
            status = self._board_status()
            if status is not None:
                if not status.configured and self._topology is not None:
                    return True
                return self._epoch is not None and status.epoch != self._epoch
            return self._topology is not None and self._remote_topology() != self._topology
        except DeviceError:
            return True  # the link failed too: recover and see

    def _after_interrupt(self, attempts: int = 2) -> None:
        """Ctrl-C came during a transaction: now that it is complete, make the board safe
        (itself not interruptible; `attempts` tries), then deliver the interrupt."""
        with self._guard.active(), contextlib.suppress(DeviceError):
            self._run(Op.SAFE_STATE, Message(), attempts=attempts)
        self._guard.deliver()

    def _checked(self, check: Callable[..., T], *args: Any) -> T:
        try:
            return check(*args)
        except LimitViolation as exc:
            self._refused += 1
            exc.sent = False  # refused here: nothing went out
            raise

    # -- the Device interface
    @property
    def info(self) -> DeviceInfo:
        if self._info is None:
            raise DeviceError(f"{self.name} is not open")
        return self._info

    @property
    def topology(self) -> Topology | None:
        return self._topology

    def configure(self, topology: Topology) -> None:
        with self.lock:
            powered_up = self._same_board()
            self._checked(checks.check_topology, topology, self.info.limits)
            self._transact(Op.CONFIGURE, Message(pl.topology_to_dict(topology)))
            self._wear.configured(topology)
            before, self._topology = self._topology, topology
            if powered_up is None:
                return
            if before is None:  # nothing programmed on the host's side yet: nothing lost
                self._arrays = powered_up.arrays_id
                return
            # the same limits, but its arrays may be another chip's or erased: programmed again
            # with the repair set (`repair_lost_arrays`), else `ArraysLost`, as after a
            # reconnect; without this the host went on with the devices' own values
            self._check_arrays(powered_up)

    def program(
        self,
        tile: str,
        g_plus: np.ndarray,
        g_minus: np.ndarray,
        *,
        verify: bool = False,
        tol: float | None = None,
        max_iters: int | None = None,
    ) -> ProgramReport:
        if verify:
            self.require("program_verify")
        with self.lock:
            gp, gm = self._checked(
                checks.check_program, self.topology, self.info.limits, tile, g_plus, g_minus
            )
            tol, max_iters = self._checked(checks.check_verify, self.info.limits, tol, max_iters)
            reply = self._transact(Op.PROGRAM, pl.program_request(tile, gp, gm, verify, tol, max_iters))
            return pl.program_report(reply, tile, gp.shape, self.info.limits, max_iters)

    def pulse(self, tile: str, counts_plus: np.ndarray, counts_minus: np.ndarray) -> PulseReport:
        self.require("pulse")
        with self.lock:
            cp, cm = self._checked(
                checks.check_pulse, self.topology, self.info.limits, tile, counts_plus, counts_minus
            )
            sent = self._checked(self._wear.check, self.info.limits, tile, cp, cm)
            report = pl.pulse_report(self._transact(Op.PULSE, pl.pulse_request(tile, cp, cm)), tile)
            self._wear.record(tile, sent)
            return report

    def read_conductance(self, tile: str) -> tuple[np.ndarray, np.ndarray]:
        with self.lock:
            shape = checks.check_tile(self.topology, tile)
            reply = self._transact(Op.READ_CONDUCTANCE, Message({"tile": tile}))
            return pl.conductances(reply, shape, self.info.limits)

    def mvm(self, tile: str, x: np.ndarray, *, transpose: bool = False) -> np.ndarray:
        self.require("mvm")
        transpose = bool(transpose)  # once, before the input's check: its conversion runs the caller's code
        with self.lock:
            arr = self._checked(checks.check_mvm, self.topology, self.info.limits, tile, x, transpose, True)
            rows, cols = checks.check_tile(self.topology, tile)
            reply = self._transact(Op.MVM, pl.mvm_request(tile, arr, transpose))
            return pl.mvm_result(reply, arr.shape[0], rows if transpose else cols)

    def settle(
        self,
        clamp: dict[str, np.ndarray],
        nudge: dict[str, Nudge] | None = None,
        init: dict[str, np.ndarray] | None = None,
        trace: bool | int = False,
    ) -> Equilibrium:
        self.require_settle(trace, init)
        with self.lock:
            # the trace interval before the arrays (converting it runs the caller's code, which
            # must not change an array after its check), and sent as checked (converted once)
            every = self._checked(checks.check_trace, self.info.limits, trace)
            cl, nd, ini, batch = self._checked(
                checks.check_settle, self.topology, self.info.limits, clamp, nudge, init
            )
            topo = checks.require_topology(self.topology)
            self._checked(checks.check_trace_values, topo, cl, batch, every, self.info.limits)
            self._checked(checks.check_settle_lines, topo, self.info.limits, cl, ini)
            sent = trace if isinstance(trace, bool) else every
            reply = self._transact(Op.SETTLE, pl.settle_request(cl, nd, ini, sent))
            return pl.equilibrium(reply, topo.groups, batch, every, topo.budget.max_steps)

    def wait(self, seconds: float) -> None:
        """`seconds` of board time pass. Hardware may let them pass in real time before it
        answers, so the reply deadline of this one request is the link's `timeout` plus
        `seconds`: a long wait is not taken for a dead link (and resent)."""
        seconds = self._checked(checks.check_wait, self.info.limits, seconds)
        base = self.timeout
        self.timeout = base + seconds
        try:
            self._transact(Op.WAIT, Message({"seconds": seconds}))
        finally:
            self.timeout = base

    def safety(self) -> SafetyCounters:
        remote = pl.safety_counters(self._transact(Op.SAFETY, Message()))
        return SafetyCounters(remote.refused + self._refused, remote.violations)

    def meter(self) -> Meter | None:
        """The board's meter; None from a board without one (or firmware without METER)."""
        try:
            return pl.meter(self._transact(Op.METER, Message()))
        except NotSupported:
            return None
        except DeviceFault as exc:
            if exc.code in _UNKNOWN_OP:
                return None
            raise

    def wear(self) -> Wear | None:
        """The board's wear (`Device.wear`); None, without asking, from a board that declares no
        pulse endurance. NotSupported from firmware that declares one but lacks the query."""
        limits = self.info.limits
        if limits.pulse_endurance is None:
            return None
        with self.lock:
            try:
                reply = self._transact(Op.WEAR, Message())
            except DeviceFault as exc:
                if exc.code in _UNKNOWN_OP:
                    raise NotSupported(
                        f"{self.name}: the board declares a pulse endurance of {limits.pulse_endurance} "
                        f"but its firmware does not report wear (SYST:WEAR?, opcode 0x24; it answered "
                        f'{exc.code}); it still counts and enforces it (docs/protocol.md, "Pulse endurance")'
                    ) from None
                raise
            topo = self._topology
            shapes = None if topo is None else {c.tile: topo.tile_shape(c.tile) for c in topo.couplings}
            return pl.wear(reply, limits, shapes)

    def reset(self) -> None:
        with self.lock:
            self._topology = None  # so that a recovery during the reset does not configure it again
            self._transact(Op.RESET, Message())
            self._topology = self._board_topology(self._topology_meta())
            status = self.status()
            self._epoch = status.epoch if self._epoch is not None else None
            if self._epoch is not None:
                self._check_arrays(status, repair=False)  # firmware that erases its arrays on RESET says so

    def _topology_meta(self) -> dict[str, Any] | None:
        return self._transact(Op.TOPOLOGY, Message()).meta.get("topology")

    def status(self) -> BoardStatus:
        with self.lock:
            if self._epoch is None:  # the board has no STATUS: what the host knows
                return BoardStatus(configured=self._topology is not None)
            return pl.board_status(self._transact(Op.STATUS, Message()))

    def begin(self, tag: str) -> None:
        if self._epoch is not None:
            self._transact(Op.BEGIN, Message({"tag": tag}))

    def commit(self, tag: str) -> None:
        if self._epoch is not None:
            self._transact(Op.COMMIT, Message({"tag": tag}))

    def safe_state(self) -> None:
        """Idempotent: a failed link is reconnected and the request sent once more (not the
        whole budget: leaving a `with` block on a board that is gone should not take long)."""
        try:
            self._transact(Op.SAFE_STATE, Message(), attempts=2)
        except DeviceError as exc:
            self._unsafe_told = True  # raised to the caller: `close` does not warn of it again
            exc.add_note(self._who_makes_it_safe(self._owns))
            raise

    def close(self) -> None:
        """Put the board in its safe state (if the link still works) and close the link. A
        board that could not be told (its link failed before or during the close) is closed
        all the same, with a `SafeStateWarning` saying so and whether and when the board makes
        itself safe (its lease); nothing is raised, so an error being handled is not hidden."""
        self._closing.set()  # a request in flight in another thread gives up after its attempt
        with self.lock:
            self._closing.clear()  # the safe state below keeps its one resend
            if self._closed:
                return
            unsafe: str | None = None  # why the board was not told to go safe
            owned = self._owns
            try:
                if self._info is not None and not self._safe:
                    if self._broken:
                        unsafe = "its link had already failed"
                    else:
                        self._transact(Op.SAFE_STATE, Message(), attempts=2)  # one resend at most
            except BoardLocked:
                pass  # another host owns the board: its safe state is that host's to apply
            except DeviceError as exc:
                unsafe = f"{type(exc).__name__}: {exc}"
            finally:
                told = self._unsafe_told
                self.close_link()  # releases the board first
            if unsafe is not None and not told:
                warnings.warn(self._unsafe_close(unsafe, owned), SafeStateWarning, stacklevel=2)

    def _unsafe_close(self, why: str, owned: bool) -> str:
        """What a close that could not send the safe state says: why, and what the board does."""
        then = self._who_makes_it_safe(owned)
        return f"{self.name}: closed without putting the board in its safe state ({why}); {then}"

    def _who_makes_it_safe(self, owned: bool) -> str:
        """Whether and when a board this host could not tell to go safe makes itself safe."""
        info = self._info
        if info is not None and LOCK_CAPABILITY in info.capabilities and owned:
            lease = f"{self.owner_lease_s:g} s" if self.owner_lease_s is not None else "its lease"
            return (
                "its lines may still be driven. The board applies its safe state itself once it "
                "finds this host gone: at once if it sees this connection close (TCP), else after "
                f"{lease} (its lease) with nothing from this host (a serial line, a network that "
                f"dropped), so within about {lease} of the close if it is still running"
            )
        whose = (
            "this session did not hold its lock: opened with lock=0, or its lock was broken"
            if info is not None and LOCK_CAPABILITY in info.capabilities
            else "it has no ownership lease (capability 'lock')"
        )
        return (
            f"its lines may still be driven, and the board will not make itself safe ({whose}): "
            "open it again and call safe_state(), or switch it off, before touching its wiring"
        )

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """As `Device.__exit__`, except on a board another host owns (a session opened with
        ``lock=0``, or one whose lock was broken): its safe state is not this host's to apply,
        so leaving the block only closes (`close` tries the safe state and takes a refusal)."""
        if self._info is not None and LOCK_CAPABILITY in self._info.capabilities and not self._owns:
            self.close()
            return
        super().__exit__(exc_type, exc, tb)

    def close_link(self) -> None:
        """Close the link without `close`'s safe state: for a session that only looked at a
        board another host drives (`hil info`), whose lines it must not drive to 0 V."""
        self._stopping.set()  # the keep-alive thread ends
        with self.lock:
            if not self._closed:
                try:
                    self._release()
                finally:
                    self._closed = True
                    self._disconnect()
