"""Ctrl-C during a transaction that then fails (a board that hung or died): the interrupt was
deferred until the transaction completed, and delivered only if it succeeded. A failing one
went on through every retry (attempts x timeout: 40 s with the defaults) and raised
RetriesExhausted, so a pytest session or a `hil` command at a hung board ignored Ctrl-C and
reported a failure, and the deferred interrupt was kept and raised later, inside whichever
transaction next succeeded (a later test's, a teardown's)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

import pytest

from drivers import open_device
from drivers.errors import RetriesExhausted
from hil.testing import BoardServers
from tests.main_thread import skip_unless_main_thread

TIMEOUT_S = 0.5
ATTEMPTS = 20


@pytest.mark.parametrize("transport", ["visa-tcp", "serial-socket", "serial-pty", "visa-asrl"])
def test_ctrl_c_at_a_hung_board_stops_the_retries_and_is_delivered_once(
    transport: str, emulated_board: Callable[..., BoardServers]
) -> None:
    skip_unless_main_thread()
    handler = signal.getsignal(signal.SIGINT)
    served = emulated_board("emulator://?preset=ideal&seed=0")
    tcp = transport in ("visa-tcp", "serial-socket")  # a pty has one server thread, asleep in the hang
    dev = open_device(served.uri(transport, timeout=str(TIMEOUT_S), attempts=str(ATTEMPTS), backoff="0"))
    try:
        served.plan.reply_delay_s = 60.0  # the board hangs: no reply to anything from now on
        timer = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        t0 = time.monotonic()
        try:
            with pytest.raises(KeyboardInterrupt):
                dev.safety()
        finally:
            timer.cancel()
        took = time.monotonic() - t0
        # the attempt in flight ran out, then the safe state was tried (a framed link: its
        # retransmissions first): not ATTEMPTS tries of TIMEOUT_S
        assert took < 0.7 * ATTEMPTS * TIMEOUT_S, took
        if tcp:
            served.plan.reply_delay_s = 0.0  # the board answers again (on a new connection)
            assert dev.safety().violations == 0  # and the interrupt is not raised a second time
    finally:
        dev.close() if tcp else dev.close_link()
    assert signal.getsignal(signal.SIGINT) is handler


def test_a_process_that_ignores_sigint_retries_as_ever(emulated_board: Callable[..., BoardServers]) -> None:
    """SIGINT ignored (a background job of a non-interactive shell): the guard catches the signal
    meant to be ignored; it must neither raise it nor cut a failing transaction's retries."""
    skip_unless_main_thread()
    served = emulated_board("emulator://?preset=ideal&seed=0")
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        dev = open_device(served.uri("visa-tcp", timeout="0.3", attempts="3", backoff="0"))
        served.plan.reply_delay_s = 60.0
        timer = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        try:
            with pytest.raises(RetriesExhausted, match="failed 3 time"):
                dev.safety()
        finally:
            timer.cancel()
            served.plan.reply_delay_s = 0.0
        assert dev.safety().violations == 0
        dev.close()
    finally:
        signal.signal(signal.SIGINT, handler)
