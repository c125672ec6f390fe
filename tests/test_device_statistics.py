"""Issue 21: state-dependent PCM statistics (Nandakumar et al., ICECS 2019, as in aihwkit's
PCMLikeNoiseModel): programming noise, drift exponent and read noise follow the documented
functions of the conductance, within sampling error, on the emulator's pcm tiles."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from drivers.errors import ConfigurationError
from emulator.array import TileArray
from emulator.devices import DeviceModel
from emulator.presets import PRESETS
from emulator.statistics import (
    pcm_nu_mid,
    pcm_nu_moments,
    pcm_read_std,
    pcm_write_std,
    pcm_write_std_mid,
)

PCM = PRESETS["pcm"].device
# no stuck devices and no device-to-device window spread: every device lands where the
# model puts it, so the statistics are the model's alone
CLEAN = dataclasses.replace(PCM, stuck_fraction=0.0, bounds_dtod=0.0)
LEVELS = (2e-6, 6e-6, 12.5e-6, 20e-6)  # S, away from the window's edges (no clipping)
ROWS, COLS = 64, 128  # per level: 2 x 64 x 128 = 16384 devices


def _tile(model: DeviceModel = CLEAN, seed: int = 0) -> TileArray:
    return TileArray(ROWS, COLS, model, torch.Generator().manual_seed(seed), torch.device("cpu"))


def _target(level: float) -> torch.Tensor:
    return torch.full((2, ROWS, COLS), level)


def _std_band(n: int) -> float:
    """Relative half-width of a 5-sigma band on a sample std of `n` Gaussian values."""
    return 5.0 / math.sqrt(2.0 * (n - 1))


def test_the_preset_quotes_the_model_at_mid_window() -> None:
    assert PCM.statistics == "pcm"
    assert PCM.write_noise == pytest.approx(pcm_write_std_mid(PCM.g_max), rel=1e-3)
    assert (PCM.drift_nu, PCM.drift_nu_dtod) == pytest.approx(pcm_nu_mid(PCM.g_max))
    # the published shape: noisier programming and faster, wider drift at low conductance
    g = torch.tensor([1e-6, 5e-6, 12.5e-6, 25e-6])
    sigma = pcm_write_std(g, PCM.g_max)
    assert bool((sigma[1:] > sigma[:-1]).all())
    mu, sd = pcm_nu_moments(g, PCM.g_max)
    assert float(mu[0]) > 0.07 and float(sd[0]) > 0.03 and float(mu[-1]) == pytest.approx(0.049)
    assert float(pcm_read_std(torch.tensor(12.5e-6), PCM.g_max, PCM.read_noise)) == pytest.approx(
        PCM.read_noise, rel=1e-6
    )


@pytest.mark.parametrize("level", LEVELS)
def test_programming_noise_follows_the_fit(level: float) -> None:
    tile = _tile()
    gen = torch.Generator().manual_seed(1)
    tile.write_stacked(_target(level), 0.0, gen)
    landed = tile.conductances(0.0)
    err = torch.stack(landed).double() - level
    want = float(pcm_write_std(torch.tensor(level, dtype=torch.float64), PCM.g_max))
    n = err.numel()
    assert abs(float(err.mean())) < 5 * want / math.sqrt(n)
    assert float(err.std()) == pytest.approx(want, rel=_std_band(n))


@pytest.mark.parametrize("level", LEVELS)
def test_drift_exponents_are_drawn_from_the_written_state(level: float) -> None:
    tile = _tile()
    tile.write_stacked(_target(level), 0.0, torch.Generator().manual_seed(2))
    g = torch.stack(tile.conductances(0.0))
    nu = tile.truth()["nu"].double()
    mu, sd = pcm_nu_moments(g.double(), PCM.g_max)
    # nu = |mu + sd z|: standardised, z is N(0, 1) (mu > 3 sd everywhere on these levels)
    z = (nu - mu) / sd
    n = z.numel()
    assert abs(float(z.mean())) < 5 / math.sqrt(n)
    assert float(z.std()) == pytest.approx(1.0, rel=_std_band(n))
    # and the drift they drive: G(t) = G0 (t / t0)^-nu, a day after the write
    t = 86400.0
    after = torch.stack(tile.conductances(t)).double()
    want = g.double() * (t / PCM.drift_t0) ** -nu
    torch.testing.assert_close(after, want, rtol=1e-5, atol=0.0)


def test_a_pulse_redraws_the_drift_exponent_of_the_devices_it_moved_only() -> None:
    tile = _tile()
    tile.write_stacked(_target(2e-6), 0.0, torch.Generator().manual_seed(3))
    before = tile.truth()["nu"]
    counts = torch.zeros(ROWS, COLS, dtype=torch.int64)
    counts[: ROWS // 2] = 5
    tile.pulse(counts, torch.zeros_like(counts), 100.0, torch.Generator().manual_seed(4))
    after = tile.truth()["nu"]
    moved = torch.zeros(2, ROWS, COLS, dtype=torch.bool)
    moved[0, : ROWS // 2] = True
    assert torch.equal(after[~moved], before[~moved])
    assert not torch.equal(after[moved], before[moved])
    # the new exponents follow the new, higher state: a lower mean than at 2 uS
    g = torch.stack(tile.conductances(100.0))
    mu_new, _ = pcm_nu_moments(g[moved].double(), PCM.g_max)
    mu_old, _ = pcm_nu_moments(torch.tensor(2e-6, dtype=torch.float64), PCM.g_max)
    assert float(mu_new.mean()) < float(mu_old)
    assert float(after[moved].double().mean()) == pytest.approx(float(mu_new.mean()), rel=0.05)


@pytest.mark.parametrize("level", LEVELS)
def test_read_noise_follows_the_state(level: float) -> None:
    tile = _tile()
    target = _target(level)
    tile.set_conductances(target[0], target[1], 0.0)
    gen = torch.Generator().manual_seed(5)
    reads = torch.stack([torch.stack(tile.read(0.0, gen)) for _ in range(4)]).double()
    err = reads - level
    want = float(pcm_read_std(torch.tensor(level, dtype=torch.float64), PCM.g_max, PCM.read_noise))
    n = err.numel()
    assert float(err.std()) == pytest.approx(want, rel=_std_band(n))
    # the mvm's equal-device formula takes the RMS of those stds
    assert tile.read_noise_rms() == pytest.approx(want, rel=1e-5)


def test_constant_statistics_are_unchanged_and_bad_names_refused() -> None:
    rram = PRESETS["rram"].device
    assert rram.statistics == "constant"
    tile = TileArray(8, 8, rram, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert tile.read_noise_rms() == rram.read_noise
    with pytest.raises(ConfigurationError, match="statistics must be one of"):
        dataclasses.replace(rram, statistics="reram_2025")
