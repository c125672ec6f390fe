"""Polling for a condition another thread or process brings about (a server noticing a closed
connection, a lease lapsing), for tests that cannot be told when it happens."""

from __future__ import annotations

import time
from collections.abc import Callable


def until(cond: Callable[[], bool], timeout: float) -> bool:
    """Whether `cond()` holds within `timeout` seconds, asked every 10 ms (and once at the end)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()
