"""Metrics of the VAE family: Frechet distance in the feature space of a fixed digits classifier.

The classifier (64-64-10 MLP, ReLU) is trained deterministically (fixed seed, full-batch
Adam, fixed epochs) on the built-in digits' training split and cached as a plain ``.npz``
(no pickle) under ``$XBAR_HIL_CACHE`` (default ``~/.cache/xbar-hil``), keyed by a hash of
its recipe, so every run compares samples in the same feature space.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import linalg
from torch import Tensor, nn


@dataclass(frozen=True)
class FeatureRecipe:
    hidden: int = 64
    epochs: int = 300
    lr: float = 1e-2
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def cache_dir() -> Path:
    return Path(os.environ.get("XBAR_HIL_CACHE", Path.home() / ".cache" / "xbar-hil"))


class DigitsFeatures:
    """The fixed digits classifier: `features(x)` gives its hidden-layer activations."""

    def __init__(self, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, test_accuracy: float) -> None:
        self.w1, self.b1, self.w2, self.b2 = w1, b1, w2, b2
        self.test_accuracy = test_accuracy

    def features(self, x: Tensor) -> Tensor:
        return torch.relu(x.to(torch.float32) @ self.w1.T + self.b1)

    def logits(self, x: Tensor) -> Tensor:
        return self.features(x) @ self.w2.T + self.b2

    @staticmethod
    def load_or_train(recipe: FeatureRecipe | None = None) -> DigitsFeatures:
        from hil.data import load_digits

        recipe = recipe or FeatureRecipe()
        path = cache_dir() / f"digits-features-{recipe.key()}.npz"
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as z:
                    t = {k: torch.from_numpy(z[k]) for k in ("w1", "b1", "w2", "b2")}
                    return DigitsFeatures(**t, test_accuracy=float(z["test_accuracy"]))
            except (OSError, KeyError, ValueError):
                path.unlink(missing_ok=True)  # a damaged cache entry is rebuilt
        data = load_digits()
        gen = torch.Generator().manual_seed(recipe.seed)
        # allocated without drawing (torch's initialisers draw from its global generator); drawn below
        lin1 = nn.utils.skip_init(nn.Linear, data.features, recipe.hidden)
        net = nn.Sequential(lin1, nn.ReLU(), nn.utils.skip_init(nn.Linear, recipe.hidden, 10))
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / np.sqrt(p.shape[-1])))
        opt = torch.optim.Adam(net.parameters(), lr=recipe.lr)
        for _ in range(recipe.epochs):
            opt.zero_grad()
            nn.functional.cross_entropy(net(data.x_train), data.y_train).backward()
            opt.step()
        with torch.no_grad():
            acc = float((net(data.x_test).argmax(1) == data.y_test).float().mean())
        w1, b1, w2, b2 = (p.detach().clone() for p in net.parameters())
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, w1=w1.numpy(), b1=b1.numpy(), w2=w2.numpy(), b2=b2.numpy(), test_accuracy=acc)
        tmp.replace(path)
        return DigitsFeatures(w1, b1, w2, b2, acc)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (rows are samples)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    # a small ridge: dead ReLU features make the covariances singular
    ridge = 1e-6 * np.eye(a.shape[1])
    s1, s2 = np.cov(a, rowvar=False) + ridge, np.cov(b, rowvar=False) + ridge
    covmean = np.real(linalg.sqrtm(s1 @ s2))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def frechet_references(
    features: DigitsFeatures, x_train: Tensor, x_test: Tensor, samples: int = 360, seed: int = 0
) -> dict[str, float]:
    """Frechet distances to the test images of image sets that bracket a generator, in the
    same features as the trainer's `Evaluation.frechet` (`samples` generated images against
    every test image):

    - ``train_vs_test``: `samples` training images drawn without replacement (seeded): what a
      generator that reproduced the data distribution would score, sampling noise included;
    - ``train_all_vs_test``: every training image;
    - ``mean_image_vs_test``: the mean training image repeated `samples` times: a generator
      that ignores its latent input and draws the average digit (right mean, no spread).

    The untrained model, the other end of the scale, is each run's ``initial.frechet``.
    """
    xtr = x_train.reshape(len(x_train), -1).to(torch.float32)
    xte = x_test.reshape(len(x_test), -1).to(torch.float32)
    f_test = features.features(xte).numpy()
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(xtr), generator=gen)[: min(samples, len(xtr))]
    mean_image = xtr.mean(0, keepdim=True).expand(samples, -1)
    return {
        "train_vs_test": frechet_distance(features.features(xtr[pick]).numpy(), f_test),
        "train_all_vs_test": frechet_distance(features.features(xtr).numpy(), f_test),
        "mean_image_vs_test": frechet_distance(features.features(mean_image).numpy(), f_test),
    }
