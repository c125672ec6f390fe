"""Stored digits: the user's patterns of `hil mhn phase --digits` and the corruption test.

Raw 8x8 digits are all non-negative and strongly alike (pairwise cosines near 0.9), and the
MHN's similarity is a dot product, so the digit with the most ink wins every query at large
beta. Stored as the set's deviations from its own mean, scaled to one norm, the similarity is
the cosine and the memory retrieves by shape; queries go through the same map.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from hil.data import load_digits


@dataclass
class DigitMemory:
    raw: np.ndarray  # (64, N) the stored images, pixels in [0, 1]
    labels: np.ndarray  # (N,)
    mean: np.ndarray  # (64, 1) the stored set's mean image
    norm: float

    @property
    def patterns(self) -> Tensor:
        """(64, N) float64: the stored images as the memory holds them."""
        return torch.from_numpy(self.encode(self.raw.T).T.copy())

    def encode(self, images: np.ndarray) -> np.ndarray:
        """(batch, 64) images in [0, 1] -> states: centred on the stored mean, scaled to `norm`."""
        c = images - self.mean[:, 0]
        return self.norm * c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)


def digit_memory(per_class: int = 1, *, norm: float = 1.0, classes: int = 10) -> DigitMemory:
    """The first `per_class` training images of each of the first `classes` digits."""
    ds = load_digits()
    x, y = ds.x_train.numpy().astype(np.float64), ds.y_train.numpy()
    idx = np.concatenate([np.flatnonzero(y == k)[:per_class] for k in range(classes)])
    raw = x[idx].T
    return DigitMemory(raw, y[idx], raw.mean(1, keepdims=True), float(norm))


def corrupt(images: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Replace `fraction` of each image's pixels (chosen at random) by uniform values in [0, 1]."""
    out = np.array(images, dtype=np.float64, copy=True)
    n = out.shape[1]
    k = round(fraction * n)
    for row in out:
        idx = rng.choice(n, k, replace=False)
        row[idx] = rng.uniform(0.0, 1.0, k)
    return out
