"""The converter routines of a calibration session within the work and scale bounds a board
declares (`Limits.max_batch`, `Limits.max_w_max`), through the real framed server over TCP
(the safety audit of 2026-12-07, round 4): a board that declares lower bounds than the
defaults is calibrated in requests it takes, never sent one it refuses."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from calibration import CalibrationError, SessionOptions, run_session
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
