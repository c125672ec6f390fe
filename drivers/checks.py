"""Request validation shared by every backend (host side) and by the emulator (board side).

Each check raises before anything is sent or applied, with a message that names the
offending value, the limit, and what to do instead.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from drivers.errors import ConfigurationError, LimitViolation
from drivers.topology import BIAS, SettleBudget, Topology

if TYPE_CHECKING:
    from drivers.base import Limits, Nudge


def require_topology(topology: Topology | None) -> Topology:
    if topology is None:
        raise ConfigurationError("the device has no topology yet; call configure(topology) first")
    return topology


def check_topology(topology: Topology, limits: Limits) -> None:
    if len(topology.couplings) > limits.max_tiles:
        raise LimitViolation(
            "tile count", len(topology.couplings), limits.max_tiles, "use fewer couplings or another board"
        )
    for c in topology.couplings:
        rows, cols = topology.tile_shape(c.tile)
        if rows > limits.tile_rows_max or cols > limits.tile_cols_max:
            raise LimitViolation(
                f"tile size of {c.tile!r} ({rows} x {cols})",
                max(rows / limits.tile_rows_max, cols / limits.tile_cols_max),
                1.0,
                f"tiles hold at most {limits.tile_rows_max} x {limits.tile_cols_max} cells; split the layer",
            )
    check_budget(topology.budget, limits)


def check_budget(b: SettleBudget, limits: Limits) -> None:
    if b.max_steps > limits.max_settle_steps:
        raise LimitViolation("settle budget max_steps", b.max_steps, limits.max_settle_steps)
    if not (0 < b.dt <= 1):
        raise ConfigurationError(f"settle budget dt must be in (0, 1], got {b.dt}")
    if b.max_steps < 1 or b.check_every < 1 or b.tol < 0:
        raise ConfigurationError(f"bad settle budget {b}: max_steps, check_every >= 1 and tol >= 0")


def as_batch(
    name: str, value: object, n: int, batch: int | None = None, limits: Limits | None = None
) -> np.ndarray:
    """Return a C-contiguous float32 (batch, n) array (a view where possible), refusing NaN and
    infinities and, with `limits`, states beyond the read-voltage limit."""
    arr = np.asarray(value)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != n:
        raise ConfigurationError(f"{name}: expected shape (batch, {n}), got {np.shape(value)}")
    if batch is not None and arr.shape[0] != batch:
        raise ConfigurationError(f"{name}: batch size {arr.shape[0]} differs from the clamp's {batch}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if arr.size:
        lo, hi = float(arr.min()), float(arr.max())  # a NaN or infinity shows in one of them
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ConfigurationError(f"{name}: contains NaN or infinite values")
        if limits is not None:
            _check_voltage(name, max(-lo, hi), limits)
    return arr


def _check_voltage(name: str, peak: float, limits: Limits) -> None:
    if peak > limits.clamp_max:
        raise LimitViolation(
            f"read-voltage limit on {name}",
            peak * limits.v_read,
            limits.v_read_max,
            f"state {peak:.4g} x v_read {limits.v_read:g} V; node states must lie within "
            f"+-{limits.clamp_max:.4g} (normalised units, 1.0 = {limits.v_read:g} V)",
        )


def check_states(
    kind: str, states: dict[str, np.ndarray], topology: Topology, limits: Limits, batch: int | None
) -> tuple[dict[str, np.ndarray], int | None]:
    out: dict[str, np.ndarray] = {}
    for group, value in states.items():
        if group == BIAS:
            raise ConfigurationError(f"{kind}: the bias node is fixed at 1 and cannot be set")
        if group not in topology.groups:
            raise ConfigurationError(f"{kind}: unknown group {group!r}; known: {sorted(topology.groups)}")
        arr = as_batch(f"{kind} {group!r}", value, topology.groups[group], batch, limits)
        batch = arr.shape[0]
        out[group] = arr
    return out, batch


def check_settle(
    topology: Topology | None,
    limits: Limits,
    clamp: dict[str, np.ndarray],
    nudge: dict[str, Nudge] | None,
    init: dict[str, np.ndarray] | None,
) -> tuple[dict[str, np.ndarray], dict[str, Nudge], dict[str, np.ndarray], int]:
    from drivers.base import Nudge

    topo = require_topology(topology)
    if not clamp:
        raise ConfigurationError("settle needs at least one clamped group (the input)")
    clamp, batch = check_states("clamp", clamp, topo, limits, None)
    assert batch is not None
    if batch == 0:
        raise ConfigurationError("settle got an empty batch (0 samples); pass at least one sample")
    nudges: dict[str, Nudge] = {}
    for group, nd in (nudge or {}).items():
        if group in clamp:
            raise ConfigurationError(f"nudge on clamped group {group!r} has no effect; nudge a free group")
        if group not in topo.groups:
            raise ConfigurationError(f"nudge: unknown group {group!r}; known: {sorted(topo.groups)}")
        if not np.isfinite(nd.beta):
            raise ConfigurationError(f"nudge {group!r}: beta must be finite, got {nd.beta}")
        n = topo.groups[group]
        target = None
        if nd.target is not None:
            target = as_batch(f"nudge target {group!r}", nd.target, n, batch, limits)
        grad = None if nd.grad is None else as_batch(f"nudge grad {group!r}", nd.grad, n, batch)
        nudges[group] = Nudge(float(nd.beta), target, grad)
    # Entries for clamped groups are ignored, so a previous Equilibrium's states can be passed whole.
    free_init = {g: v for g, v in (init or {}).items() if g not in clamp}
    init_states, _ = check_states("init", free_init, topo, limits, batch)
    return clamp, nudges, init_states, batch


def check_tile(topology: Topology | None, tile: str) -> tuple[int, int]:
    return require_topology(topology).tile_shape(tile)


def check_program(
    topology: Topology | None, limits: Limits, tile: str, g_plus: np.ndarray, g_minus: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    shape = check_tile(topology, tile)
    out = []
    for name, g in (("g_plus", g_plus), ("g_minus", g_minus)):
        arr = np.ascontiguousarray(g, dtype=np.float32)
        if arr.shape != shape:
            raise ConfigurationError(f"program {tile!r}: {name} has shape {arr.shape}, the tile is {shape}")
        lo, hi = float(arr.min()), float(arr.max())
        if not (np.isfinite(lo) and np.isfinite(hi)):  # min and max carry any NaN or infinity
            raise ConfigurationError(f"program {tile!r}: {name} contains NaN or infinite values")
        slack = 1e-6 * (limits.g_max - limits.g_min)
        if lo < limits.g_min - slack:
            raise LimitViolation(
                f"conductance range ({name} of {tile!r})", lo, limits.g_min, "targets must be >= g_min"
            )
        if hi > limits.g_max + slack:
            raise LimitViolation(
                f"conductance range ({name} of {tile!r})", hi, limits.g_max, "targets must be <= g_max"
            )
        out.append(arr)
    return out[0], out[1]


def check_pulse(
    topology: Topology | None, limits: Limits, tile: str, counts_plus: np.ndarray, counts_minus: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    shape = check_tile(topology, tile)
    out = []
    for name, c in (("counts_plus", counts_plus), ("counts_minus", counts_minus)):
        arr = np.asarray(c)
        if arr.shape != shape:
            raise ConfigurationError(f"pulse {tile!r}: {name} has shape {arr.shape}, the tile is {shape}")
        if not np.issubdtype(arr.dtype, np.integer) and (
            not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr))
        ):
            raise ConfigurationError(f"pulse {tile!r}: {name} must hold whole pulse counts")
        arr = np.ascontiguousarray(arr, dtype=np.int32)
        peak = int(np.abs(arr).max()) if arr.size else 0
        if peak > limits.max_pulses:
            raise LimitViolation(
                f"pulses per device ({name} of {tile!r})", peak, limits.max_pulses, "split into several calls"
            )
        out.append(arr)
    return out[0], out[1]


def check_mvm(
    topology: Topology | None, limits: Limits, tile: str, x: np.ndarray, transpose: bool
) -> np.ndarray:
    rows, cols = check_tile(topology, tile)
    arr = as_batch(f"mvm input to {tile!r}", x, cols if transpose else rows, limits=limits)
    return arr
