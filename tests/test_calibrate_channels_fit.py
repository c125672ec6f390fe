"""`hil calibrate --channels N` on a board with fewer converter channels passed on the
board's refusal, whose fix was to add ``&channels=`` to an emulator URI (no fix at all for a
lab board): it now names the board's count and the --channels value that fits (and the
--tile-size, where a routine's network on the tiles is what does not fit), and those values
run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hil.testing import served_board

SMALL = "emulator://?preset=ideal&seed=0&channels=64"


def _calibrate(
    uri: str, tmp_path: Path, *args: str, routines: str = "dac"
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "hil.cli", "calibrate", uri, "--no-progress"]
    cmd += ["--routines", routines] if routines else []
    cmd += ["--out", str(tmp_path / "rec.zarr"), "--overwrite", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _error(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, (done.stdout, done.stderr)
    return next(line for line in done.stderr.splitlines() if line.startswith("error: "))


def test_too_many_channels_names_the_boards_count_and_the_value_that_fits(tmp_path: Path) -> None:
    line = _error(_calibrate(SMALL, tmp_path, "--channels", "100"))
    assert "--channels 100 needs 101 converter channels; the board has 64: give --channels 63 or less" in line
    done = _calibrate(SMALL, tmp_path, "--channels", "63")
    assert done.returncode == 0, done.stderr


def test_the_default_session_on_a_small_board_names_channels_and_tiles_that_fit(tmp_path: Path) -> None:
    """Every routine (the settle routine's network is rows + cols + 32 wide): the values named
    run the whole default session at once."""
    line = _error(_calibrate(SMALL, tmp_path, routines="adc,dac,mvm,stuck,gmap,pulse,settle"))
    assert "the default --channels 512 needs 513 converter channels; the board has 64" in line
    assert "give --channels 63 or less and --tile-size 21 or less" in line
    done = _calibrate(SMALL, tmp_path, "--channels", "63", "--tile-size", "21", routines="")
    assert done.returncode == 0, done.stderr


def test_a_tile_too_wide_for_the_mvm_routine_names_the_tile_size_that_fits(tmp_path: Path) -> None:
    line = _error(_calibrate(SMALL, tmp_path, "--channels", "10", "--tile-size", "63", routines="mvm"))
    assert (
        "the mvm routine's network on the tiles 63x63 needs 126 converter channels; the board has 64" in line
    )
    assert "give --tile-size 32 or less" in line


def test_over_a_served_board_the_fix_is_the_option_not_a_uri_parameter(tmp_path: Path) -> None:
    with served_board(board=SMALL) as servers:
        line = _error(_calibrate(servers.uris["visa-tcp"], tmp_path, "--channels", "100"))
    assert "the board has 64: give --channels 63 or less" in line
    assert "&channels=" not in line.split("give --channels", 1)[1]  # not this URI's to change
