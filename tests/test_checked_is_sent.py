"""What is checked is what is sent: the arrays of a pulse, an mvm and a settle are copied before
their checks, and the copy is what reaches the board (and what a retry sends again), so a caller
that changes its array after the call began (another thread, or a callback: here a log handler,
which runs between the check and the send) cannot put an unchecked value on a line.

Through the emulator's servers (SCPI over pyvisa-py TCP, framed over TCP): the board's own
`refused` counter shows whether a changed value reached it."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers import Topology, checks, open_device
from drivers.base import Device, Limits
from hil.testing import BoardServers

BOARD = "emulator://?preset=ideal&seed=0"
TOPO = Topology.layered([4, 3])


class _Meddler(logging.Handler):
    """Changes `array` in place to `value` when the client logs that it sends `op`."""

    def __init__(self, op: str, array: np.ndarray, value: float) -> None:
        super().__init__(logging.DEBUG)
        self.op, self.array, self.value, self.fired = op, array, value, 0

    def emit(self, record: logging.LogRecord) -> None:
        if f"-> {self.op} " in record.getMessage():
            self.array[...] = self.value
            self.fired += 1


@pytest.fixture
def servers(emulated_board: Callable[..., BoardServers]) -> BoardServers:
    return emulated_board(BOARD)


@pytest.fixture(params=["visa-tcp", "serial-socket"])
def dev(request: pytest.FixtureRequest, servers: BoardServers) -> Iterator[Device]:
    with open_device(servers.uri(request.param)) as d:
        d.configure(TOPO)
        yield d


@contextlib.contextmanager
def _meddle(op: str, array: np.ndarray, value: float) -> Iterator[_Meddler]:
    log = logging.getLogger("drivers.wire")
    handler = _Meddler(op, array, value)
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def test_pulse_counts_changed_after_the_check_do_not_reach_the_board(
    servers: BoardServers, dev: Device
) -> None:
    limits = dev.info.limits
    counts = np.ones((5, 3), np.int32)  # W0 is 4 inputs and the bias row by 3
    zero = np.zeros((5, 3), np.int32)
    refused = servers.device.safety().refused
    with _meddle("pulse", counts, 100 * limits.max_pulses) as handler:
        report = dev.pulse("W0", counts, zero)
        assert handler.fired == 1
    assert report.pulses == 15  # the checked counts, one pulse per G+ device
    assert servers.device.safety().refused == refused
    assert int(counts.max()) == 100 * limits.max_pulses  # the caller's array did change


def test_mvm_input_changed_after_the_check_does_not_reach_the_board(
    servers: BoardServers, dev: Device
) -> None:
    x = np.full((2, 5), 0.5, np.float32)
    expected = dev.mvm("W0", x.copy())
    refused = servers.device.safety().refused
    with _meddle("mvm", x, 32.0) as handler:  # 6.4 V on a 0.2 V read
        y = dev.mvm("W0", x)
        assert handler.fired == 1
    np.testing.assert_allclose(y, expected, atol=0.05)
    assert servers.device.safety().refused == refused


def test_settle_clamp_changed_after_the_check_does_not_reach_the_board(
    servers: BoardServers, dev: Device
) -> None:
    clamp = np.full((2, 4), 0.5, np.float32)
    refused = servers.device.safety().refused
    with _meddle("settle", clamp, 32.0) as handler:
        eq = dev.settle({"s0": clamp})
        assert handler.fired == 1
    np.testing.assert_array_equal(eq.states["s0"], np.full((2, 4), 0.5, np.float32))
    assert servers.device.safety().refused == refused


LIMITS = Limits(0.2, 0.25, 1e-6, 1e-5, None, None, (0.0, 1.0), 64, 64, 8, 1000, 1000, 1e-8)
dtypes = st.sampled_from([np.float32, np.float64, np.float16, np.int32, np.int64, np.uint8])


@settings(max_examples=100, deadline=None)
@given(dtype=dtypes, batch=st.integers(1, 4), transpose=st.booleans(), fortran=st.booleans())
def test_a_checked_array_never_shares_the_callers_memory(
    dtype: type, batch: int, transpose: bool, fortran: bool
) -> None:
    """Whatever the caller's dtype and layout (float32 C-contiguous, where a view would do, most
    of all), the checked mvm input, settle clamp and pulse counts are the host's own copies."""
    n = 3 if transpose else 5
    x = np.zeros((batch, n), dtype, order="F" if fortran else "C")
    arr = checks.check_mvm(TOPO, LIMITS, "W0", x, transpose, True)
    assert not np.shares_memory(arr, x) and arr.dtype == np.float32 and arr.flags.c_contiguous
    clamp = np.zeros((batch, 4), dtype, order="F" if fortran else "C")
    cl, _, _, _ = checks.check_settle(TOPO, LIMITS, {"s0": clamp}, None, None)
    assert not np.shares_memory(cl["s0"], clamp)
    if np.dtype(dtype).kind in "iu":
        c = np.zeros((5, 3), dtype, order="F" if fortran else "C")
        cp, cm = checks.check_pulse(TOPO, LIMITS, "W0", c, c)
        assert not np.shares_memory(cp, c) and not np.shares_memory(cm, c)
