"""Latent code, likelihoods and KL: the probabilistic parts every VAE variant shares.

Hopfield node states live in [0, 1], so the latent statistics are affine maps of states:
``mu = mu_scale (s_mu - 1/2)`` and ``log sigma^2 = lv_min + (lv_max - lv_min) s_lv``; a sample z
is clamped back as ``s = z / mu_scale + 1/2`` (clipped to the DAC's [0, 1]).

Population code: each latent dimension is carried by `copies` units (its statistic is their
mean; a clamped z drives all of them). In a network whose encoder and decoder share
symmetric weights this balances the two directions: the encoder reads 64 pixels into a
latent unit, the decoder drives 64 pixels from only `dim` latent values, and `copies` units
per value give the decoder's drive the same order of magnitude as the encoder's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class LatentCode:
    dim: int = 4
    mu_scale: float = 3.0  # mu in [-1.5, 1.5]
    lv_min: float = -6.0
    lv_max: float = 1.0
    copies: int = 1  # units per latent dimension (population code)

    @property
    def units(self) -> int:
        """Units of the mu group (and of the lv group)."""
        return self.dim * self.copies

    def _mean(self, s: Tensor) -> Tensor:
        return s.reshape(*s.shape[:-1], self.dim, self.copies).mean(-1)

    def _spread(self, g: Tensor) -> Tensor:
        """The gradient of a per-dimension mean, on each of its units."""
        return g.repeat_interleave(self.copies, dim=-1) / self.copies

    def stats(self, s_mu: Tensor, s_lv: Tensor) -> tuple[Tensor, Tensor]:
        """(mu, log sigma^2) from the latent groups' states."""
        m, v = self._mean(s_mu), self._mean(s_lv)
        return self.mu_scale * (m - 0.5), self.lv_min + (self.lv_max - self.lv_min) * v

    def state_grads(self, d_mu: Tensor, d_lv: Tensor) -> tuple[Tensor, Tensor]:
        """dL/ds_mu and dL/ds_lv from dL/dmu and dL/dlog sigma^2 (chain rule of `stats`)."""
        return self._spread(self.mu_scale * d_mu), self._spread((self.lv_max - self.lv_min) * d_lv)

    def clamp_state(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """The state that clamps z onto the mu group, and ds/dz per dimension (0 where clipped)."""
        s = z / self.mu_scale + 0.5
        inside = ((s >= 0) & (s <= 1)).to(z.dtype)
        return s.clamp(0.0, 1.0).repeat_interleave(self.copies, dim=-1), inside / self.mu_scale

    def z_grad(self, d_state: Tensor, dsdz: Tensor) -> Tensor:
        """dL/dz from dL/ds of the clamped mu group (its copies summed)."""
        return d_state.reshape(*d_state.shape[:-1], self.dim, self.copies).sum(-1) * dsdz


def reparameterize(mu: Tensor, logvar: Tensor, eps: Tensor) -> Tensor:
    return mu + torch.exp(0.5 * logvar) * eps


def kl_normal(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) per sample, summed over latent dimensions."""
    return 0.5 * (mu**2 + logvar.exp() - 1.0 - logvar).sum(-1)


@dataclass(frozen=True)
class GaussianLikelihood:
    """p(x|z) = N(x; mean, sigma^2) per pixel with fixed sigma (the paper's fixed-sigma variant:
    a hard-sigmoid output saturating at 0 or 1 keeps a finite loss)."""

    sigma: float = 0.3

    def nll(self, x: Tensor, mean: Tensor) -> Tensor:
        """-log p(x|mean) per sample, in nats."""
        d = x.shape[-1]
        return ((x - mean) ** 2).sum(-1) / (2 * self.sigma**2) + d * math.log(
            self.sigma * math.sqrt(2 * math.pi)
        )

    def grad(self, x: Tensor, mean: Tensor) -> Tensor:
        """d nll / d mean."""
        return (mean - x) / self.sigma**2


@dataclass(frozen=True)
class BernoulliLikelihood:
    """p(x|z) = Bernoulli(x; p) with p squashed into [eps, 1 - eps], so a saturated hard sigmoid
    (output exactly 0 or 1) cannot give an infinite loss."""

    eps: float = 0.01

    def _p(self, mean: Tensor) -> Tensor:
        return self.eps + (1 - 2 * self.eps) * mean

    def nll(self, x: Tensor, mean: Tensor) -> Tensor:
        p = self._p(mean)
        return -(x * p.log() + (1 - x) * (1 - p).log()).sum(-1)

    def grad(self, x: Tensor, mean: Tensor) -> Tensor:
        p = self._p(mean)
        return (1 - 2 * self.eps) * (p - x) / (p * (1 - p))


Likelihood = GaussianLikelihood | BernoulliLikelihood


def make_likelihood(name: str, sigma: float = 0.3, eps: float = 0.01) -> Likelihood:
    if name == "gaussian":
        if sigma <= 0:
            raise ValueError(f"likelihood sigma must be > 0, got {sigma}")
        return GaussianLikelihood(sigma)
    if name == "bernoulli":
        if not 0 < eps < 0.5:
            raise ValueError(f"bernoulli eps must be in (0, 0.5), got {eps}")
        return BernoulliLikelihood(eps)
    raise ValueError(f"likelihood must be 'gaussian' or 'bernoulli', got {name!r}")
