"""Framed binary server over any Device, on a pty (a serial port) and on TCP.

One thread per link runs the responder side of `drivers.wire.link.Link`: receive a
request, acknowledge it, run it, send the reply (or an ERROR reply with the code).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections import Counter

from drivers.base import Device
from drivers.errors import ProtocolError
from drivers.wire import codes, frames
from drivers.wire import payload as pl
from drivers.wire.frames import Flag, LinkOp
from drivers.wire.link import Abandoned, Link, MessageTooLarge, ack_hold, smaller_timeout
from drivers.wire.payload import LOCK_OPS, Op
from emulator.server.dispatch import ReplayCache, execute, guard, reboot
from emulator.server.faults import HANG_UPS, REBOOTS, FaultPlan, FaultyStream, closable
from emulator.server.links import (
    IDLE_TIMEOUT_S,
    MAX_CONNECTIONS,
    POLL_S,
    EndpointServer,
    Stream,
    keepalive_within,
)
from emulator.server.ownership import BoardLock, LockSession
from emulator.server.throttle import ErrorThrottle

_OP_OF = {int(op): op for op in Op}
_OPS = set(_OP_OF)
_LOCK_OPCODES = {int(op) for op in LOCK_OPS}  # unknown opcodes to a board without ownership
_RESPONSE = int(Flag.RESPONSE)  # IntFlag arithmetic costs a microsecond or two per reply


_ERROR = int(Flag.ERROR)  # a plain int: an IntFlag test costs a microsecond per reply


def _link_errors(link: Link) -> float:
    """What a link's counters say its peer got wrong: every NACKed frame, every fragment
    dropped because its message grew too large, and garbage between frames by the 256 bytes
    (one bad byte resynchronises; a stream of it is a flood)."""
    stats = link.stats
    return stats.nacks_sent + stats.oversize + stats.garbage_bytes / 256


def _error(code: int, message: str) -> bytes:
    return pl.dumps({"code": code, "message": message})


class _SilenceWatch:
    """A serial line's stream whose reads, while a reply to the owner goes out (`arm`), check
    the line's silence (`BoardLock.silence`) from when the reply was ready or the last byte
    came, whichever is later. A reply that nobody acknowledges is resent until the link's
    retries are spent, each resend waiting for a line nobody drains (2 s on a pty): checked
    only after that, a long reply to a dead host put its board's safe state a dozen seconds
    past the lease. Reads while nothing is armed pass through (the handler's loop checks
    the silence itself between requests)."""

    def __init__(self, inner: Stream) -> None:
        self.inner = inner  # `closable` looks through it
        self._session: LockSession | None = None
        self._since = 0.0

    def arm(self, session: LockSession, since: float) -> None:
        self._session, self._since = session, since

    def disarm(self) -> None:
        self._session = None

    def read(self, timeout: float) -> bytes:
        data = self.inner.read(timeout)
        session = self._session
        if session is not None:
            now = time.monotonic()
            if data:
                self._since = now  # the host speaks (its ACKs): no silence
            elif session.token is not None:
                session.lock.silence(session, now - self._since)
        return data

    def write(self, data: bytes | memoryview) -> None:
        self.inner.write(data)

    def close(self) -> None:
        self.inner.close()


class FramedServer(EndpointServer):
    """Serves one Device over the framed protocol on any number of ptys and TCP ports.

    `plan` (`emulator.server.faults.FaultPlan`) is shared by all links, reconnections
    included; its frame faults (`plan.link`) are copied for each link, so every link sees
    the same ones. `cache` remembers the outcomes of requests that carry a request id
    (non-idempotent ones), so a host resending one after a lost reply does not run it
    twice. A TCP connection that sends and receives nothing for `idle_timeout_s` is closed
    (None: never). `lock`: the board's owner (`emulator.server.ownership`), shared with its
    other servers; None serves a board without ownership (firmware without the capability)."""

    def __init__(
        self,
        device: Device,
        *,
        ack_timeout: float = 0.25,
        retries: int = 5,
        plan: FaultPlan | None = None,
        cache: ReplayCache | None = None,
        max_connections: int = MAX_CONNECTIONS,
        max_message: int = frames.MAX_MESSAGE,
        idle_timeout_s: float | None = IDLE_TIMEOUT_S,
        lock: BoardLock | None = None,
    ) -> None:
        self.device = device
        self.lock = lock
        self.ack_timeout = ack_timeout
        self.retries = retries
        self.plan = plan or FaultPlan()
        self.cache = cache or ReplayCache()
        self.max_message = max_message
        guard(device, lock)  # the board makes itself safe when its owner is gone
        # a TCP owner that lost power (no FIN) is dropped within about the lease: its lease runs
        super().__init__(
            max_connections, idle_timeout_s, keepalive_within(None if lock is None else lock.lease_s)
        )
        self.links: list[Link] = []  # the links of open connections (and ptys)
        self._links_lock = threading.Lock()
        self._closed_injected: Counter[str] = Counter()  # frame faults of the links already closed

    def _new_link(self, stream: Stream) -> Link:
        link = Link(
            stream.read,
            stream.write,
            ack_timeout=self.ack_timeout,
            retries=self.retries,
            faults=dataclasses.replace(self.plan.link),
            max_message=self.max_message,
        )
        with self._links_lock:
            self.links.append(link)
        return link

    def _free(self, link: Link) -> None:
        link.close()
        with self._links_lock, contextlib.suppress(ValueError):
            self.links.remove(link)
            self._closed_injected.update(link.faults.injected)

    def frame_faults(self) -> dict[str, int]:
        """The frame faults injected on every link so far (`plan.link`), by kind."""
        with self._links_lock:
            total = Counter(self._closed_injected)
            for link in self.links:
                total.update(link.faults.injected)
        return {k: int(total[k]) for k in ("corrupt", "drop", "garbage")}

    def _handler(self, stream: Stream, stopping: threading.Event) -> None:
        plan = self.plan
        if plan.active:
            stream = FaultyStream(stream, plan)
        session = None if self.lock is None else self.lock.session()
        # a serial line never closes: a host that died on it is seen by its silence (the
        # owner's lease without a frame; `BoardLock.silence`), also while a reply to it is
        # resent (`_SilenceWatch`)
        serial_line = session is not None and not closable(stream)
        watch = _SilenceWatch(stream) if serial_line else None
        if watch is not None:
            stream = watch
        link = self._new_link(stream)
        served = 0
        throttle = ErrorThrottle()
        charged = 0.0  # of the link's errors, those charged to the throttle
        errors = 0.0  # ERROR replies and dropped fragments (the link counts its NACKs)
        quiet_since = time.monotonic()
        heard_frames = 0  # the link's frames received when last looked at
        try:
            while not stopping.is_set():
                total = errors + _link_errors(link)
                wait = throttle.charge(total - charged)
                charged = total
                if wait:  # a peer making errors by the hundred: not read until its allowance refills
                    if throttle.kick and closable(stream):
                        return
                    throttle.hold(wait, stopping)
                    continue
                try:
                    got = link.receive(POLL_S, response=False)
                except MessageTooLarge as exc:  # its fragments were dropped; the link lives on
                    errors += 1  # (its dropped fragments are counted by the link)
                    error = _error(codes.TOO_MUCH_DATA, str(exc))
                    flags = Flag.RESPONSE | Flag.ERROR
                    try:
                        link.send(exc.first.opcode, error, flags=flags, ref=exc.first.seq)
                    except Abandoned:
                        pass  # the peer stopped acknowledging: it has gone, nothing to tell it
                    except Exception:
                        link.drain()
                    continue
                if got is None:
                    if serial_line and session is not None and session.token is not None:
                        if link.stats.frames_received != heard_frames:  # a message on its way in
                            heard_frames, quiet_since = link.stats.frames_received, time.monotonic()
                        session.lock.silence(session, time.monotonic() - quiet_since)
                    continue
                first, body = got
                quiet_since = time.monotonic()
                if session is not None and first.opcode != LinkOp.HELLO:  # a HELLO is a new session:
                    session.heard()  # it brings a silent one's token back no more than a closed one's
                # an inactive plan draws no fault (its rates are all 0): no draw, no lock per request
                fault = plan.request_fault(first.opcode) if plan.active and first.opcode in _OPS else None
                if fault == "close" or (fault in REBOOTS and self.plan.reset_after):
                    self._answer(link, first.opcode, body, session)
                if fault in REBOOTS:  # the board reboots (instead of or after running the request)
                    reboot(self.device, self.lock, arrays_lost=fault == "lose")
                if fault in HANG_UPS:
                    if closable(stream):
                        return
                    self._free(link)  # a pty stays: the board forgets the link state, the reply is lost
                    link = self._new_link(stream)
                    charged = errors
                    continue
                flags, reply = self._answer(link, first.opcode, body, session)
                if flags & _ERROR:
                    errors += 1
                delay = (plan.delay_s if fault == "delay" else 0.0) + plan.reply_delay_s
                if delay and stopping.wait(delay):
                    return  # the server closed while the reply was held back: nobody waits for it
                ready, heard_by_then = time.monotonic(), link.stats.frames_received
                if watch is not None and session is not None:
                    watch.arm(session, ready)  # a reply nobody acknowledges is silence from now
                try:
                    link.send(first.opcode, reply, flags=_RESPONSE | flags, ref=first.seq)
                    quiet_since = time.monotonic()  # a long request is no silence of the host's
                except Abandoned:
                    continue
                except Exception:  # the client went away mid-reply: wait for its next request
                    link.drain()
                    # ... but a reply it never acknowledged is: the line is silent since the reply
                    # was ready (unless a frame came while it was resent), not since the resends
                    # ran out, nor since the request's frames were next counted (each put a dead
                    # owner's safe state later: a lease plus 1.5 s after its last frame)
                    quiet_since, heard_frames = ready, heard_by_then
                finally:
                    if watch is not None:
                        watch.disarm()
                served += 1
                if plan.hang_up_after and served >= plan.hang_up_after:
                    return
        finally:
            self._free(link)
            if session is not None:
                session.close()  # the token it presented starts its lease

    def _hello(self, link: Link, body: bytes) -> dict[str, object]:
        """A new session: piggyback ACKs on responses if the host asked for it, holding an ACK
        back for at most a quarter of the host's ACK timeout (and of this end's)."""
        try:
            host = pl.loads(body) if body else {}
        except ProtocolError:
            host = {}
        host = host if isinstance(host, dict) else {}
        piggyback = host.get("piggyback") is True
        limit = smaller_timeout(self.ack_timeout, host.get("ack_timeout")) or self.ack_timeout
        link.ack_delay = ack_hold(limit) if piggyback else 0.0
        info: dict[str, object] = {
            "version": frames.VERSION,
            "max_fragment": frames.MAX_FRAGMENT,
            "time": time.time(),
            "piggyback": link.ack_delay > 0,
            # a new request acknowledges the response before it (the host may hold that ACK
            # back for a quarter of the smaller ACK timeout, this one included)
            "request_acks": True,
            "ack_timeout": self.ack_timeout,
        }
        return info

    def _answer(self, link: Link, opcode: int, body: bytes, session: LockSession | None) -> tuple[int, bytes]:
        try:
            if opcode == LinkOp.PING:
                return 0, body
            if opcode == LinkOp.HELLO:
                if session is not None:  # a new session on this link (a pty's next host) presents nothing yet
                    session.withdraw()
                return 0, pl.dumps(self._hello(link, body))
            if opcode == LinkOp.STATS:
                return 0, pl.dumps(link.stats.as_dict())
            if opcode not in _OPS or (session is None and opcode in _LOCK_OPCODES):
                return Flag.ERROR, _error(codes.FRAME_ERROR, f"unknown opcode {opcode:#x}")
            op = _OP_OF[opcode]  # a dict: Op(opcode) goes through the enum's call machinery
            if session is not None:  # ownership before the payload is read (docs/protocol.md,
                session.lock.check(session, op)  # "Ownership": the order of the checks): 120
            try:
                request = pl.unpack(body)
            except ProtocolError as exc:
                return Flag.ERROR, _error(codes.FRAME_ERROR, str(exc))
            if op not in pl.IDEMPOTENT and "rid" not in request.meta:  # a replayed frame must not rerun it
                message = f"a {op.name.lower()} request needs a request id (rid): it changes state"
                return Flag.ERROR, _error(codes.MISSING_PARAMETER, message)
            return 0, pl.pack(execute(self.device, op, request, self.cache, session))
        except Exception as exc:  # every device error becomes an ERROR reply; the link lives on
            return Flag.ERROR, _error(*codes.code_for(exc))
