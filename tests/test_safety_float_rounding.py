"""Float64 clamps and mvm inputs next to a narrowed read-voltage limit, through the real framed
server over TCP (the safety audit of 2026-12-07): a float64 value within the limit can round
up to a float32 past it on the way to the board. The host must refuse exactly what the board
refuses (it checks the float32 the wire carries), so the board never sees one to refuse."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivers import Device, Topology, open_device
from drivers.errors import LimitViolation
from emulator.server.launch import ServedBoard, serve

# v_read_max / v_read = 1.05 is not a float32: the largest float32 state within the limit is
# just below it, and float64 states between it and 1.05 round to float32s on either side
BOARD = "emulator://?preset=ideal&seed=0&v_read_max=0.21"


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[ServedBoard, Device]]:
    s = serve(BOARD, scpi_port=None, scpi_pty=False, framed_pty=False)
    dev = open_device(s.uris["serial-socket"])
    dev.configure(Topology.layered([3, 2]))
    try:
        yield s, dev
    finally:
        dev.close()
        s.close()


def _near_the_limit() -> st.SearchStrategy[float]:
    top = 0.21 / 0.2
    return st.one_of(
        st.floats(top - 1e-6, top + 1e-6),
        st.sampled_from([top, float(np.nextafter(np.float32(top), np.float32(2))), -top, -0.0]),
        st.floats(np.finfo(np.float32).smallest_subnormal, 1e-38),
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=_near_the_limit(), pos=st.integers(0, 3), op=st.sampled_from(["settle", "mvm"]))
def test_the_host_refuses_exactly_where_the_float32_on_the_wire_passes_the_limit(
    served: tuple[ServedBoard, Device], value: float, pos: int, op: str
) -> None:
    s, dev = served
    limits = dev.info.limits
    n = 3 if op == "settle" else 4  # a settle clamps s0; an mvm drives W0's rows (s0 and the bias)
    pos = pos % n
    x = np.full((1, n), 0.5)
    x[0, pos] = value
    volts = abs(float(np.float32(value))) * limits.v_read  # what the wire carries, in volts
    before = s.device.safety()
    if value < 0 and op == "settle":
        x[0, pos] = abs(value)  # clamps are states in the DAC's range; the sign is the mvm's case
    try:
        if op == "settle":
            dev.settle({"s0": x})
        else:
            dev.mvm("W0", x)
        assert volts <= limits.v_read_max, (value, volts)  # sent: within the limit as carried
    except LimitViolation:
        assert volts > limits.v_read_max, (value, volts)  # refused: past it as carried
    after = s.device.safety()
    assert (after.refused, after.violations) == (before.refused, before.violations) == (0, 0)
