"""Per-connection throttling of peers that make errors, so that a peer sending garbage
cannot take the server's time from the peers that do not.

Each connection has an allowance of errors (a token bucket): `ERROR_BURST` at once,
refilled at `ERROR_RATE` per second. What counts as an error is the server's call: a
queued SCPI error, a NACKed or undecodable frame, an ERROR reply, the fragments of a
message dropped as too large. A connection that runs over its allowance is not read until
the excess has refilled, and what it already sent waits unparsed in its buffer (a server
stops working through a read once the allowance is spent): TCP flow control then holds its
sender, so its bytes cost the server nothing while it waits, and the error-free peers get
the interpreter. A TCP connection held for `KICK_AFTER_S` in all is closed (a flood that
went on that long is not a person typing; its slot goes back to the pool). A peer that
makes no errors is never slowed; one that makes a few (a person typing, a script finding
its way) never meets the limit.

The rate is a declared bound, like the caps of `links`: 50 errors a second sustained is far
beyond what a well-behaved host produces (it stops at its first error) and far below what
a flooding peer does (thousands a second)."""

from __future__ import annotations

import time

ERROR_RATE = 50.0  # errors per second a connection may keep making
ERROR_BURST = 200.0  # errors it may make at once
MAX_PAUSE_S = 0.25  # longest single wait (the server's stop flag is checked between waits)
KICK_AFTER_S = 5.0  # a TCP connection held this long in all is closed


class ErrorThrottle:
    """One connection's allowance of errors; `charge` says how long to stop reading it."""

    def __init__(self, rate: float | None = None, burst: float | None = None) -> None:
        rate = ERROR_RATE if rate is None else rate
        burst = ERROR_BURST if burst is None else burst
        if not (rate > 0 and burst >= 1):
            raise ValueError(f"need rate > 0 and burst >= 1, got rate {rate}, burst {burst}")
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.t = time.monotonic()
        self.paused_s = 0.0  # seconds this connection has been held so far

    def charge(self, errors: float = 0.0) -> float:
        """Spend `errors`; the seconds to wait before reading the connection again (0: none)."""
        if not errors and self.tokens >= self.burst:  # the usual call: nothing to spend, nothing owed
            return 0.0  # (a full bucket stays full whatever the time: no clock read needed)
        now = time.monotonic()
        # the debt is capped at one burst: what a peer did long ago does not hold it for ever
        self.tokens = max(-self.burst, min(self.burst, self.tokens + (now - self.t) * self.rate) - errors)
        self.t = now
        if self.tokens >= 0:
            return 0.0
        return min(-self.tokens / self.rate, MAX_PAUSE_S)

    def spent(self, errors: float) -> bool:
        """Whether `errors` not yet charged use up the allowance (stop working for now)."""
        return errors > self.tokens

    @property
    def kick(self) -> bool:
        """Whether the connection has been held long enough to be closed."""
        return self.paused_s >= KICK_AFTER_S

    def hold(self, wait: float, stopping: object) -> None:
        """Wait `wait` seconds (or until `stopping`, a threading.Event, is set)."""
        self.paused_s += wait
        stopping.wait(wait)  # type: ignore[attr-defined]
