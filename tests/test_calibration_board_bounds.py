"""The converter routines of a calibration session within the work and scale bounds a board
declares (`Limits.max_batch`, `Limits.max_w_max`), through the real framed server over TCP
(the safety audit of 2026-12-07, round 4): a board that declares lower bounds than the
defaults is calibrated in requests it takes, never sent one it refuses."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from calibration import CalibrationError, SessionOptions, run_session
from calibration.converters import ConverterOptions
from calibration.mvm import _probe_mvm_range
from drivers import Device, open_device
from drivers.emulated import EmulatedDevice
from emulator.server.launch import ServedBoard, serve

SHAPE = (24, 24)


def _narrowed(**bounds: object) -> EmulatedDevice:
    """An emulated rram board whose limits (host's and board's) declare `bounds`."""
    dev = open_device("emulator://?preset=rram&seed=0&wire_resistance=0")
    assert isinstance(dev, EmulatedDevice)
    board = dev.board
    lim = dataclasses.replace(board.limits, **bounds)
    board._limits = (board.preset, lim)
    dev._info = dataclasses.replace(dev._info, limits=lim)
    return dev


@pytest.fixture
def served(request: pytest.FixtureRequest) -> Iterator[tuple[ServedBoard, Device]]:
    s = serve(_narrowed(**request.param), scpi_port=None, scpi_pty=False, framed_pty=False)
    dev = open_device(s.uris["serial-socket"])
    try:
        yield s, dev
    finally:
        dev.close()
        s.close()


@pytest.mark.parametrize(
    "served",
    [{"max_batch": 200}, {"max_w_max": 100.0}, {"max_gain": 1.0}],
    indirect=True,
    ids=["max_batch=200", "max_w_max=100", "max_gain=1"],
)
def test_the_converter_routines_stay_within_the_boards_declared_bounds(
    served: tuple[ServedBoard, Device],
) -> None:
    s, dev = served
    record = run_session(dev, SessionOptions(routines=("mvm",), tile_shapes=(SHAPE,)))
    assert s.device.safety().refused == 0  # the board refused nothing
    mvm = record.converters["mvm"]
    assert mvm.valid.sum() >= SHAPE[0] // 2  # the routine still calibrates
    assert mvm.info["w_max"] <= dev.info.limits.max_w_max


def test_a_max_w_max_too_low_to_clip_the_readout_is_a_calibration_error_naming_the_fix() -> None:
    dev = _narrowed(max_w_max=1.0)
    with pytest.raises(CalibrationError, match=r"max_w_max 1 .*more rows.*--tiles"):
        _probe_mvm_range(dev, (4, 4), dev.info.limits.adc_range[0])
    assert dev.safety().refused == 0


@settings(max_examples=200, deadline=None)
@given(
    value=st.one_of(
        st.none(),
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(-3, 3),
        st.booleans(),
        st.sampled_from([float("nan"), float("inf"), -0.0, 0.0, 5e-324]),
    ),
    name=st.sampled_from(["gain_tol", "offset_tol_lsb"]),
)
def test_a_converter_tolerance_is_none_or_finite_and_positive(value: object, name: str) -> None:
    """The converter routines mark a channel invalid when its fit does not pin the gain to
    `gain_tol` or the offset to `offset_tol_lsb` (``3 se > tol x ...``): a NaN tolerance passes
    no such test, so every channel counted as precise. Accepted exactly when None or a finite
    number > 0; else a CalibrationError naming the option."""
    ok = value is None or (
        not isinstance(value, bool) and isinstance(value, int | float) and 0 < value < math.inf
    )
    try:
        ConverterOptions(**{name: value})  # type: ignore[arg-type]
    except CalibrationError as exc:
        assert not ok, (value, exc)
        assert f"ConverterOptions.{name}" in str(exc)
    else:
        assert ok, value


def test_the_drift_check_fits_a_board_with_tiles_smaller_than_its_read_noise_sample() -> None:
    """The drift check read its read-noise sample from a 16 x 16 tile whatever the board holds:
    a board of 12 x 12 tiles refused it (with a hint to split a layer). Now the sample tile is
    at most the board's tile size."""
    from calibration import drift_check

    dev = open_device("emulator://?preset=rram&seed=0&wire_resistance=0&tile_rows_max=12&tile_cols_max=12")
    record = run_session(dev, SessionOptions(routines=("gmap",), tile_shapes=((12, 12),)))
    report = drift_check(dev, record)
    assert "read_noise" in report.checks
    assert dev.safety().refused == 0


@pytest.mark.parametrize("caps", ["", "&capabilities=mvm,pulse,program_verify"], ids=["settle", "mvm-only"])
def test_the_default_tile_size_past_the_boards_tiles_names_tile_size_and_the_value_that_fits(
    tmp_path, caps: str
) -> None:  # type: ignore[no-untyped-def]
    """`hil calibrate URI --out REC` with no tile option on a board of 32 x 32 tiles: the
    default --tile-size 64 was refused as '--tiles 64x64', an option the user never passed,
    with no value that fits. Now it names --tile-size and the size to pass, and that runs."""
    from typer.testing import CliRunner

    from hil.cli import app

    uri = f"emulator://?preset=rram&seed=0&tile_rows_max=32&tile_cols_max=32{caps}"
    out = tmp_path / "rec.zarr"
    res = CliRunner().invoke(
        app, ["calibrate", uri, "--out", str(out), "--routines", "stuck", "--no-progress"]
    )
    assert res.exit_code == 2
    assert (
        "--tile-size 64: this board's tiles hold at most 32 rows x 32 columns; pass --tile-size 32"
        in res.output
    )
    assert not out.exists()
    args = ["calibrate", uri, "--out", str(out), "--routines", "stuck", "--tile-size", "32", "--no-progress"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
