"""The temperature phase transition of an MHN, derived and measured.

Derivation (docs/mhn.md has it in full). The update ``T(x) = xi softmax(beta xi^T x)`` has the
Jacobian ``J = beta xi (diag p - p p^T) xi^T``, symmetric and positive semi-definite; the
energy's Hessian is ``I - J``. At small beta, T is a contraction with one fixed point x*, the
single global attractor (near the patterns' mean). It stays a minimum while
``lambda_max(J(x*)) < 1``. For patterns of equal norm and equal pairwise overlaps
(equidistant), the mean m is a fixed point at every beta with p uniform (all ``xi_mu . m`` are
equal), and there ``J = beta C`` with ``C = 1/N sum_mu (xi_mu - m)(xi_mu - m)^T`` the patterns'
covariance, so

    beta_c = 1 / lambda_max(C)       (equidistant: N / (r^2 (1 - c)), norm r, cosine c).

For any other pattern set x* moves with beta and p is not uniform; `critical_beta` follows x*
by continuation (Newton at each beta from the previous one) and bisects on
``lambda_max(J(x*(beta), beta)) = 1``, which a general set reaches at a fold (x* meets a
saddle and the branch ends). Some sets never reach it: x* slides smoothly towards one pattern
(a crossover, not a transition); there beta_c is where lambda_max(J) peaks. The effective
inverse temperature is ``beta_eff = beta lambda_max(C)``: the same dimensionless number for
any scale and spread of the patterns, whose critical value is 1 for equidistant sets;
`beta / beta_c` is the ratio that says on which side a memory sits for any set.

Measured: from starts near x* (a small random displacement) and from random points of the
patterns' convex hull, the board retrieves; the distinct end states are the minima reached,
with their overlap (cosine) with the nearest pattern. The transition is where starts near x*
stop returning to it. (The transition is discontinuous: pattern minima appear below beta_c and
coexist with x*, so the count from anywhere in the hull grows before beta_c; the single
attractor is the only minimum only well below it.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from drivers import ConfigurationError
from hil.mhn.core import fixed_point, jacobian

RetrieveFn = Callable[[np.ndarray, float], np.ndarray]  # (starts (B, d), beta) -> end states (B, d)


def equidistant_patterns(n: int, d: int, norm: float, *, cos: float = 0.0, seed: int = 0) -> Tensor:
    """`n` patterns of dimension `d` (columns of a (d, n) float64 matrix), all of norm `norm`,
    every pair with cosine `cos`, in a random orientation. Needs ``n <= d`` and
    ``-1/(n-1) < cos < 1``."""
    if not (1 <= n <= d):
        raise ConfigurationError(f"equidistant patterns need 1 <= n <= d, got n={n}, d={d}")
    if not (math.isfinite(norm) and norm > 0):
        raise ConfigurationError(f"norm must be > 0, got {norm!r}")
    if not (-1.0 / max(n - 1, 1) < cos < 1.0):
        raise ConfigurationError(f"cos must be in (-1/(n-1), 1), got {cos!r}")
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, n, generator=gen, dtype=torch.float64))
    gram = (1 - cos) * torch.eye(n, dtype=torch.float64) + cos * torch.ones(n, n, dtype=torch.float64)
    return norm * q @ torch.linalg.cholesky(gram).T


def covariance(xi: Tensor) -> Tensor:
    """``1/N sum_mu (xi_mu - m)(xi_mu - m)^T`` of the columns of `xi`."""
    c = xi - xi.mean(1, keepdim=True)
    return c @ c.T / xi.shape[1]


def lambda_cov(xi: Tensor) -> float:
    return float(torch.linalg.eigvalsh(covariance(xi.double()))[-1])


@dataclass
class Critical:
    """The derived transition of a pattern set."""

    beta_c: float
    lambda_cov: float  # lambda_max of the patterns' covariance
    # how the single attractor ends: "pitchfork" (the mean, p uniform: equidistant-like sets),
    # "fold" (x* meets a saddle), "crossover" (x* never loses stability, it slides towards a
    # pattern: beta_c is where lambda_max(J) peaks, the softest point of the branch)
    kind: str
    centre: Tensor  # x* at beta_c (d,)

    @property
    def symmetric(self) -> bool:
        return self.kind == "pitchfork"

    @property
    def beta_eff_c(self) -> float:
        """The critical effective inverse temperature (1 for equidistant sets)."""
        return self.beta_c * self.lambda_cov

    def ratio(self, beta: float) -> float:
        """``beta_eff / beta_eff_c = beta / beta_c``: below 1 a single attractor, above 1
        pattern-specific minima."""
        return beta / self.beta_c


def stability(xi: Tensor, beta: float, x0: Tensor | None = None) -> tuple[Tensor, float]:
    """The small-beta branch's fixed point near `x0` (default: the mean) and lambda_max of the
    update's Jacobian there."""
    xi = xi.double()
    x = (xi.mean(1) if x0 is None else x0.double())[None]
    x = fixed_point(x, xi, beta, damping=0)
    lam = float(torch.linalg.eigvalsh(jacobian(x, xi, beta)[0])[-1])
    return x[0], lam


def critical_beta(xi: Tensor, *, rel_tol: float = 1e-6) -> Critical:
    """Derive beta_c for patterns `xi` (d, N): ``1 / lambda_max(C)`` when the mean is the fixed
    point with uniform p, else by continuation of x* and bisection (module docstring)."""
    xi = xi.double()
    lam_c = lambda_cov(xi)
    if lam_c <= 0:
        raise ConfigurationError("the patterns are all equal: there is no transition")
    m = xi.mean(1)
    sims = m @ xi
    if float(sims.max() - sims.min()) <= 1e-9 * max(float(sims.abs().max()), 1e-30):
        return Critical(1.0 / lam_c, lam_c, "pitchfork", m)
    # continuation from a beta where T is a strong contraction. The branch ends where
    # lambda_max(J) reaches 1: at a pitchfork (symmetric sets) or at a fold, where x* meets a
    # saddle and Newton jumps to another branch; a jump counts as the end too.
    jump = 0.1 * math.sqrt(float(torch.trace(covariance(xi))))

    def stable(beta: float, x_prev: Tensor) -> tuple[bool, Tensor]:
        x, lam = stability(xi, beta, x_prev)
        ok = lam < 1.0 and bool(torch.isfinite(x).all()) and float((x - x_prev).norm()) <= jump
        return ok, x

    beta, x = 0.05 / lam_c, m
    b_lo, x_lo = beta, m
    peak = (0.0, beta, m)  # lambda_max, beta, x* where the branch was softest
    while True:
        ok, x = stable(beta, x_lo)
        if not ok:
            break
        lam = stability(xi, beta, x)[1]
        if lam > peak[0]:
            peak = (lam, beta, x)
        elif lam < 0.5 * peak[0] or beta > 1e3 / lam_c:
            return Critical(peak[1], lam_c, "crossover", peak[2])
        b_lo, x_lo = beta, x
        beta *= 1.02
    b_hi = beta
    while b_hi - b_lo > rel_tol * b_hi:
        mid = 0.5 * (b_lo + b_hi)
        ok, xm = stable(mid, x_lo)
        if ok:
            b_lo, x_lo = mid, xm
        else:
            b_hi = mid
    return Critical(0.5 * (b_lo + b_hi), lam_c, "fold", x_lo)


def centre_at(xi: Tensor, beta: float, crit: Critical) -> Tensor:
    """Where the near-centre starts are displaced from: x* of the small-beta branch at `beta`,
    continued from the mean. Past beta_c: for a symmetric set the mean (the branch goes on,
    unstable); for any other the branch's end point ``crit.centre`` (it ended at a fold: there
    is no x* left to start near)."""
    if crit.symmetric:
        return xi.double().mean(1)
    if beta >= crit.beta_c:
        return crit.centre
    x = xi.double().mean(1)
    steps = max(1, math.ceil(beta / crit.beta_c * 20))
    for k in range(1, steps + 1):
        x, _ = stability(xi, beta * k / steps, x)
    return x


def meaning(ratio: float) -> str:
    """One plain sentence on what ``beta / beta_c`` means for retrieval."""
    if ratio < 0.9:
        return (
            f"beta is {ratio:.3g} of beta_c: the memory sits in the single-attractor phase, so queries "
            "near the patterns' centre all fall to one blended state instead of a stored pattern."
        )
    if ratio <= 1.1:
        return (
            f"beta is {ratio:.3g} of beta_c: the memory sits at the transition, where retrieval is slow "
            "and device noise decides whether a query reaches a pattern or the blended state."
        )
    return (
        f"beta is {ratio:.3g} of beta_c: the memory sits in the retrieval phase, where each stored "
        "pattern is its own minimum and a query falls to the pattern it is nearest."
    )


# ------------------------------------------------------------------------------ measuring
@dataclass
class PhasePoint:
    """What the starts reached at one beta."""

    beta: float
    escaped: float  # fraction of the near-centre starts that did not return to x*
    minima_centre: int  # distinct end states of the near-centre starts
    minima: int  # distinct end states of all starts (near-centre and anywhere in the hull)
    overlaps: list[float] = field(default_factory=list)  # per minimum: cosine with its nearest pattern
    mean_overlap: float = 0.0  # over all starts' end states

    def to_dict(self) -> dict[str, float | int]:
        return {
            "beta": self.beta,
            "escaped": self.escaped,
            "minima_centre": self.minima_centre,
            "minima": self.minima,
            "mean_overlap": self.mean_overlap,
        }


def distinct(x: np.ndarray, radius: float) -> np.ndarray:
    """Greedy clustering of end states: one representative per group within `radius`."""
    reps: list[np.ndarray] = []
    for v in x:
        if not any(float(np.linalg.norm(v - r)) <= radius for r in reps):
            reps.append(v)
    return np.array(reps).reshape(len(reps), x.shape[1])


def overlap(x: np.ndarray, xi: np.ndarray) -> np.ndarray:
    """Per state, the largest cosine with a pattern."""
    nx = np.linalg.norm(x, axis=1, keepdims=True)
    nxi = np.linalg.norm(xi, axis=0, keepdims=True)
    return ((x @ xi) / np.maximum(nx * nxi, 1e-30)).max(1)


@dataclass
class Starts:
    """The random starts of a sweep, drawn once (the same at every beta)."""

    directions: np.ndarray  # (B, d) unit vectors: near-centre displacements
    hull: np.ndarray  # (B2, N) Dirichlet weights: starts anywhere in the patterns' hull
    radius: float  # displacement of the near-centre starts

    @staticmethod
    def draw(xi: Tensor, centre: int = 32, anywhere: int = 32, eps: float = 0.05, seed: int = 0) -> Starts:
        rng = np.random.default_rng(seed)
        d, n = xi.shape
        v = rng.standard_normal((centre, d))
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        spread = math.sqrt(float(torch.trace(covariance(xi.double()))))
        return Starts(v, rng.dirichlet(np.ones(n), anywhere), eps * spread)


def measure(
    retrieve: RetrieveFn,
    xi: Tensor,
    beta: float,
    crit: Critical,
    starts: Starts,
    *,
    box: tuple[float, float] | None = None,
) -> PhasePoint:
    """Run the starts at one beta and count what they reached."""
    xi64 = xi.double()
    xin = xi64.numpy()
    c = centre_at(xi64, beta, crit).numpy()
    near = c[None] + starts.radius * starts.directions
    anywhere = starts.hull @ xin.T
    x0 = np.concatenate([near, anywhere])
    if box is not None:
        x0 = np.clip(x0, *box)
    end = retrieve(x0, beta)
    k = len(near)
    scale = float(np.linalg.norm(xin - c[:, None], axis=0).min())  # the nearest pattern's distance
    escaped = float((np.linalg.norm(end[:k] - c, axis=1) > 0.25 * scale).mean())
    pairs = np.linalg.norm(xin[:, :, None] - xin[:, None, :], axis=0)
    radius = 0.1 * float(pairs[~np.eye(pairs.shape[0], dtype=bool)].min()) if xin.shape[1] > 1 else scale
    reps = distinct(end, radius)
    return PhasePoint(
        beta,
        escaped,
        len(distinct(end[:k], radius)),
        len(reps),
        [float(o) for o in overlap(reps, xin)],
        float(overlap(end, xin).mean()),
    )


def sweep(
    retrieve: RetrieveFn,
    xi: Tensor,
    betas: Sequence[float],
    *,
    crit: Critical | None = None,
    starts: Starts | None = None,
    box: tuple[float, float] | None = None,
) -> list[PhasePoint]:
    crit = crit or critical_beta(xi)
    starts = starts or Starts.draw(xi)
    return [measure(retrieve, xi, float(b), crit, starts, box=box) for b in betas]


def measured_critical(points: Sequence[PhasePoint], level: float = 0.5) -> float:
    """The beta where the near-centre starts' escaped fraction first reaches `level`,
    interpolated linearly between the sweep's points: NaN where it never does, -inf where it
    already does at the sweep's lowest beta (the transition lies below the sweep, or the board
    keeps the memory from ever settling near the centre: not a measurement)."""
    prev = None
    for pt in sorted(points, key=lambda q: q.beta):
        if pt.escaped >= level:
            if prev is None:
                return -math.inf
            f = (level - prev.escaped) / max(pt.escaped - prev.escaped, 1e-12)
            return prev.beta + f * (pt.beta - prev.beta)
        prev = pt
    return math.nan


def locate(
    retrieve: RetrieveFn,
    xi: Tensor,
    crit: Critical,
    starts: Starts,
    *,
    lo: float,
    hi: float,
    iters: int = 6,
    box: tuple[float, float] | None = None,
) -> float:
    """Bisect on beta between `lo` (starts return) and `hi` (they escape) for the escape level
    of 1/2; returns the midpoint of the last bracket."""
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if measure(retrieve, xi, mid, crit, starts, box=box).escaped >= 0.5:
            hi = mid
        else:
            lo = mid
    return 0.5 * (lo + hi)
