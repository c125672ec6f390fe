"""A refusal shows the value it refused and the limit as different numbers whenever they differ
(the safety audit: an mvm input one float32 step above 1.25 on rram was refused as "exceeded:
requested 0.25, limit 0.25", the hint saying "state 1.25 ... within +-1.25"; both were
formatted with 6 or 4 significant digits). `drivers.errors.distinct_numbers` adds digits where
those print alike; LimitViolation, the voltage hint and the scalar checks use it.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers import Topology, open_device
from drivers.errors import ConfigurationError, LimitViolation, distinct_numbers
from drivers.scalars import as_float, check_within

_PAIR = re.compile(r"requested (\S+), limit (\S+?)\.?(?:\s|$)")


def _requested_and_limit(message: str) -> tuple[str, str]:
    m = _PAIR.search(message)
    assert m, message
    return m.group(1), m.group(2)


def test_an_mvm_input_one_float32_step_past_the_limit_shows_two_numbers() -> None:
    with open_device("emulator://?preset=rram&seed=0") as dev:
        dev.configure(Topology.layered([3, 2]))
        top = np.float32(dev.info.limits.clamp_max)
        x = np.full((1, 4), np.nextafter(top, np.float32(np.inf)), np.float32)
        with pytest.raises(LimitViolation) as err:
            dev.mvm("W0", x)
    text = str(err.value)
    requested, limit = _requested_and_limit(text)
    assert requested != limit and float(requested) > float(limit), text
    state = re.search(r"state (\S+) x v_read", text)
    most = re.search(r"within \+-(\S+) ", text)
    assert state and most and float(state.group(1)) > float(most.group(1)), text


def test_a_tile_past_the_boards_tiles_names_the_ways_to_split_it() -> None:
    """The refusal said only "split the layer", not how (a conv user on `open_device`)."""
    dev = open_device("emulator://?preset=ideal&seed=0&tile_rows_max=16&tile_cols_max=16")
    with dev, pytest.raises(LimitViolation) as err:
        dev.configure(Topology.layered([20, 4]))
    text = str(err.value)
    assert "tile size of 'W0' (21 x 4)" in text and "tiles hold at most 16 x 16 cells" in text, text
    assert "hil.boards.open_board(uri)" in text and "model.block_layers" in text, text
    assert dev.safety().violations == 0


def test_counts_are_shown_in_full() -> None:
    text = str(LimitViolation("batch size", 1_000_001, 1_000_000))
    assert "requested 1000001, limit 1000000" in text
    assert "requested 2e-05, limit 1e-05" in str(LimitViolation("x", 2e-5, 1e-5))  # short as before


def test_the_scalar_checks_show_the_value_and_the_end_it_passed_apart() -> None:
    above_one = float(np.nextafter(np.float32(1), np.float32(2)))
    with pytest.raises(ConfigurationError, match=r"must be <= 1, got 1\.00000012"):
        as_float("settle budget dt", above_one, 0.0, 1.0)
    with pytest.raises(ConfigurationError, match=r"must be >= 0\.25, got 0\.249999985"):
        as_float("tol", float(np.nextafter(np.float32(0.25), np.float32(0))), 0.25, 1.0)
    with pytest.raises(ConfigurationError, match=r"=1\.00000012 is outside \[0, 1\]"):
        check_within("device", "gain", above_one, 0.0, 1.0)


_FINITE = st.floats(allow_nan=False, allow_infinity=False)


@settings(max_examples=500, deadline=None)
@given(a=_FINITE, b=_FINITE)
def test_distinct_numbers_differ_exactly_when_the_numbers_do_and_keep_their_order(a: float, b: float) -> None:
    ta, tb = distinct_numbers(a, b)
    assert (ta != tb) if a != b else (ta == tb or a == 0)  # 0.0 and -0.0 keep their signs
    if a < b:
        assert float(ta) < float(tb)


@settings(max_examples=300, deadline=None)
@given(bound=st.floats(1e-30, 1e30), steps=st.integers(1, 3), width=st.sampled_from([np.float32, np.float64]))
def test_a_refusal_one_step_past_any_limit_shows_two_numbers(bound: float, steps: int, width: type) -> None:
    b = width(bound)
    v = b
    for _ in range(steps):
        v = np.nextafter(v, width(math.inf))
    requested, limit = _requested_and_limit(str(LimitViolation("limit", float(v), float(b))))
    assert float(requested) > float(limit)
