"""Output noise of the mvm read-out (`PeripheryModel.out_noise`, aihwkit's
`IOParameters.out_noise`): a Gaussian of the configured std on every output of every mvm,
independent of the input, added to the devices' read noise in quadrature; opt-in (0 on every
preset, whose numbers and configuration fingerprints stay as they were)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from drivers import SettleBudget, Topology, open_device
from drivers.errors import ConfigurationError
from emulator.periphery import PeripheryModel
from tests.test_emulator import program_weights

N_IN, N_OUT, BATCH = 64, 64, 256  # 16,384 outputs per mvm


def _mvm_noise(uri: str, x: np.ndarray) -> np.ndarray:
    """Two mvms of the same input on one board minus each other, over sqrt(2): the noise of
    one read-out (the programmed weights and the input cancel)."""
    with open_device(uri) as dev:
        topo = Topology.layered([N_IN, N_OUT])
        dev.configure(topo)
        w = np.random.default_rng(0).uniform(-0.5, 0.5, topo.tile_shape("W0"))
        program_weights(dev, "W0", w)
        xb = np.concatenate([x, np.ones((len(x), 1), np.float32)], 1)  # the bias row's input
        return (dev.mvm("W0", xb) - dev.mvm("W0", xb)) / math.sqrt(2.0)


@pytest.mark.parametrize("out_noise", [0.02, 0.06])
def test_mvm_output_noise_std_is_the_configured_one(out_noise: float) -> None:
    """On the ideal board (no read noise, ideal ADC) every output's noise has std `out_noise`,
    within 5 standard errors of a std over 16,384 values (SE = sigma / sqrt(2 n))."""
    x = np.random.default_rng(1).uniform(0, 1, (BATCH, N_IN)).astype(np.float32)
    d = _mvm_noise(f"emulator://?preset=ideal&seed=3&out_noise={out_noise}", x)
    se = out_noise / math.sqrt(2 * d.size)
    assert abs(d.std() - out_noise) < 5 * se, (d.std(), out_noise, se)
    assert abs(d.mean()) < 5 * out_noise / math.sqrt(d.size)


def test_mvm_output_noise_does_not_follow_the_input() -> None:
    """Zero inputs (but the bias row) read out with the same noise as full ones: the read-out's
    noise, not the devices' (whose noise grows with |x|)."""
    uri = "emulator://?preset=ideal&seed=3&out_noise=0.05"
    small = _mvm_noise(uri, np.zeros((BATCH, N_IN), np.float32)).std()
    full = _mvm_noise(uri, np.ones((BATCH, N_IN), np.float32)).std()
    assert abs(small - full) < 5 * 0.05 / math.sqrt(BATCH * N_OUT), (small, full)


def test_mvm_output_noise_adds_to_read_noise_in_quadrature() -> None:
    """rram's read noise (0.03 uS per device, std ``sqrt(2) 0.03 / 9 |x|`` per output) and an
    output noise of 0.04 sum in variance; ADC ideal so that no quantisation enters."""
    x = np.full((BATCH, N_IN), 0.5, np.float32)
    xb_norm = math.sqrt(N_IN * 0.25 + 1.0)
    read = math.sqrt(2.0) * 0.03e-6 / 9e-6 * xb_norm
    uri = "emulator://?preset=rram&seed=3&adc_bits=none&stuck_fraction=0&wire_resistance=0"
    only_read = _mvm_noise(uri, x).std()
    both = _mvm_noise(uri + "&out_noise=0.04", x).std()
    se = 5 / math.sqrt(2 * BATCH * N_OUT)
    assert abs(only_read / read - 1) < se, (only_read, read)
    assert abs(both / math.hypot(read, 0.04) - 1) < se, (both, math.hypot(read, 0.04))


def test_mvm_mode_settle_reads_out_with_output_noise() -> None:
    """An mvm-mode settle on the ideal board is deterministic without output noise and noisy
    with it; the same seed reproduces it."""

    def settle(out: str, seed: int) -> np.ndarray:
        with open_device(f"emulator://?preset=ideal&seed={seed}{out}") as dev:
            budget = SettleBudget(max_steps=40, tol=0.0)
            topo = Topology.layered([16, 12, 5], mode="mvm", budget=budget)
            dev.configure(topo)
            rng = np.random.default_rng(0)
            for c in topo.couplings:
                program_weights(dev, c.tile, rng.uniform(-0.5, 0.5, topo.tile_shape(c.tile)))
            x = np.random.default_rng(1).uniform(0, 1, (8, 16)).astype(np.float32)
            a = dev.settle({"s0": x}).states["s1"]
            b = dev.settle({"s0": x}).states["s1"]
            return np.stack([a, b])

    quiet = settle("", 0)
    assert np.array_equal(quiet[0], quiet[1])
    noisy = settle("&out_noise=0.05", 0)
    assert not np.array_equal(noisy[0], noisy[1])
    assert 0.005 < float(np.abs(noisy[0] - quiet[0]).mean()) < 0.2
    assert np.array_equal(noisy, settle("&out_noise=0.05", 0))  # seeded


def test_out_noise_is_range_checked_and_off_by_default() -> None:
    assert PeripheryModel().out_noise == 0.0
    for bad in (-0.1, 4.5):  # past the mvm ADC's half-range (4.0)
        with pytest.raises(ConfigurationError, match="out_noise"):
            PeripheryModel(out_noise=bad)
    with pytest.raises(ConfigurationError, match="out_noise"):
        open_device("emulator://?preset=rram&out_noise=-1")


def test_fingerprints_of_boards_without_output_noise_are_unchanged() -> None:
    """`out_noise` enters a board's configuration fingerprint only where it is set, so
    calibration records of the presets still match."""
    with (
        open_device("emulator://?preset=rram&seed=0") as a,
        open_device("emulator://?preset=rram&seed=0&out_noise=0") as b,
    ):
        assert a.board.configuration == b.board.configuration
        assert "out_noise" not in repr(a.board.preset)
    with open_device("emulator://?preset=rram&seed=0&out_noise=0.06") as c:
        assert c.board.configuration != a.board.configuration


def test_out_noise_is_drawn_on_the_board_device() -> None:
    with open_device("emulator://?preset=ideal&seed=0&out_noise=0.05") as dev:
        dev.configure(Topology.layered([4, 3]))
        y = dev.board.mvm("W0", torch.ones(2, 5))
        assert y.device == dev.board.device


def test_mvm_mode_counts_one_read_out_per_tile_feeding_a_group() -> None:
    """In an mvm-mode step a layered network's hidden group is fed by two read-outs (W0 forward,
    its bias row included, and W1 transposed) and its output group by one; a dense tile is read
    once for all its sources. The output noise follows (and each read-out's w_max scales it)."""
    with open_device("emulator://?preset=ideal&seed=0&out_noise=0.05") as dev:
        dev.configure(Topology.layered([16, 12, 5], mode="mvm"))
        std = dev.board.engine._out_noise_std(["s1", "s2"])
        assert std["s1"] == pytest.approx(0.05 * math.sqrt(2)) and std["s2"] == pytest.approx(0.05)
        dev.configure(Topology.dense({"x": 8, "h": 6, "y": 3}, mode="mvm"))
        std = dev.board.engine._out_noise_std(["h", "y"])
        assert std == pytest.approx({"h": 0.05, "y": 0.05})
    with open_device("emulator://?preset=ideal&seed=0") as dev:
        dev.configure(Topology.layered([16, 12, 5], mode="mvm"))
        assert dev.board.engine._out_noise_std(["s1", "s2"]) == {}
