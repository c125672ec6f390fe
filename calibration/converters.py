"""DAC and ADC gain and offset per channel, by loop-back through known conductances: what
the three converter routines share (`ConverterOptions`, and the helpers more than one uses).

A product of two unknown gains (a DAC's and an ADC's) cannot be split by linear
measurements alone, so every bank is referred to something the board holds exactly:

1. state ADC (``adc``, `calibration.adc.measure_adc`): the bias node, a constant 1 that no
   DAC touches, into each node through reference pairs of known conductance;
2. DAC (``dac``, `calibration.dac.measure_dac`): each DAC channel clamped through a 1 x 1
   reference pair into a node whose state ADC step 1 calibrated;
3. mvm ADC (``mvm``, `calibration.mvm.measure_mvm`): `mvm` through a tile of known random
   weights with inputs that the calibrated DAC turns into exact codes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from calibration.record import CalibrationError, ChannelCal
from drivers import Device, SettleBudget

MAX_REF_WIDTH = 1024  # cells of a state-ADC reference row, at most
# the most of each count of the converter routines (each sets how much work a session does, and
# `levels` how often the state-ADC routine writes its reference pairs): 32 to 64 times the defaults
COUNT_BOUNDS = {
    "levels": 4096,
    "repeats": 4096,
    "samples": 1 << 16,
    "reads": 1 << 16,
    "level_reads": 4096,
    "steps": 1 << 16,
}


def check_count(owner: str, name: str, value: object, lo: int, hi: int) -> None:
    """`value` of the option `name` of `owner` is a whole number (not a bool) in [lo, hi];
    else CalibrationError naming it, the bounds and the fix."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise CalibrationError(
            f"{owner}.{name} is {value!r}: give a whole number from {lo} to {hi} (every count of a "
            "calibration session has a bound, so that none can ask for unbounded reads, settles or writes)"
        )


@dataclass(frozen=True)
class ConverterOptions:
    levels: int = 96  # rounds of random reference levels of the state-ADC routine
    repeats: int = 32  # settles per level (one batch)
    samples: int = 1024  # DAC and mvm samples per channel
    reads: int = 1024  # reads that pin down each reference pair of the DAC and mvm routines
    level_reads: int = 32  # reads of each state-ADC reference row at each level
    # cells of a state-ADC reference row: its wires carry the current of them all, and their
    # IR drop grows with the square of the width (0.04 % of the gain at 8 cells of rram,
    # 2 % at 64; calibration.wires)
    ref_width: int = 8
    steps: int = 12  # settle steps per measurement (the node noise reaches its stationary spread)
    seed: int = 0
    # a DAC or state-ADC channel is valid only if its fit pins the gain to `gain_tol` (relative)
    # and the offset to `offset_tol_lsb` converter steps at three standard errors (None: no
    # such requirement); a channel that falls short is marked invalid with the reason, and
    # the apply functions leave it uncorrected: rerun with more levels or samples
    gain_tol: float | None = 0.005
    offset_tol_lsb: float | None = 1.0

    def __post_init__(self) -> None:
        for name, hi in COUNT_BOUNDS.items():
            check_count("ConverterOptions", name, getattr(self, name), 1, hi)
        for name in ("gain_tol", "offset_tol_lsb"):
            tol = getattr(self, name)
            # a NaN passes no `>` test: every channel's fit would count as precise, none invalid
            if tol is not None and (
                isinstance(tol, bool) or not isinstance(tol, int | float) or not 0 < tol < math.inf
            ):
                raise CalibrationError(
                    f"ConverterOptions.{name} is {tol!r}: give a finite number > 0 (a channel whose fit "
                    "does not pin it that closely is marked invalid), or None for no such requirement"
                )
        if not 1 <= self.ref_width <= MAX_REF_WIDTH:
            raise CalibrationError(
                f"ref_width must be 1 to {MAX_REF_WIDTH} cells, got {self.ref_width}: 8 keeps the "
                "reference rows' IR drop under 0.1 % on the rram preset"
            )


def _budget(steps: int) -> SettleBudget:
    # tol 1 ends every settle at its first check, after exactly `steps` steps
    return SettleBudget(max_steps=steps, tol=1.0, dt=0.5, check_every=steps)


def _g_range(device: Device) -> float:
    lim = device.info.limits
    return lim.g_max - lim.g_min


def _empty(n: int, bank: str, step: float, units: str) -> ChannelCal:
    nan = np.full(n, np.nan)
    return ChannelCal(bank, nan.copy(), nan.copy(), nan.copy(), nan.copy(), np.zeros(n, bool), step, units)


def _imprecise(cal: ChannelCal, known: dict[int, str], options: ConverterOptions) -> dict[int, str]:
    """Channels of `cal` (not in `known`) whose fit does not pin the gain to
    `options.gain_tol` or the offset to `options.offset_tol_lsb` at three standard errors
    (few usable samples, a short stretch of the range between rails), with the reason."""
    gain_tol = np.inf if options.gain_tol is None else options.gain_tol
    offset_tol = np.inf if options.offset_tol_lsb is None else options.offset_tol_lsb
    out = {}
    with np.errstate(invalid="ignore"):
        loose = (3 * cal.gain_se > gain_tol * np.abs(cal.gain)) | (3 * cal.offset_se > offset_tol * cal.lsb)
    for ch in np.flatnonzero(np.isfinite(cal.gain) & loose):
        if int(ch) not in known:
            out[int(ch)] = (
                f"the fit pins the gain to +-{300 * cal.gain_se[ch] / abs(cal.gain[ch]):.2f} % and the "
                f"offset to +-{3 * cal.offset_se[ch] / cal.lsb:.2f} LSB (3 standard errors; asked: "
                f"{100 * gain_tol:g} % and {offset_tol:g} LSB): it passes uncorrected; more levels or "
                "samples (`ConverterOptions`, from Python) pin it closer"
            )
    return out
