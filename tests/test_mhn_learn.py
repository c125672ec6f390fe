"""Issue 19: the MHN's patterns as parameters, EP gradients through the board against implicit
differentiation of its energy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from drivers import open_device
from hil.mhn.core import fixed_point
from hil.mhn.learn import cosine, ep_gradient, implicit_gradient
from hil.mhn.setups import GRADIENT_RATIOS, IDEAL, gradient_clamp, gradient_problem


def _problem(ratio: float):
    """The setup, shared with benchmarks/mhn_checks.py (which prints the figures these bound)."""
    p = gradient_problem(ratio)
    return p.block, p.beta, p.x0, p.target, p.mask


def test_implicit_gradient_matches_finite_differences() -> None:
    """The reference itself, checked: central differences of the loss at the re-solved minimum."""
    blk, beta, x0, target, mask = _problem(1.5)
    xi = blk.device_patterns().clone()
    x_free = fixed_point(torch.from_numpy(x0), xi, beta)
    grad = implicit_gradient(xi, x_free.numpy(), target, beta, mask=mask)

    def loss(p: torch.Tensor) -> float:
        x = fixed_point(x_free, p, beta, damping=0)
        g = (x - torch.from_numpy(target)) * torch.from_numpy(mask)
        return float(0.5 * (g * g).sum(1).mean())

    h = 1e-6
    for i, j in ((0, 0), (3, 2), (7, 5), (12, 1)):
        e = torch.zeros_like(xi)
        e[i, j] = h
        fd = (loss(xi + e) - loss(xi - e)) / (2 * h)
        assert fd == pytest.approx(float(grad[i, j]), rel=1e-4, abs=1e-8)


@pytest.mark.parametrize("ratio", GRADIENT_RATIOS)
def test_ep_gradient_of_the_patterns_matches_implicit_differentiation(ratio: float) -> None:
    """Centered EP at beta_EP 0.01 through ideal-board retrievals, below and above the transition."""
    blk, beta, x0, target, mask = _problem(ratio)
    ep = ep_gradient(blk, x0, target, mask=mask, beta_ep=0.01)
    ref = implicit_gradient(blk.device_patterns(), ep.free.x, target, beta, mask=mask)
    assert ep.plus.steps > 0 and ep.minus.steps > 0
    assert cosine(ep.grad, ref) >= 0.999
    assert float((ep.grad - ref).norm() / ref.norm()) <= 0.01
    # the gradient is a descent direction: a small step lowers the loss at the new minimum
    with torch.no_grad():
        blk.patterns -= torch.as_tensor(0.02 * ep.grad / ep.grad.norm(), dtype=torch.float32)
    after = blk.retrieve(ep.free.x)
    g = (after.x - target) * mask
    assert float(0.5 * (g * g).sum(1).mean()) < ep.loss


def test_ep_gradient_with_clamped_components_matches_implicit_differentiation() -> None:
    """Half the state held at the query (an input): EP over the free half against implicit
    differentiation restricted to it."""
    blk, beta, x0, target, mask = _problem(1.5)
    clamp = gradient_clamp()
    ep = ep_gradient(blk, x0, target, mask=mask, beta_ep=0.01, clamp=clamp)
    np.testing.assert_array_equal(ep.free.x[:, 8:], x0[:, 8:])  # held where clamped
    ref = implicit_gradient(blk.device_patterns(), ep.free.x, target, beta, mask=mask, clamp=clamp)
    assert cosine(ep.grad, ref) >= 0.999
    free_only = implicit_gradient(blk.device_patterns(), ep.free.x, target, beta, mask=mask)
    assert cosine(free_only, ref) < 0.995  # clamping changes the gradient (0.990 here): the check can fail


def test_mhn_classifier_learns_the_digits_by_ep() -> None:
    """20 prototypes ([image ; label], image clamped) on the ideal board, 2 epochs of EP."""
    from hil.mhn.classifier import MHNClassifier

    clf = MHNClassifier(open_device(IDEAL), per_class=2, beta_ratio=1.5)
    res = clf.fit(epochs=2, lr=2.0)
    before, after = res.test_accuracy[0], res.test_accuracy[-1]
    assert after >= 0.9 and after >= before + 0.1, res.test_accuracy
    assert res.train_loss[-1] < res.train_loss[0]
    assert res.cells == 75 * 20 and res.energy_j_per_image > 0
