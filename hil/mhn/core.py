"""The modern Hopfield network (MHN) in pure torch: energy, update, retrieval.

Patterns are the columns of ``xi`` (d, N); states are rows of ``x`` (batch, d). The energy is

    E(x) = -1/beta logsumexp(beta xi^T x) + |x|^2 / 2

and its concave-convex update ``x <- xi softmax(beta xi^T x)`` never raises it (Ramsauer et al.
2020). This module is the reference the board's retrieval (`hil.mhn.block`) is checked
against, and the exact minimiser the diagnostics and gradient checks use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from drivers import ConfigurationError

# One retrieval's step bound: the update contracts geometrically away from the transition, and
# at 1.01 beta_c it still settles in a few thousand steps; 10^6 steps of a batch are minutes on
# a board, past any use.
MAX_RETRIEVAL_STEPS = 1_000_000
MAX_BETA = 1e6  # inverse temperature: past this the softmax is an argmax in float32 anyway


def check_nudge(beta: float, name: str = "beta_ep") -> float:
    """An EP nudge strength in (0, 1): the two nudged retrievals use +-beta, and a retrieval
    refuses a nudge of |beta| >= 1 (`MHNBlock.retrieve`); ConfigurationError otherwise, naming
    `name`, so that the error comes where the nudge is set, not in a backward pass."""
    try:
        b = float(beta)
    except (TypeError, ValueError):
        raise ConfigurationError(f"{name} (the EP nudge) must be a number, got {beta!r}") from None
    if not (math.isfinite(b) and 0.0 < b < 1.0):
        raise ConfigurationError(
            f"{name} (the EP nudge) must be in (0, 1), got {beta!r}: 0.01 on an ideal board, more on "
            "a noisy one (docs/mhn.md)"
        )
    return b


def check_beta(beta: float) -> float:
    """A finite inverse temperature in (0, MAX_BETA]; ConfigurationError otherwise."""
    try:
        b = float(beta)
    except (TypeError, ValueError):
        raise ConfigurationError(f"beta must be a number, got {beta!r}") from None
    if not (math.isfinite(b) and 0.0 < b <= MAX_BETA):
        raise ConfigurationError(f"beta must be in (0, {MAX_BETA:g}], got {beta!r}")
    return b


@dataclass(frozen=True)
class RetrievalBudget:
    """How a retrieval runs: at most `max_steps` updates; every `check_every` steps the largest
    state change over the batch is compared with `tol` (plus the board's noise floor, where it
    has one); ``tol = 0`` runs exactly `max_steps`."""

    max_steps: int = 500
    tol: float = 1e-6
    check_every: int = 1

    def __post_init__(self) -> None:
        for name, lo, hi in (("max_steps", 1, MAX_RETRIEVAL_STEPS), ("check_every", 1, MAX_RETRIEVAL_STEPS)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ConfigurationError(
                    f"retrieval budget: {name} must be an integer in [{lo}, {hi}], got {v!r}"
                )
        t = self.tol
        if isinstance(t, bool) or not isinstance(t, int | float) or not (math.isfinite(t) and t >= 0):
            raise ConfigurationError(f"retrieval budget: tol must be a finite number >= 0, got {t!r}")


def logits(x: Tensor, xi: Tensor, beta: float) -> Tensor:
    return beta * (x @ xi)


def update(x: Tensor, xi: Tensor, beta: float) -> Tensor:
    """One step ``x <- xi softmax(beta xi^T x)`` for a batch of states."""
    return torch.softmax(logits(x, xi, beta), dim=-1) @ xi.T


def energy(x: Tensor, xi: Tensor, beta: float) -> Tensor:
    """Per-sample ``-1/beta logsumexp(beta xi^T x) + |x|^2 / 2``."""
    return -torch.logsumexp(logits(x, xi, beta), dim=-1) / beta + 0.5 * (x * x).sum(-1)


def jacobian(x: Tensor, xi: Tensor, beta: float) -> Tensor:
    """The update's Jacobian at each state, ``beta xi (diag p - p p^T) xi^T`` (batch, d, d);
    symmetric and positive semi-definite, and ``I - J`` is the energy's Hessian."""
    p = torch.softmax(logits(x, xi, beta), dim=-1)
    cov = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return beta * xi @ cov @ xi.T


@dataclass
class TorchRetrieval:
    x: Tensor  # (batch, d) final states
    steps: int
    converged: bool
    residual: float  # the largest state change of the last step


def retrieve(x0: Tensor, xi: Tensor, beta: float, budget: RetrievalBudget | None = None) -> TorchRetrieval:
    """Iterate the update from `x0` under `budget` (the same rule as the board's retrieval)."""
    budget = budget or RetrievalBudget()
    beta = check_beta(beta)
    x = x0
    residual, steps = math.inf, 0
    for steps in range(1, budget.max_steps + 1):
        nxt = update(x, xi, beta)
        if budget.tol > 0 and steps % budget.check_every == 0:
            residual = float((nxt - x).abs().max())
            x = nxt
            if residual <= budget.tol:
                return TorchRetrieval(x, steps, True, residual)
        else:
            x = nxt
    if budget.tol == 0:
        residual = float((update(x, xi, beta) - x).abs().max())
    return TorchRetrieval(x, steps, budget.tol == 0, residual)


def fixed_point(
    x0: Tensor,
    xi: Tensor,
    beta: float,
    *,
    iters: int = 100,
    tol: float = 1e-12,
    damping: int = 50,
    free: Tensor | None = None,
) -> Tensor:
    """A stationary point of the energy near `x0` by Newton's method on ``x - T(x) = 0`` (float64
    advised), after `damping` plain updates. Newton converges where plain iteration crawls
    (near the transition the update contracts by lambda_max(J) -> 1 per step). `free`: a (d,)
    bool mask of the components that move (the others stay clamped at `x0`'s values)."""
    idx = torch.arange(xi.shape[0]) if free is None else torch.nonzero(free).flatten()
    x = x0.clone()
    for _ in range(damping):
        x[:, idx] = update(x, xi, beta)[:, idx]
    eye = torch.eye(len(idx), dtype=xi.dtype, device=xi.device)
    for _ in range(iters):
        f = (x - update(x, xi, beta))[:, idx]
        if float(f.abs().max()) <= tol:
            break
        h = eye - jacobian(x, xi, beta)[:, idx][:, :, idx]
        x[:, idx] = x[:, idx] - torch.linalg.solve(h, f.unsqueeze(-1)).squeeze(-1)
    return x
