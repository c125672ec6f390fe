"""What the tools say about a board that programs, reads and multiplies but does not settle (the
MVM-only bring-up audit): no settle or pulse bounds in `hil info`, and no ``--channels`` (which sets the
extent of the DAC and state-ADC routines, which need a settle) in a calibration record's
rerun hint."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from calibration.calibrated import CalibratedDevice
from calibration.session import SessionOptions, run_session
from drivers import open_device
from hil.cli import app

RRAM = "emulator://?preset=rram&seed=0"
MVM_ONLY = RRAM + "&capabilities=mvm,program_verify"


@pytest.mark.parametrize("uri", [MVM_ONLY, RRAM], ids=["mvm-only", "settles"])
def test_info_gives_settle_and_pulse_bounds_only_for_a_board_that_has_them(uri: str) -> None:
    res = CliRunner().invoke(app, ["info", uri])
    assert res.exit_code == 0, res.output
    line = next(x for x in res.output.splitlines() if x.startswith("work bounds"))
    if uri == MVM_ONLY:
        assert "settle not supported (capability 'settle' not declared)" in line, line
        assert "steps (" not in line, line
        assert "pulses not supported (capability 'pulse' not declared)" in line, line
        assert "pulses per device per call" not in line, line
    else:
        assert "settle 100000 steps (1e-08 s each)" in line, line
        assert "1000 pulses per device per call" in line, line


def test_info_says_write_verify_is_not_supported_on_a_board_without_it() -> None:
    res = CliRunner().invoke(app, ["info", RRAM + "&capabilities=mvm,pulse"])
    assert res.exit_code == 0, res.output
    line = next(x for x in res.output.splitlines() if x.startswith("work bounds"))
    assert "write-verify not supported (capability 'program_verify' not declared)" in line, line
    assert "write-verify rounds" not in line, line


@pytest.mark.parametrize("uri", [MVM_ONLY, RRAM], ids=["mvm-only", "settles"])
def test_the_rerun_hint_names_channels_only_where_a_routine_uses_them(uri: str) -> None:
    with open_device(uri) as dev:
        record = run_session(dev, SessionOptions(routines=("stuck",), tile_shapes=((8, 8),), channels=512))
        rerun = CalibratedDevice(dev, record).rerun()
    assert rerun.startswith("hil calibrate URI --out RECORD --overwrite --tiles 8x8"), rerun
    assert ("--channels 512" in rerun) == (uri == RRAM), rerun
