"""Fault injection shared by both servers: what a noisy link, a slow or crashing board and a
flaky cable do to a host, drawn from seeded generators and counted per kind.

Byte faults act on the byte stream of every connection in both directions (`FaultyStream`):
each byte is dropped with probability `drop_rate` and has one bit flipped with probability
`8 * ber` (a bit-error rate `ber` on 8-bit bytes, for small rates). They are drawn as the gaps
between struck bytes (`ByteStrikes`), so which bytes of the plan's stream they strike does not
depend on how it was cut into reads and writes (timing). Request faults act once
per received request (an SCPI program message, a framed request):

- `delay`: the board runs the request, then holds the reply for `delay_s` (set it beyond
  the host's timeout);
- `reset`: on a settle or programming request (`reset_ops`) the board reboots
  (`emulator.server.dispatch.reboot`: the configuration is lost, the conductances and the
  transaction tag kept, the epoch advanced, the ownership forgotten) instead of running it
  (with `reset_after`: right after running it), and its link goes down as a rebooting
  board's does;
- `lose`: a `reset` that also loses the arrays (`emulator.server.dispatch.reboot` with
  `arrays_lost`: a re-formed or erased array, a spare chip of the same identity fitted): the
  board comes back with devices as fabricated, never programmed, and a new STATUS `arrays_id`,
  so the host must program every tile again (docs/reliability.md, guarantee 3). What a server
  process killed and started again on the same port does, without the process, and on a pty
  too (a server started again gets another pty); it needs an emulated board;
- `close`: the board runs the request, then closes the connection before replying (on a
  pty, which cannot close, it forgets the link state and swallows the reply).

Link faults act on the frames of each framed link (`link`, a `drivers.wire.link.Faults`
copied for every link: corrupted, dropped or garbage-prefixed frames, counted or drawn per
frame). `reply_delay_s` holds every reply of both servers back (a slow board, not a fault
of the host's making), and `hang_up_after` closes a connection after it has been answered
that many requests (0: never).

`limit` caps the number of each kind (None: no cap), so a long run can be given an exact
budget of faults. This is the one fault type of both servers: `hil emulator serve --ber ...
--fault-seed`, the pytest plugin and the test harness all build one.

Each kind draws from its own generator (`kind_rng`: `SeedSequence(seed).spawn` keyed by the
kind's index in `KINDS`), so a kind's faults depend only on the events it is drawn for: the
n-th request a request fault is drawn for meets the same draw whatever bytes, keep-alives or
other kinds' faults came before it. (One generator shared by all kinds let the byte traffic,
whose chunking is a matter of timing, shift which requests the request faults struck.)
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from drivers.wire.link import Faults
from drivers.wire.payload import Op
from emulator.server.links import Stream

KINDS = ("corrupt", "drop", "delay", "reset", "close", "lose")  # append only: the index seeds a kind
RESET_OPS = frozenset({Op.SETTLE, Op.PROGRAM})
REBOOTS = frozenset({"reset", "lose"})  # the request faults after which the board reboots
HANG_UPS = REBOOTS | {"close"}  # ... and those after which its link goes down


def kind_rng(seed: int, kind: str) -> np.random.Generator:
    """The generator of fault kind `kind` under `seed`: child `KINDS.index(kind)` of
    `SeedSequence(seed).spawn(...)`, independent of every other kind's."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(KINDS.index(kind),)))


class ByteStrikes:
    """Which bytes one byte-fault kind strikes, as a stream: the gap to each struck byte
    (geometric at the rate) and the bit it flips are drawn from the kind's generator in fixed
    batches and used in order, so the n-th byte the plan sees is struck or not whatever the
    lengths of the pieces it came in (a binomial count drawn per read or write made the faults
    depend on how the stream was cut, which is timing)."""

    BATCH = 256

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.rate = 0.0
        self.ahead = 0  # bytes to pass before the next struck one
        self.bit = 0  # the bit the next struck byte has flipped (corrupt)
        self.batch: list[tuple[int, int]] = []
        self.used = 0

    def _next(self) -> tuple[int, int]:
        """The next (gap, bit): the bytes from the last struck one to the next, its bit."""
        if self.used == len(self.batch):
            gaps = self.rng.geometric(self.rate, self.BATCH).tolist()
            self.batch = list(zip(gaps, self.rng.integers(0, 8, self.BATCH).tolist(), strict=True))
            self.used = 0
        self.used += 1
        return self.batch[self.used - 1]

    def strikes(self, rate: float, n: int, room: int | None) -> list[tuple[int, int]]:
        """(position, bit) of each struck byte among the next `n`, at most `room` (None: no cap;
        those past the cap are passed over unstruck, the stream keeping its place)."""
        if room == 0:
            return []
        if rate != self.rate:  # the first bytes at this rate (or the rate changed mid-run)
            self.rate, self.batch, self.used = rate, [], 0
            gap, self.bit = self._next()
            self.ahead = gap - 1
        hits: list[tuple[int, int]] = []
        while self.ahead < n:
            if room is None or len(hits) < room:
                hits.append((self.ahead, self.bit))
            gap, self.bit = self._next()
            self.ahead += gap
        self.ahead -= n
        return hits


@dataclass
class FaultPlan:
    ber: float = 0.0  # bit-error rate of every byte in and out
    drop_rate: float = 0.0  # probability that a byte in or out is lost
    p_delay: float = 0.0  # per request: the reply comes `delay_s` late
    delay_s: float = 0.5
    p_reset: float = 0.0  # per settle / program request: the board restarts instead
    p_close: float = 0.0  # per request: run it, then hang up before replying
    p_lose: float = 0.0  # per settle / program request: a reset whose arrays come back fresh
    seed: int = 0
    limit: int | None = None  # at most this many faults of each kind
    reset_ops: frozenset[int] = RESET_OPS  # the requests a reset strikes
    reset_after: bool = False  # the reset strikes after the request ran (its reply lost)
    link: Faults = field(default_factory=Faults)  # frame faults of every framed link (each a copy)
    reply_delay_s: float = 0.0  # both servers: every reply waits this long (a slow board)
    hang_up_after: int = 0  # both servers: close a connection after answering N requests (0: never)
    rerun_ids: bool = False  # both servers: no at-most-once record, a resent request runs again
    injected: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        for name in ("ber", "drop_rate", "p_delay", "p_reset", "p_close", "p_lose"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"fault rate {name} must be in [0, 1], got {value}")
        for name in ("delay_s", "reply_delay_s"):
            value = getattr(self, name)
            if not 0.0 <= value < float("inf"):
                raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value}")
        if self.hang_up_after < 0:
            raise ValueError(f"hang_up_after must be >= 0 (0: never), got {self.hang_up_after}")
        self._rngs = {kind: kind_rng(self.seed, kind) for kind in KINDS}
        self._bytes = {kind: ByteStrikes(self._rngs[kind]) for kind in ("corrupt", "drop")}
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        return any((self.ber, self.drop_rate, self.p_delay, self.p_reset, self.p_close, self.p_lose))

    def _room(self, kind: str) -> int | None:
        """How many more faults of `kind` the limit allows (None: no limit)."""
        return None if self.limit is None else max(0, self.limit - self.injected[kind])

    def _draw(self, kind: str, p: float) -> bool:
        with self._lock:
            if p <= 0 or self._room(kind) == 0 or self._rngs[kind].random() >= p:
                return False
            self.injected[kind] += 1
            return True

    def request_fault(self, op: int | None) -> str | None:
        """The fault (if any) for one received request of opcode `op` (None: unknown)."""
        if op is not None and op in self.reset_ops:
            if self._draw("lose", self.p_lose):
                return "lose"
            if self._draw("reset", self.p_reset):
                return "reset"
        if self._draw("close", self.p_close):
            return "close"
        if self._draw("delay", self.p_delay):
            return "delay"
        return None

    def mangle(self, data: bytes | memoryview) -> bytes | memoryview:
        """`data` after the byte faults (unchanged, and not copied, when none struck)."""
        n = len(data)
        p_flip = min(1.0, 8 * self.ber)
        if not n or not (p_flip or self.drop_rate):
            return data
        with self._lock:
            corrupt, drop = self._bytes["corrupt"], self._bytes["drop"]
            flips = corrupt.strikes(p_flip, n, self._room("corrupt")) if p_flip else []
            drops = drop.strikes(self.drop_rate, n, self._room("drop")) if self.drop_rate else []
            if not (flips or drops):
                return data
            self.injected["corrupt"] += len(flips)
            self.injected["drop"] += len(drops)
        buf = bytearray(data)
        for i, bit in flips:
            buf[i] ^= 1 << bit
        if not drops:
            return bytes(buf)
        keep = np.ones(n, bool)
        keep[[i for i, _ in drops]] = False
        return np.frombuffer(bytes(buf), np.uint8)[keep].tobytes()

    def summary(self) -> dict[str, int]:
        return {k: int(self.injected[k]) for k in KINDS}


class FaultyStream:
    """A Stream whose bytes pass through `plan.mangle` both ways."""

    def __init__(self, inner: Stream, plan: FaultPlan) -> None:
        self.inner = inner
        self.plan = plan

    def read(self, timeout: float) -> bytes:
        data = self.inner.read(timeout)
        return bytes(self.plan.mangle(data)) if data else data

    def write(self, data: bytes | memoryview) -> None:
        self.inner.write(self.plan.mangle(data))

    def close(self) -> None:
        self.inner.close()


def closable(stream: object) -> bool:
    """Whether hanging up ends the connection (TCP) rather than a link that stays (a pty)."""
    inner = getattr(stream, "inner", None)
    if inner is not None:
        return closable(inner)
    return hasattr(stream, "conn")
