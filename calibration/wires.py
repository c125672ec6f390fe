"""The host's model of a tile's wires (IR drop), and targets pre-distorted for it.

A crossbar's row and column wires have a resistance per cell segment, so a cell sees less than
the voltage its row driver puts out, and a tile's effective weights fall short of the ones its
conductances give, the more so the larger the tile and the conductances (docs/calibration.md).
The host models each array (G+ and G-) of a tile as the resistor network of a crossbar whose
rows are driven at their column-0 end and whose columns end in virtual-ground sense amplifiers
after the last row, every segment `r` ohms, and takes the map of a uniform drive: with every
row at the same voltage, cell (i, j) keeps the fraction ``u_ij`` of it, and its effective
conductance is ``G_ij u_ij`` (first order in the wires' effect, exact for a uniform input;
the emulator's default `ir_model="attenuation"` is this map). `r` is measured by the mvm
routine (`calibration.mvm.measure_mvm`, from how the outputs move when the line load
changes at fixed weights); `predistort` finds conductances whose effective values are the
ones asked for, and `calibration.CalibratedDevice` programs those.

The solve: the currents x of the cells obey ``x / G + r A x = 1`` with ``A`` the wires'
operator (`wire_operator`); with ``S = sqrt(G)``, ``y = x / S`` it is the symmetric positive
definite ``(1 + r S A S) y = S``, solved by Jacobi-preconditioned conjugate gradients in
float64 to a relative residual of `TOL`. One solve costs about ``iterations x R x C``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from calibration.record import CalibrationError

TOL = 1e-9  # relative residual of the conjugate-gradient solve
MAX_ITERS = 2000  # conjugate-gradient iterations of one solve
MAX_CELLS = 1 << 22  # R C of a tile the host models (2048 x 2048)
MAX_OHMS = 100.0  # wire resistance per segment the host considers (ohms)
PREDISTORT_ITERS = 30  # fixed-point steps of `predistort`
PREDISTORT_TOL = 1e-5  # ... until every effective conductance is within this share of the range
MIN_COLUMN_SCALE = 0.05  # `predistort` scales a column's weights down to this factor at most


def _revcumsum(x: np.ndarray, axis: int) -> np.ndarray:
    return x.sum(axis, keepdims=True) - x.cumsum(axis) + x


def wire_operator(x: np.ndarray) -> np.ndarray:
    """``A x``: the voltage drop (per ohm of segment) at every cell that cell currents `x`
    (R, C) cause: along the row wire from the driver at column 0 (the segment before cell j
    carries every current drawn at and beyond j) and up the column wire from the sense end
    after row R-1 (the segment after cell i carries the currents of rows 0..i)."""
    return _revcumsum(x, 1).cumsum(1) + _revcumsum(x.cumsum(0), 0)


def _check(g: np.ndarray, r: float) -> np.ndarray:
    g = np.asarray(g, dtype=np.float64)
    if g.ndim != 2 or g.size == 0:
        raise CalibrationError(f"a wire model needs one array of conductances (rows, cols), got {g.shape}")
    if g.size > MAX_CELLS:
        raise CalibrationError(
            f"the wire model of a {g.shape[0]} x {g.shape[1]} tile holds {g.size:,} cells, over the "
            f"bound of {MAX_CELLS:,}: compensate smaller tiles"
        )
    if not 0.0 <= r <= MAX_OHMS:
        raise CalibrationError(f"wire resistance must be in [0, {MAX_OHMS:g}] ohms per segment, got {r}")
    return np.clip(g, 0.0, None)


def attenuation(g: np.ndarray, r: float, u0: np.ndarray | None = None) -> np.ndarray:
    """The fraction (R, C) of a uniform row drive that each cell of conductances `g` (siemens)
    keeps with `r` ohms per wire segment; `u0`, an earlier answer, starts the solve.
    CalibrationError if it does not converge."""
    g = _check(g, r)
    if r == 0.0:
        return np.ones_like(g)
    rows, cols = g.shape
    s = np.sqrt(g)
    seg = np.arange(1, cols + 1)[None, :] + np.arange(rows, 0, -1)[:, None]
    inv_diag = 1.0 / (1.0 + r * g * seg)  # a cell's own current over its own segments

    def op(y: np.ndarray) -> np.ndarray:
        return y + r * s * wire_operator(s * y)

    b = s
    y = s.copy() if u0 is None else s * np.asarray(u0, dtype=np.float64)
    res = b - op(y)
    z = inv_diag * res
    p = z.copy()
    rz = float((res * z).sum())
    target = TOL**2 * max(float((b * b).sum()), 1e-300)
    for _ in range(MAX_ITERS):
        if float((res * res).sum()) <= target:
            return 1.0 - r * wire_operator(s * y)
        ap = op(p)
        alpha = rz / max(float((p * ap).sum()), 1e-300)
        y += alpha * p
        res -= alpha * ap
        z = inv_diag * res
        rz_new = float((res * z).sum())
        p = z + (rz_new / max(rz, 1e-300)) * p
        rz = rz_new
    raise CalibrationError(
        f"the wire model's solve did not converge in {MAX_ITERS} iterations ({r} ohm, tile "
        f"{g.shape}): the wire resistance is too large for this tile; use smaller tiles"
    )


def effective_conductance(g: np.ndarray, r: float) -> np.ndarray:
    """``G u``: the conductances (R, C) an mvm sees through the wires."""
    g = _check(g, r)
    return g * attenuation(g, r)


def effective_weights(g_plus: np.ndarray, g_minus: np.ndarray, r: float, g_range: float) -> np.ndarray:
    """``(G+ u+ - G- u-) / g_range``: each array with its own wires."""
    return (effective_conductance(g_plus, r) - effective_conductance(g_minus, r)) / g_range


@dataclass
class Predistorted:
    """Conductances to program (R, C) so that each array's effective conductances are the
    requested ones, each column's weights scaled by `column_scale` where the wires take more
    than [g_lo, g_hi] can give back."""

    g_plus: np.ndarray
    g_minus: np.ndarray
    # (C,) in (0, 1]: column j's effective conductances are g_lo + s_j (requested - g_lo), so
    # its weights (differences) are s_j times the requested ones; 1 where every cell is reached
    column_scale: np.ndarray
    residual: float  # largest |effective - scaled request| of the devices not `fixed` (siemens)
    iterations: int
    attenuation: tuple[np.ndarray, np.ndarray]  # each array's `attenuation` at the answer


def predistort(
    g_plus: np.ndarray,
    g_minus: np.ndarray,
    r: float,
    g_lo: float,
    g_hi: float,
    *,
    fixed: tuple[np.ndarray, np.ndarray] | None = None,
    start: tuple[np.ndarray, np.ndarray] | None = None,
) -> Predistorted:
    """Conductances in [g_lo, g_hi] whose effective values through `r` ohms of wire per
    segment are `g_plus` and `g_minus` (each array separately, so the weights match too).

    The fixed point of ``G = T / u(G)``: a cell whose effective value falls short is raised by
    the share it loses, and the line current it adds goes into the next solve. Where a
    column's cells would need more than g_hi, the column's requests are scaled towards g_lo
    by the largest factor that every one of them reaches (`Predistorted.column_scale`):
    clipping the cells one by one would bend the column's weights against each other, while
    a common factor only scales its output (as the wires themselves mostly do). `fixed`
    (masks for G+ and G-) names devices that hold their value whatever is asked (stuck ones):
    they keep it, and their current is in the others' solve. `start` (each array's
    `attenuation` from an earlier call, `Predistorted.attenuation`) warm-starts the solves."""
    if not g_lo < g_hi:
        raise CalibrationError(f"predistort needs g_lo < g_hi, got {g_lo} and {g_hi}")
    t = np.stack((np.asarray(g_plus, np.float64), np.asarray(g_minus, np.float64)))
    keep = np.zeros(t.shape, bool) if fixed is None else np.stack([np.asarray(f, bool) for f in fixed])
    g = t.copy()
    u = np.stack([attenuation(g[k], r, None if start is None else start[k]) for k in (0, 1)])
    scale = np.ones(t.shape[-1])
    tol = PREDISTORT_TOL * (g_hi - g_lo)
    lift = np.where(keep, 0.0, t - g_lo)  # what each request asks above g_lo
    iterations = 0
    for _ in range(PREDISTORT_ITERS):
        iterations += 1
        # the largest common factor of each column that keeps (g_lo + s lift) / u <= g_hi;
        # never raised again once lowered, so the iteration settles
        with np.errstate(divide="ignore", invalid="ignore"):
            room = np.where(lift > 0, (g_hi * u - g_lo) / lift, np.inf)
        scale = np.minimum(scale, np.clip(room.min(axis=(0, 1)), MIN_COLUMN_SCALE, 1.0))
        want = g_lo + scale * lift
        g = np.where(keep, t, np.clip(want / np.maximum(u, 1e-6), g_lo, g_hi))
        u = np.stack([attenuation(g[k], r, u[k]) for k in (0, 1)])
        if float(np.where(keep, 0.0, np.abs(g * u - want)).max()) <= tol:
            break
    want = g_lo + scale * lift
    return Predistorted(
        g_plus=g[0].astype(np.float32),
        g_minus=g[1].astype(np.float32),
        column_scale=scale,
        residual=float(np.where(keep, 0.0, np.abs(g * u - want)).max()),
        iterations=iterations,
        attenuation=(u[0], u[1]),
    )
