"""RRAM conductance relaxation (`DeviceModel.relax_sigma`, `relax_mean`, `relax_t0`): after
the write that set it ends, a device moves by ``ln(1 + tau / t0) (relax_mean + relax_sigma z)``
siemens; opt-in, off on every preset. The values of `emulator.presets.RRAM_RELAXATION` are
Wan et al. (Nature 2022) as aihwkit's ReRamWan2022NoiseModel fits them."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from drivers import open_device
from drivers.errors import ConfigurationError
from emulator.array import TileArray
from emulator.devices import DeviceModel
from emulator.presets import PRESETS, RRAM_DEVICE, RRAM_RELAXATION

ROWS = COLS = 64
N = 2 * ROWS * COLS
G_MID = 5.5e-6


def _tile(**kw: object) -> tuple[TileArray, float]:
    """rram without write noise, stuck devices and wires, every device written to mid-window at
    t = 10 s; and when the write ended."""
    model = replace(RRAM_DEVICE, write_noise=0.0, stuck_fraction=0.0, wire_resistance=0.0, bounds_dtod=0.0)
    tile = TileArray(ROWS, COLS, replace(model, **kw), torch.Generator().manual_seed(0), torch.device("cpu"))  # type: ignore[arg-type]
    g = torch.full((ROWS, COLS), G_MID)
    st = tile.write(g, g, 10.0, torch.Generator().manual_seed(1))
    return tile, 10.0 + st.time_s


@pytest.mark.parametrize("tau", [1.0, 3600.0, 86400.0])
def test_spread_follows_the_log_law(tau: float) -> None:
    """std of G - G0 is relax_sigma ln(1 + tau / t0), within 5 standard errors of a std over 8192
    devices; a day after programming the preset values give Wan et al.'s growth on this
    window (0.75 uS)."""
    tile, end = _tile(**RRAM_RELAXATION)
    d = (tile.state(end + tau) - G_MID).double()
    want = RRAM_RELAXATION["relax_sigma"] * math.log1p(tau / RRAM_RELAXATION["relax_t0"])
    assert abs(float(d.std()) - want) < 5 * want / math.sqrt(2 * N), (float(d.std()), want)
    assert abs(float(d.mean())) < 5 * want / math.sqrt(N)
    if tau == 86400.0:
        assert want == pytest.approx(0.75e-6, rel=0.01)


def test_mean_decay_follows_the_log_law() -> None:
    tile, end = _tile(relax_mean=-0.02e-6, relax_t0=2.0)
    d = tile.state(end + 100.0) - G_MID
    assert float(d.mean()) == pytest.approx(-0.02e-6 * math.log1p(50.0), rel=1e-3)
    assert float(d.std()) < 1e-12  # no spread without relax_sigma


def test_nothing_before_the_write_ends_and_off_by_default() -> None:
    tile, end = _tile(**RRAM_RELAXATION)
    assert float((tile.state(end) - G_MID).abs().max()) == 0.0  # what write-verify's reads see
    assert (
        not PRESETS["rram"].device.relaxes
        and TileArray(4, 4, RRAM_DEVICE, torch.Generator(), "cpu")._rx is None
    )


def test_range_checks_and_fingerprint() -> None:
    for kw in ({"relax_sigma": -1e-9}, {"relax_sigma": 1.0}, {"relax_mean": -1.0}, {"relax_t0": 0.0}):
        with pytest.raises(ConfigurationError, match=next(iter(kw))):
            DeviceModel(**kw)  # type: ignore[arg-type]
    with open_device("emulator://?preset=rram&seed=0") as a:
        with open_device("emulator://?preset=rram&seed=0&relax_sigma=6.6e-08") as b:
            assert a.board.configuration != b.board.configuration
        with open_device("emulator://?preset=rram&seed=0&relax_sigma=0") as c:
            assert a.board.configuration == c.board.configuration
