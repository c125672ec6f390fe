"""An mvm's read noise on a drifting pcm tile follows the conductances the devices hold now,
as a host read's does (docs/emulator.md, "State-dependent statistics": the RMS of the devices'
read-noise stds in their present state), not those they were written to.

pcm's read noise grows as G^0.35 over most of the window; a day after a write at 20 uS the
devices have drifted to ~13.3 uS and read with a std of 0.153 uS (host reads) where they read
0.177 uS at the write. Before, the mvm kept the noise of the written state: 16 % too high."""

from __future__ import annotations

import math

import numpy as np
import torch

from drivers import Topology, open_device
from emulator.statistics import pcm_read_std

# converters ideal for the purpose (24 bits, no gain or offset errors), no stuck devices or
# wires: an mvm output's error is its read noise alone
URI = (
    "emulator://?preset=pcm&seed=0&stuck_fraction=0&wire_resistance=0&adc_bits=24&dac_bits=24"
    "&gain_error=0&offset_error=0"
)
DAY = 86400.0


def test_mvm_read_noise_follows_the_drifted_state() -> None:
    with open_device(URI) as dev:
        dev.configure(Topology.layered([63, 64]))
        lim = dev.info.limits
        g = np.full((64, 64), 20e-6, np.float32)
        dev.program("W0", g, g, verify=False)
        dev.wait(DAY)
        board = dev.board
        tile = board.tile("W0")
        x = np.full((1000, 64), 0.25, np.float32)
        y = dev.mvm("W0", x)
        w = tile.weights(board.clock).numpy()
        err = y - x[0] @ w
        now = tile.state(board.clock).double()
        assert float(now.mean()) < 0.7 * 20e-6  # drifted by a third
        rms = float(pcm_read_std(now, lim.g_max, 0.15e-6).square().mean().sqrt())
        want = math.sqrt(2.0) * rms / (lim.g_max - lim.g_min) * float(np.linalg.norm(x[0]))
        written = float(pcm_read_std(torch.full((1,), 20e-6, dtype=torch.float64), lim.g_max, 0.15e-6)[0])
        assert written / rms > 1.15  # the old figure is 15 % off: ~50 standard errors
        # 64,000 outputs: the sample std's relative standard error is 1 / sqrt(2 x 64000) = 0.28 %;
        # within 2 % is 7 standard errors
        assert abs(float(err.std()) / want - 1.0) < 0.02, (float(err.std()), want)
