"""mvm-ADC gain and offset per output line, and the tile's wire resistance (``mvm``).

`mvm` through a tile of known random weights with inputs that the calibrated DAC
(`calibration.dac`) turns into exact codes, at two line loads (the same weights on devices
set higher); the wire resistance is the one whose modelled effective weights
(`calibration.wires`) make the two loads agree, and output j is fitted against
``d @ W_eff``. A channel the model does not explain is marked "ir_drop".
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from calibration.converters import ConverterOptions, _empty, _g_range
from calibration.dac import dac_codes_to_requests
from calibration.measure import (
    LineFit,
    Progress,
    ReadStats,
    board_budget,
    fit_lines,
    leave_out,
    mvm_batched,
    no_progress,
    pair_weights,
    read_stats,
)
from calibration.record import CalibrationError, ChannelCal
from calibration.wires import MAX_OHMS, effective_weights
from drivers import Coupling, Device, Topology, seeds
from drivers.converters import IDEAL_LSB_BITS, rail_lsb

MVM_LOADS = ((0.8, 0.0), (1.0, 0.2))  # mvm routine: (high, low) device of a pair, shares of the range
WIRE_FIT_TOL = 1e-3  # relative precision of the bisection for the wire resistance
PROBE_W_MAX = 1e4  # mvm-range probe: weight scale x rows that clips any read-out ADC
TWO_LEVEL_MIN_LINES = 16  # mvm routine: two-level inputs (the most signal) from this many input lines on


def _probe_mvm_range(device: Device, shape: tuple[int, int], lim_lo: float) -> tuple[float, float]:
    """Saturate the mvm read-out both ways: the rails it clips to, its outermost codes (half a
    step inside its nominal range: a mid-tread ADC, `drivers.converters.rail_lsb`)."""
    n, m = shape
    lim = device.info.limits
    # the weight scale that clips the read-out by far (1e4 / rows), or the board's bound
    # (`Limits.max_w_max`, which a board may declare far lower): a configure past it is refused
    w_max = min(PROBE_W_MAX / n, lim.max_w_max)
    topo = Topology(
        {"r": n, "c": m}, (Coupling("T", ("r",), ("c",), w_max=w_max),), budget=board_budget(device)
    )
    device.configure(topo)
    g_hi, g_lo = lim.g_min + 0.9 * _g_range(device), lim.g_min + 0.1 * _g_range(device)
    sign = np.where(np.arange(m) % 2 == 0, 1.0, -1.0)[None, :]
    gp = np.where(sign > 0, g_hi, g_lo) * np.ones((n, 1))
    gm = np.where(sign > 0, g_lo, g_hi) * np.ones((n, 1))
    device.program("T", gp.astype(np.float32), gm.astype(np.float32))
    y = device.mvm("T", np.full((1, n), lim_lo + 0.9, np.float32))
    top = float(y.max())
    bottom = float(y.min()) if m > 1 else -top
    # unclipped, every output would be +-(rows x input x 0.8 w_max): a rail is well below that
    # (PROBE_W_MAX / rows puts it 1e3 times past any read-out range); a board whose max_w_max
    # lets the outputs stay on the line reads them, not the rails the routine needs
    unclipped = n * (lim_lo + 0.9) * 0.8 * w_max
    # (an ideal read-out, adc_bits None, has no rails: what it reads is its range, as before)
    capped = w_max < PROBE_W_MAX / n
    if capped and lim.adc_bits is not None and max(top, -bottom) > 0.5 * unclipped:
        raise CalibrationError(
            f"the mvm routine cannot find the read-out's range on this board: at its declared max_w_max "
            f"{lim.max_w_max:g} a {n}-row tile drives the outputs to {max(top, -bottom):.4g} of an unclipped "
            f"{unclipped:.4g} weight units, not into the ADC's rails; calibrate a tile with more rows "
            "(SessionOptions.tile_shapes, `hil calibrate --tiles`) or leave mvm out of the routines"
        )
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
    # at most the board's max_w_max (a smaller spread: less signal, nothing refused)
    w_max = min((half / 3.0) / np.sqrt(n * 0.64 * 0.25 * (d_hi - d_lo) ** 2), lim.max_w_max)
    topo = Topology(
        {"r": n, "c": m}, (Coupling("T", ("r",), ("c",), w_max=float(w_max)),), budget=board_budget(device)
    )
    device.configure(topo)
    span_g = _g_range(device)
    sign = rng.choice([-1.0, 1.0], shape)
    pairs = n - n % 2
    sign[1:pairs:2] = -sign[0:pairs:2]
    levels = round((hi - lo) / dac.lsb)
    k_lo, k_hi = round(d_lo * levels), round(d_hi * levels)
    size = max(n, m)
    # the probe found the rails, the outermost codes of a mid-tread ADC: 2**bits - 2 steps apart
    est_step = rail_lsb(lim.adc_bits, top - bottom, ideal_bits=IDEAL_LSB_BITS)
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
                mvm_batched(device, "T", dac_codes_to_requests(dac, d, 0), transpose=t).astype(np.float64)
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
