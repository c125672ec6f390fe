"""Tests that send themselves a signal (SIGINT, SIGALRM) run their handlers only in the main
thread, the only one Python runs signal handlers in: elsewhere (a test runner that runs tests
in a worker thread) they are skipped, saying why."""

from __future__ import annotations

import threading

import pytest

SKIP_REASON = "signals are delivered to the main thread only"


def skip_unless_main_thread() -> None:
    """Skip the calling test unless it runs in the main thread (`SKIP_REASON`)."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip(SKIP_REASON)
