"""EP on conv EB blocks (issue 18): a two-layer conv block with pooling against implicit
differentiation of the reference, and BP-EP chaining through a digital conv front, a conv EB
block and a linear head against autograd through the reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from drivers import Device, SettleBudget, Topology, open_device
from hil.data import load_digits
from hil.ep import EBBlock
from hil.ffebm import FFEBM, split_conv
from hil.gradcheck import cosine, gradcheck, rel_error
from hil.init import goe_init

CHECK = SettleBudget(max_steps=600, tol=0.0, dt=0.5)


def _devices(k: int) -> Device:
    return open_device(f"emulator://?preset=ideal&seed={k}")


def _off_kinks(w: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Biases U(0.2, 0.4): most units between the corners of the hard sigmoid."""
    g = torch.Generator().manual_seed(seed)
    for t in w.values():
        t[-1] = 0.2 + 0.2 * torch.rand(t.shape[1], generator=g)
    return w


@pytest.mark.parametrize("pool_mode", ["max", "avg"])
def test_conv_block_ep_gradients_match_implicit_differentiation(pool_mode: str) -> None:
    """Two conv layers, each max- or average-pooled 2 x 2, and a fully connected output:
    weights, biases and the input gradient at beta 0.01, centered."""
    t = Topology.convolutional((1, 8, 8), [4, 6], pools=[2, 2], pool_mode=pool_mode, head=[3], budget=CHECK)
    w = _off_kinks(goe_init(t, 0.5, torch.Generator().manual_seed(0)), 1)
    blk = EBBlock(_devices(0), t, weights=w)
    gen = torch.Generator().manual_seed(2)
    x, target = torch.rand(8, 64, generator=gen), torch.rand(8, 3, generator=gen)
    eq = blk.reference().settle({"s0": x.double()}, newton=True)
    for g in ("s1", "s2", "s3"):
        on = float(((eq.states[g] > 1e-6) & (eq.states[g] < 1 - 1e-6)).double().mean())
        assert on > 0.6, (g, on)  # the check is about EP, not about units stuck on a kink
    rows = gradcheck(blk, x, target, betas=(0.01,), modes=("centered",))
    seen = {r.param for r in rows}
    assert {"W0.weight", "W0.bias", "W1.weight", "W1.bias", "W2.weight", "W2.bias", "input:s0"} <= seen
    for r in rows:
        assert r.cosine >= 0.999, r
        assert r.rel_error <= 0.05, r


def test_split_conv_chains_the_maps() -> None:
    assert split_conv((1, 28, 28), [4, 4, 8, 8, 16, 16], [1, 2, 1, 2, 1, 1], 3) == [
        ((1, 28, 28), [4, 4, 8], [1, 2, 1]),
        ((8, 14, 14), [8, 16, 16], [2, 1, 1]),
    ]
    with pytest.raises(ValueError, match="one pool per conv layer"):
        split_conv((1, 8, 8), [4, 4], [2], 1)


def test_conv_ffebm_bp_ep_chain_matches_autograd_through_the_reference() -> None:
    """Digital conv front (Conv2d, max-pool, batch-norm, clamp), a conv EB block on a board, a
    digital linear head: every parameter's gradient against autograd through the reference."""
    ds = load_digits()
    model = FFEBM.convolutional(
        (1, 8, 8), [4], [2], 1, 10, _devices, front=3, head="digital", budget=CHECK, init_scale=0.8,
        beta=0.01, seed=0,
    )  # fmt: skip
    blk = model.eb_layers[0].block
    with torch.no_grad():
        _off_kinks(dict(blk.weights), 3)
    assert blk.topology.shapes == {"s0": (3, 4, 4), "s1": (4, 2, 2)}
    x, y = ds.x_train[:16].reshape(16, 1, 8, 8), ds.y_train[:16]
    model.train()
    loss = nn.functional.cross_entropy(4 * model(x), y)
    loss.backward()
    ref = model.reference()
    ref.train()
    lref = nn.functional.cross_entropy(4 * ref(x.double()), y)
    lref.backward()
    assert float(loss.detach()) == pytest.approx(float(lref.detach()), rel=1e-4)
    ours = torch.cat([p.grad.flatten().double() for p in model.parameters()])
    theirs = torch.cat([p.grad.flatten() for p in ref.parameters()])
    assert cosine(ours, theirs) >= 0.999
    front = model.parts[0]
    conv = front[1]
    assert float(conv.weight.grad.abs().sum()) > 0
    assert cosine(conv.weight.grad, ref[0][1].weight.grad) >= 0.999
    assert rel_error(blk.weights["W0"].grad, ref[1].net.weights["W0"].grad) < 0.05
