"""Issue 4: the Hopfield VAE family."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from drivers import SettleBudget, open_device
from hil.gradcheck import cosine
from hil.vae.hopfield import HopfieldVAE
from hil.vae.latent import BernoulliLikelihood, GaussianLikelihood, LatentCode, kl_normal
from hil.vae.metrics import DigitsFeatures, FeatureRecipe, frechet_distance

IDEAL = "emulator://?preset=ideal&seed=0"


def test_gaussian_likelihood_matches_torch_and_its_gradient() -> None:
    lik = GaussianLikelihood(0.3)
    x, mean = (
        torch.rand(5, 64, dtype=torch.float64),
        torch.rand(5, 64, dtype=torch.float64, requires_grad=True),
    )
    expected = -torch.distributions.Normal(mean, 0.3).log_prob(x).sum(-1)
    torch.testing.assert_close(lik.nll(x, mean), expected)
    (g,) = torch.autograd.grad(lik.nll(x, mean).sum(), mean)
    torch.testing.assert_close(lik.grad(x, mean.detach()), g)


def test_bernoulli_likelihood_is_finite_on_saturated_outputs() -> None:
    lik = BernoulliLikelihood(0.01)
    x = torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64)
    mean = torch.tensor([[0.0, 1.0, 1.0]], dtype=torch.float64, requires_grad=True)
    value = lik.nll(x, mean)
    assert torch.isfinite(value).all()
    assert value.item() == pytest.approx(-2 * math.log(0.01) - math.log(0.99))
    (g,) = torch.autograd.grad(value.sum(), mean)
    torch.testing.assert_close(lik.grad(x, mean.detach()), g)


def test_latent_code_round_trip_and_kl() -> None:
    code = LatentCode(dim=3, mu_scale=6.0)
    z = torch.tensor([[-2.0, 0.0, 4.0]])
    s, dsdz = code.clamp_state(z)
    mu, _ = code.stats(s, torch.zeros_like(s))
    torch.testing.assert_close(mu, torch.tensor([[-2.0, 0.0, 3.0]]))  # 4 is beyond the +-3 range
    torch.testing.assert_close(dsdz, torch.tensor([[1 / 6, 1 / 6, 0.0]]))
    assert float(kl_normal(torch.zeros(1, 3), torch.zeros(1, 3))) == 0.0
    pop = LatentCode(dim=2, mu_scale=6.0, copies=3)
    s, dsdz = pop.clamp_state(torch.tensor([[0.6, -1.2]]))
    torch.testing.assert_close(s, torch.tensor([[0.6, 0.6, 0.6, 0.3, 0.3, 0.3]]))
    mu, _ = pop.stats(s, torch.zeros_like(s))
    torch.testing.assert_close(mu, torch.tensor([[0.6, -1.2]]))
    z = torch.tensor([[0.3, 0.9]], requires_grad=True)
    s_z, _ = pop.clamp_state(z)
    w = torch.arange(6.0)[None]
    (expected,) = torch.autograd.grad((s_z * w).sum(), z)
    torch.testing.assert_close(pop.z_grad(w, dsdz), expected)


def _small_vae(
    variant: str,
    devices: tuple,
    seed: int = 0,
    active: bool = False,
    budget: SettleBudget | None = None,
    compute: str | None = None,
) -> HopfieldVAE:
    """64 pixels, 12 hidden units, 2 latent dimensions; settles run to a tight tolerance unless
    `budget` says otherwise; `compute`: the blocks' torch device (`HopfieldVAE`)."""
    vae = HopfieldVAE(
        variant,  # type: ignore[arg-type]
        devices,
        pixels=64,
        hidden=12,
        code=LatentCode(dim=2),
        budget=budget or SettleBudget(max_steps=20000, tol=1e-9, dt=0.5),
        init_scale=0.5,
        seed=seed,
        compute=compute,
    )
    if active:
        # biases U(0.1, 0.4), as `hil gradcheck` does: units sit inside the hard sigmoid's
        # linear range, away from its kinks, where EP's estimate is not O(beta^2) exact
        gen = torch.Generator().manual_seed(seed + 3)
        with torch.no_grad():
            for block in vae.blocks().values():
                for p in block.weights.values():
                    p[-1] = 0.1 + 0.3 * torch.rand(p.shape[1], generator=gen)
    return vae


@pytest.mark.parametrize("variant", ["tdh-vae", "shared-layered"])
def test_ep_gradient_of_whole_elbo_matches_autograd_for_shared_network(variant: str) -> None:
    """Encoder and decoder passes on one network, fixed eps: EP vs implicit differentiation."""
    from hil.data import load_digits

    x = load_digits().x_test[:6].reshape(6, -1)
    eps = torch.randn(6, 2, generator=torch.Generator().manual_seed(1))
    lik = GaussianLikelihood(0.3)
    with open_device(IDEAL) as dev:
        vae = _small_vae(variant, (dev,), active=True)
        step = vae.step(x, eps, lik, beta=0.01, mode="centered")
        loss, nets = vae.reference_loss(x, eps, lik)
        loss.backward()
        assert step.loss == pytest.approx(loss.item(), rel=1e-4)
        for tile, ref in nets["net"].weights.items():
            assert float(ref.grad.norm()) > 1.0  # a real gradient, not two zeros
            c = cosine(step.grads["net"][tile], ref.grad)
            assert c >= 0.99, (tile, c)


def test_tdh_vae_uses_half_the_cells_of_dh_vae() -> None:
    with open_device(IDEAL) as a, open_device(IDEAL) as b:
        dh = _small_vae("dh-vae", (a, b))
        tdh = _small_vae("tdh-vae", (a,))
        assert dh.cells() == 2 * tdh.cells()
        assert tdh.cells() == (64 + 12 + 2 + 2 + 1) * (64 + 12 + 2 + 2)


def test_frechet_distance_and_feature_classifier_are_deterministic(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XBAR_HIL_CACHE", str(tmp_path))
    recipe = FeatureRecipe(epochs=60)
    first = DigitsFeatures.load_or_train(recipe)
    (tmp_path / f"digits-features-{recipe.key()}.npz").unlink()
    second = DigitsFeatures.load_or_train(recipe)
    torch.testing.assert_close(first.w1, second.w1)
    cached = DigitsFeatures.load_or_train(recipe)
    torch.testing.assert_close(first.w2, cached.w2)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 8))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shifted = frechet_distance(a, a + 1.0)
    assert shifted == pytest.approx(8.0, rel=1e-3)
