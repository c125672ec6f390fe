"""Stop-and-wait ARQ over frames: the engine both ends of a framed link run.

Every data frame is acknowledged on receipt (ACK) or rejected (NACK). The sender keeps
one frame outstanding, retransmits it on NACK or after `ack_timeout`, and gives up after
`retries` retransmissions. A frame whose sequence number equals the last one accepted is a
retransmission whose ACK was lost: it is acknowledged again and never handed up twice,
so no operation runs twice. Chunks that fail to decode are NACKed and dropped; the
leading delimiter of the next frame resynchronises the receiver.

Acknowledgement piggybacking (negotiated by HELLO, docs/protocol.md section 3): a responder
with `ack_delay` > 0 holds back the ACK of a request's final fragment for up to that long;
the first fragment of its response then acknowledges the request. A host link with
`ack_delay` > 0 and `holds_responses` does the same with the ACK of a response's final
fragment: its next request acknowledges the response. Back-to-back transactions then cost
two frames each instead of three (or four). A timer sends the plain ACK when nothing
carries it in time, so a long settle or an idle host never makes the peer retransmit. A
host takes a response as the ACK of its request only where the peer's HELLO agreed to
piggyback (`reply_acks`); a board that says it does not must send every ACK.

The duplicate filter compares whole frames: a retransmission repeats the frame it resends
byte for byte, while a peer that restarted (a board reset behind a serial line that stayed
open) numbers its frames from its start again, and its fresh frame that happens to carry
the last accepted seq differs (another `ref`, opcode or payload) and is handed up.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from drivers.errors import DeviceTimeout, ProtocolError
from drivers.wire import frames
from drivers.wire.frames import NO_SEQ, Flag, Frame, FrameError, LinkOp, LinkStats, Reason

# the flags as plain ints: IntFlag arithmetic costs microseconds per frame in the hot path
_RESPONSE, _MORE, _START = int(Flag.RESPONSE), int(Flag.MORE), int(Flag.START)
_ACK, _NACK, _HELLO = int(LinkOp.ACK), int(LinkOp.NACK), int(LinkOp.HELLO)
_CONTROL = (_ACK, _NACK)

MIN_ACK_DELAY_S = 0.001  # a shorter hold-back of an ACK is not worth a timer (a near-zero one would spin)


def smaller_timeout(mine: float, theirs: object) -> float | None:
    """The smaller of this end's ACK timeout and the one a peer's HELLO named, or None where
    the peer's is not a positive finite number (a JSON bool, a string, NaN, 0). Compared
    before any float(): a JSON integer past 1e308 would overflow it."""
    if isinstance(theirs, bool) or not isinstance(theirs, int | float) or not 0 < theirs < float("inf"):
        return None
    return float(theirs) if theirs < mine else mine


def ack_hold(timeout: float) -> float:
    """How long an end may hold an ACK back for the next message to carry it, given the ACK
    timeout both ends agreed on: a quarter of it, or 0 (acknowledge at once) below
    `MIN_ACK_DELAY_S`."""
    delay = timeout / 4
    return delay if delay >= MIN_ACK_DELAY_S else 0.0


ReadFn = Callable[[float], bytes]
WriteFn = Callable[[bytes], None]


@dataclass
class Faults:
    """Fault injection on one end of a link (a server option; tests use the counters).

    Counters apply to the next N data frames; probabilities to every frame, ACKs included,
    drawn from a generator seeded by `seed`."""

    corrupt_tx: int = 0  # flip a byte in the next N outgoing data frames
    drop_tx: int = 0  # do not send the next N outgoing data frames
    garbage_tx: int = 0  # send random non-frame bytes before the next N outgoing data frames
    corrupt_rx: int = 0  # flip a byte in the next N received chunks before decoding
    p_corrupt: float = 0.0
    p_drop: float = 0.0
    delay_s: float = 0.0  # before every outgoing frame
    seed: int = 0
    # what was injected, by kind ("corrupt", "drop", "garbage"): a server reports it on exit
    injected: Counter[str] = field(default_factory=Counter, compare=False, init=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("p_corrupt", "p_drop"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"link fault rate {name} must be in [0, 1], got {value}")
        for name in ("corrupt_tx", "drop_tx", "garbage_tx", "corrupt_rx"):
            if getattr(self, name) < 0:
                raise ValueError(f"link fault count {name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.delay_s < float("inf"):
            raise ValueError(f"link delay_s must be a finite number of seconds >= 0, got {self.delay_s}")


class _DeferredAck:
    """The ACK a responder holds back; a daemon thread sends it once `delay` has passed.

    The thread polls every `delay / 2` rather than being woken per request: arming is then
    two attribute writes, with no thread switch on the fast path."""

    def __init__(self, emit: Callable[[Frame], None], delay: float) -> None:
        self._emit = emit
        self.delay = delay
        self._lock = threading.Lock()
        self._seq: int | None = None
        self._deadline = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="deferred-ack", daemon=True)
        self._thread.start()

    def arm(self, seq: int) -> None:
        with self._lock:
            self._deadline = time.monotonic() + self.delay
            self._seq = seq

    def take(self) -> int | None:
        """The held-back seq, now no longer the timer's to send (None if it was sent)."""
        with self._lock:
            seq, self._seq = self._seq, None
        return seq

    def flush(self) -> None:
        seq = self.take()
        if seq is not None:
            self._emit(frames.ack(seq))

    def _run(self) -> None:
        while not self._stop.wait(max(self.delay / 2, 0.0005)):  # never a busy loop
            with self._lock:
                due = self._seq is not None and time.monotonic() >= self._deadline
                seq = self._seq if due else None
                if due:
                    self._seq = None
            if seq is not None:
                try:
                    self._emit(frames.ack(seq))
                except Exception:  # the link broke: its owner finds out on its next read or write
                    return

    def close(self) -> None:
        self._stop.set()


class MessageTooLarge(Exception):
    """A received message grew past `Link.max_message`: its fragments were dropped. `first`
    is its first frame (for the ERROR reply), `size` the bytes seen before it was refused."""

    def __init__(self, first: Frame, size: int, limit: int) -> None:
        super().__init__(f"message of over {size} bytes exceeds the {limit}-byte limit; dropped")
        self.first = first
        self.size = size
        self.limit = limit


class Abandoned(Exception):
    """The peer started a new request while this end was still sending the last reply."""


def _flip(data: bytes, rng: random.Random) -> bytes:
    """Change one byte inside the frame (never into a delimiter) so its CRC or COBS fails. The
    byte is picked with one draw whatever the frame's length (`randint`'s rejection sampling
    draws a number of times that depends on the range: a frame of another length, e.g. a
    reply carrying the time, then shifted every later fault of the seed)."""
    buf = bytearray(data)
    lo, hi = (1, len(buf) - 2) if buf[0] == 0 and buf[-1] == 0 and len(buf) > 2 else (0, len(buf) - 1)
    i = min(hi, lo + int(rng.random() * (hi - lo + 1)))
    buf[i] ^= 0x55 if buf[i] != 0x55 else 0xAA
    return bytes(buf)


class Link:
    def __init__(
        self,
        read: ReadFn,
        write: WriteFn,
        *,
        ack_timeout: float = 0.25,
        retries: int = 5,
        fragment: int = frames.MAX_FRAGMENT,
        seq0: int = 0,
        faults: Faults | None = None,
        max_message: int | None = None,
    ) -> None:
        self._read = read
        self.max_message = max_message  # bytes of one reassembled message (None: no cap)
        self._write = write
        self.ack_timeout = ack_timeout
        self.retries = retries
        self.fragment = fragment
        self.faults = faults or Faults()
        self._rng = random.Random(self.faults.seed)
        self.stats = LinkStats()
        self._deframer = frames.Deframer()
        self._tx_seq = seq0 % frames.SEQ_MOD
        self._last_rx: Frame | None = None  # the last data frame accepted (the duplicate filter)
        self._inbox: deque[Frame] = deque()
        self._awaiting: int | None = None
        self._acked = False
        self._nacked = False
        self._rx_first: Frame | None = None
        self._rx_parts: list[bytes] = []
        self._rx_size = 0
        self._rx_next = 0  # the seq the next fragment of the message being reassembled must carry
        self._rx_skip: Frame | None = None  # first frame of an over-size message being dropped
        self._write_lock = threading.Lock()  # the deferred-ACK thread writes too
        self._deferred: _DeferredAck | None = None
        self._piggyback: tuple[int, int] | None = None  # (opcode, ref) of a response that acks
        # whether a response acknowledges the request it answers (the peer's HELLO agreed to
        # piggyback; a host clears it for a board that said it would not)
        self.reply_acks = True
        # this link's own counters (`stats` may be shared across links): a peer that answers
        # but never acknowledges is told apart from one that is gone
        self.acks_in = 0
        self.responses_in = 0
        # which messages' final ACK `ack_delay` holds back: requests (a responder, the
        # default) or responses (a host whose peer takes its next request as that ACK)
        self.holds_responses = False

    @property
    def ack_delay(self) -> float:
        """How long a received request's ACK may wait for the response to carry it (0: never)."""
        return self._deferred.delay if self._deferred is not None else 0.0

    @ack_delay.setter
    def ack_delay(self, seconds: float) -> None:
        if self._deferred is not None and seconds > 0:
            self._deferred.delay = seconds
            return
        if self._deferred is not None:
            self._deferred.flush()
            self._deferred.close()
            self._deferred = None
        if seconds > 0:
            self._deferred = _DeferredAck(self._emit, seconds)

    def close(self) -> None:
        """Stop the deferred-ACK timer (the byte stream is the owner's to close)."""
        self.ack_delay = 0.0

    # -- bytes out
    def _emit(self, frame: Frame) -> None:
        data = frames.encode(frame)
        f = self.faults
        if f.delay_s or f.drop_tx or f.p_drop or f.corrupt_tx or f.p_corrupt or f.garbage_tx:
            faulty = self._inject(frame, data)
            if faulty is None:
                return
            data = faulty
        op = frame.opcode
        with self._write_lock:
            self._write(data)
            stats = self.stats
            stats.frames_sent += 1
            stats.bytes_sent += len(data)
            if op == _ACK:
                stats.acks_sent += 1
            elif op == _NACK:
                stats.nacks_sent += 1

    def _inject(self, frame: Frame, data: bytes) -> bytes | None:
        """`data` after this end's transmit faults (None: dropped)."""
        f, data_frame = self.faults, frame.opcode not in _CONTROL
        if f.delay_s:
            time.sleep(f.delay_s)
        if data_frame and f.drop_tx:
            f.drop_tx -= 1
            f.injected["drop"] += 1
            return None
        if f.p_drop and self._rng.random() < f.p_drop:
            f.injected["drop"] += 1
            return None
        if (data_frame and f.corrupt_tx) or (f.p_corrupt and self._rng.random() < f.p_corrupt):
            if data_frame and f.corrupt_tx:
                f.corrupt_tx -= 1
            data = _flip(data, self._rng)
            f.injected["corrupt"] += 1
        if data_frame and f.garbage_tx:
            f.garbage_tx -= 1
            data = bytes(self._rng.randint(1, 255) for _ in range(self._rng.randint(1, 40))) + data
            f.injected["garbage"] += 1
        return data

    # -- bytes in
    def _pump(self, timeout: float) -> None:
        """Read what arrives within `timeout` and handle every complete frame in it."""
        data = self._read(max(timeout, 0.0))
        if not data:
            return
        self.stats.bytes_received += len(data)
        dropped = self._deframer.dropped
        chunks = self._deframer.feed(data)
        self.stats.garbage_bytes += self._deframer.dropped - dropped
        for chunk in chunks:
            if self.faults.corrupt_rx:
                self.faults.corrupt_rx -= 1
                chunk = _flip(chunk, self._rng)
            try:
                frame = frames.decode(chunk)
            except FrameError as exc:
                self.stats.bad_frames += 1
                if exc.reason == Reason.CRC:
                    self.stats.crc_errors += 1
                self._emit(frames.nack(NO_SEQ, exc.reason))
                continue
            self._handle(frame)

    def _handle(self, frame: Frame) -> None:
        self.stats.frames_received += 1
        if frame.opcode == _ACK:
            self.stats.acks_received += 1
            self.acks_in += 1
            if frame.seq == self._awaiting:
                self._acked = True
            return
        if frame.opcode == _NACK:
            self.stats.nacks_received += 1
            if self._awaiting is not None and frame.seq in (self._awaiting, NO_SEQ):
                self._nacked = True
            return
        if self.max_message is not None and len(self._inbox) > self.max_message // frames.MAX_FRAGMENT + 2:
            self.stats.stale += 1  # a flood while this end sends: unacknowledged, so not lost to a
            return  # peer that keeps to stop-and-wait (it never has two frames unacknowledged)
        if frame.flags & _RESPONSE:
            self.responses_in += 1
        if (
            self._piggyback is not None
            and frame.flags & _RESPONSE
            and frame.flags & _START
            and (frame.opcode, frame.ref) == self._piggyback
        ):
            self._acked = True  # the response acknowledges the request it answers
        request = not frame.flags & _RESPONSE
        hello = frame.opcode == _HELLO and request
        deferred = self._deferred
        held = deferred.take() if deferred is not None else None
        if held is not None and held != frame.seq:
            self._emit(frames.ack(held))  # whatever comes next, an earlier held-back ACK is due now
        if frame == self._last_rx and not hello:
            self.stats.duplicates += 1
            self._emit(frames.ack(frame.seq))
            return
        if deferred is not None and request is not self.holds_responses and not frame.flags & _MORE:
            deferred.arm(frame.seq)
        else:
            self._emit(frames.ack(frame.seq))
        self._last_rx = frame
        self._inbox.append(frame)

    # -- messages
    def send(self, opcode: int, payload: bytes = b"", *, flags: int = 0, ref: int = 0) -> int:
        """Send one message, fragment by fragment; returns the first fragment's seq (the
        `ref` a reply to this message carries).

        Raises DeviceTimeout after `retries` unanswered retransmissions, ProtocolError if
        the peer keeps rejecting the frame, Abandoned if (as a responder) a new request
        arrives before the reply's last fragment went out. A new request while the last
        fragment awaits its ACK acknowledges the reply: the peer only asks again once it
        has its answer (or has given up on it)."""
        # one frame (every message but bulk data) without the slicing of `fragments`
        parts = [payload] if len(payload) <= self.fragment else frames.fragments(payload, self.fragment)
        first = self._tx_seq
        responder = bool(flags & _RESPONSE)
        if self._deferred is not None and responder is not self.holds_responses:
            # a response carries the ACK of its request; a host's next request, that of the
            # last response
            self._deferred.take()
        for k, part in enumerate(parts):
            last = k == len(parts) - 1
            bits = int(flags) | (_START if k == 0 else 0) | (0 if last else _MORE)
            seq = self._tx_seq
            self._tx_seq = (self._tx_seq + 1) % frames.SEQ_MOD
            # the HELLO's reply is always taken as its ACK: a board may still hold ACKs back as
            # the previous session's HELLO agreed (its reply tells whether it will go on to)
            takes = self.reply_acks or opcode == _HELLO
            self._piggyback = (opcode, first & 0xFF) if last and not responder and takes else None
            try:
                preempted = self._deliver(Frame(opcode, seq, bits, part, ref))
            except (DeviceTimeout, ProtocolError) as exc:
                if not last:
                    # given up before the last fragment went out: the peer hands a message up at
                    # its last fragment only (rule 4), so it cannot have taken this one. Only that
                    # is provable: a NACK (0xFFFF) names no frame, and a last fragment the peer took
                    # may have had its ACK lost, so a message NACKed there may still have run.
                    exc.not_run = True
                    outcome = "given up before the message's last fragment went out: the peer cannot have it"
                    outcome += "" if responder else ", so the request did not run"
                else:
                    outcome = "the peer may have taken the message's last fragment"
                    outcome += "" if responder else ", so the request may have run"
                if isinstance(exc, ProtocolError) and str(exc).startswith("no copy of frame seq"):
                    exc.args = (f"{exc}; {outcome}",)
                raise
            finally:
                self._piggyback = None
            if preempted and not last:
                raise Abandoned
        return first

    def _new_request_waiting(self) -> bool:
        return any(f.flags & _START and not f.flags & _RESPONSE for f in self._inbox)

    def _deliver(self, frame: Frame) -> bool:
        """Transmit until acknowledged; True if a responder was preempted by a new request."""
        responder = bool(frame.flags & _RESPONSE)
        self._awaiting, self._acked, self._nacked = frame.seq, False, False
        crc0 = self.stats.crc_errors
        try:
            self._emit(frame)
            tries, nacks = 0, 0
            deadline = time.monotonic() + self.ack_timeout
            while True:
                self._pump(deadline - time.monotonic())
                if self._acked:
                    return False
                if responder and self._new_request_waiting():
                    return True
                timed_out = time.monotonic() >= deadline
                if not (self._nacked or timed_out):
                    continue
                if timed_out:
                    self.stats.timeouts += 1
                else:
                    nacks += 1
                if tries >= self.retries:
                    gave_up: DeviceTimeout | ProtocolError
                    if nacks > tries // 2:
                        # a NACK of 0xFFFF (a header the peer could not read) names no frame, and
                        # the ACK of a copy the peer took can be lost on the way back: NACKs do not
                        # prove that no copy was taken (`send` says what that means for the message)
                        gave_up = ProtocolError(
                            f"no copy of frame seq {frame.seq} was acknowledged: {nacks} NACKs and "
                            f"{tries + 1 - nacks} ACK timeouts over {tries + 1} sends (a NACK of seq "
                            f"0xFFFF names no frame, and an ACK can be lost, so a copy may have been "
                            "taken); the link is too noisy or the peer speaks another protocol version"
                        )
                    else:
                        why = self._why_no_ack(self.stats.crc_errors - crc0, nacks)
                        gave_up = DeviceTimeout(
                            f"no acknowledgement for frame seq {frame.seq} after {tries} retransmissions "
                            f"({self.ack_timeout:g} s each); {why}"
                        )
                    # what the link saw, for the advice a caller gives (`RetriesExhausted`): a NACK
                    # comes from a board that is powered, connected and reading damaged frames
                    gave_up.nacks = nacks
                    raise gave_up
                tries += 1
                self.stats.retransmissions += 1
                self._nacked = False
                self._emit(frame)
                deadline = time.monotonic() + self.ack_timeout
        finally:
            self._awaiting = None

    def _why_no_ack(self, crc_errors: int, nacks: int = 0) -> str:
        """What a missing ACK most likely means, from what did arrive meanwhile."""
        if nacks:
            return f"the board NACKed {nacks} of the copies: it answers, but reads frames damaged"
        if crc_errors:
            return (
                f"received {crc_errors} frames from the board that failed their CRC (the CRC covers "
                "header + payload: zlib.crc32; docs/protocol.md, section 3)"
            )
        if self.responses_in and not self.acks_in:
            return (
                "the board answers but sends no ACK frame; it must ACK every data frame, MORE "
                "fragments included (docs/protocol.md, section 3, rule 1)"
            )
        return "is the board connected and running?"

    def receive(
        self, timeout: float, *, response: bool, ref: int | None = None, opcode: int | None = None
    ) -> tuple[Frame, bytes] | None:
        """The next complete message (first frame, joined payload), or None after `timeout`.

        Frames that cannot belong to the exchange (wrong direction, a reply to another
        request: another `ref` or, when given, another `opcode`; a fragment without its
        start) are counted as stale and dropped, and so is a fragment that is not the next
        one of the message being reassembled (docs/protocol.md section 3, rule 4: the seq
        after the last fragment taken, the first fragment's opcode and `ref`): a missing,
        repeated or swapped fragment, or one of another message, never splices into it; a
        message with a fragment missing never completes (the next START starts over). (`ref`
        is 8 bits of the request's sequence number: a stale reply can share them, its opcode
        then tells it apart.)

        With `max_message`, a message that grows past it is dropped fragment by fragment as
        it arrives (nothing more is buffered) and its last fragment raises MessageTooLarge."""
        deadline = time.monotonic() + timeout
        while True:
            while self._inbox:
                f = self._inbox.popleft()
                if bool(f.flags & _RESPONSE) != response:
                    self.stats.stale += 1
                    continue
                if f.flags & _START:
                    other = ref is not None and f.ref != ref & 0xFF
                    if other or (opcode is not None and f.opcode != opcode):
                        self.stats.stale += 1
                        continue
                    self._rx_first, self._rx_parts, self._rx_size = f, [f.payload], len(f.payload)
                    self._rx_skip = None
                else:
                    head = self._rx_first if self._rx_skip is None else self._rx_skip
                    if head is None or (f.opcode, f.ref, f.seq) != (head.opcode, head.ref, self._rx_next):
                        # not the next fragment of this message: a missing, repeated or swapped
                        # fragment, or one of another message (an older request's, another ref)
                        self.stats.stale += 1
                        continue
                    if self._rx_skip is None:
                        self._rx_parts.append(f.payload)
                    self._rx_size += len(f.payload)
                self._rx_next = (f.seq + 1) % frames.SEQ_MOD
                if self.max_message is not None and self._rx_size > self.max_message:
                    self.stats.oversize += 1
                    if self._rx_first is not None:
                        self._rx_skip, self._rx_first, self._rx_parts = self._rx_first, None, []
                    if not f.flags & _MORE:
                        skipped, self._rx_skip = self._rx_skip, None
                        assert skipped is not None
                        raise MessageTooLarge(skipped, self._rx_size, self.max_message)
                    continue
                if not f.flags & _MORE:
                    first, parts = self._rx_first, self._rx_parts
                    self._rx_first, self._rx_parts = None, []
                    assert first is not None
                    return first, b"".join(parts)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self._pump(remaining)

    def drain(self) -> None:
        """Forget partial input (before a new exchange after an error)."""
        self._inbox.clear()
        self._rx_first, self._rx_parts, self._rx_skip, self._rx_size = None, [], None, 0
