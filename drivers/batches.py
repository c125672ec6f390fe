"""A settle whose batch is larger than the board takes in one request, sent as several.

A board declares the most samples one settle request may carry (`Limits.max_batch`), and the
host takes at most `MAX_SETTLE_VALUES` states in one reply. A training step asks for more
than that when `train.batch_size` is large (the centered nudged phases settle the doubled
batch as one, `hil.ep.EBBlock.settle`), and so do an evaluation over a whole test set and a
calibration routine's repeated reads (`calibration.measure.settle_states`). Samples settle independently
of each other, so the batch goes to the board in consecutive chunks of rows, each chunk with
its rows of the clamps, the nudges' targets and error currents and the initial states, and the
chunks' equilibria are joined into the one the whole batch would have given:

- states, energies and traces are stacked along the batch in order;
- ``steps`` is the longest chunk's, ``converged`` holds when every chunk converged,
  ``residual`` is the largest; settle time and joules add up (the board ran the chunks one
  after the other);
- a chunk that stopped sooner than another keeps its last traced row for the steps it did not
  take (its states at its own fixed point), so every trace has the longest chunk's steps.

One difference from a single request: a settle that stops on convergence (``tol``) checks it
per chunk, over that chunk's samples, so a chunk may stop a few steps before the whole batch
would have.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from drivers.base import Equilibrium, Limits, Nudge
from drivers.checks import settle_samples_most
from drivers.topology import Topology

__all__ = ["batch_of", "chunks", "mvm_in_chunks", "settle_in_chunks", "settle_samples"]


def batch_of(clamp: Mapping[str, Any]) -> int:
    """The number of samples of a settle's clamp (the first axis of its arrays)."""
    return int(next(iter(clamp.values())).shape[0])


def chunks(batch: int, most: int) -> range:
    """The first rows of the requests that carry `batch` samples, at most `most` each (one
    request for an empty batch)."""
    if most < 1:
        raise ValueError(f"a request holds at least one sample, got {most}")
    return range(0, max(batch, 1), most)


def settle_samples(limits: Limits, topology: Topology) -> int:
    """The most samples one settle request of `topology` carries on a board of `limits`: its
    `max_batch`, and at most `MAX_SETTLE_VALUES` states in the reply and pre-pooling values of
    each conv tile (`drivers.checks.settle_samples_most`), the `most` of `settle_in_chunks` for
    the training's settles (`hil.ep.EBBlock.settle_batch_most`) and the calibration's
    (`calibration.measure.settle_states`) alike."""
    return min(limits.max_batch, settle_samples_most(topology))


def mvm_in_chunks(device: Any, tile: str, x: np.ndarray, *, transpose: bool = False, most: int) -> np.ndarray:
    """``device.mvm(tile, x)`` in requests of at most `most` rows (the board's
    `Limits.max_batch`), the outputs joined; one request where it fits."""
    parts = [device.mvm(tile, x[lo : lo + most], transpose=transpose) for lo in chunks(x.shape[0], most)]
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def _rows(x: Any, lo: int, hi: int) -> Any:
    return None if x is None else x[lo:hi]


def _torch_of(x: Any) -> Any:
    """The torch module where `x` is a tensor, else None. This module does not import torch:
    a board on a link (numpy on the wire) and the calibration routines never load it (about
    0.8 s of start-up), and no tensor exists before torch is imported."""
    torch = sys.modules.get("torch")
    return torch if torch is not None and isinstance(x, torch.Tensor) else None


def _stack(parts: list[Any]) -> Any:
    if (torch := _torch_of(parts[0])) is not None:
        return torch.cat(parts)
    return np.concatenate(parts)


def _pad_steps(x: Any, steps: int) -> Any:
    """`x` (T, ...) with its last row repeated up to `steps` rows."""
    missing = steps - x.shape[0]
    if missing <= 0:
        return x
    if (torch := _torch_of(x)) is not None:
        return torch.cat([x, x[-1:].expand(missing, *x.shape[1:])])
    return np.concatenate([x, np.repeat(x[-1:], missing, axis=0)])


def _joined_trace(traces: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    if any(t is None for t in traces):
        return None
    present = [t for t in traces if t is not None]
    longest = max(present, key=lambda t: len(t["step"]))
    steps = len(longest["step"])
    out: dict[str, Any] = {"step": longest["step"]}
    for key in present[0]:
        if key != "step":
            out[key] = _stack_along_batch([_pad_steps(t[key], steps) for t in present])
    return out


def _stack_along_batch(parts: list[Any]) -> Any:
    """(T, B_i, ...) parts stacked along their second axis, the batch."""
    if (torch := _torch_of(parts[0])) is not None:
        return torch.cat(parts, dim=1)
    return np.concatenate(parts, axis=1)


def settle_in_chunks(
    settle: Callable[..., Equilibrium],
    clamp: Mapping[str, Any],
    nudge: Mapping[str, Nudge] | None,
    init: Mapping[str, Any] | None,
    trace: bool | int,
    most: int,
) -> Equilibrium:
    """`settle` (a `Device.settle` or `Device.settle_tensors`) of the whole batch of `clamp`,
    sent as consecutive chunks of at most `most` samples, joined into one equilibrium (the one
    reply itself where the batch fits)."""
    batch = batch_of(clamp)
    eqs: list[Equilibrium] = []
    for lo in chunks(batch, most):
        hi = min(batch, lo + most)
        part_nudge = None
        if nudge:
            part_nudge = {
                g: replace(n, target=_rows(n.target, lo, hi), grad=_rows(n.grad, lo, hi))
                for g, n in nudge.items()
            }
        eqs.append(
            settle(
                {g: v[lo:hi] for g, v in clamp.items()},
                nudge=part_nudge,
                init=None if init is None else {g: v[lo:hi] for g, v in init.items()},
                trace=trace,
            )
        )
    if len(eqs) == 1:
        return eqs[0]
    energies = [eq.energy for eq in eqs]
    return Equilibrium(
        states={g: _stack([eq.states[g] for eq in eqs]) for g in eqs[0].states},
        steps=max(eq.steps for eq in eqs),
        converged=all(eq.converged for eq in eqs),
        residual=max(eq.residual for eq in eqs),
        energy=None if any(e is None for e in energies) else _stack(energies),
        settle_time_s=sum(eq.settle_time_s for eq in eqs),
        energy_j=sum(eq.energy_j for eq in eqs),
        trace=_joined_trace([eq.trace for eq in eqs]),
    )
