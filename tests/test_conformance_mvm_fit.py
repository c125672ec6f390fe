"""`hil conformance`'s aggregate gain and offset fit of the mvm checks (`hil.conformance.mvm._fit`)
on a board whose read-out is mid-tread (a zero code, ``round(y / step) * step``, as real ADCs and
aihwkit's output quantiser): a correct one passes whatever weights its tile holds, and the fit
still catches a gain 20 % off and an offset of three LSBs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from drivers import DeviceInfo, ProgramReport, open_device
from drivers.converters import lsb
from drivers.wrapper import DeviceWrapper
from hil.conformance import run_conformance

EXACT = "emulator://?preset=rram&seed=0&adc_bits=none"
STEP = lsb(8, 8.0)  # an 8-bit read-out over +-4, the emulator's


class MidTread(DeviceWrapper):
    """The exact product through a mid-tread 8-bit read-out over +-4 (declared as 8 bits), times
    `gain` plus `offset`; programs land at `share` of their distance from g_min (a tile whose
    weights read back small; 0: every device at g_min, a tile of zero weights)."""

    def __init__(self, share: float, gain: float = 1.0, offset: float = 0.0) -> None:
        super().__init__(open_device(EXACT))
        self.share, self.gain, self.offset = share, gain, offset

    @property
    def info(self) -> DeviceInfo:
        inner = self.inner.info
        return dataclasses.replace(inner, limits=dataclasses.replace(inner.limits, adc_bits=8))

    def program(self, tile, g_plus, g_minus, **kw) -> ProgramReport:  # type: ignore[no-untyped-def]
        lim = self.inner.info.limits
        low = np.float32(lim.g_min)
        near = [(low + self.share * (g - low)).astype(np.float32) for g in (g_plus, g_minus)]
        return self.inner.program(tile, *near, **kw)

    def mvm(self, tile: str, x: np.ndarray, *, transpose: bool = False) -> np.ndarray:
        y = self.gain * self.inner.mvm(tile, x, transpose=transpose).astype(np.float64) + self.offset
        return (np.clip(np.round(y / STEP), -127, 127) * STEP).astype(np.float32)


def _mvm_checks(board: MidTread) -> dict[str, tuple[str, str]]:
    with board:
        report = run_conformance(board)
    return {c.operation: (c.status, c.got) for c in report.checks if c.operation in ("mvm", "mvm transpose")}


def test_a_correct_mid_tread_board_passes_with_a_tile_near_zero() -> None:
    """Every device at g_min, weights read back near zero: outputs within +-1 LSB, which the ADC
    rounds to -1, 0, 1 steps (the fit over them read a slope of 0.43, a false FAIL; 0.52 on the
    emulator's own mid-tread rram seed 0). Inputs at the rails reach too few LSBs too: the fit
    is not run, and the line says so."""
    checks = _mvm_checks(MidTread(share=0.0))
    for status, got in checks.values():
        assert status == "PASS", got
        assert "aggregate fit not run" in got


def test_small_weights_are_fitted_at_the_rails() -> None:
    """Weights read back an eighth of the test network's: the random inputs' products span under
    10 LSB, the transposed product's inputs at the declared rails (aligned with each output's
    weights, both ways) span more: the fit runs there, and catches a gain 20 % off."""
    status, got = _mvm_checks(MidTread(share=0.12))["mvm transpose"]
    assert status == "PASS" and "with inputs at the rails: fit y =" in got, got
    status, got = _mvm_checks(MidTread(share=0.12, gain=0.8))["mvm transpose"]
    assert status == "FAIL" and "with inputs at the rails" not in got and "gain or offset off" in got, got


@pytest.mark.parametrize(("share", "gain", "offset"), [(0.25, 0.8, 0.0), (1.0, 1.0, 3 * STEP)])
def test_the_fit_catches_a_gain_20_percent_off_and_an_offset_of_three_lsb(
    share: float, gain: float, offset: float
) -> None:
    """Outputs small enough (or an offset small enough) that the per-output tolerance lets each
    pass: the fit fails them. (A gain 20 % off at the full weights fails the per-output
    tolerance first.)"""
    checks = _mvm_checks(MidTread(share=share, gain=gain, offset=offset))
    for status, got in checks.values():
        assert status == "FAIL" and "gain or offset off" in got, got
    assert _mvm_checks(MidTread(share=1.0, gain=0.8))["mvm"][0] == "FAIL"
