"""The patterns as parameters: EP gradients through the board, and the implicit-differentiation
reference they are checked against.

A retrieval's end state x* minimises ``E(x; xi)``; a loss ``L(x*)`` (here the elastic cost
``1/2 |mask (x - target)|^2``, averaged over the batch) depends on xi through x*. Centered EP:
nudge the retrieval with ``+-beta_ep L`` (the host adds ``-+beta_ep grad L`` to each update,
`hil.mhn.block.ElasticNudge`), and

    dL/dxi ~ [dE/dxi(x+) - dE/dxi(x-)] / (2 beta_ep),    dE/dxi = -x p^T

(``p = softmax(beta xi^T x)``; the gradient of ``-1/beta logsumexp`` wrt xi is ``-x p^T``),
from the states and probabilities the board's retrievals return. Implicit differentiation:
at ``x* = T(x*)``, ``dx* = (I - J)^-1 dT/dxi dxi``, so ``dL/dxi = lambda^T dT/dxi`` with
``(I - J) lambda = grad L`` (J symmetric), computed in float64 torch at the patterns the board
holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from hil.mhn.block import ElasticNudge, MHNBlock, Retrieval
from hil.mhn.core import RetrievalBudget, check_nudge, fixed_point, jacobian, update


@dataclass
class EPGradient:
    grad: Tensor  # (d, N) float64: dL/dxi, batch mean
    free: Retrieval
    plus: Retrieval
    minus: Retrieval
    loss: float  # at the free state


def _cost(x: np.ndarray, target: np.ndarray, mask: np.ndarray | None) -> float:
    g = x - target
    if mask is not None:
        g = g * mask
    return float(0.5 * (g * g).sum(1).mean())


def ep_gradient(
    block: MHNBlock,
    x0: np.ndarray,
    target: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    beta_ep: float = 0.01,
    budget: RetrievalBudget | None = None,
    clamp: np.ndarray | None = None,
) -> EPGradient:
    """Centered EP estimate of the patterns' gradient: a free retrieval from `x0`, then the
    two nudged ones from its end state (`clamp`: components held at `x0`'s values in all
    three, `MHNBlock.retrieve`)."""
    check_nudge(beta_ep)
    free = block.retrieve(x0, budget=budget, clamp=clamp)
    plus = block.retrieve(free.x, budget=budget, nudge=ElasticNudge(beta_ep, target, mask), clamp=clamp)
    minus = block.retrieve(free.x, budget=budget, nudge=ElasticNudge(-beta_ep, target, mask), clamp=clamp)
    dplus = -plus.x.T @ plus.p  # sum over the batch of dE/dxi
    dminus = -minus.x.T @ minus.p
    grad = torch.from_numpy((dplus - dminus) / (2 * beta_ep * x0.shape[0]))
    return EPGradient(grad, free, plus, minus, _cost(free.x, target, mask))


def implicit_gradient(
    xi: Tensor,
    x_free: np.ndarray,
    target: np.ndarray,
    beta: float,
    *,
    mask: np.ndarray | None = None,
    clamp: np.ndarray | None = None,
) -> Tensor:
    """dL/dxi by implicit differentiation at the fixed point near `x_free` (float64); with
    `clamp`, over the free components only (``(I - J_ff) lambda = grad_f L``)."""
    free = None if clamp is None else torch.from_numpy(~np.asarray(clamp, dtype=bool))
    idx = torch.arange(xi.shape[0]) if free is None else torch.nonzero(free).flatten()
    xi = xi.detach().double().clone().requires_grad_(True)
    x = fixed_point(torch.from_numpy(np.asarray(x_free, np.float64)), xi.detach(), beta, damping=0, free=free)
    g = x - torch.from_numpy(np.asarray(target, np.float64))
    if mask is not None:
        g = g * torch.from_numpy(np.asarray(mask, np.float64))
    eye = torch.eye(len(idx), dtype=torch.float64)
    h = eye - jacobian(x, xi.detach(), beta)[:, idx][:, :, idx]
    lam = torch.linalg.solve(h, g[:, idx].unsqueeze(-1)).squeeze(-1)
    (grad,) = torch.autograd.grad((update(x, xi, beta)[:, idx] * lam).sum(), xi)
    return grad / x.shape[0]


def cosine(a: Tensor, b: Tensor) -> float:
    """0 when either is zero, unlike `hil.gradcheck.cosine` (1 for two zero vectors): a test
    asserting a cosine near 1 does not pass on two zero gradients."""
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-300))
