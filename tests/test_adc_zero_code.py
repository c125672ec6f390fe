"""The mvm read-out's ADC is mid-tread: a zero code, as real crossbar read-outs and aihwkit's
output quantiser (``round(y / out_res) * out_res``) have. With an even number of levels over
``[-mvm_range, mvm_range]`` (the unipolar quantiser applied to a symmetric range) a column of no
current read as +-half a step: 0.0157 weight units at 8 bits over +-4, 0.063 at 6 bits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from drivers import Device, Nudge, SettleBudget, Topology, open_device
from drivers.converters import lsb, rail_lsb
from emulator.periphery import quantize_signed


def program_weights(dev: Device, tile: str, w: np.ndarray) -> None:
    lim = dev.info.limits
    span = lim.g_max - lim.g_min
    gp = lim.g_min + np.maximum(w, 0) * span
    gm = lim.g_min + np.maximum(-w, 0) * span
    dev.program(tile, gp.astype(np.float32), gm.astype(np.float32))


@pytest.mark.parametrize("bits", [6, 8])
def test_an_mvm_of_zero_input_reads_zero(bits: int) -> None:
    uri = f"emulator://?preset=ideal&seed=0&adc_bits={bits}&dac_bits=8"
    with open_device(uri) as dev:
        dev.configure(Topology.layered([16, 8], bias=False))
        rng = np.random.default_rng(0)
        program_weights(dev, "W0", rng.uniform(-0.5, 0.5, (16, 8)).astype(np.float32))
        y = dev.mvm("W0", np.zeros((4, 16), np.float32))
        assert np.array_equal(y, np.zeros_like(y))
        yt = dev.mvm("W0", np.zeros((4, 8), np.float32), transpose=True)
        assert np.array_equal(yt, np.zeros_like(yt))


def test_a_drive_under_half_a_step_reads_zero_and_the_transfer_is_odd() -> None:
    """One input line at 0.1 through weights of +-0.1: outputs +-0.01, under half of the
    8-bit step over +-4 (0.0157): they read 0, and a negated weight reads the negated code."""
    with open_device("emulator://?preset=ideal&seed=0&adc_bits=8&dac_bits=8") as dev:
        dev.configure(Topology.layered([1, 4], bias=False))
        program_weights(dev, "W0", np.array([[0.1, -0.1, 0.5, -0.5]], np.float32))
        y = dev.mvm("W0", np.array([[0.1], [0.5]], np.float32))[:, :]
        step = lsb(8, 8.0)
        assert np.array_equal(y[0, :2], [0.0, 0.0])
        assert y[1, 2] == -y[1, 3] and y[1, 2] > 0
        assert abs(y[1, 2] / step - round(y[1, 2] / step)) < 1e-4  # on the grid through zero


@pytest.mark.parametrize("bits", [2, 3, 6, 8, 9])
def test_quantize_signed_grid(bits: int) -> None:
    full = 4.0
    step = lsb(bits, 2 * full)
    x = torch.linspace(-6, 6, 200_001, dtype=torch.float64)
    q = quantize_signed(x, bits, full)
    codes = torch.unique(q)
    top = (1 << (bits - 1)) - 1
    assert len(codes) == 2 * top + 1 == 2**bits - 1  # odd: zero in the middle
    assert torch.allclose(codes, torch.arange(-top, top + 1, dtype=torch.float64) * step)
    assert torch.equal(quantize_signed(-x, bits, full), -q)  # odd-symmetric
    inside = x.abs() <= top * step
    assert float((q - x)[inside].abs().max()) <= step / 2 + 1e-12
    # the rails, half a step inside the range, are 2**bits - 2 steps apart
    assert float(q.max()) == pytest.approx(full - step / 2)
    assert rail_lsb(bits, float(q.max() - q.min())) == pytest.approx(step)


def test_quantize_signed_comparator_and_ideal() -> None:
    x = torch.tensor([-1.0, -0.1, 0.2, 3.0])
    assert torch.equal(quantize_signed(x, None, 4.0), x)
    assert torch.equal(quantize_signed(x, 1, 4.0), torch.tensor([-4.0, -4.0, 4.0, 4.0]))
    assert rail_lsb(1, 8.0) == 8.0
    assert rail_lsb(None, 8.0) == 0.0 and rail_lsb(None, 8.0, ideal_bits=8) == lsb(8, 8.0)


def test_the_mvm_calibration_models_the_same_step() -> None:
    """The mvm routine's range probe finds the rails, and its step from them is the board's
    (the one `lsb` the settle's stop floor and the host's dither take)."""
    from calibration.mvm import _probe_mvm_range

    with open_device("emulator://?preset=ideal&seed=0&adc_bits=8&dac_bits=8") as dev:
        bottom, top = _probe_mvm_range(dev, (8, 8), dev.info.limits.adc_range[0])
        step = lsb(8, 8.0)
        assert top == pytest.approx(4.0 - step / 2, rel=1e-6) and bottom == pytest.approx(-top, rel=1e-6)
        assert rail_lsb(8, top - bottom) == pytest.approx(step, rel=1e-6)


def test_a_zero_error_current_is_injected_as_zero() -> None:
    """The injected nudge current's DAC (auto-ranged to the largest current) is mid-tread too:
    an output unit with no error current (grad 0) settles where it settled free, and the
    largest current is its top code. Two output units that do not couple (a 1-2 network, no
    bias); an exact state ADC, so the states show the drive."""
    uri = "emulator://?preset=ideal&seed=0&dac_bits=8&adc_bits=none"
    budget = SettleBudget(max_steps=20_000, tol=1e-9, dt=0.5, check_every=5)
    with open_device(uri) as dev:
        dev.configure(Topology.layered([1, 2], bias=False, budget=budget))
        program_weights(dev, "W0", np.array([[0.5, 0.5]], np.float32))
        x = {"s0": np.full((1, 1), 0.8, np.float32)}
        free = dev.settle(x).states["s1"]
        grad = np.array([[0.2, 0.0]], np.float32)
        nudged = dev.settle(x, nudge={"s1": Nudge(0.5, grad=grad)}).states["s1"]
        assert nudged[0, 1] == pytest.approx(free[0, 1], abs=1e-6)  # was 0.5 x 0.2 / 255 / 2 off
        assert nudged[0, 0] == pytest.approx(free[0, 0] - 0.1, abs=1e-6)  # the top code: the full current
