"""The last clamp of the emulated board's settles, kept for the next settle of the same
clamps (see `emulator.settle`, "The input product once per batch"): an EP step settles the
same inputs three times, so their conversion and constant drive are worth keeping."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from emulator.settle_plan import Plan


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exactly equal tensors (shape and every value): the first row first (different clamps
    differ there almost always), then all of them; on the CPU through numpy, several times
    faster than `torch.equal` there."""
    if a.shape != b.shape:
        return False
    if a.device.type != "cpu" or a.requires_grad or b.requires_grad:
        return bool(torch.equal(a[:1], b[:1])) and bool(torch.equal(a, b))
    x, y = a.numpy(), b.numpy()
    return bool(np.array_equal(x[:1], y[:1])) and bool(np.array_equal(x, y))


@dataclass
class ClampCache:
    """The last clamp (see `emulator.settle`'s docstring, "The input product once per batch"): the
    clamps as the host sent them (`raw`, copies) and as the DAC applied them (`applied`, with
    the safety violations that conversion counted), and what the settles of one plan
    computed from them, valid while the plan and the tiles' `weights_epoch` s are those of
    `plan` and `epochs`: `drive`, the (nodes, batch) constant drive of an analog settle;
    `outs`, per constant term its product ``F.linear(s_src, matrix)`` (batch, n_out), for an
    mvm-mode settle; the clamped lines' power and the constant noise variance."""

    raw: dict[str, torch.Tensor]
    applied: dict[str, torch.Tensor]
    batch: int
    violations: int = 0
    plan: Plan | None = None
    epochs: tuple[int, ...] = ()
    drive: torch.Tensor | None = None
    outs: list[torch.Tensor] | None = None
    line_power: float | None = None  # the clamped groups' share of `settle_energy.settle_power` (W)
    noise_var: dict[str, torch.Tensor] | None = None  # per free group, its constant noise variance (1, batch)
    exact: bool = False  # the DAC handed every clamp back unchanged (`applied` is `raw`)

    def repeats(self, clamp: dict[str, torch.Tensor], batch: int) -> int:
        """How many times over `clamp` repeats the cached clamps along the batch: 1 (the same
        clamps), 2 (the batch twice over, ``[x; x]``, as `settle_both` sends it), or 0 (no
        reuse). Exact comparisons (`same_values`), once per settle."""
        if clamp.keys() != self.raw.keys():
            return 0
        n = self.batch
        if batch == n:
            return 1 if all(same_values(clamp[g], c) for g, c in self.raw.items()) else 0
        if batch == 2 * n:
            same = all(
                same_values(clamp[g][:n], c) and same_values(clamp[g][n:], c) for g, c in self.raw.items()
            )
            return 2 if same else 0
        return 0

    def bind(self, plan: Plan) -> None:
        """Hold what settles of `plan` at its present weights compute (forgetting the rest)."""
        self.plan, self.epochs = plan, plan.epochs
        self.drive = self.outs = self.line_power = self.noise_var = None
