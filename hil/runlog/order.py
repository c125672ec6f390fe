"""A shuffled, resumable data order: the permutation of the current epoch, the position in it,
and the generator that draws the next epoch's permutation."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch


class DataOrder:
    """Epochs of a shuffled index order over `n` examples, with a state that a snapshot stores.

    ``next(b)`` returns the epoch and the next (up to) `b` indices; at the end of an epoch
    the next permutation is drawn at once, so `state()` taken after any batch says exactly
    where to go on."""

    def __init__(self, n: int, seed: int = 0) -> None:
        if n < 1:
            raise ValueError(f"a data order needs at least one example, got n={n}")
        self.n = n
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self.pos = 0
        self.perm = torch.randperm(n, generator=self.generator)

    def next(self, batch_size: int) -> tuple[int, torch.Tensor]:
        epoch = self.epoch
        idx = self.perm[self.pos : self.pos + batch_size]
        self.pos += len(idx)
        if self.pos >= self.n:
            self.epoch += 1
            self.pos = 0
            self.perm = torch.randperm(self.n, generator=self.generator)
        return epoch, idx

    def batches(self, batch_size: int, epochs: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(epoch, indices) until `epochs` epochs are done, from wherever the order stands."""
        while self.epoch < epochs:
            yield self.next(batch_size)

    def state(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "epoch": self.epoch,
            "pos": self.pos,
            "perm": self.perm.clone(),
            "generator": self.generator.get_state(),
        }

    @staticmethod
    def from_state(state: Mapping[str, Any]) -> DataOrder:
        order = DataOrder(int(state["n"]))
        order.epoch = int(state["epoch"])
        order.pos = int(state["pos"])
        order.perm = torch.as_tensor(state["perm"])
        order.generator.set_state(torch.as_tensor(state["generator"]))
        return order
