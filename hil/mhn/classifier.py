"""A small MHN classifier on the digits, its patterns learned by EP through the board.

The state is ``[image (64) ; label (10)]``. Each pattern is a prototype: an image (centred
and scaled as `hil.mhn.digits.DigitMemory` stores them) and a label part (``label_scale``
times a one-hot at the start). A query is ``[image ; 0]`` with the image part clamped (held:
`MHNBlock.retrieve`'s `clamp`), so the label part settles to the minimum of the energy given
the image, and its argmax is the prediction. (Unclamped, the end state would be a minimum
that depends on the query only through the basin it starts in: no gradient of the patterns
could move a basin's boundary, and EP training did not improve the accuracy.) The loss
``1/2 |label part - label_scale onehot|^2`` of the end state is minimised
over the patterns with centered EP (`hil.mhn.learn.ep_gradient`, the mask on the label part),
plain SGD, and the tile is reprogrammed after each step through the programming scheme.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from drivers import Device
from hil.data import load_digits
from hil.mhn.block import MHNBlock
from hil.mhn.core import RetrievalBudget
from hil.mhn.digits import DigitMemory
from hil.mhn.learn import ep_gradient
from hil.mhn.phase import critical_beta

PIXELS, CLASSES = 64, 10


@dataclass
class ClassifierResult:
    test_accuracy: list[float] = field(default_factory=list)  # before training, then per epoch
    train_loss: list[float] = field(default_factory=list)  # per epoch, mean over batches
    beta: float = 0.0
    beta_c: float = 0.0
    cells: int = 0  # crossbar cells (differential pairs) of the tile, bias row included: (d + 1) N
    energy_j_per_image: float = 0.0  # array energy of one test retrieval per image (last epoch)


class MHNClassifier:
    def __init__(
        self,
        device: Device,
        *,
        per_class: int = 2,
        label_scale: float = 0.5,
        beta_ratio: float = 2.0,
        budget: RetrievalBudget | None = None,
        programming: str = "ideal",
        seed: int = 0,
        rewrite: bool = True,
    ) -> None:
        ds = load_digits()
        x, y = ds.x_train.numpy().astype(np.float64), ds.y_train.numpy()
        self.x_train, self.y_train = x, y
        self.x_test, self.y_test = ds.x_test.numpy().astype(np.float64), ds.y_test.numpy()
        rng = np.random.default_rng(seed)
        pick = [rng.choice(np.flatnonzero(y == k), per_class, replace=False) for k in range(CLASSES)]
        idx = np.concatenate(pick)
        self.memory = DigitMemory(x[idx].T, y[idx], x.mean(0)[:, None], 1.0)
        self.label_scale = label_scale
        images = self.memory.encode(x[idx])
        labels = label_scale * np.eye(CLASSES)[y[idx]]
        xi = torch.from_numpy(np.concatenate([images, labels], 1).T.copy())
        self.beta_c = critical_beta(xi).beta_c
        self.beta = beta_ratio * self.beta_c
        self.block = MHNBlock(
            device,
            xi.float().numpy(),
            beta=self.beta,
            budget=budget or RetrievalBudget(max_steps=500, tol=1e-6),
            programming=programming,
            margin=0.25,
            seed=seed,
        )
        # a second write: the first one's read-back finds the stuck devices and the scheme lets
        # their partners carry the weight (on rram, seed 0: 26.7 % test accuracy before it,
        # 70.6 % after; docs/mhn.md). `rewrite=False` leaves it out (the one-write figure)
        if rewrite:
            self.block.sync(force=True)
        self.mask = np.concatenate([np.zeros(PIXELS), np.ones(CLASSES)])
        self.clamp = self.mask == 0

    def queries(self, images: np.ndarray) -> np.ndarray:
        q = np.concatenate([self.memory.encode(images), np.zeros((len(images), CLASSES))], 1)
        return np.clip(q, *self.block.box())

    def targets(self, labels: np.ndarray) -> np.ndarray:
        onehot = self.label_scale * np.eye(CLASSES)[labels]
        return np.concatenate([np.zeros((len(labels), PIXELS)), onehot], 1)

    def evaluate(self) -> tuple[float, float]:
        """Test accuracy and the array energy per image of the retrievals."""
        r = self.block.retrieve(self.queries(self.x_test), clamp=self.clamp)
        pred = r.x[:, PIXELS:].argmax(1)
        return float((pred == self.y_test).mean()), r.energy_j / len(self.y_test)

    def fit(self, epochs: int = 2, batch: int = 32, lr: float = 0.5, beta_ep: float = 0.01, seed: int = 0):
        res = ClassifierResult(beta=self.beta, beta_c=self.beta_c)
        res.cells = (self.block.d + 1) * self.block.n
        acc, _ = self.evaluate()
        res.test_accuracy.append(acc)
        rng = np.random.default_rng(seed)
        for _ in range(epochs):
            order = rng.permutation(len(self.y_train))
            losses = []
            for k in range(0, len(order), batch):
                i = order[k : k + batch]
                ep = ep_gradient(
                    self.block,
                    self.queries(self.x_train[i]),
                    self.targets(self.y_train[i]),
                    mask=self.mask,
                    beta_ep=beta_ep,
                    clamp=self.clamp,
                )
                losses.append(ep.loss)
                with torch.no_grad():
                    self.block.patterns -= torch.as_tensor(lr * ep.grad, dtype=torch.float32)
            res.train_loss.append(float(np.mean(losses)))
            acc, energy = self.evaluate()
            res.test_accuracy.append(acc)
            res.energy_j_per_image = energy
        return res
