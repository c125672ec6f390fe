"""A transaction cut by an exception that is not the link's (pytest-timeout's signal method
failing a slow test, a signal handler raising, SystemExit from a SIGTERM handler) left the
board's late reply in an SCPI stream, and the device went on using that session: the next
query of the same kind returned the cut request's result as its own, silently (an mvm of
one input answered with the product of another). Such a cut now marks the link broken, so the
next transaction reconnects first (a new session: the stale reply goes with the old one)."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import numpy as np
import pytest

from drivers import Topology, open_device
from hil.testing import BoardServers
from tests.main_thread import skip_unless_main_thread


class Cut(BaseException):
    """What pytest-timeout's signal method raises inside a test (its Failed is a BaseException)."""


def _cut(signum: int, frame: object) -> None:
    raise Cut


@pytest.mark.parametrize("transport", ["visa-tcp", "visa-asrl", "serial-socket"])
def test_a_transaction_cut_by_an_exception_does_not_leave_its_reply_for_the_next(
    transport: str, emulated_board: Callable[..., BoardServers]
) -> None:
    skip_unless_main_thread()
    served = emulated_board("emulator://?preset=ideal&seed=0")
    previous = signal.signal(signal.SIGALRM, _cut)
    try:
        with open_device(served.uri(transport, timeout="5")) as dev:
            dev.configure(Topology.layered([8, 6, 3]))
            lim = dev.info.limits
            rng = np.random.default_rng(0)
            shape = dev.read_conductance("W0")[0].shape
            dev.program("W0", *rng.uniform(lim.g_min, lim.g_max, (2, *shape)))
            x1, x2 = np.full((2, 9), 0.3, np.float32), np.full((2, 9), -0.1, np.float32)
            y1, y2 = dev.mvm("W0", x1), dev.mvm("W0", x2)
            assert not np.array_equal(y1, y2)
            served.plan.reply_delay_s = 0.6  # a slow reply ...
            signal.setitimer(signal.ITIMER_REAL, 0.2)  # ... and the test's timeout strikes first
            with pytest.raises(Cut):
                dev.mvm("W0", x1)
            served.plan.reply_delay_s = 0.0
            time.sleep(0.8)  # the cut request's reply has come by now
            np.testing.assert_array_equal(dev.mvm("W0", x2), y2)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
