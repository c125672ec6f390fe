"""Issue 19: an MHN block inside an ff-EBM (input clamped, EP backward) against autograd through
the pure-torch fixed point."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hil.mhn.layer import MHNLayer
from hil.mhn.learn import cosine
from hil.mhn.setups import LAYER_D_IN, LAYER_D_OUT, layer_setup, layer_unrolled

D_IN, D_OUT = LAYER_D_IN, LAYER_D_OUT
_unrolled = layer_unrolled


@pytest.fixture(scope="module")
def setup():
    # shared with benchmarks/mhn_checks.py, which prints the figures these tests bound
    return layer_setup()


def test_layer_forward_and_ep_backward_match_autograd(setup) -> None:
    blk, gen = setup
    layer = MHNLayer(blk, D_IN, beta=0.01)
    lo, hi = blk.box()
    x = (lo + (hi - lo) * torch.rand(10, D_IN, generator=gen, dtype=torch.float64)).float()
    w = torch.randn(10, D_OUT, generator=gen, dtype=torch.float64)
    x.requires_grad_(True)
    out = layer(x)
    (out.double() * w).sum().backward()
    # the reference at the patterns the tile holds
    xi = blk.device_patterns().clone().requires_grad_(True)
    xin = x.detach().double().clone().requires_grad_(True)
    ref = _unrolled(xin, xi)
    np.testing.assert_allclose(out.detach().double().numpy(), ref.detach().numpy(), atol=1e-5)
    (ref * w).sum().backward()
    assert layer.last is not None and all(r.converged for r in layer.last)
    assert cosine(blk.patterns.grad.double(), xi.grad) >= 0.999
    assert cosine(x.grad.double(), xin.grad) >= 0.999
    rel = float((x.grad.double() - xin.grad).norm() / xin.grad.norm())
    assert rel <= 0.01


def test_layer_in_a_digital_chain_trains(setup) -> None:
    """Linear -> clamp to the box -> MHN layer: a few steps of SGD on both lower the loss."""
    blk, gen = setup
    layer = MHNLayer(blk, D_IN, beta=0.01)
    lo, hi = blk.box()
    torch.manual_seed(0)
    front = torch.nn.Linear(5, D_IN)
    x = torch.randn(16, 5, generator=gen)
    y = 0.3 * torch.randn(16, D_OUT, generator=gen)
    opt = torch.optim.SGD([*front.parameters(), layer.patterns], lr=0.1)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = 0.5 * ((layer(front(x).clamp(lo, hi)) - y) ** 2).sum(1).mean()
        loss.backward()
        assert front.weight.grad is not None and float(front.weight.grad.abs().sum()) > 0
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
