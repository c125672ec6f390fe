"""Calibration sessions on a board whose limits are narrower than the emulator presets'
(the safety audit of 2026-12-07), through the real framed server over TCP and the real
`hil calibrate`: the routines keep to the board's declared settle steps, and nothing they
send is refused by the board or reaches it past a limit."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import zarr
from typer.testing import CliRunner

from emulator.server.launch import ServedBoard, serve
from hil.cli import app


@pytest.fixture
def narrow_board(request: pytest.FixtureRequest) -> Iterator[ServedBoard]:
    b = serve(
        f"emulator://?preset=rram&seed=0&{request.param}",
        scpi_port=None,
        scpi_pty=False,
        framed_pty=False,
    )
    try:
        yield b
    finally:
        b.close()


def _calibrate(board: ServedBoard, out: Path, *args: str) -> tuple[int, str]:
    uri = board.uris["serial-socket"]
    r = CliRunner().invoke(app, ["calibrate", uri, "--out", str(out), "--no-progress", *args])
    return r.exit_code, r.output


@pytest.mark.parametrize("narrow_board", ["max_settle_steps=50"], indirect=True)
def test_device_and_settle_routines_keep_to_a_board_of_fewer_settle_steps(
    narrow_board: ServedBoard, tmp_path: Path
) -> None:
    """The stuck, gmap, pulse and settle routines configured the host's default budget (100
    steps) or the settle profile's 200: a board that declares 50 refused each configure (the
    mvm routine's too), after the minutes the routines before it took."""
    out = tmp_path / "cal.zarr"
    code, text = _calibrate(
        narrow_board, out, "--routines", "stuck,gmap,settle", "--tile-size", "4", "--reads", "2"
    )
    assert code == 0, text
    settle = zarr.open_group(str(out), mode="r")["settle"].attrs.asdict()
    summary = settle.get("summary", settle)
    assert summary["default_budget"]["max_steps"] == 50
    assert narrow_board.device.safety().refused == 0
    assert narrow_board.device.safety().violations == 0


@pytest.mark.parametrize("narrow_board", ["max_settle_steps=8"], indirect=True)
def test_converter_routines_past_the_boards_settle_steps_are_refused_before_anything_runs(
    narrow_board: ServedBoard, tmp_path: Path
) -> None:
    out = tmp_path / "cal.zarr"
    code, text = _calibrate(narrow_board, out, "--routines", "adc", "--tile-size", "4", "--channels", "4")
    assert code == 2, text
    assert "nothing was run" in text and "max_settle_steps" in text
    assert narrow_board.device.topology is None  # not even configured
    assert narrow_board.device.safety().refused == 0
    assert not out.exists() and not (tmp_path / "cal.partial.zarr").exists()


@pytest.mark.parametrize("narrow_board", ["max_settle_steps=8"], indirect=True)
def test_the_settle_step_refusal_names_what_a_cli_user_sets_and_that_it_runs(
    narrow_board: ServedBoard, tmp_path: Path
) -> None:
    """The refusal named `ConverterOptions(steps=...)`, a Python setting no `hil calibrate`
    option reaches. It now gives the --routines list that fits the board (and the Python
    setting, with the value that fits), and that list runs."""
    out = tmp_path / "cal.zarr"
    code, text = _calibrate(narrow_board, out, "--tile-size", "4", "--channels", "4")
    assert code == 2, text
    assert "--routines stuck,gmap,pulse,settle" in text
    assert "ConverterOptions(steps=8)" in text
    assert "ConverterOptions(steps=...)" not in text
    assert not out.exists()
    code, text = _calibrate(
        narrow_board, out, "--routines", "stuck,gmap,pulse,settle", "--tile-size", "4", "--reads", "2"
    )
    assert code == 0, text
    assert narrow_board.device.safety().refused == 0


@pytest.mark.parametrize("narrow_board", ["max_gain=0.5", "max_w_max=0.5"], indirect=True)
def test_a_board_of_a_narrower_gain_or_weight_scale_calibrates_within_it(
    narrow_board: ServedBoard, tmp_path: Path
) -> None:
    """Every routine configured gain 1 and w_max 1: on a board declaring max_gain 0.5 (or
    max_w_max 0.5) no routine ran, the first configure refused naming 'Topology.gain' (or a
    coupling's w_max), which no option sets. The device and settle routines (and the drift
    check) now keep within the board's gain and weight scale; the converter routines, whose
    references need 1, are refused before anything runs, naming the --routines that run."""
    out = tmp_path / "cal.zarr"
    code, text = _calibrate(narrow_board, out, "--tile-size", "4", "--channels", "4")
    assert code == 2, text
    assert "nothing was run" in text and "--routines stuck,gmap,pulse,settle" in text
    assert "Topology.gain" not in text and "scale its weights down" not in text
    assert narrow_board.device.topology is None
    code, text = _calibrate(
        narrow_board, out, "--routines", "stuck,gmap,pulse,settle", "--tile-size", "4", "--reads", "2"
    )
    assert code == 0, text
    uri = narrow_board.uris["serial-socket"]
    r = CliRunner().invoke(app, ["calibrate", uri, "--check", str(out)])
    assert r.exit_code == 0, r.output
    assert narrow_board.device.safety().refused == 0


@pytest.mark.parametrize("narrow_board", ["max_line_current_a=1e-5"], indirect=True)
def test_the_adc_reference_rows_fit_the_boards_line_current_limit(
    narrow_board: ServedBoard, tmp_path: Path
) -> None:
    """The state-ADC routine's reference rows are 8 cells wide (ConverterOptions.ref_width); on
    a board whose line limit holds 5 devices at g_max read at v_read the fourth row's program
    was refused part-way through the routine ('line current of row 0 of B3'), with a hint to
    pass a smaller --tile-size, which does not set the rows' width. The rows are now narrowed
    to what the line limit holds."""
    out = tmp_path / "cal.zarr"
    code, text = _calibrate(narrow_board, out, "--routines", "adc", "--tile-size", "4", "--channels", "16")
    assert code == 0, text
    assert "line current" not in text
    assert narrow_board.device.safety().refused == 0
    assert narrow_board.device.safety().violations == 0
