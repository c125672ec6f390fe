"""Issue 3: ff-EBM: EB blocks inside torch models, BP-EP chaining against autograd."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from drivers import Device, SettleBudget, Topology, open_device
from hil.data import load_digits
from hil.ep import EBBlock
from hil.ffebm import FFEBM, Clamp01, EBLayer, split_layered
from hil.gradcheck import cosine, rel_error
from hil.init import goe_init

CHECK = SettleBudget(max_steps=20_000, tol=1e-7, dt=0.5)


def _healthy(model: FFEBM, seed: int = 5) -> None:
    """Biases U(0.1, 0.4): units active, few on a kink of the hard sigmoid (see `hil gradcheck`)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.eb_layers:
            for w in layer.block.weights.values():
                w[-1] = 0.1 + 0.3 * torch.rand(w.shape[1], generator=g)
        for p in model.parts:
            if isinstance(p, nn.Linear):
                p.bias.uniform_(0.1, 0.4, generator=g)


def _devices(k: int) -> Device:
    return open_device(f"emulator://?preset=ideal&seed={k}")


def test_split_layered() -> None:
    assert split_layered([64, 256, 256, 10], 2) == [[64, 256, 256], [256, 10]]
    assert split_layered([64, 32, 16, 16, 10], 2) == [[64, 32, 16], [16, 16, 10]]
    assert split_layered([5, 4, 3], 5) == [[5, 4, 3]]
    with pytest.raises(ValueError):
        split_layered([5, 4], 0)


def test_goe_init_is_a_symmetric_ensemble() -> None:
    topo = Topology.dense({"a": 40, "b": 60})
    w = goe_init(topo, 0.5, torch.Generator().manual_seed(0))["W"]
    core = w[:100]
    assert torch.equal(core, core.T) and float(core.diagonal().abs().max()) == 0
    assert float(w[100].abs().max()) == 0  # bias row starts at 0
    radius = float(torch.linalg.eigvalsh(core.double()).abs().max())
    assert 0.8 < radius < 1.15  # semicircle edge 2 * scale = 1
    lay = goe_init(Topology.layered([30, 20, 10]), 0.5, torch.Generator().manual_seed(0))
    assert lay["W0"].shape == (31, 20) and float(lay["W1"][-1].abs().max()) == 0


def test_ffebm_two_blocks_linear_between_matches_autograd() -> None:
    """Two EB blocks on two boards with a digital Linear (+ hard sigmoid) between them: BP-EP
    chaining against autograd through the reference (implicit differentiation)."""
    ds = load_digits()
    model = FFEBM.layered(
        [64, 32, 16, 16, 10], 2, _devices, between="linear", budget=CHECK, init="gaussian",
        init_scale=1.0, beta=0.01,
    )  # fmt: skip
    _healthy(model)
    assert len(model.eb_layers) == 2 and isinstance(model.parts[1], nn.Linear)
    x, y = ds.x_train[:32], ds.y_train[:32]
    loss = nn.functional.cross_entropy(4 * model(x), y)
    loss.backward()
    ref = model.reference()
    lref = nn.functional.cross_entropy(4 * ref(x.double()), y)
    lref.backward()
    assert float(loss.detach()) == pytest.approx(float(lref.detach()), rel=1e-5)
    ours = torch.cat([p.grad.flatten().double() for p in model.parameters()])
    theirs = torch.cat([p.grad.flatten() for p in ref.parameters()])
    assert cosine(ours, theirs) >= 0.99
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        assert cosine(a.grad, b.grad) >= 0.99, tuple(a.shape)


def test_ffebm_with_conv_bn_pool_front() -> None:
    """A digital conv front (Conv2d, BatchNorm, pooling) feeding an EB block: the EP input
    gradient flows back into the convolution."""
    ds = load_digits()
    torch.manual_seed(0)
    front = [nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), Clamp01(), nn.AvgPool2d(2)]
    topo = Topology.layered([64, 24, 10], budget=CHECK)
    blk = EBBlock(_devices(0), topo, weights=goe_init(topo, 0.5, torch.Generator().manual_seed(1)))
    with torch.no_grad():
        for w in blk.weights.values():
            w[-1].uniform_(0.1, 0.4)
    model = FFEBM([*front, EBLayer(blk, beta=0.01)])
    x, y = ds.x_train[:16].reshape(16, 1, 8, 8), ds.y_train[:16]
    nn.functional.cross_entropy(4 * model(x), y).backward()
    ref = model.reference()
    nn.functional.cross_entropy(4 * ref(x.double()), y).backward()
    conv, conv_ref = model.parts[0], ref[0]
    assert conv.weight.grad is not None and float(conv.weight.grad.abs().sum()) > 0
    assert cosine(conv.weight.grad, conv_ref.weight.grad) >= 0.99
    assert rel_error(blk.weights["W0"].grad, ref[4].net.weights["W0"].grad) < 0.05


def test_an_optimiser_step_reaches_the_boards() -> None:
    model = FFEBM.layered([8, 6, 4, 3], 1, _devices, between="linear", budget=SettleBudget(max_steps=30))
    assert len(model.block_parameters()) == 3 and len(model.digital_parameters()) == 4
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.rand(5, 8)
    before = [p.detach().clone() for p in model.block_parameters()]
    for _ in range(4):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
    after = model.block_parameters()
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    # the new weights reached the boards at the next forward
    model(x)
    blk = model.eb_layers[0].block
    assert torch.allclose(blk.device_weights().weights["W0"], blk.weights["W0"].detach(), atol=1e-6)
