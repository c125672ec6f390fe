"""Measurement helpers shared by the routines: averaged conductance reads, per-channel line fits,
and node-channel layouts of calibration topologies.

The channel convention of a board (see `calibration.apply.channel_offsets`): node k of the
configured topology, counting the groups in their declared order, uses DAC channel k and
state-ADC channel k. A calibration topology therefore places a group on a chosen channel by
putting uncoupled "pad" groups in front of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from drivers import Coupling, Device, SettleBudget, Topology
from drivers.base import Limits
from drivers.batches import mvm_in_chunks, settle_in_chunks, settle_samples
from drivers.checks import require_topology

Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``: called by the routines as they advance."""


def leave_out(what: str, routines: str) -> str:
    """The `instead` hint of a routine's `Device.require`: calibration's way round a missing
    capability is to run the session without the routines that need it (not the host stack's)."""
    return (
        f"calibrate without {what}: leave {routines} out of SessionOptions(routines=...) "
        f"or `hil calibrate --routines ...`"
    )


SETTLE_ROUTINES = "adc, dac, mvm (it needs dac) and settle"
"""The routines that settle the board (the converter routines read states through a settle)."""


def no_progress(stage: str, done: int, total: int) -> None:
    """The default progress callback: says nothing."""


def batch_size(device: Device) -> int:
    """The most samples one request may carry on `device` (`Limits.max_batch`)."""
    return int(device.info.limits.max_batch)


def mvm_batched(device: Device, tile: str, x: np.ndarray, *, transpose: bool = False) -> np.ndarray:
    """``device.mvm(tile, x)`` in requests of at most the board's `Limits.max_batch` samples
    (one request where it fits): a routine's sample count is a measurement setting, not a
    request the board must take whole."""
    return mvm_in_chunks(device, tile, x, transpose=transpose, most=batch_size(device))


def settle_states(
    device: Device, clamp: dict[str, np.ndarray], init: dict[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """The states of ``device.settle(clamp, init=init)`` on its configured topology, settled in
    requests of at most the samples one settle may carry (`drivers.batches.settle_samples`:
    the board's `Limits.max_batch`, and `MAX_SETTLE_VALUES` states in a reply, as training
    chunks its settles; one request where it fits), joined again."""
    most = settle_samples(device.info.limits, require_topology(device.topology))
    return settle_in_chunks(device.settle, clamp, None, init, False, most).states


@dataclass
class ReadStats:
    """Per-device statistics of repeated reads of one tile, shape (2, rows, cols) (0: G+, 1: G-)."""

    mean: np.ndarray  # float64, siemens
    std: np.ndarray  # float64, sample std (ddof 1; 0 for a single read)
    reads: int

    @property
    def se(self) -> np.ndarray:
        """Standard error of the mean per device."""
        return self.std / np.sqrt(self.reads)


def read_stats(device: Device, tile: str, reads: int) -> ReadStats:
    """Read every device of `tile` `reads` times (Welford's running mean and variance)."""
    if reads < 1:
        raise ValueError(f"reads must be >= 1, got {reads}")
    gp, gm = device.read_conductance(tile)
    # one float64 buffer per quantity, reused by every read (the per-read work of an emulated
    # board's small tiles is mostly numpy's own overhead): the same operations as
    # ``delta = g - mean; mean += delta / k; m2 += delta * (g - mean)``, the same numbers
    g = np.empty((2, *np.shape(gp)), np.float64)
    g[0], g[1] = gp, gm
    mean = g.copy()
    m2 = np.zeros_like(g)
    delta, step = np.empty_like(g), np.empty_like(g)
    for k in range(2, reads + 1):
        gp, gm = device.read_conductance(tile)
        g[0], g[1] = gp, gm
        np.subtract(g, mean, out=delta)
        mean += np.divide(delta, k, out=step)
        m2 += np.multiply(delta, np.subtract(g, mean, out=step), out=step)
    std = np.sqrt(m2 / (reads - 1)) if reads > 1 else np.zeros_like(mean)
    return ReadStats(mean, std, reads)


def pair_weights(stats: ReadStats, g_range: float, w_max: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Weights ``w_max (G+ - G-) / g_range`` from averaged reads, and their standard errors."""
    w = w_max * (stats.mean[0] - stats.mean[1]) / g_range
    se = w_max * np.sqrt(stats.se[0] ** 2 + stats.se[1] ** 2) / g_range
    return w, se


@dataclass
class LineFit:
    """Per-column least-squares lines ``y = slope x + intercept``; NaN where a column has < 3 points."""

    slope: np.ndarray
    intercept: np.ndarray
    slope_se: np.ndarray
    intercept_se: np.ndarray
    resid_std: np.ndarray
    n: np.ndarray


def fit_lines(x: np.ndarray, y: np.ndarray, mask: np.ndarray) -> LineFit:
    """Fit one line per column of (samples, columns) arrays, using the points where `mask` holds."""
    m = mask.astype(np.float64)
    x = np.where(mask, x, 0.0).astype(np.float64)
    y = np.where(mask, y, 0.0).astype(np.float64)
    n = m.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mx = (m * x).sum(0) / n
        my = (m * y).sum(0) / n
        dx = np.where(mask, x - mx, 0.0)
        dy = np.where(mask, y - my, 0.0)
        sxx = (dx * dx).sum(0)
        slope = (dx * dy).sum(0) / sxx
        intercept = my - slope * mx
        resid = np.where(mask, y - slope * x - intercept, 0.0)
        var = (resid * resid).sum(0) / (n - 2)
        slope_se = np.sqrt(var / sxx)
        intercept_se = np.sqrt(var * (1.0 / n + mx * mx / sxx))
    bad = n < 3
    out = [slope, intercept, slope_se, intercept_se, np.sqrt(var)]
    for a in out:
        a[bad] = np.nan
    return LineFit(*out, n=n.astype(np.int64))


def place_groups(spans: dict[str, tuple[int, int]], total: int | None = None) -> dict[str, int]:
    """Order groups so that each lands on its node channels: `spans` maps a group to (first
    channel, size). Gaps become uncoupled pad groups ``_pad0``, ``_pad1``, ... (nodes that
    settle to 0 and are never read); `total`, if given, pads up to that many channels."""
    order = sorted(spans.items(), key=lambda item: item[1][0])
    groups: dict[str, int] = {}
    cursor = 0
    for name, (start, size) in order:
        if start < cursor:
            raise ValueError(f"group {name!r} at channel {start} overlaps the previous group")
        if start > cursor:
            groups[f"_pad{len(groups)}"] = start - cursor
        groups[name] = size
        cursor = start + size
    if total is not None and total > cursor:
        groups[f"_pad{len(groups)}"] = total - cursor
    return groups


def runs(channels: np.ndarray, max_len: int) -> list[tuple[int, int]]:
    """Split sorted distinct channel indices into contiguous runs (start, length) of <= max_len."""
    out: list[tuple[int, int]] = []
    for c in np.asarray(channels, dtype=np.int64).tolist():
        if out and out[-1][0] + out[-1][1] == c and out[-1][1] < max_len:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((c, 1))
    return out


def board_budget(device: Device, budget: SettleBudget | None = None) -> SettleBudget:
    """`budget` (default: `SettleBudget()`, 100 steps) with at most the steps the board declares
    (`Limits.max_settle_steps`): the budget of a routine's topology that does not settle, or
    settles under the host's default budget. A board that declares fewer steps than the
    default refused the configure of the mvm, stuck, gmap, pulse and settle routines, after the
    minutes the routines before them took."""
    return (budget or SettleBudget()).capped(device.info.limits.max_settle_steps)


def board_scales(limits: Limits | None) -> tuple[float, float]:
    """The gain and coupling w_max of a routine's topology whose measurement does not depend on
    them (the device routines read and pulse conductances; the settle profile times the
    board's own settles): 1 and 1, or the board's `max_gain` and `max_w_max` where it declares
    less. A board of a narrower scale refused every routine's configure ('give the topology a
    gain of at most 0.5 (Topology.gain)'), something no `hil calibrate` option sets."""
    if limits is None:
        return 1.0, 1.0
    return limits.unit_scales


def tile_topology(
    shapes: list[tuple[int, int]], budget: SettleBudget | None = None, limits: Limits | None = None
) -> Topology:
    """Tiles ``T0, T1, ...`` of the given shapes at positions 0, 1, ..., each coupling its own
    row group ``r<k>`` to its own column group ``c<k>``: the layout of the device routines
    (a physical tile is its position and its shape). `budget`: the topology's settle budget
    (the routines that use it do not settle; `board_budget` fits it to the board); `limits`:
    the board's, whose gain and weight scale it keeps within (`board_scales`)."""
    groups: dict[str, int] = {}
    for k, (rows, cols) in enumerate(shapes):
        groups[f"r{k}"] = rows
        groups[f"c{k}"] = cols
    gain, w_max = board_scales(limits)
    couplings = tuple(Coupling(f"T{k}", (f"r{k}",), (f"c{k}",), w_max=w_max) for k in range(len(shapes)))
    return Topology(groups, couplings, budget=budget or SettleBudget(), gain=gain)


@dataclass
class CrosstalkFit:
    """Per-column fits ``y = a x + b + c x (z - mean z)`` (the line of `fit_lines` with a term
    for how the slope moves with `z`); NaN where a column has < 4 points or no spread in z."""

    slope: np.ndarray  # a
    cross: np.ndarray  # c
    cross_se: np.ndarray
    z_mean: np.ndarray


def fit_crosstalk(x: np.ndarray, z: np.ndarray, y: np.ndarray, mask: np.ndarray) -> CrosstalkFit:
    """Fit `CrosstalkFit` per column of (samples, columns) arrays where `mask` holds."""
    m = mask.astype(np.float64)
    n = m.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        zm = (m * np.where(mask, z, 0.0)).sum(0) / n
        cols = [np.ones_like(m), np.where(mask, x, 0.0), np.where(mask, x * (z - zm), 0.0)]
        design = np.stack(cols, -1) * m[..., None]  # (samples, columns, 3)
        yy = np.where(mask, y, 0.0)
        xtx = np.einsum("sci,scj->cij", design, design)
        xty = np.einsum("sci,sc->ci", design, yy)
        ok = (n >= 4) & (np.abs(np.linalg.det(xtx)) > 1e-300)
        eye = np.eye(3)
        inv = np.linalg.inv(np.where(ok[:, None, None], xtx, eye))
        beta = np.einsum("cij,cj->ci", inv, xty)
        resid = yy - np.einsum("sci,ci->sc", design, beta)
        var = (resid * resid * m).sum(0) / (n - 3)
        se = np.sqrt(var * inv[:, 2, 2])
    out = [beta[:, 1].copy(), beta[:, 2].copy(), se, zm]
    for a in out:
        a[~ok] = np.nan
    return CrosstalkFit(*out)
