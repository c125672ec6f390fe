"""The plain data of a settle, kept apart from the engine (`emulator.settle.SettleEngine`) so
that what only needs the types (the board, the convolutional settle, the energy module, the
in-process backend) does not import the engine: `SettleNudge`, the nudge as the node circuits
get it, and `SettleResult`, a settle's outcome."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class SettleNudge:
    """The nudge of one settle as the node circuits get it (targets after the DAC, currents
    after the auto-ranged injection DAC): per group ``(beta, target, grad)``, an elastic pull
    ``beta (target - s)`` (target not None) and an injected current ``-beta grad`` (grad not
    None), i.e. the cost ``beta (1/2 |s - target|^2 + grad . s)`` added to the energy."""

    groups: dict[str, tuple[float, torch.Tensor | None, torch.Tensor | None]] = field(default_factory=dict)

    @property
    def elastic(self) -> dict[str, tuple[float, torch.Tensor]]:
        """Per group with a target: (beta, target)."""
        return {g: (beta, t) for g, (beta, t, _gr) in self.groups.items() if t is not None}

    @property
    def currents(self) -> dict[str, tuple[float, torch.Tensor]]:
        """Per group with an injected current: (beta, grad) (the current is ``-beta grad``)."""
        return {g: (beta, gr) for g, (beta, _t, gr) in self.groups.items() if gr is not None}

    def add_energy(self, e: torch.Tensor, s: dict[str, torch.Tensor]) -> torch.Tensor:
        """`e` plus the nudge's terms of the energy per sample at the states `s`."""
        for g, (beta, target, grad) in self.groups.items():
            if target is not None:
                e = e + 0.5 * beta * ((s[g] - target) ** 2).sum(1)
            if grad is not None:
                e = e + beta * (grad * s[g]).sum(1)
        return e

    def copied(self) -> SettleNudge:
        """The nudge with its own copies of the targets and grads (for an energy computed later,
        after the caller's tensors may have changed)."""

        def copy(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.clone()

        return SettleNudge({g: (beta, copy(tg), copy(gr)) for g, (beta, tg, gr) in self.groups.items()})

    def repeated(self, t: int) -> SettleNudge:
        """The nudge with every tensor repeated `t` times along the batch (trace energies)."""

        def rep(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.repeat(t, 1)

        return SettleNudge({g: (beta, rep(tg), rep(gr)) for g, (beta, tg, gr) in self.groups.items()})


@dataclass
class SettleResult:
    """A settle's outcome. The energy per sample is computed when first read (`energy`) from
    what the settle kept for it (`energy_of`): a training step never reads it."""

    states: dict[str, torch.Tensor]
    steps: int
    converged: bool
    residual: float
    energy_of: Callable[[], torch.Tensor]
    settle_time_s: float
    energy_j: float
    trace: dict[str, torch.Tensor] | None = None
    _energy: torch.Tensor | None = field(default=None, repr=False)
    # a noisy settle's steps per sample (each sample stops on its own, `drivers.settle_stop`;
    # `steps` is the largest); None where the batch stopped as one
    sample_steps: torch.Tensor | None = None

    @property
    def energy(self) -> torch.Tensor:
        if self._energy is None:
            self._energy = self.energy_of()
        return self._energy

    @property
    def energy_pending(self) -> bool:
        """The energy has not been computed yet."""
        return self._energy is None
