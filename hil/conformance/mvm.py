"""The matrix-vector product against ``x @ W`` from the board's own conductances, and the meter."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from drivers.converters import lsb
from hil.conformance.report import Mismatch
from hil.conformance.session import GAIN_ALLOWANCE, Session, desc, expect_array


def mvm(sess: Session) -> None:
    if "mvm" not in sess.caps:
        tile = sess.topo.couplings[0].tile
        rows, _ = sess.topo.tile_shape(tile)
        sess.skip("mvm", "mvm", lambda: sess.dev.mvm(tile, np.zeros((1, rows), np.float32)))
        return
    tile = sess.topo.couplings[0].tile
    spec = "x @ W, W = w_max (G+ - G-) / (g_max - g_min); DAC on x, ADC on the result"
    for transpose in (False, True):
        sess.run(
            "mvm transpose" if transpose else "mvm",
            spec.replace("x @ W", "x @ W.T") if transpose else spec,
            lambda sent, tr=transpose: _mvm(sess, sent, tile, tr),
        )
    sess.run(
        "mvm 1-D", "a 1-D x is one sample: y has shape (1, cols)", lambda sent: _mvm_1d(sess, sent, tile)
    )

    meter = getattr(sess.dev, "meter", None)
    if callable(meter):
        sess.run(
            "meter",
            "meter() is None, or clock_s and energy_j never fall, mvm_calls counts mvm requests (one per "
            f"request whatever its batch) and clock_s counts a wait's seconds ({METER_RULE})",
            lambda sent: _meter(sess, sent, tile, meter),
        )


METER_RULE = (
    'docs/protocol.md section 1, "Meter": mvm_calls is the number of mvm operations run, one per request '
    "whatever its batch; clock_s is the board clock, waits included"
)
WAIT_S = 0.01  # the wait the meter check sends: a board sleeps it (the emulator advances its clock)


def mvm_tolerance(
    sess: Session, w_max: float, x: np.ndarray, w: np.ndarray, ys: np.ndarray
) -> tuple[np.ndarray, str, float]:
    """Per-output tolerance of ``x @ w`` (a tile of `w_max`) against repeated board results
    `ys` (K, B, n), how it was built, and the output LSB it assumed."""
    noise = float(np.sqrt(ys.var(axis=0, ddof=1).mean())) if len(ys) > 1 else 0.0
    ref_noise = sess.sigma_w() * np.sqrt((x.astype(np.float64) ** 2).sum(1, keepdims=True) / sess.opt.reads)
    out_lsb = 0.0
    if sess.lim.adc_bits is not None:
        # The mvm ADC's range is not among the limits: its step is the smallest gap between
        # distinct outputs, at most that of an ADC spanning twice the largest possible
        # output (+-rows x w_max x |x|max), so that a coarse reply cannot pass as quantised.
        levels = np.unique(ys.astype(np.float64))
        gaps = np.diff(levels)
        gaps = gaps[gaps > 1e-9 * max(1.0, float(np.abs(levels).max()))]
        full = w.shape[0] * w_max * max(abs(sess.x_lo), abs(sess.x_hi))
        cap = 2 * lsb(sess.lim.adc_bits, 2 * full)
        out_lsb = min(float(gaps.min()) if gaps.size else 0.0, cap)
    abs_w = np.abs(w)
    tol = (
        4 * noise
        + 4 * ref_noise
        + 2 * out_lsb
        + 0.5 * sess.dac_lsb * abs_w.sum(0)
        + GAIN_ALLOWANCE * (np.abs(x) @ abs_w)
    )
    how = (
        f"tol 4 sigma (noise {noise:.3g}, ref {float(ref_noise.max()):.3g}) + 2 ADC LSB ({out_lsb:.3g}) "
        f"+ DAC LSB/2 x sum|W| + {GAIN_ALLOWANCE:.0%} x |x| @ |W|"
    )
    return tol, how, out_lsb


def _mvm(sess: Session, sent: list[str], tile: str, transpose: bool) -> str:
    w = sess.weights(tile)
    if transpose:
        w = w.T
    n_in, n_out = w.shape
    x = sess.inputs((sess.opt.mvm_batch(sess.lim), n_in))
    sent.append(f"{tile} x {desc(x)}, transpose={transpose}, {sess.opt.repeats} times")
    ys = []
    for _ in range(sess.opt.repeats):
        ys.append(expect_array("y", sess.own_mvm(tile, x, transpose), (len(x), n_out)))
    stack = np.stack(ys).astype(np.float64)
    ref = x.astype(np.float64) @ w
    tol, how, out_lsb = mvm_tolerance(sess, sess.topo.coupling(tile).w_max, x, w, stack)
    err = np.abs(stack.mean(0) - ref)
    worst = float((err - tol).max())
    got = f"y {desc(ys[0])}, max |y - x @ W| {float(err.max()):.3g}, {how} (min {float(tol.min()):.3g})"
    if worst > 0:
        i = np.unravel_index(int(np.argmax(err - tol)), err.shape)
        hint = _hint(sess, tile, transpose, x, stack, tol)
        raise Mismatch(f"{got}; y{list(map(int, i))} = {stack.mean(0)[i]:.4g}, x @ W = {ref[i]:.4g}{hint}")
    return f"{got}; {_fit(sess, tile, transpose, w, ref, stack.mean(0), out_lsb)}"


# The aggregate fit needs outputs that span this many output LSBs: rounding to the ADC's grid
# (+-half a step, correlated with the output near zero on a mid-tread grid: outputs within +-1
# LSB read -1, 0, 1 steps, a fitted slope of 0.52 on rram seed 0) moves the fitted slope by at
# most a step over the span (10 % at 10 LSB, far less in practice: spread over many outputs, the
# fit's standard error carries it; the fit caught a gain 20 % off at 12 LSB).
MIN_FIT_LSB = 10


def _reach_inputs(sess: Session, w: np.ndarray) -> np.ndarray:
    """Inputs at the declared rails that drive each output as far as the weights allow, both
    ways: for output k, ``x_j = x_hi`` where ``W[j, k] > 0`` and ``x_lo`` elsewhere, then the
    opposite (2 n_out samples, the largest outputs these weights can give within the limits)."""
    pos = (w > 0).T  # (n_out, n_in)
    up = np.where(pos, sess.x_hi, sess.x_lo)
    down = np.where(pos, sess.x_lo, sess.x_hi)
    return np.concatenate([up, down]).astype(np.float32)


def _fit(
    sess: Session, tile: str, transpose: bool, w: np.ndarray, ref: np.ndarray, y: np.ndarray, out_lsb: float
) -> str:
    """`_aggregate` on outputs that span at least `MIN_FIT_LSB` output LSBs: the random test
    inputs' products when they do, else those of `_reach_inputs` added (the weights read back may
    be small: a tile left near zero gives outputs within +-1 LSB, which a correct mid-tread ADC
    rounds to -1, 0, 1 and no fit can read a gain from). When even those span too few LSBs the
    fit is not run, and the line says so (the per-output tolerance above still holds)."""
    need = MIN_FIT_LSB * out_lsb
    if float(np.ptp(ref)) >= need:
        return _aggregate(ref, y, out_lsb)
    x = _reach_inputs(sess, w)
    batch = sess.lim.max_batch
    chunks = [x[i : i + batch] for i in range(0, len(x), batch)]
    ys = [np.concatenate([sess.own_mvm(tile, c, transpose) for c in chunks]) for _ in range(sess.opt.repeats)]
    ref_all = np.concatenate([ref, x.astype(np.float64) @ w])
    y_all = np.concatenate([y, np.mean(ys, axis=0, dtype=np.float64)])
    spread = f"outputs over {float(np.ptp(ref_all)) / out_lsb:.1f} LSB with inputs at the rails"
    if float(np.ptp(ref_all)) < need:
        return (
            f"aggregate fit not run: the weights read back give {spread}, under the {MIN_FIT_LSB} LSB "
            "a gain fit needs"
        )
    return f"{spread}: {_aggregate(ref_all, y_all, out_lsb)}"


def _hint(sess: Session, tile: str, transpose: bool, x: np.ndarray, ys: np.ndarray, tol: np.ndarray) -> str:
    """What a failed product looks like, of the mistakes a firmware author makes reading
    docs/protocol.md: "" when none of them fits."""
    gp, gm = sess.g[tile]
    w_max = sess.topo.coupling(tile).w_max
    x64, y = x.astype(np.float64), ys.mean(0)

    def fits(gp_: np.ndarray, gm_: np.ndarray, span: float) -> bool:
        w = w_max * (gp_ - gm_) / span
        return bool(np.all(np.abs(y - x64 @ (w.T if transpose else w)) <= tol))

    lim = sess.lim
    if lim.g_min > 0 and fits(gp, gm, lim.g_max):
        return (
            "; y is x @ W with W = w_max (G+ - G-) / g_max: the board divides by g_max, not by "
            f"g_max - g_min (a gain of {sess.g_range / lim.g_max:.3g}; docs/protocol.md section 1, Units)"
        )
    shape = gp.shape
    if fits(*(g.ravel().reshape(shape, order="F") for g in (gp, gm)), sess.g_range):
        return (
            "; y is x @ W with the conductances the board read back taken column-major: the board stores a "
            "tile's arrays in Fortran order (what it reads back is what was programmed, but not where the "
            "product finds it); arrays travel in C order, row-major (docs/protocol.md section 1, Arrays)"
        )
    if lim.adc_bits is not None:
        levels = np.unique(ys.astype(np.float64))
        gaps = np.diff(levels)
        gaps = gaps[gaps > 1e-9 * max(1.0, float(np.abs(levels).max()))]
        full = shape[1 if transpose else 0] * w_max * max(abs(sess.x_lo), abs(sess.x_hi))
        if gaps.size and float(gaps.min()) > 2 * lsb(lim.adc_bits, 2 * full):
            bits = float(np.log2(2 * full / float(gaps.min()) + 1))
            return (
                f"; the outputs lie on levels {float(gaps.min()):.4g} apart: a read-out of about "
                f"{bits:.1f} bits over +-{full:g}, coarser than the adc_bits {lim.adc_bits} the board "
                "declares (docs/bringup.md section 3, The converters)"
            )
    return ""


def w_max(sess: Session) -> None:
    """After the checks that use the test network's weights (it reprograms the first tile)."""
    if "mvm" not in sess.caps:
        return
    tile = sess.topo.couplings[0].tile
    sess.run(
        "mvm w_max",
        "the coupling's w_max scales the product: configured with twice the w_max, the same "
        "conductances give twice the outputs",
        lambda sent: _w_max(sess, sent, tile),
    )


def _w_max(sess: Session, sent: list[str], tile: str) -> str:
    """The test network runs at w_max 1, where a firmware that leaves w_max out of the product
    gives the right numbers: the tile is programmed to random weights of +-0.5, then
    configured again with w_max doubled (the conductances stay, as a configure keeps them),
    and must give twice the outputs, by a fit ``y2 = a y1 + b`` over repeated products,
    |a - 2| within the converters' allowance."""
    rows, cols = sess.topo.tile_shape(tile)
    sign = sess.rng.choice([-1.0, 1.0], (rows, cols))
    mid = sess.lim.g_min + 0.5 * sess.g_range
    gp = (mid + 0.25 * sess.g_range * sign).astype(np.float32)
    gm = (mid - 0.25 * sess.g_range * sign).astype(np.float32)
    sess.own_program(tile, gp, gm, verify="program_verify" in sess.caps)
    x = (0.5 * sess.inputs((sess.opt.mvm_batch(sess.lim), rows))).astype(np.float32)  # half: room to double
    w_max = sess.topo.coupling(tile).w_max
    # twice the w_max, or half where twice is past the board's max_w_max (a board whose weights
    # are normalised to +-1 declares max_w_max 1: the doubled configure was refused on the host)
    factor = 2.0 if 2 * w_max <= sess.lim.max_w_max else 0.5
    doubled = dataclasses.replace(
        sess.topo,
        couplings=tuple(
            dataclasses.replace(c, w_max=factor * c.w_max) if c.tile == tile else c
            for c in sess.topo.couplings
        ),
    )
    sent.append(
        f"{tile} +-0.5 weights, x {desc(x)} at w_max {w_max:g}, then configured at {factor * w_max:g}; "
        f"{sess.opt.repeats} times"
    )

    def mean_y() -> np.ndarray:
        return np.mean([sess.own_mvm(tile, x) for _ in range(sess.opt.repeats)], axis=0, dtype=np.float64)

    y1 = mean_y()
    sess.dev.configure(doubled)
    try:
        y2 = mean_y()
    finally:
        sess.dev.configure(sess.topo)
    if float(np.ptp(y1)) == 0.0:
        raise Mismatch(f"every output is {float(y1.flat[0]):.4g} at +-0.5 weights: the program did not take")
    (a, b), cov = np.polyfit(y1.ravel(), y2.ravel(), 1, cov=True)
    tol = factor * GAIN_ALLOWANCE + 3 * float(np.sqrt(cov[0, 0]))  # 2 x the allowance at factor 2
    span = f"[{y1.min():.3g}, {y1.max():.3g}]"
    got = f"fit y({factor:g} w_max) = {a:.3f} y(w_max) {b:+.3g} over outputs in {span}"
    if abs(a - factor) > tol:
        raise Mismatch(
            f"{got}: expected a = {factor:g} within {tol:.3g} (a = 1: w_max is left out of the product)"
        )
    return f"{got}, |a - {factor:g}| <= {tol:.3g}"


def _aggregate(ref: np.ndarray, y: np.ndarray, out_lsb: float) -> str:
    """All outputs together: y = a (x @ W) + b by least squares, with |a - 1| within the
    converters' gain allowance and |b| within one output LSB (at least 1.5 % of the largest
    output, for a fine or ideal ADC), plus 3 standard errors of the fit. A per-output
    tolerance cannot resolve a gain 10 % off or an offset of a few LSBs on a noisy board; the
    fit over every output can."""
    if float(np.ptp(ref)) == 0.0:
        raise Mismatch(
            "the reference x @ W is the same for every output (the weights read back are all equal, "
            "e.g. all zero): the program did not take, or the read-back does not show it"
        )
    (a, b), cov = np.polyfit(ref.ravel(), y.ravel(), 1, cov=True)
    se_a, se_b = (float(v) for v in np.sqrt(np.diag(cov)))
    slope_tol = GAIN_ALLOWANCE + 3 * se_a
    offset_tol = max(out_lsb, 0.015 * float(np.abs(ref).max())) + 3 * se_b
    text = f"fit y = {a:.4f} (x @ W) {b:+.3g}: |a - 1| <= {slope_tol:.3g}, |b| <= {offset_tol:.3g}"
    if abs(a - 1) > slope_tol or abs(b) > offset_tol:
        raise Mismatch(f"gain or offset off: {text}")
    return text


def _mvm_1d(sess: Session, sent: list[str], tile: str) -> str:
    rows, cols = sess.topo.tile_shape(tile)
    w = sess.weights(tile)
    x = sess.inputs((rows,))
    sent.append(f"{tile} x {desc(x)}")
    y = expect_array("y", sess.own_mvm(tile, x), (1, cols))
    stack = np.stack([sess.own_mvm(tile, x) for _ in range(sess.opt.repeats)] + [y]).astype(np.float64)
    tol, how, _ = mvm_tolerance(sess, sess.topo.coupling(tile).w_max, x[None, :], w, stack)
    err = np.abs(y.astype(np.float64) - x.astype(np.float64) @ w)
    got = f"y {desc(y)}, max |y - x @ W| {float(err.max()):.3g}"
    if float((err - tol).max()) > 0:
        raise Mismatch(f"{got}, {how}")
    return got


def _meter(sess: Session, sent: list[str], tile: str, meter: Callable[[], Any]) -> str:
    rows, _ = sess.topo.tile_shape(tile)
    first = meter()
    sess.requests_out += 1
    if first is None:
        sent.append("meter()")
        return "None (the board does not meter)"
    n, batch = 3, min(2, sess.lim.max_batch)
    wait_s = min(WAIT_S, sess.lim.max_wait_s)  # a board may declare shorter waits than 0.01 s
    sent.append(f"meter(), {n} mvm calls of {batch} samples, wait({wait_s}), meter()")
    x = sess.inputs((batch, rows))
    for _ in range(n):
        sess.own_mvm(tile, x)
    sess.dev.wait(wait_s)
    second = meter()
    if second is None:
        raise Mismatch(f"{first} first, then None")
    if second.clock_s < first.clock_s or second.energy_j < first.energy_j:
        raise Mismatch(f"went backwards: {first} -> {second}")
    calls = second.mvm_calls - first.mvm_calls
    if calls != n:
        counts = " (it counts samples, not requests)" if calls == n * batch else ""
        raise Mismatch(
            f"mvm_calls {first.mvm_calls} -> {second.mvm_calls} after {n} calls of {batch} samples{counts}; "
            f"{METER_RULE}"
        )
    if second.clock_s - first.clock_s < wait_s * (1 - 1e-9):  # float64 sums: a rounding step
        raise Mismatch(
            f"clock_s {first.clock_s!r} -> {second.clock_s!r} over {n} mvm calls and a wait of {wait_s} s: "
            f"the wait's seconds did not pass on the board (a WAIT that returns at once measures no drift); "
            f"{METER_RULE}"
        )
    return f"{first} -> {second}"
