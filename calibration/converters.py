"""DAC and ADC gain and offset per channel, by loop-back through known conductances.

A product of two unknown gains (a DAC's and an ADC's) cannot be split by linear
measurements alone, so every bank is referred to something the board holds exactly:

1. state ADC (``adc``): the bias node is a constant 1 that no DAC touches. 1 x n tiles
   (n = `ConverterOptions.ref_width`, 8: short rows, little IR drop in their wires)
   couple it into nodes 0..n-1 through conductance pairs known from averaged reads, so at
   activation gain 1 node j settles at ``s_j = W_bj`` (kept inside the linear region, away
   from the rails where the activation would rectify the node noise). State-ADC channel j
   reads it; the pairs are reprogrammed to random levels round after round, and a line fit
   of mean reading against ``s_j`` gives gain and offset. The node and read noise dither
   the ADC, so the fit resolves fractions of an LSB. Every other round raises both devices
   of every pair alike (the same weights, more current in the row): how a channel's slope
   moves with its row's current is the wires' share of it, which is corrected to first
   order (pooled over the channels at the same place in their rows) up to `IR_CORRECT_MAX`
   and marked "ir_drop" beyond.
2. DAC (``dac``): each DAC channel is clamped through its own 1 x 1 tile (a single known
   conductance pair: no other line feeds the node, so the offsets of idle channels cannot
   leak in) into a node whose state ADC step 1 calibrated. Random requests in the middle
   of the range average the DAC's own quantisation out of the fit.
3. mvm ADC (``mvm``): `mvm` through a tile of known random weights with inputs that the
   calibrated DAC turns into exact codes, at two line loads (the same weights on devices
   set higher); the wire resistance is the one whose modelled effective weights
   (`calibration.wires`) make the two loads agree, and output j is fitted against
   ``d @ W_eff``. A channel the model does not explain is marked "ir_drop".

Stuck devices in a reference pair are recognised from the reads (|W| too small) and the
channel is measured again through another physical tile. A channel that no working
reference reaches is returned with ``valid`` False.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from calibration.measure import (
    SETTLE_ROUTINES,
    CrosstalkFit,
    LineFit,
    Progress,
    ReadStats,
    fit_crosstalk,
    fit_lines,
    leave_out,
    lsb,
    no_progress,
    pair_weights,
    place_groups,
    read_stats,
    runs,
)
from calibration.record import CalibrationError, ChannelCal
from calibration.wires import MAX_OHMS, effective_weights
from drivers import BIAS, Coupling, Device, SettleBudget, Topology, seeds

REF_HIGH = 0.8  # reference pair: G+ at g_min + REF_HIGH * range, G- at g_min
REF_MIN_W = 0.3  # a reference pair weaker than this has a stuck device; use another tile
TILES_PER_DAC_PASS = 16  # 1 x 1 reference tiles per DAC pass (each is read `reads` times)
ADC_LOAD_SHIFT = 0.3  # state-ADC routine: every other round raises both devices of a pair by this
MAX_REF_WIDTH = 1024  # cells of a state-ADC reference row, at most
IR_CORRECT_MAX = 0.02  # a state-ADC reference row's IR drop corrected to first order up to this share


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


def _program_pairs(device: Device, tile: str, shape: tuple[int, int], high: float) -> None:
    lim = device.info.limits
    gp = np.full(shape, lim.g_min + high * _g_range(device), np.float32)
    gm = np.full(shape, lim.g_min, np.float32)
    device.program(tile, gp, gm)


def _empty(n: int, bank: str, step: float, units: str) -> ChannelCal:
    nan = np.full(n, np.nan)
    return ChannelCal(bank, nan.copy(), nan.copy(), nan.copy(), nan.copy(), np.zeros(n, bool), step, units)


# ------------------------------------------------------------------------------ state ADC


def measure_adc(
    device: Device, channels: np.ndarray, options: ConverterOptions, progress: Progress = no_progress
) -> ChannelCal:
    """State-ADC gain and offset of the node `channels` (sorted, distinct); arrays cover
    0..max(channels), channels not asked for are NaN and invalid.

    Each of `options.levels` rounds programs every channel's reference pair to a random
    weight in the state range, reads it `options.level_reads` times and settles
    `options.repeats` times at activation gain 1; one round gives one point per channel (the
    mean reading against the read weight). The activation gain stays at 1 so that the node
    noise keeps dithering the ADC at every level, and the random levels make what dithering
    cannot remove (the ADC's staircase) look like noise to the fit rather than a bias.

    The reference rows are `options.ref_width` cells wide, so that their wires carry little
    current (IR drop, `calibration.wires`, grows with the square of a row's length); every
    other round raises both devices of every pair by `ADC_LOAD_SHIFT` of the range (the
    weights stay, the row's current rises), and a channel whose gain moves with its row's
    current (`fit_crosstalk`) by more than the tolerance allows is invalid ("ir_drop")."""
    device.require("settle", instead=leave_out("the routines that settle", SETTLE_ROUTINES))
    lim = device.info.limits
    lo, hi = lim.adc_range
    span = hi - lo
    channels = np.unique(np.asarray(channels, dtype=np.int64))
    size = int(channels[-1]) + 1
    out = _empty(size, "adc", lsb(lim.adc_bits, span), "state (1.0 = v_read)")
    blocks = runs(channels, min(options.ref_width, lim.tile_cols_max))
    per_pass = max(1, lim.max_tiles - 3)  # room for the retries' dummy couplings
    s_lo, s_hi = max(lo, 0.0) + 0.04 * span, min(hi, 1.0) - 0.06 * span
    s_hi_loaded = min(s_hi, 0.97 - ADC_LOAD_SHIFT)
    end = int(channels[-1]) + 1
    rng = seeds.numpy_rng(options.seed, "calibration.adc")
    g_min, g_range = lim.g_min, _g_range(device)
    xs = np.full((options.levels, size), np.nan)
    ys = np.full((options.levels, size), np.nan)
    loads = np.full((options.levels, size), np.nan)
    attempt_of = np.full(size, -1)
    todo = np.zeros(size, bool)
    todo[channels] = True
    steps = 0
    for attempt in range(3):
        if not todo.any():
            break
        w_ref = np.full((options.levels, size), np.nan)
        r_mean = np.full((options.levels, size), np.nan)
        load = np.full((options.levels, size), np.nan)
        passes = [blocks[i : i + per_pass] for i in range(0, len(blocks), per_pass)]
        passes = [p for p in passes if any(todo[s : s + n].any() for s, n in p)]
        for chunk in passes:
            # Attempt a > 0 puts `a` dummy couplings first, so each block lands on other physical tiles.
            spans = {f"y{k}": (start, n) for k, (start, n) in enumerate(chunk)}
            spans["_z"] = (end, 1)
            for a in range(attempt):
                spans[f"_d{a}"] = (end + 1 + a, 1)
            couplings = tuple(Coupling(f"_D{a}", (BIAS,), (f"_d{a}",)) for a in range(attempt)) + tuple(
                Coupling(f"B{k}", (BIAS,), (f"y{k}",)) for k in range(len(chunk))
            )
            device.configure(Topology(place_groups(spans), couplings, budget=_budget(options.steps)))
            batch = options.repeats
            for k in range(options.levels):
                shift = ADC_LOAD_SHIFT * g_range * (k % 2)
                init = {}
                for b, (start, n) in enumerate(chunk):
                    target = rng.uniform(s_lo, s_hi_loaded if k % 2 else s_hi, n)
                    gp = (g_min + shift + target * g_range).astype(np.float32)[None, :]
                    device.program(f"B{b}", gp, np.full_like(gp, g_min + shift))
                    stats = read_stats(device, f"B{b}", options.level_reads)
                    w, _ = pair_weights(stats, g_range)
                    w_ref[k, start : start + n] = w[0]
                    cell = (stats.mean[0, 0] + stats.mean[1, 0]) / g_range
                    load[k, start : start + n] = cell.sum() - cell  # the rest of the row
                    init[f"y{b}"] = np.tile(np.clip(np.nan_to_num(w[0]), 0, 1), (batch, 1)).astype(np.float32)
                eq = device.settle({"_z": np.zeros((batch, 1), np.float32)}, init=init)
                for b, (start, n) in enumerate(chunk):
                    r = eq.states[f"y{b}"].astype(np.float64)
                    rail = (r <= lo + 0.5 * out.lsb) | (r >= hi - 0.5 * out.lsb)
                    # a level with a reading on a rail is clipped: its mean would be biased
                    r_mean[k, start : start + n] = np.where(rail.any(0), np.nan, r.mean(0))
                steps += 1
                progress("adc", steps, options.levels * len(passes))
        inside = (w_ref >= s_lo - 0.02 * span) & (w_ref <= s_hi + 0.02 * span) & np.isfinite(r_mean)
        # a reference with a stuck device does not follow the random targets
        spread = np.zeros(size)
        seen = np.isfinite(w_ref).sum(0) > 1
        spread[seen] = np.nanstd(w_ref[:, seen], axis=0)
        usable = todo & (inside.sum(0) >= max(4, options.levels // 2)) & (spread > 0.1 * span)
        xs[:, usable] = np.where(inside[:, usable], w_ref[:, usable], np.nan)
        ys[:, usable] = np.where(inside[:, usable], r_mean[:, usable], np.nan)
        loads[:, usable] = load[:, usable]
        attempt_of[usable] = attempt
        todo &= ~usable
    mask = np.isfinite(xs) & np.isfinite(ys)
    fit = fit_lines(xs, ys, mask)
    out.gain = fit.slope
    out.offset = fit.intercept
    out.gain_se = fit.slope_se
    out.offset_se = fit.intercept_se
    cross = fit_crosstalk(xs, loads, ys, mask & np.isfinite(loads))
    share, share_se = _pooled_ir_share(cross, fit.slope, channels, blocks)
    reasons = {}
    with np.errstate(invalid="ignore"):
        # first order in the wires' effect: the gain at no line current is the fitted one
        # raised by the share the row's mean load takes
        out.gain = fit.slope * (1.0 + share)
        out.gain_se = np.hypot(fit.slope_se, fit.slope * share_se)
        too_large = np.abs(share) > IR_CORRECT_MAX
    for ch in np.flatnonzero(too_large):
        reasons[int(ch)] = (
            f"ir_drop: the reading moves with the current of the rest of its reference row (IR drop "
            f"in the wires: {100 * share[ch]:.2f} +- {100 * share_se[ch]:.2f} % of the gain, over the "
            f"{100 * IR_CORRECT_MAX:g} % a first-order correction takes): measure with narrower "
            "reference rows (ConverterOptions.ref_width)"
        )
    for ch, why in _imprecise(out, reasons, options).items():
        if abs(fit.slope[ch]) * share_se[ch] > fit.slope_se[ch]:
            # the uncertainty is the IR correction's more than the fit's own
            why = (
                f"ir_drop: the correction for the wires' IR drop ({100 * share[ch]:.2f} +- "
                f"{100 * share_se[ch]:.2f} % of the gain) leaves it too uncertain ({why}); measure "
                "with narrower reference rows (ConverterOptions.ref_width)"
            )
        reasons[ch] = why
    for ch in reasons:
        out.gain[ch] = out.offset[ch] = np.nan
    out.valid = np.isfinite(out.gain)
    out.raw = {
        "reference_w": xs.astype(np.float32),
        "reading_mean": ys.astype(np.float32),
        "row_load": loads.astype(np.float32),
        "ir_drop": share.astype(np.float32),
        "ir_drop_se": share_se.astype(np.float32),
        "attempt": attempt_of,
    }
    out.info = {
        "method": "bias node through 1 x n reference rows at random weights, activation gain 1",
        "levels": options.levels,
        "repeats": options.repeats,
        "reads": options.level_reads,
        "ref_width": options.ref_width,
        "state_range": [s_lo, s_hi],
        "resid_std_median": float(np.nanmedian(fit.resid_std)),
        "ir_drop_median": float(np.nanmedian(share)) if np.isfinite(share).any() else float("nan"),
        "invalid": {str(ch): why for ch, why in reasons.items()},
    }
    return out


def _pooled_ir_share(
    cross: CrosstalkFit, gain: np.ndarray, channels: np.ndarray, blocks: list[tuple[int, int]]
) -> tuple[np.ndarray, np.ndarray]:
    """Per channel, the share of its gain the wires of its reference row take at the row's mean
    load, and its standard error (0 where not measured).

    A channel's own fit of how its slope moves with the rest of the row's current is noisy (it
    is one term more of the same data); rows of the same width share their geometry and
    wires, so the relative slope change per unit of load is pooled (inverse-variance mean)
    over the channels at the same position of rows of the same width, and each channel's
    share is that times its own mean load."""
    size = gain.shape[0]
    share = np.zeros(size)
    share_se = np.zeros(size)
    with np.errstate(invalid="ignore", divide="ignore"):
        kappa = -cross.cross / gain
        kappa_se = cross.cross_se / np.abs(gain)
    width_of = np.zeros(size, np.int64)
    pos_of = np.zeros(size, np.int64)
    for start, n in blocks:
        width_of[start : start + n] = n
        pos_of[start : start + n] = np.arange(n)
    ok = np.isfinite(kappa) & np.isfinite(kappa_se) & (kappa_se > 0)
    for n in np.unique(width_of[channels]):
        for p in range(int(n)):
            members = channels[(width_of[channels] == n) & (pos_of[channels] == p)]
            use = members[ok[members]]
            if use.size == 0:
                continue
            wts = 1.0 / kappa_se[use] ** 2
            k = float((wts * kappa[use]).sum() / wts.sum())
            k_se = float(1.0 / np.sqrt(wts.sum()))
            load = np.nan_to_num(cross.z_mean[members])
            share[members] = k * load
            share_se[members] = k_se * load
    return share, share_se


# ------------------------------------------------------------------------------ DAC


def _readout_channels(adc: ChannelCal, block: np.ndarray, n: int) -> np.ndarray:
    """`n` calibrated state-ADC channels outside `block`, nearest to it."""
    cand = np.flatnonzero(adc.valid)
    cand = cand[~np.isin(cand, block)]
    if cand.size < n:
        invalid = adc.info.get("invalid", {})
        why = f" ({len(invalid)} are invalid, e.g. {next(iter(invalid.values()))})" if invalid else ""
        raise CalibrationError(
            f"the DAC routine needs {n} calibrated state-ADC channels beside the block "
            f"{int(block[0])}..{int(block[-1])}; the ADC calibration has {cand.size}{why}: "
            "calibrate more ADC channels"
        )
    centre = 0.5 * (block[0] + block[-1])
    return np.sort(cand[np.argsort(np.abs(cand - centre), kind="stable")[:n]])


def measure_dac(
    device: Device,
    channels: np.ndarray,
    adc: ChannelCal,
    options: ConverterOptions,
    progress: Progress = no_progress,
) -> ChannelCal:
    """DAC gain and offset of the node `channels`, read through the calibrated state ADC."""
    device.require("settle", instead=leave_out("the routines that settle", SETTLE_ROUTINES))
    lim = device.info.limits
    lo, hi = lim.adc_range
    span = hi - lo
    channels = np.unique(np.asarray(channels, dtype=np.int64))
    size = int(channels[-1]) + 1
    out = _empty(size, "dac", lsb(lim.dac_bits, span), "state (1.0 = v_read)")
    n_tiles = min(TILES_PER_DAC_PASS, lim.max_tiles, channels.size)
    rng = seeds.numpy_rng(options.seed, "calibration.dac")
    x_lo, x_hi = lo + 0.03 * span, lo + 0.95 * span
    w_tile = np.full(n_tiles, np.nan)
    w_tile_se = np.full(n_tiles, np.nan)
    tile_of = np.full(size, -1)
    readout = np.full(size, -1)
    d_se_rel = np.full(size, np.nan)
    d_off_se = np.full(size, np.nan)

    def sweep(
        chans: np.ndarray, r_lo: np.ndarray, r_hi: np.ndarray, stage: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """Requests uniform in [r_lo, r_hi] per channel through each channel's reference tile:
        (requests, estimated outputs), (samples, size), NaN where not measured or unusable."""
        xs = np.full((options.samples, size), np.nan)
        ds = np.full((options.samples, size), np.nan)
        blocks = [chans[i : i + n_tiles] for i in range(0, chans.size, n_tiles)]
        for b, block in enumerate(blocks):
            n = block.size
            rd = _readout_channels(adc, block, n)
            todo = np.ones(n, bool)
            for shift in range(min(3, n)):
                if not todo.any():
                    break
                # position p carries local channel i = (p - shift) mod n: each retry moves a
                # channel onto another physical 1 x 1 tile
                local = [(p - shift) % n for p in range(n)]
                spans = {f"x{i}": (int(block[i]), 1) for i in range(n)}
                spans.update({f"y{i}": (int(rd[i]), 1) for i in range(n)})
                couplings = tuple(Coupling(f"P{p}", (f"x{local[p]}",), (f"y{local[p]}",)) for p in range(n))
                topo = Topology(place_groups(spans), couplings, budget=_budget(options.steps))
                device.configure(topo)
                for p in range(n):
                    if np.isnan(w_tile[p]):
                        _program_pairs(device, f"P{p}", (1, 1), REF_HIGH)
                        w, se = pair_weights(read_stats(device, f"P{p}", options.reads), _g_range(device))
                        w_tile[p], w_tile_se[p] = float(w[0, 0]), float(se[0, 0])
                pos = np.array([(i + shift) % n for i in range(n)])
                usable = todo & (w_tile[pos] >= REF_MIN_W)
                if not usable.any():
                    continue
                w_i = w_tile[pos]
                gamma = 0.85 / float(np.median(w_tile[:n][w_tile[:n] >= REF_MIN_W]))
                device.configure(replace(topo, gain=gamma))
                x = rng.uniform(r_lo[block], r_hi[block], (options.samples, n)).astype(np.float32)
                clamp = {f"x{i}": x[:, i : i + 1] for i in range(n)}
                init = {
                    f"y{i}": np.clip(gamma * np.nan_to_num(w_i[i]) * x[:, i : i + 1], 0, 1).astype(np.float32)
                    for i in range(n)
                }
                eq = device.settle(clamp, init=init)
                for i in np.flatnonzero(usable):
                    ch, rch = int(block[i]), int(rd[i])
                    r = eq.states[f"y{i}"][:, 0].astype(np.float64)
                    s_hat = (r - adc.offset[rch]) / adc.gain[rch]
                    d_hat = s_hat / (gamma * w_i[i])
                    pred = gamma * w_i[i] * x[:, i]
                    ok = (r > lo + 0.5 * adc.lsb) & (r < hi - 0.5 * adc.lsb) & (pred > 0.015) & (pred < 0.95)
                    xs[:, ch] = np.where(ok, x[:, i], np.nan)
                    ds[:, ch] = np.where(ok, d_hat, np.nan)
                    tile_of[ch], readout[ch] = pos[i], rch
                    d_se_rel[ch] = np.hypot(w_tile_se[pos[i]] / w_i[i], adc.gain_se[rch] / adc.gain[rch])
                    d_off_se[ch] = adc.offset_se[rch] / (adc.gain[rch] * gamma * w_i[i])
                todo &= ~usable
            progress(stage, b + 1, len(blocks))
        return xs, ds

    xs, ds = sweep(channels, np.full(size, x_lo), np.full(size, x_hi), "dac")
    # channels that reach a rail within the request range: measured again with requests only
    # where their first line says the output stays off the rails, so that their fit has as
    # many samples as the others'
    first, used, _ = _fit_unsaturated(xs, ds, (lo, hi), out.lsb)
    margin = 3 * out.lsb
    with np.errstate(invalid="ignore", divide="ignore"):
        ends = np.sort(np.stack(((lo + margin - first.intercept) / first.slope,
                                 (hi - margin - first.intercept) / first.slope)), axis=0)  # fmt: skip
        r_lo, r_hi = np.maximum(ends[0], x_lo), np.minimum(ends[1], x_hi)
        again = (used < np.isfinite(xs).sum(0)) & (r_hi - r_lo >= 0.1 * span)
    if again.any():
        xs2, ds2 = sweep(np.flatnonzero(again), r_lo, r_hi, "dac (rails)")
        xs, ds = np.concatenate((xs, xs2)), np.concatenate((ds, ds2))
    fit, used, reasons = _fit_unsaturated(xs, ds, (lo, hi), out.lsb)
    out.gain = fit.slope
    out.offset = fit.intercept
    out.gain_se = np.sqrt(fit.slope_se**2 + (fit.slope * d_se_rel) ** 2)
    out.offset_se = np.sqrt(fit.intercept_se**2 + d_off_se**2)
    out.valid = np.isfinite(fit.slope)
    reasons.update(_imprecise(out, reasons, options))
    for ch in reasons:
        out.valid[ch] = False
        out.gain[ch] = out.offset[ch] = np.nan
    measured = np.isfinite(xs).sum(0)
    out.raw = {
        "reference_w": w_tile,
        "reference_w_se": w_tile_se,
        "reference_tile": tile_of,
        "readout_channel": readout,
        "request": xs.astype(np.float32),
        "output": ds.astype(np.float32),
        "saturated_samples": (measured - used).astype(np.int64),
    }
    out.info = {
        "method": "clamp through a 1 x 1 reference tile into a calibrated state-ADC channel",
        "samples": options.samples,
        "reads": options.reads,
        "request_range": [x_lo, x_hi],
        "resid_std_median": float(np.nanmedian(fit.resid_std)),
        "saturated_channels": int(((measured - used) > 0).sum()),
        "invalid": {str(ch): why for ch, why in reasons.items()},
    }
    return out


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
                f"{100 * gain_tol:g} % and {offset_tol:g} LSB): measure with more levels or samples"
            )
    return out


MVM_LOADS = ((0.8, 0.0), (1.0, 0.2))  # mvm routine: (high, low) device of a pair, shares of the range
WIRE_FIT_TOL = 1e-3  # relative precision of the bisection for the wire resistance
TWO_LEVEL_MIN_LINES = 16  # mvm routine: two-level inputs (the most signal) from this many input lines on

MIN_UNSATURATED = 0.25  # a DAC channel fitted on less than this share of its samples is invalid
RESID_LIMIT = 2.0  # ... and one whose residual spread is over this many times the bank's median


def _fit_unsaturated(
    xs: np.ndarray, ds: np.ndarray, out_range: tuple[float, float], step: float
) -> tuple[LineFit, np.ndarray, dict[int, str]]:
    """Line fits of DAC outputs `ds` against requests `xs` (samples, channels) on the samples
    whose fitted output stays one DAC step inside `out_range` at both ends.

    A channel whose gain or offset carries part of the request range past a rail outputs
    the rail there: those samples bend the line (a 10 % gain channel read 1 % low, with its
    offset 1 LSB off, before this). The fit is repeated, each time without the samples its
    last line puts past a rail, until the set stops changing. Returns the fit, the samples
    each channel's fit used, and per channel with too few unsaturated samples the reason
    it is invalid."""
    lo, hi = out_range
    mask = np.isfinite(xs)
    # first without the outputs that read within two steps of a rail (most saturated samples),
    # then by the line's own prediction
    with np.errstate(invalid="ignore"):
        keep = mask & (ds >= lo + 2 * step) & (ds <= hi - 2 * step)
    fit = fit_lines(xs, ds, keep)
    for _ in range(20):
        with np.errstate(invalid="ignore"):
            pred = fit.slope * np.where(mask, xs, 0.0) + fit.intercept
            inside = mask & (pred >= lo + step) & (pred <= hi - step)
        inside |= mask & ~np.isfinite(fit.slope)  # an unfitted channel keeps its samples
        if np.array_equal(inside, keep):
            break
        keep = inside
        fit = fit_lines(xs, ds, keep)
    used = keep.sum(0)
    total = mask.sum(0)
    reasons = {}
    for ch in np.flatnonzero((total > 0) & (used < MIN_UNSATURATED * total)):
        reasons[int(ch)] = (
            f"the output reaches a rail over most of the request range ({int(total[ch] - used[ch])} "
            f"of {int(total[ch])} samples saturated): its gain or offset is too large to fit"
        )
    # a transfer that is not a line where the fit used it (a rail the rules above missed, a
    # kink): residuals well above the bank's typical spread
    typical = float(np.nanmedian(fit.resid_std)) if np.isfinite(fit.resid_std).any() else np.nan
    for ch in np.flatnonzero(fit.resid_std > RESID_LIMIT * typical):
        reasons.setdefault(
            int(ch),
            f"residuals {fit.resid_std[ch] / typical:.1f} times the bank's median about the fitted "
            "line: the transfer is not a line over the request range",
        )
    return fit, used, reasons


# ------------------------------------------------------------------------------ mvm ADC


def dac_codes_to_requests(dac: ChannelCal, d: np.ndarray, start: int = 0) -> np.ndarray:
    """Requests that make DAC channels start.. output `d` (the inverse of the measured
    transfer; uncalibrated channels pass `d` through)."""
    n = d.shape[-1]
    g = dac.gain[start : start + n]
    o = dac.offset[start : start + n]
    ok = dac.valid[start : start + n]
    return np.where(ok, (d - np.where(ok, o, 0.0)) / np.where(ok, g, 1.0), d).astype(np.float32)


def _probe_mvm_range(device: Device, shape: tuple[int, int], lim_lo: float) -> tuple[float, float]:
    """Saturate the mvm read-out both ways: the rails it clips to are its range."""
    n, m = shape
    topo = Topology({"r": n, "c": m}, (Coupling("T", ("r",), ("c",), w_max=1e4 / n),))
    device.configure(topo)
    lim = device.info.limits
    g_hi, g_lo = lim.g_min + 0.9 * _g_range(device), lim.g_min + 0.1 * _g_range(device)
    sign = np.where(np.arange(m) % 2 == 0, 1.0, -1.0)[None, :]
    gp = np.where(sign > 0, g_hi, g_lo) * np.ones((n, 1))
    gm = np.where(sign > 0, g_lo, g_hi) * np.ones((n, 1))
    device.program("T", gp.astype(np.float32), gm.astype(np.float32))
    y = device.mvm("T", np.full((1, n), lim_lo + 0.9, np.float32))
    top = float(y.max())
    bottom = float(y.min()) if m > 1 else -top
    return bottom, top


def measure_mvm(
    device: Device,
    shape: tuple[int, int],
    dac: ChannelCal,
    options: ConverterOptions,
    progress: Progress = no_progress,
) -> ChannelCal:
    """mvm-ADC gain and offset of output lines 0..max(shape)-1, with inputs made exact by the
    calibrated DAC, and the wire resistance of the tile (IR drop). Uses physical tile 0 with
    `shape`.

    The tile holds random +-0.8 weights twice: once as device pairs (0.8, 0) and once as
    (1.0, 0.2) of the range (`MVM_LOADS`), the same weights carrying more current. Converters
    answer both alike; the wires attenuate the second more. The wire resistance per segment
    is the one whose modelled effective weights (`calibration.wires`, from the conductance
    reads) make the two fits' gains agree on average (`_fit_wires`); the gains and offsets
    are then fitted against those effective weights. A channel whose two gains still differ
    by more than the tolerance (the model does not explain its wires) is invalid ("ir_drop")."""
    device.require("mvm", instead=leave_out("the mvm-ADC calibration", "mvm"))
    lim = device.info.limits
    n, m = shape
    if dac.channels < max(n, m):
        raise CalibrationError(
            f"the mvm routine drives {max(n, m)} DAC channels; the DAC calibration covers {dac.channels}"
        )
    lo, hi = lim.adc_range
    bottom, top = _probe_mvm_range(device, shape, lo)
    progress("mvm", 1, 4)
    half = 0.5 * (top - bottom)
    rng = seeds.numpy_rng(options.seed, "calibration.mvm")
    # Signal-to-noise of one output is sqrt(E[w^2] var(d) / E[d^2]) / (sqrt(2) read_noise / range)
    # whatever the size: so weights of +-0.8 w_max with random signs, and two-level inputs.
    # Rows come in antithetic pairs (row 2k+1 is row 2k negated), so that every column sums to
    # about zero and its output is centred; the outputs' spread is aimed at a third of the range.
    d_lo, d_hi = 0.03, 0.97
    w_max = (half / 3.0) / np.sqrt(n * 0.64 * 0.25 * (d_hi - d_lo) ** 2)
    topo = Topology({"r": n, "c": m}, (Coupling("T", ("r",), ("c",), w_max=float(w_max)),))
    device.configure(topo)
    span_g = _g_range(device)
    sign = rng.choice([-1.0, 1.0], shape)
    pairs = n - n % 2
    sign[1:pairs:2] = -sign[0:pairs:2]
    levels = round((hi - lo) / dac.lsb)
    k_lo, k_hi = round(d_lo * levels), round(d_hi * levels)
    size = max(n, m)
    est_step = lsb(lim.adc_bits, top - bottom)
    out = _empty(size, "mvm", est_step, "weight units (x @ W)")
    sweeps = [False] + ([True] if n > m else [])
    inputs = []
    for transpose in sweeps:
        width_in = m if transpose else n
        if width_in >= TWO_LEVEL_MIN_LINES:
            codes = rng.choice([k_lo, k_hi], (options.samples, width_in))
        else:
            # few input lines give few distinct two-level inputs (2^lines), too few for the
            # ADC's rounding to average out of the fit: every code between the two levels
            codes = rng.integers(k_lo, k_hi + 1, (options.samples, width_in))
        inputs.append(lo + codes * dac.lsb)
    reads: list[ReadStats] = []
    outputs: list[list[np.ndarray]] = []
    for high, low in MVM_LOADS:
        g_hi, g_lo = lim.g_min + high * span_g, lim.g_min + low * span_g
        gp = np.where(sign > 0, g_hi, g_lo)
        gm = np.where(sign > 0, g_lo, g_hi)
        device.program("T", gp.astype(np.float32), gm.astype(np.float32))
        reads.append(read_stats(device, "T", options.reads))
        outputs.append(
            [
                device.mvm("T", dac_codes_to_requests(dac, d, 0), transpose=t).astype(np.float64)
                for t, d in zip(sweeps, inputs, strict=True)
            ]
        )
    progress("mvm", 2, 4)
    margin = 1.5 * est_step
    masks = [[(y > bottom + margin) & (y < top - margin) for y in ys] for ys in outputs]

    def weights(k: int, r: float) -> np.ndarray:
        g = reads[k].mean
        return float(w_max) * effective_weights(g[0], g[1], r, span_g)

    def fits(k: int, r: float) -> list[LineFit]:
        w = weights(k, r)
        mats = [w.T if t else w for t in sweeps]
        data = zip(inputs, mats, outputs[k], masks[k], strict=True)
        return [fit_lines(d @ wm, y, mk) for d, wm, y, mk in data]

    wire = _fit_wires(fits)
    progress("mvm", 3, 4)
    r_hat = wire["ohms"]
    final = fits(0, r_hat)
    other = fits(1, r_hat)
    w0 = weights(0, r_hat)
    w_read, w_se = pair_weights(reads[0], span_g, float(w_max))
    raw: dict[str, np.ndarray] = {}
    reasons: dict[int, str] = {}
    tol = np.inf if options.gain_tol is None else options.gain_tol
    for k, transpose in enumerate(sweeps):
        d, fit, fit1 = inputs[k], final[k], other[k]
        width = n if transpose else m
        wmat_se = w_se.T if transpose else w_se
        # The reference reads' error in v = d @ W varies from sample to sample (it is in the fit's
        # residuals) except for its part through the mean input, which looks like an offset.
        bias = np.sqrt((wmat_se**2).sum(0)) * float(np.mean(d))
        cols = slice(0, width) if k == 0 else slice(m, width)
        out.gain[cols] = fit.slope[cols]
        out.offset[cols] = fit.intercept[cols]
        out.gain_se[cols] = fit.slope_se[cols]
        out.offset_se[cols] = np.sqrt(fit.intercept_se**2 + (fit.slope * bias) ** 2)[cols]
        with np.errstate(invalid="ignore", divide="ignore"):
            moved = fit1.slope / fit.slope - 1
            moved_se = np.hypot(fit.slope_se, fit1.slope_se) / np.abs(fit.slope)
            bad = (np.abs(moved) > tol) & (np.abs(moved) > 3 * moved_se)
        for j in np.flatnonzero(bad[cols]) + cols.start:
            reasons[int(j)] = (
                f"ir_drop: the gain moved {100 * moved[j]:+.2f} % when the tile's line currents rose at "
                f"the same weights, after the wire model ({r_hat:.3g} ohm per segment) took its part: "
                "the wires' effect on this output is not what the model says; calibrate on a smaller tile"
            )
        raw["transpose_input" if transpose else "input"] = d.astype(np.float32)
        raw["transpose_output" if transpose else "output"] = outputs[0][k].astype(np.float32)
    uniq = np.unique(np.concatenate([y.ravel() for y in outputs[0]]))
    diffs = np.diff(uniq)
    diffs = diffs[diffs > 1e-6 * (top - bottom)]
    data_step = float(np.median(diffs)) if diffs.size else float("nan")
    if lim.adc_bits is not None and np.isfinite(data_step) and abs(data_step / est_step - 1) > 0.05:
        out.lsb = data_step
    for j in reasons:
        out.gain[j] = out.offset[j] = np.nan
    out.valid = np.isfinite(out.gain)
    raw["weights"] = w0.astype(np.float32)
    raw["weights_se"] = w_se.astype(np.float32)
    raw["g_plus"] = reads[0].mean[0].astype(np.float32)
    raw["g_minus"] = reads[0].mean[1].astype(np.float32)
    out.raw = raw
    out.info = {
        "method": "mvm through a tile of known random weights at two line loads, DAC inputs at exact codes",
        "range": [bottom, top],
        "lsb_from_bits": est_step,
        "lsb_from_data": data_step,
        "w_max": float(w_max),
        "samples": options.samples,
        "reads": options.reads,
        "wire_resistance": r_hat,
        "wire_resistance_se": wire["ohms_se"],
        # the share of the weights' magnitude the wires take, by the model at the fitted resistance
        "ir_drop_mean": float(1.0 - np.abs(w0).sum() / np.abs(w_read).sum()),
        "invalid": {str(ch): why for ch, why in reasons.items()},
    }
    progress("mvm", 4, 4)
    return out


def _load_gap(fits: list[LineFit], others: list[LineFit]) -> tuple[float, float]:
    """Mean and standard error over the output lines of ``log(gain at load 0 / gain at load 1)``."""
    gaps = np.concatenate([np.log(a.slope / b.slope) for a, b in zip(fits, others, strict=True)])
    gaps = gaps[np.isfinite(gaps)]
    if gaps.size == 0:
        raise CalibrationError("the mvm routine got no usable output line: every reading saturated")
    return float(gaps.mean()), float(gaps.std(ddof=1) / np.sqrt(gaps.size)) if gaps.size > 1 else 0.0


def _fit_wires(fits: Callable[[int, float], list[LineFit]]) -> dict[str, float]:
    """The wire resistance (ohms per segment) whose modelled effective weights give the two
    loads' fits the same mean gain: the gap in log gain falls as the resistance rises (the
    model takes more of the attenuation), so it is bisected on [0, `wires.MAX_OHMS`] to
    `WIRE_FIT_TOL` of the answer. 0 where the gap is not positive at no resistance (no wire
    effect to see); its standard error from the lines' scatter through the gap's slope."""

    def gap(r: float) -> tuple[float, float]:
        return _load_gap(fits(0, r), fits(1, r))

    g0, g0_se = gap(0.0)
    if g0 <= 0.0:
        return {"ohms": 0.0, "ohms_se": float("nan"), "gap_at_zero": g0}
    lo_r, hi_r = 0.0, 1.0
    while gap(hi_r)[0] > 0.0:
        lo_r, hi_r = hi_r, 2.0 * hi_r
        if hi_r > MAX_OHMS:
            raise CalibrationError(
                f"the mvm outputs move with the line load more than {MAX_OHMS:g} ohms of wire per "
                "segment explain: the tile's wires are out of the model's reach; calibrate on a smaller tile"
            )
    while hi_r - lo_r > WIRE_FIT_TOL * hi_r:
        mid = 0.5 * (lo_r + hi_r)
        if gap(mid)[0] > 0.0:
            lo_r = mid
        else:
            hi_r = mid
    r_hat = 0.5 * (lo_r + hi_r)
    # the gap's slope in r, over a step of a tenth of the answer
    step = max(0.1 * r_hat, 1e-3)
    slope = (gap(r_hat + step)[0] - gap(max(r_hat - step, 0.0))[0]) / (r_hat + step - max(r_hat - step, 0.0))
    return {"ohms": r_hat, "ohms_se": abs(g0_se / slope) if slope else float("nan"), "gap_at_zero": g0}
