"""Closed-loop tuning of differential pairs: restore a tile's weights from the state it is in.

A firmware write-verify (`Device.program(verify=True)`) re-writes every device from scratch
to a target conductance, with single reads. On one-sided PCM that is coarse where most
devices of a weight tile live: near RESET the first SET pulses are ~1 uS, a direct write
lands with ~1 uS of noise, and a device above its target must be RESET and climb again.
Tuning works on the pair instead, as the closed-loop tuning of PCM pairs in Ambrogio et al.
(Nature 558, 60 (2018)) and the differential-pair updates of Nandakumar et al. (Front.
Neurosci. 2020): only ``G+ - G-`` matters, so a weight that is too small gets SET pulses on
``G+`` and one that is too large gets SET pulses on ``G-``; an overshoot is corrected by the
partner, not by a RESET. Every correction raises the pair's common mode, where the
exponential PCM step is smaller, so the corrections get finer as they go. Each iteration
reads the tile `reads` times and averages (read noise ~0.15 uS per read on pcm is as large
as the precision wanted); a pair is verified once its averaged difference is within `tol`
and is not pulsed again (inhibited, as in the firmware's verify).

A pair whose device to be raised is near the top of its window has its partner RESET, which
then climbs to the right difference (a target beyond the window is given up on); a device
that does not move for `patience` iterations in a row is given up on (a stuck device, or
one at its own bound). Bidirectional devices split the correction over
both devices of the pair (``+e/2`` on G+, ``-e/2`` on G-).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from drivers.base import Device

# Declared bounds on the work of one tuning (a refresh by `tune_pairs`, and the `probe_steps`
# before it). A tuning of the defaults (40 rounds of 16 averaged reads) ends well within its
# budget on pcm and rram; without a bound, 10**6 rounds with a NaN tolerance pulsed a 2 x 2
# tile for 6 893 rounds (30 320 pulses, 19 s) before the audit stopped it.
# Rounds of one tuning: 5x the default of 40. With the scheme's 32 pulses per device and
# round that caps one refresh at 6 400 pulses per device, about what a whole pulse
# calibration gives an 8 x 8 rram tile (docs/calibration.md); a pair that needs more is
# stuck or out of reach, which the patience rule gives up on long before.
MAX_TUNE_ITERS = 200
# Reads averaged per check: 16x the default of 16. Averaging 256 reads puts a check's noise
# 16x below one read's (0.15 uS on pcm -> ~0.01 uS), a tenth of the default tolerance
# (0.1 uS); more reads buy time, not precision.
MAX_TUNE_READS = 256
# Pulses one device gets in one tuning round: the emulator presets' per-call bound
# (`Limits.max_pulses`, 1000); the schemes pass 32 or the board's lower bound.
MAX_ROUND_PULSES = 1000
# Pulses per device of one step of `probe_steps`: the scheme's per-round bound (32); the probe
# moves every device below 80 % of its window by that many steps, which the tuning then undoes.
MAX_PROBE_PULSES = 32


def check_count(name: str, value: object, lo: int, hi: int, fix: str) -> int:
    """`value` as an int in [lo, hi] (an integer type, not a bool or a float); a ValueError that
    names the parameter, the bound and `fix` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}; {fix}")
    v = int(value)
    if not lo <= v <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {v}; {fix}")
    return v


def check_positive(name: str, value: object, hi: float, fix: str) -> float:
    """`value` as a finite float in (0, hi]; a ValueError that names the parameter, the bound and
    `fix` otherwise (NaN passes a plain ``value <= 0`` test and would never be met)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a finite number in (0, {hi:g}], got {value!r}; {fix}")
    v = float(value)
    if not (math.isfinite(v) and 0.0 < v <= hi):
        raise ValueError(f"{name} must be finite and in (0, {hi:g}], got {v!r}; {fix}")
    return v


# `counts(g, dev)`: expected (real) signed pulse counts that move devices at conductances
# `g` by `dev` siemens, both (2, rows, cols)
CountModel = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass
class TuneResult:
    g: np.ndarray  # (2, rows, cols): the last averaged read (siemens)
    iterations: int  # pulse rounds
    reads: int  # full-tile reads
    pulses: int
    energy_j: float
    time_s: float
    within_tol: float  # fraction of pairs whose last averaged difference is within tol
    residual_max: float  # max |(G+ - G-) - target| at the last read (siemens)
    resets: int  # partners RESET because a device to raise was near the top of its window
    gave_up: int  # pairs given up on (a device that does not move)


def mean_read(device: Device, tile: str, reads: int) -> tuple[np.ndarray, float]:
    """The mean of `reads` reads of a tile, (2, rows, cols) float64, and the read noise of one
    read estimated from their spread (median over the devices; 0 for a single read)."""
    g = np.stack([np.stack(device.read_conductance(tile)).astype(np.float64) for _ in range(reads)])
    noise = float(np.median(g.std(axis=0, ddof=1))) if reads > 1 else 0.0
    return g.mean(axis=0), noise


def tune_pairs(
    device: Device,
    tile: str,
    target: np.ndarray,
    counts: CountModel,
    *,
    one_sided: bool,
    g_min: float,
    g_max: float,
    tol: float,
    reads: int = 8,
    max_iters: int = 40,
    max_pulses: int = 32,
    gain: float = 0.7,
    patience: int = 4,
    ceiling: float = 0.9,
) -> TuneResult:
    """Tune `tile` until ``G+ - G-`` is within `tol` of `target` (siemens, (rows, cols)).

    `counts` is the pulse-response model; `gain` scales the counts it gives (below 1: aim
    short, since a one-sided device cannot step back); a device above
    ``g_min + ceiling (g_max - g_min)`` that must go up RESETs its partner instead.

    Pulse bound: each round gives a device at most `max_pulses` pulses (or one RESET), and
    there are at most `max_iters` rounds: at most ``max_iters * max_pulses`` pulses per device
    in one call (1280 with the defaults). `reads`, `max_iters` and `max_pulses` are refused
    past their declared bounds (`MAX_TUNE_READS`, `MAX_TUNE_ITERS`, `MAX_ROUND_PULSES`), and
    `tol` unless finite and > 0 (a NaN tolerance is never met: every round would run).
    """
    reads = check_count(
        "tune reads", reads, 1, MAX_TUNE_READS, "average at most MAX_TUNE_READS reads per check, at least 1"
    )
    max_iters = check_count(
        "tune max_iters",
        max_iters,
        0,
        MAX_TUNE_ITERS,
        "give the tuning at most MAX_TUNE_ITERS rounds (0: read only)",
    )
    max_pulses = check_count(
        "tune max_pulses",
        max_pulses,
        1,
        MAX_ROUND_PULSES,
        "give a device 1 to MAX_ROUND_PULSES pulses per round",
    )
    patience = check_count(
        "tune patience",
        patience,
        1,
        MAX_TUNE_ITERS,
        "give up on a stalled device after 1 to MAX_TUNE_ITERS rounds",
    )
    tol = check_positive("tune tol", tol, math.inf, "give the tolerance in siemens, e.g. 0.4 % of the range")
    gain = check_positive("tune gain", gain, 1.0, "aim at most the full step the model gives (<= 1)")
    ceiling = check_positive("tune ceiling", ceiling, 1.0, "give the ceiling as a fraction of the window")
    target = np.asarray(target, dtype=np.float64)
    top = g_min + ceiling * (g_max - g_min)
    done = np.zeros(target.shape, bool)
    gave_up = np.zeros(target.shape, bool)
    # per device: rounds in a row it was pulsed, the read before the first of them, and the
    # movement those pulses should have made
    streak = np.zeros((2, *target.shape), np.int32)
    anchor = np.zeros((2, *target.shape))
    expected = np.zeros((2, *target.shape))
    pulses = resets = n_reads = it = 0
    energy = time_s = 0.0
    while True:
        g, noise = mean_read(device, tile, reads)
        n_reads += reads
        # stalled: pulsed `patience` rounds in a row, expected to move well beyond the noise of
        # two averaged reads, and moved less than a fifth of that
        detectable = 6.0 * noise * np.sqrt(2.0 / reads)
        progress = (g - anchor) * np.sign(expected)
        big = np.abs(expected) >= detectable
        stalled = (streak >= patience) & big & (progress < 0.2 * np.abs(expected))
        err = target - (g[0] - g[1])
        done |= np.abs(err) <= tol
        gave_up |= stalled.any(axis=0) & ~done
        need = ~done & ~gave_up
        if it >= max_iters or not need.any():
            break
        it += 1
        if one_sided:
            dev = np.stack([np.maximum(err, 0.0), np.maximum(-err, 0.0)])
        else:
            dev = np.stack([0.5 * err, -0.5 * err])
        dev = np.where(need, dev, 0.0)
        raw = np.nan_to_num(counts(g, dev), posinf=max_pulses, neginf=-max_pulses)
        n = gain * raw
        k = np.where(dev == 0, 0.0, np.where(n >= 0, np.maximum(np.floor(n), 1), np.minimum(np.ceil(n), -1)))
        k = np.clip(k, -max_pulses, max_pulses)
        if one_sided:
            k = np.maximum(k, 0.0)
            # a device to raise is near its top: RESET its partner, which then climbs to the
            # right difference; a partner already near RESET means the target is out of reach
            full = (k > 0) & (g > top)
            partner = full[::-1]
            reach = partner & (g > g_min + 0.05 * (g_max - g_min))
            k = np.where(reach, -1.0, np.where(full, 0.0, k))
            resets += int(reach.sum())
            gave_up |= (full & ~reach[::-1]).any(axis=0)
        counts_i = k.astype(np.int32)
        # gradual pulses (not RESETs): their expected movement, for the stall check
        grad = (counts_i > 0) if one_sided else (counts_i != 0)
        move = np.where(grad, dev * np.minimum(np.abs(k / np.where(raw == 0, 1.0, raw)), 1.0), 0.0)
        same = grad & (streak > 0) & (np.sign(move) == np.sign(expected))
        anchor = np.where(grad & ~same, g, anchor)
        expected = np.where(grad, np.where(same, expected + move, move), 0.0)
        streak = np.where(grad, np.where(same, streak + 1, 1), 0)
        if counts_i.any():
            rep = device.pulse(tile, counts_i[0], counts_i[1])
            pulses += rep.pulses
            energy += rep.energy_j
            time_s += rep.time_s
    err = target - (g[0] - g[1])
    return TuneResult(
        g, it, n_reads, pulses, energy, time_s, float((np.abs(err) <= tol).mean()),
        float(np.abs(err).max()) if err.size else 0.0, resets, int(gave_up.sum()),
    )  # fmt: skip
