"""Fit a pulse-response model to the data of `calibration.pulse` (pure numpy).

The model (the same family as the emulator's and aihwkit's devices): a pulse moves a device
by ``dw * f(u)`` on average, where ``u`` is the fraction of its own window ``[g_lo, g_hi]``
it has travelled from the bound it moves away from (``u = x`` going up, ``1 - x`` going
down) and f is one of

    constant     1
    soft_bounds  1 - u
    linear       max(1 - gamma u, 0)
    exponential  exp(-gamma u)

with ``dw`` per device and direction, and `gamma` per tile and direction. Every
measured increment ``s = (b[k+1] - b[k]) / n`` is an unbiased sample of the mean step at the
chunk's position (the cycle-to-cycle noise multiplies a step by a factor of mean 1), so for
a given shape ``dw`` is a per-device linear least-squares fit, and `gamma` a
one-dimensional search on the summed squared error of a device subset. The shape is chosen
by BIC over both directions. Points within a few steps of the bound a device moves
towards are left out: there the bound clips steps and the mean falls below the model. For
n-pulse chunks the shape is evaluated halfway through the chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from calibration.pulse import PulseData, Sweep
from calibration.record import PulseModel
from drivers import seeds

KINDS = ("constant", "soft_bounds", "linear", "exponential")
GAMMA_RANGE = {"linear": (0.0, 1.5), "exponential": (0.0, 10.0)}
FIXED_GAMMA = {"constant": 0.0, "soft_bounds": 1.0}
EQUIVALENT = 0.01  # gamma differences below this change the step shape by < 1 %
SUBSET = 2048
BLOCK = 16384  # devices per block of the final per-device fit (bounds the temporaries)
RAW_DEVICES = 256


def shape(kind: str, u: np.ndarray, gamma: float) -> np.ndarray:
    """The step shape f(u) of the module docstring."""
    if kind == "constant":
        return np.ones_like(u)
    if kind == "soft_bounds":
        return 1.0 - u
    if kind == "linear":
        return np.maximum(1.0 - gamma * u, 0.0)
    if kind == "exponential":
        return np.exp(-gamma * u)
    raise ValueError(f"unknown pulse-response kind {kind!r}; known: {KINDS}")


@dataclass
class Points:
    """One direction's regression data, (chunks, devices)."""

    u: np.ndarray  # position from the origin bound, fraction of the device's window
    s: np.ndarray  # mean step per pulse (S), positive in the direction of motion
    n: np.ndarray  # (chunks, 1) pulses per chunk
    span: np.ndarray  # (devices,) g_hi - g_lo
    mask: np.ndarray
    var_b: np.ndarray  # the mean of the b-read variances at the two ends of each increment

    def __post_init__(self) -> None:
        # the read-noise term of every increment's variance (`weights`): the same for every
        # shape and gamma a fit tries, so computed once
        self.read_var_term = 2.0 * self.var_b / self.n**2
        self.multi = bool(np.any(self.n > 1))  # n-pulse chunks: the shape is evaluated mid-chunk


@dataclass
class DirectionFit:
    dw: np.ndarray
    dw_se: np.ndarray
    sse: float
    points: int
    resid: np.ndarray  # (chunks, devices), NaN outside the mask


def points(
    sweep: Sweep,
    g_lo: np.ndarray,
    g_hi: np.ndarray,
    valid: np.ndarray,
    read_var: Callable[[np.ndarray], np.ndarray],
) -> Points:
    """`sweep`'s increments as regression data; `read_var(g)`: one read's noise variance at
    conductance g (S^2), for each increment's two b reads."""
    span = g_hi - g_lo
    pos = sweep.a[:-1]
    lo32, hi32, inv = g_lo.astype(np.float32), g_hi.astype(np.float32), (1.0 / span).astype(np.float32)
    u = (pos - lo32) * inv if sweep.sign > 0 else (hi32 - pos) * inv
    n = sweep.chunk[:, None].astype(np.float32)
    s = np.float32(sweep.sign) * np.diff(sweep.b, axis=0) / n
    # The terminal cut uses the tile's median initial step, not each device's own: a cut that
    # depended on a device's measured steps would select on the response and bias its fit.
    s0 = float(np.median(s[:3][:, valid])) if valid.any() else 0.0
    terminal = (1.0 - u) * span > 3.0 * n * max(s0, 0.0)
    mask = valid[None, :] & np.isfinite(u) & np.isfinite(s) & (u > -0.05) & (u < 0.97) & terminal
    rv = read_var(np.nan_to_num(sweep.b.astype(np.float64)))
    var_b = 0.5 * (rv[:-1] + rv[1:]) / sweep.b_reads
    return Points(u, s, n, span, mask, var_b)


def weights(p: Points, f: np.ndarray, noise: tuple[float, float] | None) -> np.ndarray:
    """Inverse variance of each increment, ``1 / (c^2 (dw f)^2 / n + 2 sigma_b^2 / n^2)``, from the
    tile's cycle-to-cycle std c, its typical step dw (`noise`; None: equal weights) and the
    read noise sigma_b of its b reads where they were read (`Points.var_b`). The weights
    depend on the positions only, not on the measured steps: weights that followed a
    device's own steps would bias its fit."""
    if noise is None:
        return np.ones_like(f)
    c, dw_ref = noise
    var = c * c * (dw_ref * f) ** 2 / p.n + p.read_var_term
    positive = var > 0
    if not positive.all():  # a noiseless board (the ideal emulator): no increment is surer than another
        var = np.maximum(var, var[positive].min() if positive.any() else 1.0)
    return 1.0 / var


def fit_direction(
    p: Points, kind: str, gamma: float, noise: tuple[float, float] | None = None
) -> DirectionFit:
    """Per-device (weighted) least-squares ``dw`` for a given shape (two passes for n-pulse
    chunks: the second evaluates the shape halfway through each chunk).

    Equal weights let the noisy high-u points of a device and the dependence of its later
    positions on its earlier steps bias ``dw`` upwards (a dynamic-regression bias of the order
    of the squared relative error); inverse-variance weights flatten the weighting across a
    device's points and remove most of it."""
    if p.u.shape[1] > BLOCK:
        parts = [
            fit_direction(_sub(p, np.arange(i, min(i + BLOCK, p.u.shape[1]))), kind, gamma, noise)
            for i in range(0, p.u.shape[1], BLOCK)
        ]
        return DirectionFit(
            np.concatenate([q.dw for q in parts]),
            np.concatenate([q.dw_se for q in parts]),
            float(sum(q.sse for q in parts)),
            int(sum(q.points for q in parts)),
            np.concatenate([q.resid for q in parts], axis=1),
        )
    f0 = shape(kind, p.u, gamma)
    return _fit_direction(p, kind, gamma, noise, f0, weights(p, f0, noise))


def _fit_direction(
    p: Points, kind: str, gamma: float, noise: tuple[float, float] | None, f0: np.ndarray, w0: np.ndarray
) -> DirectionFit:
    """`fit_direction` given the shape at the chunks' starts, ``f0 = shape(kind, p.u, gamma)``,
    and its weights ``w0 = weights(p, f0, noise)``."""
    m = p.mask
    f = f0
    w = np.where(m, w0, 0.0)
    dw = _least_squares(w, f, p.s)
    if p.multi:  # n-pulse chunks: fit again with the shape halfway through each chunk
        f = _mid_chunk_shape(p, kind, gamma, dw, f)
        w = np.where(m, weights(p, f, noise), 0.0)
        dw = _least_squares(w, f, p.s)
        f = _mid_chunk_shape(p, kind, gamma, dw, f)  # the residuals' shape, at the final dw
        w = np.where(m, weights(p, f, noise), 0.0)
    # (single pulses: the residuals are taken at the chunks' starts, where the fit was made)
    r = np.where(m, p.s - dw * f, 0.0)
    npts = m.sum(0)
    wsse_dev = (w * r * r).sum(0)
    # a degenerate trial (a gamma far off, on a noiseless board) saturates to inf in float32
    with np.errstate(over="ignore"):
        resid = np.where(m, r, np.nan).astype(np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        dw_se = np.sqrt(wsse_dev / np.maximum(npts - 1, 1) / (w * f * f).sum(0))
    bad = npts < 3
    dw[bad] = np.nan
    dw_se[bad] = np.nan
    return DirectionFit(dw, dw_se, float(wsse_dev.sum()), int(npts.sum()), resid)


def _least_squares(w: np.ndarray, f: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Per-device weighted least-squares ``dw`` of ``s = dw f`` (NaN for a device without points)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return (w * f * s).sum(0) / (w * f * f).sum(0)


def _mid_chunk_shape(p: Points, kind: str, gamma: float, dw: np.ndarray, f: np.ndarray) -> np.ndarray:
    """The shape halfway through each chunk, the devices moved by ``dw f`` per pulse."""
    return shape(kind, p.u + 0.5 * (p.n - 1) * np.nan_to_num(dw) * f / p.span, gamma)


def _sub(p: Points, idx: np.ndarray) -> Points:
    return Points(p.u[:, idx], p.s[:, idx], p.n, p.span[idx], p.mask[:, idx], p.var_b[:, idx])


def _objective(p: Points, kind: str, gamma: float, noise: tuple[float, float] | None) -> float:
    """-2 log-likelihood up to constants: n log(WSSE / n) + sum log(variance factor)."""
    f = shape(kind, p.u, gamma)
    w = weights(p, f, noise)
    fit = _fit_direction(p, kind, gamma, noise, f, w)
    if noise is None:
        return fit.sse
    logv = float(np.where(p.mask, -np.log(w), 0.0).sum())
    return fit.points * float(np.log(max(fit.sse, 1e-300) / max(fit.points, 1))) + logv


def best_gamma(p: Points, kind: str, noise: tuple[float, float] | None = None) -> float:
    """Grid then golden-section search of the summed squared error over gamma."""
    lo, hi = GAMMA_RANGE[kind]
    grid = np.linspace(lo, hi, 16)
    sse = [_objective(p, kind, g, noise) for g in grid]
    k = int(np.argmin(sse))
    a, b = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
    ratio = (np.sqrt(5.0) - 1.0) / 2.0
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = _objective(p, kind, c, noise), _objective(p, kind, d, noise)
    for _ in range(30):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = _objective(p, kind, c, noise)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = _objective(p, kind, d, noise)
        if b - a < 1e-3 * max(1.0, abs(b)):
            break
    return float(0.5 * (a + b))


def _noise_model(p: Points, kind: str, gamma: float) -> tuple[float, float]:
    """(c2c std, median step) from an equal-weight fit of `kind`."""
    first = fit_direction(p, kind, gamma)
    c = _ctoc(p, first, kind, gamma)
    return (max(c, 0.05), float(np.nanmedian(first.dw)))


def _gamma_se(p: Points, kind: str, gamma: float, noise: tuple[float, float, float]) -> float:
    """Standard error of gamma from the curvature of -2 log L (profiled over the dw's)."""
    h = 0.01 * max(1.0, abs(gamma))
    f0 = _objective(p, kind, gamma, noise)
    fp = _objective(p, kind, gamma + h, noise)
    fm = _objective(p, kind, max(gamma - h, 0.0), noise)
    d2 = (fp - 2.0 * f0 + fm) / (h * h)
    return float(np.sqrt(2.0 / d2)) if d2 > 0 else float("inf")


def _ctoc(p: Points, fit: DirectionFit, kind: str, gamma: float) -> float:
    """Cycle-to-cycle relative std from the residuals of an equal-weight fit:
    E[r^2] = (1 - h) (c^2 (dw f)^2 / n + 2 var_b / n^2), with the leverage ``h = f^2 / sum f^2``
    of each point in its device's one-parameter fit (the fit absorbs part of the noise of the
    points that dominate it, which are the large steps this estimate rests on)."""
    f = shape(kind, p.u, gamma)
    step = np.nan_to_num(fit.dw) * f
    f2 = np.where(p.mask, f * f, 0.0)
    lev = f2 / np.maximum(f2.sum(0), 1e-300)
    keep = p.mask & (lev < 0.5)
    x = np.where(keep, step**2 / p.n, 0.0)
    y = np.where(keep, np.nan_to_num(fit.resid) ** 2 / (1.0 - lev) - 2.0 * p.var_b / p.n**2, 0.0)
    c2 = float((x * y).sum() / max((x * x).sum(), 1e-300))
    return float(np.sqrt(max(c2, 0.0)))


def _dtod(dw: np.ndarray, se: np.ndarray) -> float:
    """Relative device-to-device std of a log-normal step factor, less the fit noise."""
    ok = np.isfinite(dw) & (dw > 0) & np.isfinite(se)
    if ok.sum() < 3:
        return float("nan")
    log_var = float(np.var(np.log(dw[ok]))) - float(np.mean((se[ok] / dw[ok]) ** 2))
    return float(np.sqrt(np.expm1(max(log_var, 0.0))))


def fit_pulse_model(data: PulseData, stuck: np.ndarray | None, g_range: float, seed: int = 0) -> PulseModel:
    devices = data.g_lo.size
    span = data.g_hi - data.g_lo
    valid = np.isfinite(span) & (span > 0.1 * g_range)
    if stuck is not None:
        valid &= ~np.asarray(stuck).reshape(-1)
    sweeps = [data.up] + ([data.down] if data.down is not None else [])
    pts = [points(sw, data.g_lo, data.g_hi, valid, data.read_var) for sw in sweeps]
    rng = seeds.numpy_rng(seed, "calibration.pulse_fit")
    cand = np.flatnonzero(valid)
    sub_idx = np.sort(rng.choice(cand, min(SUBSET, cand.size), replace=False)) if cand.size else cand
    subs = [_sub(p, sub_idx) for p in pts]
    # Inverse-variance weights need a noise model (c2c std, typical step): take it from an
    # equal-weight soft-bounds fit; the weights only have to be about right.
    noises = [_noise_model(sp, "soft_bounds", 1.0) for sp in subs]
    npts = max(sum(int(sp.mask.sum()) for sp in subs), 2)
    scores: dict[str, float] = {}
    gammas: dict[str, list[float]] = {}
    for kind in KINDS:
        gs = [
            best_gamma(sp, kind, nz) if kind in GAMMA_RANGE else FIXED_GAMMA[kind]
            for sp, nz in zip(subs, noises, strict=True)
        ]
        obj = sum(_objective(sp, kind, g, nz) for sp, g, nz in zip(subs, gs, noises, strict=True))
        scores[kind] = obj + (len(subs) if kind in GAMMA_RANGE else 0) * float(np.log(npts))
        gammas[kind] = gs
    kind = min(scores, key=scores.__getitem__)
    gamma_se = [float("nan")] * len(subs)
    if kind in GAMMA_RANGE:
        gamma_se = [_gamma_se(sp, kind, g, nz) for sp, g, nz in zip(subs, gammas[kind], noises, strict=True)]
        # nested shapes: linear with gamma 1 is soft_bounds, gamma 0 is constant
        # (within 3 standard errors, or within EQUIVALENT: then the shapes differ by < 1 %)
        near = [
            abs(g - 1.0) < max(3.0 * se, EQUIVALENT) for g, se in zip(gammas[kind], gamma_se, strict=True)
        ]
        flat = [abs(g) < max(3.0 * se, EQUIVALENT) for g, se in zip(gammas[kind], gamma_se, strict=True)]
        if kind == "linear" and all(near):
            kind = "soft_bounds"
        elif all(flat):
            kind = "constant"
    # Final: noise model from the chosen shape, gamma again under it, per-device fits of all devices.
    noises = [_noise_model(sp, kind, g) for sp, g in zip(subs, gammas[kind], strict=True)]
    gs = [
        best_gamma(sp, kind, nz) if kind in GAMMA_RANGE else FIXED_GAMMA[kind]
        for sp, nz in zip(subs, noises, strict=True)
    ]
    fits = [fit_direction(p, kind, g, nz) for p, g, nz in zip(pts, gs, noises, strict=True)]
    valid &= np.isfinite(fits[0].dw)
    up = fits[0]
    down = fits[1] if len(fits) > 1 else None
    nan = np.full(devices, np.nan)
    dw_down = down.dw if down is not None else nan
    dw_down_se = down.dw_se if down is not None else nan
    full = (2, *data.shape)
    scale = 0.5 * (up.dw + dw_down) if down is not None else up.dw
    scale_se = 0.5 * np.hypot(up.dw_se, dw_down_se) if down is not None else up.dw_se
    v = valid & np.isfinite(scale)
    summary: dict[str, object] = {
        "kind": kind,
        "bic": scores,
        "gammas": {k: g for k, g in gammas.items()},
        "gamma_se": gamma_se,
        "devices_fitted": int(v.sum()),
        "devices": devices,
        "g_min": float(np.mean(data.g_lo[v])),
        "g_max": float(np.mean(data.g_hi[v])),
        "bounds_dtod": float(np.std(data.g_hi[v]) / np.mean(data.g_hi[v])),
        "dw_up_mean": float(np.mean(up.dw[v])),
        "dw_down_mean": float(np.mean(dw_down[v])) if down is not None else float("nan"),
        "dw_min": float(np.mean(scale[v])),
        "up_down": float(np.mean(((up.dw - dw_down) / (up.dw + dw_down))[v])) if down is not None else 0.0,
        "dw_min_dtod": _dtod(scale, scale_se),
        "dw_min_ctoc": noises[0][0],
        "read_noise": data.read_noise,
        # one read's noise std against the conductance it read (S): state-dependent on PCM
        "read_noise_curve": (
            None
            if data.read_noise_curve is None
            else {"g": data.read_noise_curve[0].tolist(), "std": data.read_noise_curve[1].tolist()}
        ),
        "reset_noise": data.reset_noise,
        "reset_mean": float(np.mean(data.reset[:, v])) if data.reset is not None else float("nan"),
        "dw_up_rel_se_median": float(np.median((up.dw_se / up.dw)[v])),
        "chunk_up": int(data.up.chunk.max()),
        "chunk_down": int(data.down.chunk.max()) if data.down is not None else 0,
        "plateau_bursts": data.bursts,
        # False: a saturation ended still moving, so g_lo / g_hi are not the devices' window
        # and every device is marked invalid
        "plateau_held": data.plateau,
    }
    if not data.plateau:
        valid[:] = False
    raw_idx = np.sort(rng.choice(cand, min(RAW_DEVICES, cand.size), replace=False)) if cand.size else cand
    raw = {
        "device": raw_idx,
        "up_chunk": data.up.chunk,
        "up_a": data.up.a[:, raw_idx],
        "up_b": data.up.b[:, raw_idx],
    }
    if data.down is not None:
        raw.update(
            {
                "down_chunk": data.down.chunk,
                "down_a": data.down.a[:, raw_idx],
                "down_b": data.down.b[:, raw_idx],
            }
        )
    if data.reset is not None:
        raw["reset"] = data.reset[:, raw_idx]
    return PulseModel(
        kind=kind,
        one_sided=data.one_sided,
        gamma_up=float(gs[0]),
        gamma_down=float(gs[1]) if len(gs) > 1 else float("nan"),
        g_lo=data.g_lo.reshape(full),
        g_hi=data.g_hi.reshape(full),
        g_lo_se=data.g_lo_se.reshape(full),
        g_hi_se=data.g_hi_se.reshape(full),
        dw_up=up.dw.reshape(full),
        dw_up_se=up.dw_se.reshape(full),
        dw_down=dw_down.reshape(full),
        dw_down_se=dw_down_se.reshape(full),
        valid=valid.reshape(full),
        summary=summary,
        raw=raw,
    )
