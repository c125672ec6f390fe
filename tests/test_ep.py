"""Issue 3: EP on a Device against implicit differentiation; EB blocks; programming."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from drivers import SettleBudget, Topology, open_device
from hil.cli import app
from hil.data import load_digits
from hil.ep import EBBlock
from hil.gradcheck import check_block, cosine, gradcheck, rel_error, split_bias
from hil.programming import LinearMapping, read_weights

IDEAL = "emulator://?preset=ideal&seed=0"


@pytest.fixture(scope="module")
def digits_batch() -> tuple[torch.Tensor, torch.Tensor]:
    ds = load_digits()
    return ds.x_train[:48], torch.nn.functional.one_hot(ds.y_train[:48], 10).float()


@pytest.fixture(scope="module")
def layered_rows(digits_batch) -> list:
    """Gradient check of a layered 64-256-10 DHN on the ideal preset (shared by two tests)."""
    x, y = digits_batch
    with open_device(IDEAL) as dev:
        blk = check_block(dev, [64, 256, 10])
        free = blk.free(x)
        assert free.converged, "the free phase must converge for the check to mean anything"
        return gradcheck(blk, x, y, betas=(0.1, 0.01, 0.001))


def test_centered_ep_matches_implicit_differentiation_layered(layered_rows) -> None:
    rows = [r for r in layered_rows if r.beta == 0.01 and r.mode == "centered"]
    assert {r.param for r in rows} == {"W0.weight", "W0.bias", "W1.weight", "W1.bias", "input:s0"}
    for r in rows:
        assert r.cosine >= 0.999, r
        assert r.rel_error <= 0.05, r


def test_one_sided_has_the_larger_error_at_every_beta(layered_rows) -> None:
    for beta in (0.1, 0.01, 0.001):
        for param in ("W0.weight", "W0.bias", "W1.weight", "W1.bias", "input:s0"):
            (one,) = [r for r in layered_rows if (r.beta, r.mode, r.param) == (beta, "one-sided", param)]
            (cen,) = [r for r in layered_rows if (r.beta, r.mode, r.param) == (beta, "centered", param)]
            assert one.rel_error > cen.rel_error, (beta, param, one.rel_error, cen.rel_error)


def test_centered_ep_matches_implicit_differentiation_dense(digits_batch) -> None:
    x, y = digits_batch
    with open_device(IDEAL) as dev:
        blk = check_block(dev, [64, 32, 10], dense=True)
        assert blk.free(x).converged
        rows = gradcheck(blk, x, y, betas=(0.01,), modes=("centered",))
    assert {r.param for r in rows} == {"W.weight", "W.bias", "input:x"}
    for r in rows:
        assert r.cosine >= 0.999, r
        assert r.rel_error <= 0.05, r


def test_modes_agree_and_random_sign_is_one_sided(digits_batch) -> None:
    x, y = digits_batch
    with open_device(IDEAL) as dev:
        blk = check_block(dev, [64, 32, 10])
        free = blk.free(x)
        res = {
            m: blk.ep(x, target=y, beta=0.01, mode=m, free=free) for m in ("positive", "negative", "centered")
        }
        assert res["positive"].betas == (0.01, 0.0) and res["negative"].betas == (0.0, -0.01)
        # the centered estimate is the mean of the two one-sided ones
        for t in blk.weights:
            mean = 0.5 * (res["positive"].grads[t] + res["negative"].grads[t])
            assert torch.allclose(mean, res["centered"].grads[t], atol=1e-5)
        signs = set()
        for _ in range(8):
            r = blk.ep(x, target=y, beta=0.01, mode="random", free=free)
            signs.add(r.betas)
            assert cosine(r.grads["W0"], res["centered"].grads["W0"]) > 0.99
        assert signs == {(0.01, 0.0), (0.0, -0.01)}
        with pytest.raises(ValueError, match="beta must be > 0"):
            blk.ep(x, target=y, beta=-0.1)
        with pytest.raises(ValueError, match="target or a grad"):
            blk.ep(x, beta=0.1)


def test_vjp_scaling_and_sum_reduction(digits_batch) -> None:
    """The grad nudge is normalised to a peak of 1 and scaled back: the VJP is linear in the
    incoming gradient, whatever its scale."""
    x, _ = digits_batch
    with open_device(IDEAL) as dev:
        blk = check_block(dev, [64, 32, 10])
        free = blk.free(x)
        g = torch.randn(len(x), 10, generator=torch.Generator().manual_seed(0))
        a = blk.vjp(free, g * 1e-4, beta=0.01)
        b = blk.vjp(free, g, beta=0.01)
        # (equal up to float32 rounding of the scaled nudge)
        for t in blk.weights:
            assert rel_error(a.grads[t] * 1e4, b.grads[t]) < 1e-3
        assert rel_error(a.input_grads["s0"] * 1e4, b.input_grads["s0"]) < 1e-3
        # against the reference: gradient of sum_b g_b . s_out(x_b)
        ref = blk.reference()
        gw, gx = ref.vjp({"s0": x.double()}, ref.settle({"s0": x.double()}, newton=True).states,
                         {"s2": g.double()})  # fmt: skip
        assert cosine(b.grads["W0"], gw["W0"]) > 0.999 and rel_error(b.grads["W1"], gw["W1"]) < 0.05
        assert cosine(b.input_grads["s0"], gx["s0"]) > 0.999
        zero = blk.vjp(free, torch.zeros(len(x), 10))
        assert all(float(v.abs().max()) == 0 for v in zero.grads.values())


def test_programming_roundtrip_and_sync() -> None:
    with open_device(IDEAL) as dev:
        topo = Topology.layered([5, 4, 3], w_max=0.5, budget=SettleBudget(max_steps=50))
        w = {"W0": torch.full((6, 4), 0.2), "W1": torch.linspace(-0.9, 0.9, 15).reshape(5, 3)}
        blk = EBBlock(dev, topo, weights=w)
        # weights beyond +-w_max are clipped on the host and on the device, and counted
        assert blk.clipped == 8  # |linspace(-0.9, 0.9, 15)| > 0.5
        assert float(blk.weights["W1"].detach().abs().max()) == pytest.approx(0.5)
        assert np.allclose(read_weights(dev, "W1"), blk.weights["W1"].detach().numpy(), atol=1e-6)
        m = LinearMapping.for_tile(dev, "W0")
        gp, gm, clipped = m.to_conductance(np.array([[0.5, -0.25, 0.0]], np.float32))
        lim = dev.info.limits
        assert clipped == 0 and gp[0, 0] == pytest.approx(lim.g_max) and gm[0, 1] > lim.g_min
        assert np.allclose(m.to_weight(gp, gm), [[0.5, -0.25, 0.0]], atol=1e-7)
        # only changed tiles are written
        assert blk.sync() == 0
        with torch.no_grad():
            blk.weights["W0"].add_(0.01)
        assert blk.sync() == 1
        assert np.allclose(read_weights(dev, "W0"), 0.21, atol=1e-6)
        assert dev.safety().violations == 0


def test_phase_budgets_switch_and_keep_the_weights(digits_batch) -> None:
    x, _ = digits_batch
    with open_device(IDEAL) as dev:
        fb, nb = SettleBudget(max_steps=7, tol=0.0), SettleBudget(max_steps=3, tol=0.0)
        blk = check_block(dev, [64, 32, 10], budget=fb)
        blk.budgets = {"free": fb, "nudge": nb}
        f1 = blk.free(x)
        r = blk.ep(x, grad=torch.ones(len(x), 10), beta=0.1, free=f1)
        f2 = blk.free(x)
    assert f1.steps == 7 and r.first.steps == 3 and r.second.steps == 3
    assert np.array_equal(f1.states["s2"], f2.states["s2"])


def test_split_bias_rows() -> None:
    topo = Topology.layered([3, 2])
    g = {"W0": torch.arange(8.0).reshape(4, 2)}
    parts = split_bias(topo, g)
    assert parts["W0.weight"].shape == (3, 2) and parts["W0.bias"].tolist() == [[6.0, 7.0]]


def test_gradcheck_cli() -> None:
    res = CliRunner().invoke(app, ["gradcheck", "--betas", "0.1,0.01", "--sizes", "64,16,10", "--batch", "8"])
    assert res.exit_code == 0, res.output
    assert "converged" in res.output and "cos centered" in res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip().startswith(("0.1 ", "0.01 "))]
    assert len(lines) == 2 * 5  # two betas x (W0.weight, W0.bias, W1.weight, W1.bias, input)
    bad = CliRunner().invoke(app, ["gradcheck", "--betas", "x"])
    assert bad.exit_code != 0


def test_phi_grad_difference_equals_the_difference_of_phi_grads() -> None:
    """The shortcut for rows held equal in both states (clamped inputs, bias) and the full
    product for rows that differ give dPhi/dW(a) - dPhi/dW(b)."""
    rng = np.random.default_rng(4)
    with open_device("emulator://?preset=ideal&seed=0") as dev:
        blk = EBBlock.layered(dev, [5, 7, 6, 3])
        x = rng.uniform(0, 1, (4, 5)).astype(np.float32)
        a = {
            "s0": x,
            **{g: rng.uniform(0, 1, (4, n)).astype(np.float32) for g, n in (("s1", 7), ("s2", 6), ("s3", 3))},
        }
        b = {
            "s0": x.copy(),
            **{g: rng.uniform(0, 1, (4, n)).astype(np.float32) for g, n in (("s1", 7), ("s2", 6), ("s3", 3))},
        }
        pa, pb = blk.phi_grads(a), blk.phi_grads(b)
        diff = blk.phi_grad_difference(a, b)
        assert set(diff) == {"W0", "W1", "W2"}
        for t in diff:
            torch.testing.assert_close(diff[t], pa[t] - pb[t], rtol=1e-5, atol=1e-5)


def test_joint_nudged_phases_equal_the_phases_one_by_one(digits_batch) -> None:
    """Centered EP with an error-current nudge settles both nudged phases as one settle over
    the doubled batch: one Device call, and the same equilibria, energies and gradients as two
    settles, to float32 rounding."""
    x, _ = digits_batch
    g = torch.randn(len(x), 10, generator=torch.Generator().manual_seed(1))
    with open_device(IDEAL) as dev:
        blk = check_block(dev, [64, 32, 10], budget=SettleBudget(max_steps=60, tol=0.0))
        free = blk.free(x)
        calls = []
        settle = dev.settle

        def counted(*a, **k):
            calls.append(k.get("nudge") or (a[1] if len(a) > 1 else None))
            return settle(*a, **k)

        dev.settle = counted
        joint = blk.ep(x, grad=g, beta=0.05, free=free, trace=20)
        assert len(calls) == 1
        blk.joint_phases = False
        apart = blk.ep(x, grad=g, beta=0.05, free=free, trace=20)
        assert len(calls) == 3
    for a, b in ((joint.first, apart.first), (joint.second, apart.second)):
        assert a.steps == b.steps == 60
        assert np.allclose(a.states["s1"], b.states["s1"], atol=1e-6)
        assert np.allclose(a.states["s2"], b.states["s2"], atol=1e-6)
        assert a.states["s0"] is b.states["s0"] or np.array_equal(a.states["s0"], b.states["s0"])
        assert np.allclose(a.energy, b.energy, atol=1e-5)
        assert a.settle_time_s == pytest.approx(b.settle_time_s)
        assert a.trace["s2"].shape == b.trace["s2"].shape == (4, len(x), 10)
        assert np.allclose(a.trace["energy"], b.trace["energy"], atol=1e-5)
    assert joint.first.energy_j + joint.second.energy_j == pytest.approx(
        apart.first.energy_j + apart.second.energy_j, rel=1e-5
    )
    assert not np.allclose(joint.first.states["s2"], joint.second.states["s2"])  # the phases differ
    for t in joint.grads:
        assert torch.allclose(joint.grads[t], apart.grads[t], atol=1e-6, rtol=1e-4)
    assert torch.allclose(joint.input_grads["s0"], apart.input_grads["s0"], atol=1e-6, rtol=1e-4)


def test_joint_phases_match_implicit_differentiation(digits_batch) -> None:
    """The must-show check of centered EP (beta 0.01, converged free phase) on the joint path:
    an error-current nudge, both nudged phases in one settle, against the reference's VJP by
    implicit differentiation, for every layer's weights and biases and for the input."""
    x, _ = digits_batch
    g = torch.randn(len(x), 10, generator=torch.Generator().manual_seed(3))
    with open_device(IDEAL) as dev:
        blk = check_block(dev, [64, 256, 10])
        assert blk.joint_phases
        free = blk.free(x)
        assert free.converged
        res = blk.ep(x, grad=g, beta=0.01, free=free, reduce="sum")
        ref = blk.reference()
        xs = {"s0": x.double()}
        gw, gx = ref.vjp(xs, ref.settle(xs, newton=True).states, {"s2": g.double()})
    est = split_bias(blk.topology, res.grads) | {"input:s0": res.input_grads["s0"]}
    truth = split_bias(blk.topology, gw) | {"input:s0": gx["s0"]}
    assert set(est) == {"W0.weight", "W0.bias", "W1.weight", "W1.bias", "input:s0"}
    for k, v in truth.items():
        assert cosine(est[k], v) >= 0.999, (k, cosine(est[k], v))
        assert rel_error(est[k], v) <= 0.05, (k, rel_error(est[k], v))
