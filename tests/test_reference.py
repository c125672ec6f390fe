"""Issue 3: the pure-torch reference DHN: settle, implicit differentiation, BPTT."""

from __future__ import annotations

import pytest
import torch

from drivers import Nudge, SettleBudget, Topology
from hil.gradcheck import cosine, mse_loss, rel_error
from hil.reference import DHN, rho

TIGHT = SettleBudget(max_steps=20_000, tol=1e-13, dt=0.5)


def _net(kind: str, seed: int = 0, symmetric: bool = True) -> tuple[DHN, str, str]:
    g = torch.Generator().manual_seed(seed)
    if kind == "layered":
        topo = Topology.layered([6, 9, 7, 4], budget=TIGHT)
        inp, out = "s0", "s3"
    else:
        topo = Topology.dense({"x": 6, "h": 9, "y": 4}, budget=TIGHT)
        inp, out = "x", "y"
    net = DHN(topo, generator=g, symmetric=symmetric)
    with torch.no_grad():
        for w in net.weights.values():
            w.mul_(0.6)
            w[-1].uniform_(0.1, 0.4, generator=g)  # bias row: keep units away from the kinks
    return net, inp, out


def _data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(5, 6, generator=g, dtype=torch.float64), torch.rand(
        5, 4, generator=g, dtype=torch.float64
    )


@pytest.mark.parametrize("kind", ["layered", "dense"])
def test_fixed_point_and_newton(kind: str) -> None:
    net, inp, _ = _net(kind)
    x, _ = _data()
    eq = net.settle({inp: x}, newton=True)
    assert eq.converged
    d = net.drive(eq.states)
    for g in net.free_groups({inp: x}):
        assert torch.allclose(eq.states[g], rho(d[g], net.gain), atol=1e-12)


@pytest.mark.parametrize("kind", ["layered", "dense"])
def test_implicit_matches_bptt_and_finite_differences(kind: str) -> None:
    net, inp, out = _net(kind)
    x, y = _data()
    loss = mse_loss(out, y)
    _, gw, gx, _ = net.implicit_gradients({inp: x}, loss)
    # BPTT through enough iterations to converge
    xx = x.clone().requires_grad_(True)
    loss(net.settle_bptt({inp: xx}, 600)).backward()
    for t, w in net.weights.items():
        assert rel_error(w.grad, gw[t]) < 1e-8, t
    assert rel_error(xx.grad, gx[inp]) < 1e-8
    # central finite differences on a few weights
    tile = next(iter(net.weights))
    w = net.weights[tile]
    eps = 1e-6
    for i, j in [(0, 0), (2, 3), (w.shape[0] - 1, 1)]:
        with torch.no_grad():
            w[i, j] += eps
            lp = loss(net.settle({inp: x}, newton=True).states)
            w[i, j] -= 2 * eps
            lm = loss(net.settle({inp: x}, newton=True).states)
            w[i, j] += eps
        assert abs(float((lp - lm) / (2 * eps)) - float(gw[tile][i, j])) < 1e-6


def test_forward_autograd_is_implicit_differentiation() -> None:
    net, inp, out = _net("layered")
    x, y = _data()
    _, gw, gx, _ = net.implicit_gradients({inp: x}, mse_loss(out, y))
    xx = x.clone().requires_grad_(True)
    s = net({inp: xx}, outputs=(out,))[out]
    (0.5 * ((s - y) ** 2).sum(-1).mean()).backward()
    assert cosine(xx.grad, gx[inp]) > 1 - 1e-12
    for t, w in net.weights.items():
        assert rel_error(w.grad, gw[t]) < 1e-10


def test_dense_symmetrisation_and_energy() -> None:
    net, inp, out = _net("dense")
    x, y = _data()
    # the drive is dPhi/ds for the symmetric network
    eq = net.settle({inp: x}, newton=True)
    st = {g: v.clone().requires_grad_(True) for g, v in eq.states.items()}
    (dphi,) = torch.autograd.grad(net.phi(st).sum(), [st["h"]])
    assert torch.allclose(dphi, net.drive(eq.states)["h"], atol=1e-12)
    # the settle lowers the energy (nudged: with the cost term) from the start
    nud = {out: Nudge(0.3, target=y)}
    zero = {g: torch.zeros_like(v) for g, v in eq.states.items() if g != inp}
    e0 = net.energy({inp: x, **zero}, {inp}, nud)
    en = net.settle({inp: x}, nud, newton=True)
    assert bool((net.energy(en.states, {inp}, nud) < e0).all())


def test_the_kept_dense_matrix_follows_every_write_and_keeps_autograd() -> None:
    """`_dense_matrix` is kept between calls without autograd: a write into the weights (in
    place, as programming read-backs and optimisers do) must show in the next drive, and a
    drive under autograd must still differentiate (twice: nothing of one graph is reused)."""
    net, _, _ = _net("dense")
    x = torch.rand(3, 6, dtype=torch.float64)
    states = {"x": x, "h": torch.rand(3, 9, dtype=torch.float64), "y": torch.rand(3, 4, dtype=torch.float64)}

    def fresh() -> dict[str, torch.Tensor]:
        other = DHN(net.topology, {t: w.detach() for t, w in net.weights.items()})
        with torch.no_grad():
            return other.drive(states)

    with torch.no_grad():
        before = net.drive(states)
        assert net.drive(states)["h"] is not None  # a second call, from what was kept
        net.weights["W"][2, 8] += 0.25  # x_2 with h_2
        after = net.drive(states)
    assert not torch.equal(before["h"], after["h"])
    for g, want in fresh().items():
        torch.testing.assert_close(after[g], want, rtol=0, atol=0)
    for _ in range(2):
        net.zero_grad()
        net.drive(states)["h"].sum().backward()
        assert net.weights["W"].grad is not None and net.weights["W"].grad.abs().sum() > 0
    # moved to another dtype (Module.to swaps the parameters' data: a new storage, not a write)
    net.to(torch.float32)
    with torch.no_grad():
        moved = net.drive({g: v.float() for g, v in states.items()})
    assert all(v.dtype == torch.float32 for v in moved.values())


def test_nudged_fixed_point_includes_the_nudge() -> None:
    net, inp, out = _net("layered")
    x, y = _data()
    beta = 0.2
    grad = torch.full_like(y, 0.5)
    eq = net.settle({inp: x}, {out: Nudge(beta, target=y, grad=grad)}, newton=True)
    u = net.drive(eq.states)[out] + beta * (y - eq.states[out]) - beta * grad
    assert torch.allclose(eq.states[out], rho(u, net.gain), atol=1e-12)


def test_weight_shape_is_checked() -> None:
    topo = Topology.layered([3, 2])
    with pytest.raises(ValueError, match="expected"):
        DHN(topo, {"W0": torch.zeros(3, 2)})


def test_a_tile_of_the_bias_row_alone_drives_like_a_bias_row_on_another_tile() -> None:
    """A coupling whose rows hold only the bias (a calibration tile) is a valid topology; the
    reference once failed on it (IndexError) wherever the drive leaves the bias out, which the
    newton finish and EP's gradients do. It must act as the same bias row on a tile with rows."""
    from drivers import Coupling

    g = torch.Generator().manual_seed(3)
    w_x = 0.6 * torch.randn(6, 4, generator=g, dtype=torch.float64)
    b = torch.empty(1, 4, dtype=torch.float64).uniform_(0.1, 0.4, generator=g)
    split = DHN(
        Topology(
            {"x": 6, "h": 4}, (Coupling("B", ("bias",), ("h",)), Coupling("V", ("x",), ("h",))), budget=TIGHT
        ),
        {"B": b, "V": w_x},
    )
    joined = DHN(
        Topology({"x": 6, "h": 4}, (Coupling("V", ("x", "bias"), ("h",)),), budget=TIGHT),
        {"V": torch.cat([w_x, b])},
    )
    x, _ = _data()
    for bias in (True, False):
        torch.testing.assert_close(
            split.drive({"x": x}, bias=bias)["h"], joined.drive({"x": x}, bias=bias)["h"]
        )
    a, c = split.settle({"x": x}, newton=True), joined.settle({"x": x}, newton=True)
    assert a.converged and c.converged
    torch.testing.assert_close(a.states["h"], c.states["h"], rtol=0, atol=1e-12)
