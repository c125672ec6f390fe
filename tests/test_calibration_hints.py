"""Every rerun hint a calibrated board gives (the refusal of too few channels, the warnings of
unmatched tiles and of mvm lines past the record's) names ONE `hil calibrate` command, and the
record that command makes is then taken by the same run without a further hint (the calibration
hints audit: a d=32 modern Hopfield memory on a 17x17 record was told `--tiles 17x17 --channels
37`, whose record left mvm lines 17..32 uncorrected, and then `--tiles 33x5`)."""

from __future__ import annotations

import re
import shlex
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from calibration import CalibrationError
from drivers import Coupling, Topology
from hil.boards import open_board
from hil.cli import app

RRAM = "emulator://?preset=rram&seed=0"
# a d=8 memory of 5 patterns (the audit's d=32 on a 17x17 record, scaled down to take seconds):
# one 9 x 5 tile, 13 node channels (x 8, p 5)
MHN = ["mhn", "phase", "--device", RRAM, "--n", "5", "--d", "8", "--norm", "2", "--starts", "2"]


def _calibrate(args: list[str]) -> None:
    res = CliRunner().invoke(app, ["calibrate", *args, "--reads", "2"])
    assert res.exit_code == 0, res.output


def _hints(text: str) -> list[str]:
    """The `hil calibrate ...` commands a message names."""
    return re.findall(r"`(hil calibrate [^`]*)`", text)


def _run_hint(hint: str) -> None:
    words = shlex.split(hint)
    assert words[:2] == ["hil", "calibrate"], hint
    _calibrate(words[2:])


def _phase(rec: Path, out: Path) -> tuple[int, str, list[str]]:
    """`hil mhn phase` with the record: exit code, output, warnings."""
    torch.set_num_threads(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = CliRunner().invoke(app, [*MHN, "--calibration", str(rec), "--out", str(out)])
    return res.exit_code, res.output, [str(w.message) for w in caught]


def test_mhn_refused_for_channels_takes_the_hinted_record_with_no_further_hint(tmp_path: Path) -> None:
    rec = tmp_path / "cal.zarr"
    _calibrate([RRAM, "--routines", "adc,dac,mvm", "--tiles", "5x5", "--channels", "8", "--out", str(rec)])
    code, output, _ = _phase(rec, tmp_path / "a")
    assert code != 0
    (hint,) = _hints(output)
    _run_hint(hint)
    code, output, said = _phase(rec, tmp_path / "b")
    assert code == 0, output
    assert said == [], said
    assert "warning" not in output
    # docs/mhn.md: the mvm ADC on a square (d+1) x (d+1) tile; the record's routines kept
    assert "--tiles 9x9" in hint and "--channels 13" in hint and "--routines adc,dac,mvm" in hint, hint


def test_mhn_warnings_name_one_command_whose_record_is_taken_without_hints(tmp_path: Path) -> None:
    rec = tmp_path / "cal.zarr"
    args = ["--routines", "stuck,adc,dac,mvm", "--tiles", "5x5", "--channels", "13", "--out", str(rec)]
    _calibrate([RRAM, *args])
    code, output, said = _phase(rec, tmp_path / "a")
    assert code == 0, output
    assert len(said) == 2, said  # no device calibration for xi 9x5; mvm lines 5..8
    hints = {h for s in said for h in _hints(s)}
    assert len(hints) == 1, said
    (hint,) = hints
    _run_hint(hint)
    code, output, said = _phase(rec, tmp_path / "b")
    assert code == 0, output
    assert said == [], said
    # the device calibrations at the network's tile; its first tile's side covers the mvm lines
    assert "--tiles 9x5" in hint and "--routines adc,dac,mvm,stuck" in hint, hint


def _classifier() -> Topology:
    """A 6-4-2 layered network: tiles 6x4 and 4x2, 12 node channels."""
    return Topology(
        {"x": 6, "h": 4, "y": 2},
        (Coupling("W0", ("x",), ("h",)), Coupling("W1", ("h",), ("y",))),
    )


def _use(rec: Path) -> list[str]:
    """Configure the classifier on the board with the record, program both tiles and run an
    mvm through each both ways; the warnings said (CalibrationError if refused)."""
    topo = _classifier()
    rng = np.random.default_rng(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with open_board(RRAM, str(rec)) as dev:
            dev.configure(topo)
            lim = dev.info.limits
            for tile in ("W0", "W1"):
                rows, cols = topo.tile_shape(tile)
                g = rng.uniform(lim.g_min, lim.g_max, (2, rows, cols)).astype(np.float32)
                dev.program(tile, g[0], g[1])
                dev.mvm(tile, np.full((1, rows), 0.1, np.float32))
                dev.mvm(tile, np.full((1, cols), 0.1, np.float32), transpose=True)
    return [str(w.message) for w in caught]


@pytest.mark.parametrize(
    "routines,tiles,channels",
    [("adc,dac,mvm,stuck", "4x4", "8"), ("stuck", "4x4", "8"), ("adc,dac,mvm", "3x3", "12")],
    ids=["refused", "tiles-only", "mvm-lines"],
)
def test_classifier_hint_gives_a_record_the_network_takes_without_hints(
    tmp_path: Path, routines: str, tiles: str, channels: str
) -> None:
    rec = tmp_path / "cal.zarr"
    _calibrate([RRAM, "--routines", routines, "--tiles", tiles, "--channels", channels, "--out", str(rec)])
    try:
        said = _use(rec)
    except CalibrationError as exc:
        said = [str(exc)]
    hints = {h for s in said for h in _hints(s)}
    assert len(hints) == 1, said
    (hint,) = hints
    _run_hint(hint)
    assert _use(rec) == []
    # the record's routines kept (and, on this board that settles, the converters it lacks)
    assert f"--routines {'adc,dac,mvm,stuck' if routines == 'stuck' else routines}" in hint, hint


def test_a_tile_past_the_line_current_limit_is_told_the_tile_size_that_fits(tmp_path: Path) -> None:
    """A calibration refused for a line's current names the calibration's own fix (a smaller
    --tile-size, with the most devices a line may hold), and that size runs."""
    lean = f"{RRAM}&max_line_current_a=2e-5"  # 10 devices at g_max read at v_read
    args = ["calibrate", lean, "--routines", "gmap", "--out", str(tmp_path / "r.json"), "--no-progress"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    said = re.search(r"smaller --tile-size .* \(at most (\d+) devices at g_max read at v_read", res.output)
    assert said is not None, res.output
    _calibrate([*args[1:], "--tile-size", said.group(1), "--overwrite"])
