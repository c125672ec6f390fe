"""`Limits.dac_range`: what a board's DACs drive of the states the voltage limit accepts.

The host (and the board) accept any state within `clamp_max` (1.25 on the presets), but a
quantised DAC has its codes over `adc_range` ([0, 1]) and saturates there: a settle clamp of
-0.5 was driven at 0 and one of 1.2 at 1.0, reported as sent, with nothing in the limits saying
so. The range is now declared, and every DAC output of the emulator lies within it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from drivers import checks, open_device
from drivers.topology import Topology


@pytest.mark.parametrize("preset", ["rram", "pcm", "ecram", "ideal"])
def test_every_accepted_state_is_driven_within_the_declared_dac_range(preset: str) -> None:
    dev = open_device(f"emulator://?preset={preset}&seed=0")
    lim = dev.info.limits
    lo, hi = lim.dac_range
    top = np.float32(lim.clamp_max)
    edges = [-top, np.nextafter(np.float32(lo), np.float32(-np.inf)), np.float32(lo), np.float32(hi)]
    edges += [np.nextafter(np.float32(hi), np.float32(np.inf)), np.float32(1.1), top]
    edges = [e for e in edges if abs(e) <= top]  # an ideal DAC's range ends at the limit itself
    x = np.concatenate([np.array(edges, np.float32), np.linspace(-top, top, 201, dtype=np.float32)])
    topo = Topology({"a": x.size, "b": 1}, ())
    clamp, *_ = checks.check_settle(topo, lim, {"a": x[None, :]}, None, None)  # the host accepts all
    assert np.array_equal(clamp["a"][0], x)
    board = dev.board  # type: ignore[attr-defined]
    for channel in range(4):
        state = board.dac_convert(torch.from_numpy(x.copy()), channel).numpy()
        signed = board.dac_convert(torch.from_numpy(x.copy()), channel, signed=True).numpy()
        assert lo <= float(state.min()) and float(state.max()) <= hi, (preset, channel)
        assert float(np.abs(signed).max()) <= max(abs(lo), abs(hi)), (preset, channel)
    if lim.dac_bits is None:
        assert (lo, hi) == (-lim.clamp_max, lim.clamp_max)
    else:
        assert (lo, hi) == lim.adc_range and hi < lim.clamp_max  # accepted past it, driven at it
        assert float(board.dac_convert(torch.tensor([-0.5, 1.2]), 0)[0]) == lo
