"""Every emulated device keeps inside the conductance window its board declares.

The safety audit: `rram`'s bound spread (``bounds_dtod`` 0.01) drew each device's own upper
bound as ``g_max (1 + 0.01 N(0,1))``, so half the devices saturated above the g_max the board
declares (up to ~4 %). The board's line-current limit is its longest line at g_max, so a line
of saturated devices went ~0.5 % past it: `hil calibrate --tile-size N` at the tile maximum N
was refused in its pulse routine, after the other routines had run. The spread now only narrows
a device's window (a SET's compliance caps what a real cell conducts): what the board declares
is the most any of its devices holds.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from emulator.devices import DeviceParams
from emulator.presets import PRESETS


@pytest.mark.parametrize("preset", ["rram", "pcm", "ecram"])
@pytest.mark.parametrize("bounds_dtod", [None, 0.3, 0.5])
def test_every_devices_window_lies_inside_the_declared_one(preset: str, bounds_dtod: float | None) -> None:
    model = PRESETS[preset].device
    if bounds_dtod is not None:
        model = dataclasses.replace(model, bounds_dtod=bounds_dtod)
    fab = torch.Generator().manual_seed(0)
    p = DeviceParams.draw(model, (64, 64), fab, torch.device("cpu"))
    assert float(p.g_hi.max()) <= model.g_max
    # g_min to float32 nearest (a float32 step below is within the window's float32 slack)
    assert float(p.g_lo.min()) >= float(np.float32(model.g_min))
    assert float(p.stuck_value.max()) <= model.g_max
    # the window never collapses below a tenth of the nominal range
    assert float((p.g_hi - p.g_lo).min()) >= 0.1 * model.g_range * (1 - 1e-6)


def test_calibrate_at_the_tile_maximum_runs_its_pulse_routine_within_the_line_limit(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The audit's command, small: 8 x 8 tiles, --tile-size 8, the pulse routine saturating
    every device up. It stopped with 'line current ... requested 1.60668e-05, limit 1.6e-05'."""
    from typer.testing import CliRunner

    from hil.cli import app

    uri = "emulator://?preset=rram&seed=0&tile_rows_max=8&tile_cols_max=8"
    out = tmp_path / "rec.zarr"
    args = ["calibrate", uri, "--out", str(out), "--routines", "pulse", "--tile-size", "8", "--no-progress"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "line current" not in res.output


def test_a_board_without_a_bounds_spread_keeps_its_devices_bit_for_bit() -> None:
    """The ideal preset (no spread) draws the devices it drew before the window was kept: the
    main job's figures (docs/vae.md) stay as they were."""
    model = PRESETS["ideal"].device
    p = DeviceParams.draw(model, (16, 16), torch.Generator().manual_seed(0), torch.device("cpu"))
    assert torch.equal(p.g_lo, torch.full((16, 16), model.g_min, dtype=torch.float32))
    assert torch.equal(p.g_hi, torch.full((16, 16), model.g_max, dtype=torch.float32))
