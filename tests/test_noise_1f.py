"""Accumulated 1/f noise of PCM (`DeviceModel.noise_1f_scale`): after the write that set it
ends, a device's conductance wanders as ``G (1 + scale Q(G0) f(tau) z)``,
``f(tau) = sqrt(ln((tau + t_read) / (2 t_read)))``, the accumulated read noise of aihwkit's
PCMLikeNoiseModel (Nandakumar et al., ICECS 2019); opt-in, off on every preset."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from drivers import Topology, open_device
from drivers.errors import ConfigurationError
from emulator.array import TileArray
from emulator.devices import DeviceModel
from emulator.presets import PRESETS
from emulator.statistics import pcm_1f_time
from tests.test_emulator import program_weights

G_MID = 12.5e-6
Q_MID = 0.0088 / 0.5**0.65  # the fit's Q(G) at mid-window (g_max 25 uS)
T_READ = 250e-9
ROWS = COLS = 64
N = 2 * ROWS * COLS


def _model(**kw: object) -> DeviceModel:
    """pcm without drift, write noise, stuck devices and wires: only the 1/f noise moves G."""
    base = replace(
        PRESETS["pcm"].device,
        statistics="constant",
        drift_nu=0.0,
        drift_nu_dtod=0.0,
        write_noise=0.0,
        stuck_fraction=0.0,
        wire_resistance=0.0,
        bounds_dtod=0.0,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def _written(model: DeviceModel, seed: int = 0) -> tuple[TileArray, float]:
    """A tile with every device written to mid-window at t = 10 s, and when the write ended."""
    tile = TileArray(ROWS, COLS, model, torch.Generator().manual_seed(seed), torch.device("cpu"))
    g = torch.full((ROWS, COLS), G_MID)
    st = tile.write(g, g, 10.0, torch.Generator().manual_seed(1))
    return tile, 10.0 + st.time_s


def test_the_noise_grows_with_log_time_as_the_fit_says() -> None:
    """The relative deviation's std at 100 s after programming is Q(G) f(100 s) within 5
    standard errors of a std over 8192 devices, and from 100 s to 1e4 s it grows by the
    model's factor f(1e4) / f(100) = 1.114 (the same draws: exactly, to float rounding)."""
    tile, end = _written(_model(noise_1f_scale=1.0))
    rel = {tau: (tile.state(end + tau) / G_MID - 1.0).double() for tau in (100.0, 1e4)}
    want = Q_MID * pcm_1f_time(100.0, T_READ)
    se = want / math.sqrt(2 * N)
    assert abs(float(rel[100.0].std()) - want) < 5 * se, (float(rel[100.0].std()), want)
    factor = pcm_1f_time(1e4, T_READ) / pcm_1f_time(100.0, T_READ)
    assert factor == pytest.approx(math.sqrt(math.log(2e10 + 0.5) / math.log(2e8 + 0.5)))
    assert 1.11 < factor < 1.12
    assert float(rel[1e4].std() / rel[100.0].std()) == pytest.approx(factor, rel=1e-5)


def test_scale_multiplies_the_fit() -> None:
    one, end = _written(_model(noise_1f_scale=1.0))
    three, _ = _written(_model(noise_1f_scale=3.0))
    d1 = one.state(end + 100.0) - G_MID
    d3 = three.state(end + 100.0) - G_MID
    assert torch.allclose(d3, 3 * d1, rtol=1e-4, atol=1e-11)  # float32 ulp at 12.5 uS: 1e-12


def test_no_noise_before_a_read_could_finish() -> None:
    """Right after the write (tau <= t_read) a device holds what was written, so write-verify's
    reads, taken at the write's time, see no accumulated noise."""
    tile, end = _written(_model(noise_1f_scale=1.0))
    assert torch.equal(tile.state(end), tile.state(end - 1e-6))
    assert float((tile.state(end + T_READ) - G_MID).abs().max()) < 1e-12
    assert float((tile.state(end + 1e-3) - G_MID).abs().max()) > 0.01 * G_MID


def test_a_pulsed_device_starts_accumulating_again() -> None:
    """Devices pulsed at time T count from the end of their pulses; the others from their write."""
    tile, end = _written(_model(noise_1f_scale=1.0))
    n = torch.zeros(ROWS, COLS, dtype=torch.int64)
    n[: ROWS // 2] = 1
    t = end + 1e4
    st = tile.pulse(n, torch.zeros_like(n), t, torch.Generator().manual_seed(2))
    g = tile.state(t + st.time_s)
    pulsed, left = g[0, : ROWS // 2], g[0, ROWS // 2 :]
    assert torch.equal(pulsed, tile._g0[0, : ROWS // 2])  # tau = 0: what the pulse left
    rel = float((left / G_MID - 1.0).double().std())
    assert rel == pytest.approx(Q_MID * pcm_1f_time(1e4 + st.time_s, T_READ), rel=0.1)


def test_off_changes_nothing_and_on_draws_no_shared_number() -> None:
    """Off (every preset): no state of its own. On: the chip and the board's noise stream are
    those of the board without it (its draws come from a stream of the tile's own)."""
    off = TileArray(8, 8, PRESETS["pcm"].device, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert off._1f is None
    on_model = replace(PRESETS["pcm"].device, noise_1f_scale=1.0)
    on = TileArray(8, 8, on_model, torch.Generator().manual_seed(0), torch.device("cpu"))
    for k, v in off.truth().items():
        assert torch.equal(v, on.truth()[k]), k
    g = torch.full((8, 8), G_MID)
    ga, gb = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    off.write(g, g, 1.0, ga)
    on.write(g, g, 1.0, gb)
    assert torch.equal(off._g0, on._g0) and torch.equal(ga.get_state(), gb.get_state())


def test_seeded_and_on_the_board() -> None:
    """Through a board: the same seed reproduces the 1/f noise; mvms after a wait see the
    weights it moved (without it, and without drift, they are the same)."""

    def weights_after(extra: str) -> tuple[np.ndarray, np.ndarray]:
        uri = "emulator://?preset=pcm&seed=0&statistics=constant&drift_nu=0&drift_nu_dtod=0" + extra
        with open_device(uri) as dev:
            topo = Topology.layered([16, 8])
            dev.configure(topo)
            program_weights(dev, "W0", np.random.default_rng(0).uniform(-0.5, 0.5, (17, 8)))
            x = np.eye(17, dtype=np.float32)
            before = dev.board.tile("W0").weights(dev.board.clock).numpy().copy()
            dev.wait(1e4)
            after = dev.board.tile("W0").weights(dev.board.clock).numpy().copy()
            assert dev.mvm("W0", x).shape == (17, 8)
            return before, after

    b0, a0 = weights_after("")
    assert np.array_equal(b0, a0)
    b1, a1 = weights_after("&noise_1f_scale=1")
    assert not np.array_equal(b1, a1)
    assert 1e-3 < float(np.abs(a1 - b1).mean()) < 0.1
    assert all(
        np.array_equal(u, v) for u, v in zip((b1, a1), weights_after("&noise_1f_scale=1"), strict=True)
    )


def test_range_checks_and_fingerprint() -> None:
    for kw in ({"noise_1f_scale": -0.1}, {"noise_1f_scale": 11.0}, {"noise_1f_t_read": 0.0}):
        with pytest.raises(ConfigurationError, match=next(iter(kw))):
            DeviceModel(**kw)  # type: ignore[arg-type]
    with (
        open_device("emulator://?preset=pcm&seed=0") as a,
        open_device("emulator://?preset=pcm&seed=0&noise_1f_scale=0") as b,
    ):
        assert a.board.configuration == b.board.configuration
    with open_device("emulator://?preset=pcm&seed=0&noise_1f_scale=1") as c:
        assert c.board.configuration != a.board.configuration
