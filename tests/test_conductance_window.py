"""The float32 slack of the conductance window is sized at each end from that end's own float32
step (the safety audit: 4 steps of the larger end, applied at both ends, grew below g_min with
the on/off ratio: with g_min 1e-10 and g_max 1e-4 a target of 7.1e-11 S, 29 % below g_min,
was accepted by the host and by both servers).

Host and board check with the same function (`drivers.checks.conductance_window`): the servers
run an in-process board, which checks again. Shown here through the real transports: pyvisa-py
SCPI over TCP and the framed link over a TCP socket, each with the host's check (a plain
`program`) and without it (`send_unchecked`: only the board's own check stands).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers import Topology, checks, open_device
from drivers.base import Limits
from drivers.errors import LimitViolation
from drivers.wire import payload as pl
from hil.testing import BoardServers

WIDE = "emulator://?preset=ideal&seed=0&g_min=1e-10&g_max=1e-4"  # on/off ratio 1e6
AUDIT_TARGET = 7.1e-11  # 29 % below g_min


_BASE = open_device("emulator://?preset=ideal").info.limits


def _limits(g_min: float, g_max: float) -> Limits:
    """The emulator's `ideal` limits with this window: a pure check, no board."""
    return dataclasses.replace(_BASE, g_min=g_min, g_max=g_max)


def _step(x: float) -> float:
    return abs(float(np.spacing(np.float32(x))))


def test_the_window_ends_have_their_own_slack() -> None:
    lim = _limits(1e-10, 1e-4)
    low, high = checks.conductance_window(lim)
    assert low == float(np.float32(1e-10)) - checks.WINDOW_ULPS * _step(1e-10)
    assert high == float(np.float32(1e-4)) + checks.WINDOW_ULPS * _step(1e-4)
    with pytest.raises(LimitViolation, match="g_min"):
        checks.check_conductance_range(lim, "W0", "g_plus", AUDIT_TARGET, 1e-6)
    checks.check_conductance_range(lim, "W0", "g_plus", low, high)  # the ends themselves pass


_ENDS = st.floats(1e-13, 1e-2) | st.sampled_from([0.0, 1e-10, 1e-6, 2.0**-20, 1e-5])


@settings(max_examples=300, deadline=None)
@given(a=_ENDS, b=st.floats(1e-12, 1e-2), ratio=st.floats(1.0001, 1e8))
def test_a_target_one_slack_past_an_end_is_refused_and_the_end_itself_accepted(
    a: float, b: float, ratio: float
) -> None:
    """For any g_min < g_max: g_min and g_max (as float32) are accepted; a float32 target one
    more slack width past either end (4 steps of that end, then 4 more) is refused."""
    g_min = a
    g_max = max(b, a * ratio, float(np.nextafter(np.float32(a), np.float32(1))) * 2)
    if not g_max < 1.0:
        return
    lim = _limits(g_min, g_max)
    lo32, hi32 = np.float32(g_min), np.float32(g_max)
    checks.check_conductance_range(lim, "W0", "g_plus", float(lo32), float(hi32))
    slack_lo, slack_hi = checks.WINDOW_ULPS * _step(g_min), checks.WINDOW_ULPS * _step(g_max)
    below = float(lo32) - 2 * slack_lo  # exact in float32: a multiple of g_min's step
    above = float(hi32) + 2 * slack_hi
    assert float(np.float32(below)) == below and float(np.float32(above)) == above
    with pytest.raises(LimitViolation, match="g_min"):
        checks.check_conductance_range(lim, "W0", "g_plus", below, float(hi32))
    with pytest.raises(LimitViolation, match="g_max"):
        checks.check_conductance_range(lim, "W0", "g_plus", float(lo32), above)
    low, high = checks.conductance_window(lim)
    assert float(lo32) - slack_lo <= low <= float(lo32) and high == float(hi32) + slack_hi
    assert low >= 0.0  # g_min >= 0: never a negative target


@pytest.mark.parametrize("transport", ["visa-tcp", "serial-socket"])
def test_host_and_server_refuse_a_target_below_g_min_over_the_real_transports(
    emulated_board: Callable[..., BoardServers], transport: str
) -> None:
    servers = emulated_board(WIDE)
    shape = (2, 2)
    at_min = np.full(shape, 1e-10, np.float32)
    low = np.full(shape, AUDIT_TARGET, np.float32)
    with open_device(servers.uri(transport)) as dev:
        dev.configure(Topology.layered([1, 2]))
        dev.program("W0", at_min, at_min)  # g_min itself
        before = dev.safety()
        with pytest.raises(LimitViolation, match=r"g_plus of 'W0'.*targets must be >= g_min"):
            dev.program("W0", low, at_min)  # the host's check
        # past the host's check: the server's board checks again with the same window
        request = pl.program_request("W0", low, at_min, False, None, 1)
        with pytest.raises(LimitViolation, match="g_min"):
            dev.send_unchecked(pl.Op.PROGRAM, request)  # type: ignore[attr-defined]
        after = dev.safety()
        assert after.violations == 0
        assert after.refused == before.refused + 2  # one on the host, one on the board
