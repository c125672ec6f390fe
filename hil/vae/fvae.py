"""F-VAE: feedforward encoder and decoder trained by backprop, the baseline of the family."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from hil.vae.latent import Likelihood, kl_normal, reparameterize


class FVAE(nn.Module):
    def __init__(self, pixels: int, hidden: int, latent: int, seed: int = 0) -> None:
        super().__init__()
        # torch's default initialisation, drawn from a generator of its own seeded with `seed`
        # (not torch's global one, which the process owns): the same numbers as
        # ``torch.manual_seed(seed)`` followed by the layers' own initialisers
        gen = torch.Generator().manual_seed(seed)
        self.latent = latent
        self.encoder = nn.Sequential(
            _linear(pixels, hidden, gen), nn.ReLU(), _linear(hidden, 2 * latent, gen)
        )
        self.decoder = nn.Sequential(
            _linear(latent, hidden, gen), nn.ReLU(), _linear(hidden, pixels, gen), nn.Sigmoid()
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


def _linear(n_in: int, n_out: int, gen: torch.Generator) -> nn.Linear:
    """``nn.Linear(n_in, n_out)`` with torch's default initialisation (`nn.Linear.reset_parameters`:
    Kaiming-uniform weights, biases uniform in +-1/sqrt(fan_in)) drawn from `gen`."""
    lin = nn.utils.skip_init(nn.Linear, n_in, n_out)  # allocated, not drawn
    with torch.no_grad():
        nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5), generator=gen)
        bound = 1 / math.sqrt(n_in)
        nn.init.uniform_(lin.bias, -bound, bound, generator=gen)
    return lin
