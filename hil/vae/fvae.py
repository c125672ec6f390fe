"""F-VAE: feedforward encoder and decoder trained by backprop, the baseline of the family."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hil.vae.latent import Likelihood, kl_normal, reparameterize


class FVAE(nn.Module):
    def __init__(self, pixels: int, hidden: int, latent: int, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.latent = latent
        self.encoder = nn.Sequential(nn.Linear(pixels, hidden), nn.ReLU(), nn.Linear(hidden, 2 * latent))
        self.decoder = nn.Sequential(
            nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, pixels), nn.Sigmoid()
        )

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.encoder(x)
        return h[:, : self.latent], h[:, self.latent :].clamp(-10.0, 5.0)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    def neg_elbo(self, x: Tensor, eps: Tensor, likelihood: Likelihood) -> Tensor:
        """Per-sample negative ELBO (nats) for the given noise draw."""
        mu, lv = self.encode(x)
        z = reparameterize(mu, lv, eps)
        return likelihood.nll(x, self.decode(z)) + kl_normal(mu, lv)

    def cells(self) -> int:
        """FVAE runs digitally: no crossbar cells."""
        return 0
