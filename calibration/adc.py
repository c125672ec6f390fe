"""State-ADC gain and offset per channel, referred to the bias node (``adc``).

The bias node is a constant 1 that no DAC touches. 1 x n tiles (n = `ConverterOptions.ref_width`,
8: short rows, little IR drop in their wires) couple it into nodes 0..n-1 through conductance
pairs known from averaged reads, so at activation gain 1 node j settles at ``s_j = W_bj`` (kept
inside the linear region, away from the rails where the activation would rectify the node
noise). State-ADC channel j reads it; the pairs are reprogrammed to random levels round after
round, and a line fit of mean reading against ``s_j`` gives gain and offset. The node and read
noise dither the ADC, so the fit resolves fractions of an LSB. Every other round raises both
devices of every pair alike (the same weights, more current in the row): how a channel's slope
moves with its row's current is the wires' share of it, which is corrected to first order
(pooled over the channels at the same place in their rows) up to `IR_CORRECT_MAX` and marked
"ir_drop" beyond, or where a channel's share leaves its row's (`_ir_outliers`).

Stuck devices in a reference pair are recognised from the reads (the reference does not
follow the random targets) and the channel is measured again through another physical
tile. A channel that no working reference reaches is returned with ``valid`` False.
"""

from __future__ import annotations

import math

import numpy as np

from calibration.converters import ConverterOptions, _budget, _empty, _g_range, _imprecise
from calibration.measure import (
    SETTLE_ROUTINES,
    CrosstalkFit,
    Progress,
    fit_crosstalk,
    fit_lines,
    leave_out,
    no_progress,
    pair_weights,
    place_groups,
    read_stats,
    runs,
    settle_states,
)
from calibration.record import ChannelCal
from drivers import BIAS, Coupling, Device, Topology, seeds
from drivers.base import Limits
from drivers.converters import IDEAL_LSB_BITS, lsb

ADC_LOAD_SHIFT = 0.3  # state-ADC routine: every other round raises both devices of a pair by this
IR_CORRECT_MAX = 0.02  # a state-ADC reference row's IR drop corrected to first order up to this share
IR_NEIGHBOURS = 3  # a channel's IR share is compared with those of this many places either side in its row
IR_OUTLIER_SE = 4.0  # ... and is not trusted where it differs from their median by more standard errors


def _line_width(lim: Limits) -> int:
    """The most cells of a reference row whose line stays within the board's line-current limit
    with every device at g_max, read at v_read (the bias node's drive), strictly below the
    limit: a board of a low `max_line_current_a` refused the fourth reference row's program
    part-way through the routine, with a hint to pass a smaller --tile-size, which does not
    set the rows' width."""
    per = lim.g_max * lim.v_read
    if not math.isfinite(lim.max_line_current_a) or per <= 0:
        return 1 << 30
    return max(1, math.ceil(lim.max_line_current_a / per) - 1)


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
    out = _empty(size, "adc", lsb(lim.adc_bits, span, ideal_bits=IDEAL_LSB_BITS), "state (1.0 = v_read)")
    blocks = runs(channels, min(options.ref_width, lim.tile_cols_max, _line_width(lim)))
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
                states = settle_states(device, {"_z": np.zeros((batch, 1), np.float32)}, init)
                for b, (start, n) in enumerate(chunk):
                    r = states[f"y{b}"].astype(np.float64)
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
    tol = np.inf if options.gain_tol is None else options.gain_tol
    for ch, typical in _ir_outliers(share, share_se, channels, blocks, tol).items():
        if ch in reasons:
            continue
        reasons[ch] = (
            f"ir_drop: the wires' share of its gain ({100 * share[ch]:.2f} +- {100 * share_se[ch]:.2f} %) "
            f"is not its reference row's ({100 * typical:.2f} % at the places beside it, more than "
            f"{IR_OUTLIER_SE:g} standard errors away): a device of its reference pair does not follow "
            "the row (stuck or faulty), so its first-order IR correction cannot be trusted; measure "
            "with narrower reference rows (ConverterOptions.ref_width), or again"
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


def _ir_outliers(
    share: np.ndarray,
    share_se: np.ndarray,
    channels: np.ndarray,
    blocks: list[tuple[int, int]],
    tol: float = 0.0,
) -> dict[int, float]:
    """The channels whose IR share disagrees with their reference row's by more than `tol` (the
    gain precision asked for: a correction wrong by less does no harm), with the row's share
    beside them: the wires' share of a channel's gain grows smoothly with its place along the
    row (the drop accumulates along the wire), so a share more than `IR_OUTLIER_SE` standard
    errors from the median of the `IR_NEIGHBOURS` places either side (the larger of the two
    standard errors) comes from a reference pair that does not follow the row, and its
    correction is as wrong as its share. Where rows of one width are pooled
    (`_pooled_ir_share`), an outlier moves the shares of its place in every row alike: they
    are compared with their neighbours all the same."""
    measured = np.zeros(share.shape[0], bool)
    measured[channels] = True
    measured &= np.isfinite(share) & (share_se > 0)
    out: dict[int, float] = {}
    for start, n in blocks:
        for ch in range(start, start + n):
            if not measured[ch]:
                continue
            near = [
                c
                for c in range(max(start, ch - IR_NEIGHBOURS), min(start + n, ch + IR_NEIGHBOURS + 1))
                if c != ch and measured[c]
            ]
            if len(near) < 2:
                continue
            typical = float(np.median(share[near]))
            se = max(float(share_se[ch]), float(np.median(share_se[near])))
            if abs(share[ch] - typical) > max(IR_OUTLIER_SE * se, tol):
                out[ch] = typical
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
