"""A write's line sums: the line-current bound (`TileArray.line_sum_max`) and the power's line
sums (`TileArray.line_sums`) come from one pair of per-array sums of the tile."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch.overrides import TorchFunctionMode

from emulator.array import TileArray
from emulator.presets import PRESETS

CPU = torch.device("cpu")


class CountTileSums(TorchFunctionMode):
    """Counts the sums taken over a whole (2, rows, cols) tensor."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = shape
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if getattr(func, "__name__", "") == "sum" and args and tuple(args[0].shape) == self.shape:
            self.n += 1
        return func(*args, **(kwargs or {}))


def test_bound_and_power_sums_read_the_tile_once_per_write() -> None:
    model = replace(PRESETS["rram"].device, wire_resistance=0.0)  # the devices' own sums
    t = TileArray(96, 64, model, torch.Generator().manual_seed(0), CPU)
    gen = torch.Generator().manual_seed(1)
    m = t.model
    for k in range(3):
        target = torch.rand((2, 96, 64), generator=gen).mul_(m.g_max - m.g_min).add_(m.g_min)
        t.write_stacked(target, float(k), gen)
        with CountTileSums((2, 96, 64)) as c:
            top = t.line_sum_max()
            rows, cols = t.line_sums(float(k))
        assert c.n == 2  # one sum along the rows, one along the columns (4 before)
        g = t.state(float(k)).double()
        exact = max(float(g.sum(2).max()), float(g.sum(1).max()))
        assert exact <= top <= exact * (1 + 2 * 96 * 2.0**-23)  # the bound's margin, n 2^-23
        torch.testing.assert_close(rows.double(), g.sum((0, 2)), rtol=1e-6, atol=0.0)
        torch.testing.assert_close(cols.double(), g.sum((0, 1)), rtol=1e-6, atol=0.0)
        assert rows.dtype == cols.dtype == torch.float32
