"""What is checked is what reaches the array, and host and board draw a limit at the same
number (the safety audit of 2026-12-06):

- scalar arguments are converted before the arrays are checked (converting one runs the
  caller's code, which could change an array after its check), and the arrays a numpy
  `program` checks are copies the caller cannot change afterwards;
- `Limits.clamp_max` is the largest float32 state whose voltage, computed as the board
  computes it, is within `v_read_max` (``v_read_max / v_read`` let a state through that the
  board then counted as a violation);
- limits under which the board's own states break its voltage limit are refused, in the
  emulator and from a peer;
- an unquantised DAC with gain errors saturates at its rails;
- a `program` that names no write-verify budget takes the board's when it is below 20.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers import Coupling, Nudge, Topology, checks, open_device
from drivers.errors import ConfigurationError, LimitViolation, ProtocolError
from drivers.wire import payload as pl

_LIMITS = open_device("emulator://?preset=ideal").info.limits


def _board(uri: str = "emulator://?preset=ideal&seed=0", sizes: tuple[int, ...] = (4, 3, 2)):
    dev = open_device(uri)
    dev.configure(Topology.layered(list(sizes)))
    return dev


def test_a_scalar_converted_after_the_arrays_cannot_change_what_was_checked() -> None:
    """A tol or beta whose conversion writes NaN or 100 (20 V) into the checked array: the
    array is checked after the scalar, so the call is refused and nothing reaches the array."""
    dev = _board()
    lim = dev.info.limits
    g = np.full((5, 3), 0.5 * (lim.g_min + lim.g_max), np.float32)

    class NaNTol(float):
        def __float__(self) -> float:
            g[...] = np.nan
            return 1e-7

    with pytest.raises(ConfigurationError, match="NaN"):
        dev.program("W0", g, g.copy(), tol=NaNTol(1e-7))
    assert np.isfinite(dev.read_conductance("W0")[0]).all()

    x = np.full((1, 4), 0.5, np.float32)

    class LoudBeta(float):
        def __float__(self) -> float:
            x[...] = 100.0
            return 0.1

    nudge = {"s2": Nudge(LoudBeta(0.1), target=np.zeros((1, 2), np.float32))}
    with pytest.raises(LimitViolation, match="read-voltage"):
        dev.settle({"s0": x}, nudge)
    x[...] = 0.5
    with pytest.raises(LimitViolation, match="read-voltage"):
        dev.settle_tensors({"s0": torch.from_numpy(x)}, nudge)
    assert dev.safety().violations == 0


def test_program_sends_a_copy_of_the_checked_targets() -> None:
    """The caller's float32 array is not what the in-process board writes: changing it after
    the call (or during it, from another thread) cannot reach the tile."""
    g = np.full((5, 3), 5e-6, np.float32)
    copy = checks._float32("g", g)
    assert copy is not g and not np.shares_memory(copy, g) and copy.flags.c_contiguous
    dev = _board()
    dev.program("W0", g, g)
    g[...] = np.nan
    assert np.isfinite(dev.read_conductance("W0")[0]).all()


@settings(max_examples=300, deadline=None)
@given(v_read=st.floats(1e-3, 10.0), ratio=st.floats(1.0, 100.0))
def test_clamp_max_is_the_largest_float32_state_within_the_voltage_limit(v_read: float, ratio: float) -> None:
    v_read_max = v_read * ratio
    limits = dataclasses.replace(_LIMITS, v_read=v_read, v_read_max=v_read_max)
    top = np.float32(limits.clamp_max)
    assert float(top) == limits.clamp_max
    assert float(top) * v_read <= v_read_max
    assert float(np.nextafter(top, np.float32(np.inf))) * v_read > v_read_max


def test_a_state_at_clamp_max_is_accepted_and_is_no_violation_on_the_board() -> None:
    """The audit's case: ``v_read_max / v_read`` rounds to a float32 state whose voltage the
    board finds 1 ulp over the limit. Host and board now agree on every float32 value."""
    uri = "emulator://?preset=ideal&seed=0&v_read=0.1804017265657185&v_read_max=0.18427851266017845"
    dev = _board(uri)
    top = np.float32(dev.info.limits.clamp_max)
    v_read, v_read_max = 0.1804017265657185, 0.18427851266017845
    assert float(np.float32(v_read_max / v_read)) * v_read > v_read_max  # the old bound: over by 1 ulp
    dev.settle({"s0": np.full((2, 4), top, np.float32)})
    dev.mvm("W0", np.full((2, 5), top, np.float32))
    with pytest.raises(LimitViolation):
        dev.settle({"s0": np.full((2, 4), np.nextafter(top, np.float32(2)), np.float32)})
    assert dev.safety().violations == 0


@pytest.mark.parametrize(
    ("params", "said"),
    [
        ("v_read_max=0.05", "raise v_read_max to at least 0.2 V"),
        ("v_read=1e-300&v_read_max=1e300", "past float32's range"),
    ],
)
def test_limits_under_which_the_boards_own_states_break_them_are_refused(params: str, said: str) -> None:
    with pytest.raises(ConfigurationError, match=said):
        open_device(f"emulator://?preset=ideal&{params}")
    info = pl.info_to_dict(open_device("emulator://?preset=ideal").info)
    info["limits"]["v_read_max"] = 0.05
    with pytest.raises(ProtocolError, match=r"malformed device info: v_read_max 0\.05 V is below"):
        pl.info_from_dict(info)


def test_an_unquantised_dac_with_gain_errors_saturates_at_its_rails() -> None:
    """A 5 % DAC gain error took an accepted clamp at clamp_max past the voltage limit."""
    dev = _board("emulator://?preset=ideal&seed=0&dac_bits=none&gain_error=0.05")
    top = dev.info.limits.clamp_max
    for _ in range(3):
        dev.settle({"s0": np.full((2, 4), top, np.float32)})
        dev.mvm("W0", np.full((2, 5), top, np.float32))
    assert dev.safety().violations == 0
    gains = dev.board.dac_errors.gain[:5]  # type: ignore[attr-defined]
    assert float(gains.max()) > 1.0  # the case arises: some channel amplifies


def test_the_mvm_settles_write_back_of_free_nodes_has_the_same_rails() -> None:
    """The mvm-mode settle drives each free node's state back through the DAC every step; with
    an unquantised DAC of 20 % gain error that write-back had no rail, and nodes at 1.0 were
    driven up to 1.6 x v_read, past v_read_max, on a board whose every request passed."""
    dev = _board("emulator://?preset=ideal&seed=0&dac_bits=none&gain_error=0.2")
    lim = dev.info.limits
    topo = Topology({"x": 8, "h": 64}, (Coupling("W", ("x", "bias"), ("h",)),), gain=4.0, mode="mvm")
    dev.configure(topo)
    dev.program("W", np.full((9, 64), lim.g_max, np.float32), np.full((9, 64), lim.g_min, np.float32))
    eq = dev.settle({"x": np.ones((4, 8), np.float32)})
    assert float(eq.states["h"].mean()) > 0.9  # the nodes sit near the top of the range
    gains = dev.board.dac_errors.gain  # type: ignore[attr-defined]
    assert float(gains.max()) > lim.clamp_max  # where some channel's gain takes 1.0 past the rail
    safety = dev.safety()
    assert (safety.violations, safety.refused) == (0, 0)


def test_an_mvm_of_an_empty_batch_is_refused_with_a_clear_error() -> None:
    """An mvm of 0 samples reached the board's noise scale and failed inside torch's `max`."""
    dev = _board("emulator://?preset=ideal&seed=0")
    with pytest.raises(ConfigurationError, match="empty batch"):
        dev.mvm("W0", np.zeros((0, 5), np.float32))
    assert dev.mvm("W0", np.zeros((1, 5), np.float32)).shape == (1, 3)


def test_a_program_that_names_no_budget_takes_a_lower_board_bound() -> None:
    """A board that declares 10 write-verify rounds refused every plain program (the host sent
    its default of 20 whether or not it verified); a budget the caller names is still checked."""
    limits = dataclasses.replace(_LIMITS, max_verify_iters=10)
    assert checks.check_verify(limits, None, None) == (None, 10)
    assert checks.check_verify(_LIMITS, None, None) == (None, checks.DEFAULT_VERIFY_ITERS)
    with pytest.raises(LimitViolation, match="max_iters"):
        checks.check_verify(limits, None, 20)


def test_conductance_targets_are_compared_in_float32_and_none_is_negative() -> None:
    """A slack of 1e-6 of the window let -5e-12 S through on a board with g_min 0, and 8e-12 S
    past g_max: now the window's ends in float32, give or take 4 float32 steps (targets
    computed in float32 as g_min + w (g_max - g_min) land a step past g_max), never below 0."""
    dev = _board("emulator://?preset=ideal&seed=0&g_min=0")
    g_max = dev.info.limits.g_max
    span = np.float32(g_max) - np.float32(0.0)
    in_float32 = np.float32(0.0) + np.ones((5, 3), np.float32) * span  # float32 arithmetic
    empty = np.zeros((5, 3), np.float32)
    dev.program("W0", in_float32, empty)
    two_steps = np.nextafter(np.nextafter(np.float32(g_max), np.float32(1)), np.float32(1))
    dev.program("W0", np.full((5, 3), two_steps, np.float32), empty)
    with pytest.raises(LimitViolation, match="g_min"):
        dev.program("W0", np.full((5, 3), -5e-12, np.float32), empty)
    with pytest.raises(LimitViolation, match="g_max"):
        dev.program("W0", np.full((5, 3), g_max * (1 + 8e-7), np.float32), empty)
    assert dev.safety().violations == 0
