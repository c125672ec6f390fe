"""Pulse-response measurement of every device of one tile (the data `pulse_fit` fits).

The sequence, on all devices at once:

1. bursts of `SATURATE_BURST` up-pulses (in calls of at most the board's `max_pulses`) until
   the reads stop moving: every device sits at its own upper bound, read `plateau_reads` times
   -> g_hi; a plateau that does not hold within `max_bursts` bursts marks every device of the
   tile invalid (`PulseData.plateau`), rather than fitting a window the devices never reached;
2. one down-pulse: a device that falls most of its window in one pulse is one-sided (PCM: a
   negative count is a RESET, not a gradual step);
3. two-sided: bursts of down-pulses to the lower plateau -> g_lo, a sweep of up-pulse chunks,
   back to the upper plateau, a sweep of down-pulse chunks.
   one-sided: `reset_cycles` RESETs, each read twice -> the RESET level distribution
   (g_lo + |N(0, reset_noise)|, so g_lo and reset_noise follow), then a sweep of up chunks.

A sweep applies `chunks` chunks of n pulses (three single pulses first, which size n so that
the median device crosses its window about five times over its initial step) and reads the
tile after each chunk once (a) and `b_reads` times more (b): the fit regresses the increment
of the b reads on the position from the a read, so that no read's noise appears on both
sides of the regression, and averaging the b reads keeps the read noise of small steps down.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from calibration.measure import Progress, ReadStats, leave_out, no_progress, read_stats
from calibration.routines import ENDURANCE_SHARE, FALLBACK_PULSE_BUDGET, PULSE_BUDGET_MAX  # noqa: F401 (re-exported)
from drivers import Device
from drivers.base import Limits

PILOT = 3
# pulses per device of one saturation burst, and the largest sweep chunk: whatever the board's
# `max_pulses` (a board of small calls gets a burst in several calls, one of large calls no
# more per burst than this), so the plateau test and the worst case do not depend on it
SATURATE_BURST = 1000


class PulseBudgetError(ValueError):
    """The pulse routine's worst case exceeds the session's pulse budget (nothing pulsed)."""


def default_pulse_budget(limits: Limits) -> tuple[int, str]:
    """The pulse budget a session gets unless it sets one, and how it was derived: 1 %
    (ENDURANCE_SHARE) of the pulses per device the board declares its devices endure, within
    [1, PULSE_BUDGET_MAX]; when it declares none, the default routine's worst case on this
    board (`pulse_worst_case` at its `max_pulses`: FALLBACK_PULSE_BUDGET at 1000 or more, less
    on a board of smaller `pulse` calls), and the line says which max_pulses it is taken at."""
    endurance = limits.pulse_endurance
    if endurance is None:
        return pulse_worst_case(limits.max_pulses), (
            "the board declares no device endurance: the default routine's worst case at this board's "
            f"max_pulses {limits.max_pulses}, not a figure of its devices; set --pulse-budget from "
            "their datasheet"
        )
    budget = max(1, min(PULSE_BUDGET_MAX, int(endurance * ENDURANCE_SHARE)))
    capped = " (capped)" if budget == PULSE_BUDGET_MAX else ""
    return (
        budget,
        f"{ENDURANCE_SHARE:.0%} of the {endurance} pulses per device the board's devices endure{capped}",
    )


@dataclass
class Sweep:
    """Reads of a pulse sweep: ``a[k]``, ``b[k]`` are two reads of the state before chunk k
    (``a[K]``, ``b[K]`` after the last), each (K + 1, devices); `chunk` holds n per chunk."""

    sign: int
    chunk: np.ndarray
    a: np.ndarray
    b: np.ndarray
    b_reads: int = 1  # reads averaged into each b


@dataclass
class PulseData:
    """Everything `measure_pulse_response` saw, devices flattened from (2, rows, cols)."""

    shape: tuple[int, int]
    one_sided: bool
    g_lo: np.ndarray
    g_hi: np.ndarray
    g_lo_se: np.ndarray
    g_hi_se: np.ndarray
    up: Sweep
    down: Sweep | None
    reset: np.ndarray | None  # (cycles, devices) RESET levels (mean of two reads), one-sided only
    read_noise: float
    reset_noise: float = float("nan")
    bursts: int = 0
    # one read's noise std (S) against the conductance read (S): (levels, stds), ascending,
    # from the two reads of every sweep point; None: the pooled `read_noise` everywhere
    read_noise_curve: tuple[np.ndarray, np.ndarray] | None = None
    pulses_per_device: int = 0  # pulses every device got (all calls pulse the whole tile)
    plateau: bool = True  # every saturation's plateau held (False: the window was not reached)

    def read_var(self, g: np.ndarray) -> np.ndarray:
        """One read's noise variance at conductances `g` (S): the curve interpolated, held
        flat beyond its ends; the pooled figure without a curve."""
        if self.read_noise_curve is None:
            return np.full(np.shape(g), self.read_noise**2)
        levels, stds = self.read_noise_curve
        return np.interp(g, levels, stds) ** 2


def _read2(device: Device, tile: str, b_reads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """One read (a) and the mean of `b_reads` further reads (b) of every device, flattened."""
    out = []
    for _ in range(1 + b_reads):
        gp, gm = device.read_conductance(tile)
        out.append(np.concatenate((gp.ravel(), gm.ravel())))
    return out[0], np.mean(out[1:], axis=0)


def pulse_worst_case(
    max_pulses: int, *, chunks: int = 200, max_bursts: int = 16, reset_cycles: int = 8
) -> int:
    """The most pulses any one device gets from `measure_pulse_response` on a board whose
    `pulse` call takes at most `max_pulses` per device: every `_saturate` running all its
    `max_bursts` bursts of `SATURATE_BURST`, and every sweep chunk after the `PILOT` single
    pulses sized `max_pulses`, at most `SATURATE_BURST` (devices that barely move). Two-sided
    boards (3 saturations, 1 probe, 2 sweeps) cost more than one-sided ones (1 saturation,
    probe, `reset_cycles` RESETs, 1 sweep). With the defaults and max_pulses 1000 or more:
    3 x 16 x 1000 + 1 + 2 x (3 + 197 x 1000) = 442 007."""
    sweep = min(chunks, PILOT) + max(chunks - PILOT, 0) * min(max_pulses, SATURATE_BURST)
    two_sided = 3 * max_bursts * SATURATE_BURST + 1 + 2 * sweep
    one_sided = max_bursts * SATURATE_BURST + 1 + reset_cycles + sweep
    return max(two_sided, one_sided)


def _pulse_all(device: Device, tile: str, shape: tuple[int, int], count: int, tally: list[int]) -> None:
    """`count` pulses on every device of `tile`; `tally[0]` counts the pulses per device."""
    c = np.full(shape, count, np.int32)
    device.pulse(tile, c, c)
    tally[0] += abs(count)


def _burst(device: Device, tile: str, shape: tuple[int, int], count: int, tally: list[int]) -> None:
    """`count` pulses on every device of `tile`, in calls of at most the board's `max_pulses`."""
    most = device.info.limits.max_pulses
    left = abs(count)
    while left > 0:
        n = min(left, most)
        _pulse_all(device, tile, shape, n if count > 0 else -n, tally)
        left -= n


def _flat(st: ReadStats) -> tuple[np.ndarray, np.ndarray]:
    return st.mean.reshape(-1), st.se.reshape(-1)


def _saturate(
    device: Device,
    tile: str,
    shape: tuple[int, int],
    sign: int,
    reads: int,
    max_bursts: int,
    working: np.ndarray,
    tally: list[int],
) -> tuple[np.ndarray, np.ndarray, int, bool]:
    """Pulse bursts of `SATURATE_BURST` in one direction until the plateau holds; returns
    (mean, se, bursts, held): `held` False when `max_bursts` bursts ended still moving."""
    lim = device.info.limits
    span = lim.g_max - lim.g_min
    prev = None
    bursts = 0
    while True:
        _burst(device, tile, shape, sign * SATURATE_BURST, tally)
        bursts += 1
        mean, se = _flat(read_stats(device, tile, reads))
        if prev is not None:
            tol = max(0.002 * span, 4.0 * float(np.median(se[working])) * np.sqrt(2.0))
            if np.percentile(np.abs(mean - prev)[working], 99) < tol:
                return mean, se, bursts, True
        if bursts >= max_bursts:
            return mean, se, bursts, False
        prev = mean


def _sweep(
    device: Device,
    tile: str,
    shape: tuple[int, int],
    sign: int,
    chunks: int,
    span: float,
    working: np.ndarray,
    progress: Progress,
    stage: str,
    b_reads: int,
    tally: list[int],
) -> Sweep:
    max_pulses = min(device.info.limits.max_pulses, SATURATE_BURST)
    a0, b0 = _read2(device, tile, b_reads)
    a, b, sizes = [a0], [b0], []
    n = 1
    for k in range(chunks):
        if k == PILOT:
            step0 = float(np.median(np.abs(b[PILOT] - b[0])[working])) / PILOT
            n = int(np.clip(round(5.0 * span / max(step0, 1e-30) / chunks), 1, max_pulses))
        _pulse_all(device, tile, shape, sign * n, tally)
        ak, bk = _read2(device, tile, b_reads)
        a.append(ak)
        b.append(bk)
        sizes.append(n)
        progress(stage, k + 1, chunks)
    return Sweep(sign, np.asarray(sizes, np.int64), np.stack(a), np.stack(b), b_reads)


def measure_pulse_response(
    device: Device,
    tile: str,
    shape: tuple[int, int],
    *,
    chunks: int = 200,
    plateau_reads: int = 16,
    reset_cycles: int = 8,
    max_bursts: int = 16,
    b_reads: int = 3,
    stuck: np.ndarray | None = None,
    progress: Progress = no_progress,
    budget: int | None = None,
) -> PulseData:
    """Run the pulse sequence of the module docstring on `tile` (configured by the caller).
    With `budget` (pulses per device), refuse before the first pulse when the sequence's
    worst case (`pulse_worst_case`) exceeds it. `PulseData.pulses_per_device` counts what
    every device got (the same for all: every call pulses the whole tile)."""
    device.require("pulse", instead=leave_out("the pulse-response model", "pulse"))
    lim = device.info.limits
    worst = pulse_worst_case(lim.max_pulses, chunks=chunks, max_bursts=max_bursts, reset_cycles=reset_cycles)
    if budget is not None and worst > budget:
        raise PulseBudgetError(
            f"the pulse routine on {tile!r} may apply up to {worst} pulses per device on this board "
            f"(max_pulses {lim.max_pulses} per call, {chunks} sweep chunks, {max_bursts} bursts per "
            f"plateau), above the session's pulse budget of {budget}: nothing was pulsed. Raise the "
            f"budget (hil calibrate --pulse-budget {worst}, at most {PULSE_BUDGET_MAX}) if the "
            "devices' endurance allows it, or lower the sweep chunks (SessionOptions.pulse_chunks)"
        )
    tally = [0]
    nominal = lim.g_max - lim.g_min
    devices = 2 * shape[0] * shape[1]
    working = np.ones(devices, bool) if stuck is None else ~np.asarray(stuck).reshape(-1)
    if not working.any():
        working = np.ones(devices, bool)
    g_hi, g_hi_se, bursts, held = _saturate(
        device, tile, shape, +1, plateau_reads, max_bursts, working, tally
    )
    progress("pulse", 1, 4)
    _pulse_all(device, tile, shape, -1, tally)
    probe, _ = _read2(device, tile)
    one_sided = float(np.median((g_hi - probe)[working])) > 0.5 * nominal
    diffs = []
    reset = None
    reset_noise = float("nan")
    down = None
    if one_sided:
        levels = []
        for _ in range(reset_cycles):
            _pulse_all(device, tile, shape, -1, tally)
            r1, r2 = _read2(device, tile)
            levels.append(0.5 * (r1 + r2))
            diffs.append(r1 - r2)
        reset = np.stack(levels)
        read_var = float(np.var(np.concatenate(diffs)[np.tile(working, reset_cycles)])) / 2.0
        # a RESET lands at g_lo + |N(0, sigma)|: within-device variance sigma^2 (1 - 2/pi) plus
        # the read noise of a two-read mean
        within = float(np.mean(np.var(reset[:, working], axis=0, ddof=1)))
        reset_noise = float(np.sqrt(max(within - read_var / 2.0, 0.0) / (1.0 - 2.0 / np.pi)))
        g_lo = reset.mean(0) - reset_noise * np.sqrt(2.0 / np.pi)
        g_lo_se = np.sqrt(within / reset_cycles) * np.ones(devices)
        progress("pulse", 2, 4)
        span = float(np.median((g_hi - g_lo)[working]))
        up = _sweep(device, tile, shape, +1, chunks, span, working, progress, "pulse up", b_reads, tally)
    else:
        g_lo, g_lo_se, b2, held2 = _saturate(
            device, tile, shape, -1, plateau_reads, max_bursts, working, tally
        )
        bursts += b2
        held &= held2
        progress("pulse", 2, 4)
        span = float(np.median((g_hi - g_lo)[working]))
        up = _sweep(device, tile, shape, +1, chunks, span, working, progress, "pulse up", b_reads, tally)
        g_hi2, g_hi2_se, b3, held3 = _saturate(
            device, tile, shape, +1, plateau_reads, max_bursts, working, tally
        )
        bursts += b3
        held &= held3
        g_hi = 0.5 * (g_hi + g_hi2)
        g_hi_se = 0.5 * np.sqrt(g_hi_se**2 + g_hi2_se**2)
        progress("pulse", 3, 4)
        down = _sweep(device, tile, shape, -1, chunks, span, working, progress, "pulse down", b_reads, tally)
    # var(a - b) = read_noise^2 (1 + 1 / b_reads)
    variances = [float(np.var(np.concatenate(diffs))) / 2.0] if diffs else []
    for sw in (up, down):
        if sw is not None:
            variances.append(float(np.var((sw.a - sw.b)[:, working])) / (1.0 + 1.0 / sw.b_reads))
    read_noise = float(np.sqrt(np.mean(variances)))
    curve = _read_noise_curve([sw for sw in (up, down) if sw is not None], working)
    progress("pulse", 4, 4)
    return PulseData(
        shape=shape,
        one_sided=one_sided,
        g_lo=g_lo,
        g_hi=g_hi,
        g_lo_se=g_lo_se,
        g_hi_se=g_hi_se,
        up=up,
        down=down,
        reset=reset,
        read_noise=read_noise,
        reset_noise=reset_noise,
        bursts=bursts,
        read_noise_curve=curve,
        pulses_per_device=tally[0],
        plateau=held,
    )


CURVE_BINS = 16  # conductance bins of the read-noise curve (equal counts of sweep points)


def _read_noise_curve(sweeps: list[Sweep], working: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """One read's noise std against the conductance, from ``a - b`` of every sweep point
    (``var(a - b) = sigma^2 (1 + 1 / b_reads)`` at that point's conductance) in
    `CURVE_BINS` bins of equal counts: devices whose read noise depends on their state (PCM)
    are weighted by the noise where each point was read, not by one pooled figure."""
    xs, vs = [], []
    for sw in sweeps:
        x = (0.5 * (sw.a + sw.b))[:, working].ravel()
        v = ((sw.a - sw.b)[:, working].ravel() ** 2) / (1.0 + 1.0 / sw.b_reads)
        ok = np.isfinite(x) & np.isfinite(v)
        xs.append(x[ok])
        vs.append(v[ok])
    x, v = np.concatenate(xs), np.concatenate(vs)
    if x.size < 10 * CURVE_BINS:
        return None
    order = np.argsort(x, kind="stable")
    parts = np.array_split(order, CURVE_BINS)
    levels = np.array([float(np.mean(x[i])) for i in parts])
    stds = np.array([float(np.sqrt(np.mean(v[i]))) for i in parts])
    return levels, stds
