"""DAC gain and offset per channel, read through the calibrated state ADC (``dac``).

Each DAC channel is clamped through its own 1 x 1 tile (a single known conductance pair: no
other line feeds the node, so the offsets of idle channels cannot leak in) into a node whose
state ADC the state-ADC routine (`calibration.adc`) calibrated. Random requests in the middle
of the range average the DAC's own quantisation out of the fit.

Stuck devices in a reference pair are recognised from the reads (|W| under `REF_MIN_W`) and
the channel is measured again through another physical tile. A channel that no working
reference reaches is returned with ``valid`` False. `dac_codes_to_requests` inverts the
measured transfer (the mvm routine drives its inputs through it).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from calibration.converters import ConverterOptions, _budget, _empty, _g_range, _imprecise
from calibration.measure import (
    SETTLE_ROUTINES,
    LineFit,
    Progress,
    fit_lines,
    leave_out,
    no_progress,
    pair_weights,
    place_groups,
    read_stats,
    settle_states,
)
from calibration.record import CalibrationError, ChannelCal
from drivers import Coupling, Device, Topology, seeds
from drivers.converters import IDEAL_LSB_BITS, lsb

REF_HIGH = 0.8  # reference pair: G+ at g_min + REF_HIGH * range, G- at g_min
REF_MIN_W = 0.3  # a reference pair weaker than this has a stuck device; use another tile
TILES_PER_DAC_PASS = 16  # 1 x 1 reference tiles per DAC pass (each is read `reads` times)
MIN_UNSATURATED = 0.25  # a DAC channel fitted on less than this share of its samples is invalid
RESID_LIMIT = 2.0  # ... and one whose residual spread is over this many times the bank's median


def _program_pairs(device: Device, tile: str, shape: tuple[int, int], high: float) -> None:
    lim = device.info.limits
    gp = np.full(shape, lim.g_min + high * _g_range(device), np.float32)
    gm = np.full(shape, lim.g_min, np.float32)
    device.program(tile, gp, gm)


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
    out = _empty(size, "dac", lsb(lim.dac_bits, span, ideal_bits=IDEAL_LSB_BITS), "state (1.0 = v_read)")
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
                # the node at 0.85 of its range for a full-scale request, at most the board's
                # max_gain (a board declaring a lower one refused the configure; the outputs then
                # span less of the range, and the fit's usable share says whether that is enough)
                gamma = min(
                    0.85 / float(np.median(w_tile[:n][w_tile[:n] >= REF_MIN_W])), device.info.limits.max_gain
                )
                device.configure(replace(topo, gain=gamma))
                x = rng.uniform(r_lo[block], r_hi[block], (options.samples, n)).astype(np.float32)
                clamp = {f"x{i}": x[:, i : i + 1] for i in range(n)}
                init = {
                    f"y{i}": np.clip(gamma * np.nan_to_num(w_i[i]) * x[:, i : i + 1], 0, 1).astype(np.float32)
                    for i in range(n)
                }
                states = settle_states(device, clamp, init)
                for i in np.flatnonzero(usable):
                    ch, rch = int(block[i]), int(rd[i])
                    r = states[f"y{i}"][:, 0].astype(np.float64)
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


def dac_codes_to_requests(dac: ChannelCal, d: np.ndarray, start: int = 0) -> np.ndarray:
    """Requests that make DAC channels start.. output `d` (the inverse of the measured
    transfer; uncalibrated channels pass `d` through)."""
    n = d.shape[-1]
    g = dac.gain[start : start + n]
    o = dac.offset[start : start + n]
    ok = dac.valid[start : start + n]
    return np.where(ok, (d - np.where(ok, o, 0.0)) / np.where(ok, g, 1.0), d).astype(np.float32)
