"""Issue 20: the VAE's whole-ELBO EP gradient at the zero-bias initialisation (the trainer's
before `model.init_bias = "mid"` became its default; no units moved off the kinks) matches
implicit differentiation at the training beta with a smooth neuron, and does not with the
hard sigmoid (so the test can fail). tests/test_init_kinks.py checks the trainer's default."""

from __future__ import annotations

import pytest
import torch

from drivers import SettleBudget, open_device
from hil.data import load_digits
from hil.gradcheck import cosine
from hil.vae.config import VAERunConfig
from hil.vae.hopfield import HopfieldVAE
from hil.vae.latent import LatentCode, make_likelihood

IDEAL = "emulator://?preset=ideal&seed=0"


def _cosine(activation: str, seed: int) -> float:
    """TDH-VAE with the trainer's sizes, init, likelihood and beta; one batch of 16 digits."""
    cfg = VAERunConfig()
    torch.manual_seed(seed)
    x = load_digits().x_test[:16].reshape(16, -1)
    eps = torch.randn(16, cfg.model.latent, generator=torch.Generator().manual_seed(seed + 1))
    lik = make_likelihood(cfg.likelihood.kind, cfg.likelihood.sigma, cfg.likelihood.eps)
    with open_device(IDEAL) as dev:
        vae = HopfieldVAE(
            "tdh-vae",
            (dev,),
            pixels=64,
            hidden=cfg.model.hidden,
            code=LatentCode(dim=cfg.model.latent),
            budget=SettleBudget(max_steps=20000, tol=1e-9, dt=0.5),  # settled to the fixed point
            init_scale=cfg.model.init_scale,
            init_bias="zero",
            seed=seed,
            activation=activation,
        )
        step = vae.step(x, eps, lik, beta=cfg.ep.beta, mode="centered")
        loss, nets = vae.reference_loss(x, eps, lik)
        loss.backward()
    assert step.loss == pytest.approx(loss.item(), rel=1e-4)
    ((tile, ref),) = nets["net"].weights.items()
    return float(cosine(step.grads["net"][tile], ref.grad))


@pytest.mark.parametrize("seed", [0, 1])
def test_whole_elbo_gradient_at_initialisation_with_the_logistic_neuron(seed: int) -> None:
    assert _cosine("logistic", seed) >= 0.99


def test_the_hard_sigmoid_misses_at_initialisation() -> None:
    assert _cosine("hard_sigmoid", 0) < 0.95
