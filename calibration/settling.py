"""Settle-time and convergence measurement.

A three-layer network (rows -> cols -> a small output layer, no bias) is programmed with
random weights scaled so that the hidden layer works in its linear region, and settled on a
batch of random inputs in two ways:

- under the default settle budget, as the host stack would: steps taken, converged flag,
  simulated settle time and joules per sample;
- once long with a trace of every step: the residual ``max |s_t - s_{t-1}|`` per step, whose
  geometric decay gives the contraction factor per step and whose plateau is the noise
  floor the board's read noise and node noise leave.

Where some settle under the default budget did not converge, the same inputs are settled again
under budgets of 2, 4, 8 and 16 times its steps (never more than the board declares,
`Limits.max_settle_steps`), until all of them converge. The summary recommends ``max_steps``
at 1.5 x the largest number of steps a converged settle took (under the default budget or the
first larger one under which all converged), within the board's limit; None where none of those
budgets converged every settle (the report says so: a longer budget than the routine tries, or a
network that does not settle on this board). The residual
is measured on read-out (ADC-quantised) states, so its floor is at least one ADC step: it
says how settled a read-out can look, not the board's analog noise floor (which the board's
own convergence test adds to `tol`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np

from calibration.measure import Progress, board_budget, board_scales, leave_out, no_progress
from calibration.record import SettleProfile
from drivers import Device, SettleBudget, Topology, seeds


def recommended_steps(converged_steps: int | None, most: int) -> int | None:
    """1.5 x the most steps a converged settle took, within the board's `most` steps; None
    where no budget tried converged every settle."""
    if converged_steps is None:
        return None
    return min(int(np.ceil(1.5 * converged_steps)), most)


def _program_random(device: Device, topology: Topology, rng: np.random.Generator, scale: float) -> None:
    lim = device.info.limits
    span = lim.g_max - lim.g_min
    for c in topology.couplings:
        rows, cols = topology.tile_shape(c.tile)
        w = np.clip(rng.normal(0.0, scale / np.sqrt(rows), (rows, cols)), -1.0, 1.0)
        gp = lim.g_min + np.maximum(w, 0.0) * span
        gm = lim.g_min + np.maximum(-w, 0.0) * span
        device.program(c.tile, gp.astype(np.float32), gm.astype(np.float32))


LONGER_BUDGETS = (2, 4, 8, 16)
"""The multiples of the default budget's steps tried, in order, where some settle under it did
not converge (a declared bound on the routine's work: at most 30 times the default budget's
steps per input batch)."""


def _converged_budget(
    device: Device,
    layered: Callable[[SettleBudget], Topology],
    default: SettleBudget,
    xs: list[np.ndarray],
    budgets: list[int],
) -> tuple[int | None, int | None]:
    """(the first of `budgets` (max_steps) under which every settle of `xs` converged, the
    most steps one of them took), or (None, None). Leaves the board configured with the last
    budget tried."""
    for steps in budgets:
        device.configure(layered(replace(default, max_steps=steps)))
        taken = []
        for x in xs:
            eq = device.settle({"s0": x})
            if not eq.converged:
                break
            taken.append(eq.steps)
        else:
            return steps, max(taken)
    return None, None


def profile_settle(
    device: Device,
    shape: tuple[int, int],
    *,
    batch: int = 32,
    repeats: int = 4,
    long_steps: int = 200,
    seed: int = 0,
    progress: Progress = no_progress,
) -> SettleProfile:
    device.require("settle", instead=leave_out("the settle-time profile", "settle"))
    rows, cols = shape
    batch = min(batch, device.info.limits.max_batch)  # one request each, within the board's bound
    out = min(cols, 32)
    rng = seeds.numpy_rng(seed, "calibration.settle")
    gain, w_max = board_scales(device.info.limits)  # within the board's gain and weight scale

    def layered(budget: SettleBudget) -> Topology:
        return Topology.layered([rows, cols, out], bias=False, budget=budget, gain=gain, w_max=w_max)

    topo = layered(board_budget(device))
    device.configure(topo)
    _program_random(device, topo, rng, 2.0)
    steps, conv, times, joules, xs = [], [], [], [], []
    for k in range(repeats):
        x = rng.uniform(0.0, 1.0, (batch, rows)).astype(np.float32)
        eq = device.settle({"s0": x})
        xs.append(x)
        steps.append(eq.steps)
        conv.append(eq.converged)
        times.append(eq.settle_time_s / batch)
        joules.append(eq.energy_j / batch)
        progress("settle", k + 1, repeats + 2)
    default = topo.budget.max_steps
    if all(conv):
        converged_budget, converged_steps = default, max(steps)
        tried = [default]
    else:  # the longer budgets the board allows (`Limits.max_settle_steps`), until one converges
        longer = [default * k for k in LONGER_BUDGETS if default * k <= device.info.limits.max_settle_steps]
        converged_budget, converged_steps = _converged_budget(device, layered, topo.budget, xs, longer)
        tried = [default, *longer[: longer.index(converged_budget) + 1 if converged_budget else None]]
    progress("settle", repeats + 1, repeats + 2)
    long_steps = min(long_steps, device.info.limits.max_settle_steps)
    budget = SettleBudget(max_steps=long_steps, tol=0.0, dt=topo.budget.dt, check_every=long_steps)
    device.configure(layered(budget))
    x = rng.uniform(0.0, 1.0, (batch, rows)).astype(np.float32)
    eq = device.settle({"s0": x}, trace=True)
    progress("settle", repeats + 2, repeats + 2)
    assert eq.trace is not None
    states = np.concatenate([eq.trace[g] for g in ("s1", "s2")], axis=2)  # (T, batch, nodes)
    residual = np.abs(np.diff(states, axis=0)).max(axis=2)  # (T - 1, batch)
    res = np.median(residual, axis=1)
    floor = float(np.median(res[len(res) * 3 // 4 :]))
    above = np.flatnonzero(res > 4.0 * max(floor, 1e-12))
    contraction = float("nan")
    if above.size >= 3:
        t = above[: max(3, above.size)]
        slope = np.polyfit(t, np.log(res[t]), 1)[0]
        contraction = float(np.exp(slope))
    per_step = eq.settle_time_s / (eq.steps * batch) if eq.steps else float("nan")
    steps_arr = np.asarray(steps, np.int64)
    summary = {
        "network": [rows, cols, out],
        "batch": batch,
        "default_budget": {"max_steps": topo.budget.max_steps, "tol": topo.budget.tol, "dt": topo.budget.dt},
        "steps_median": float(np.median(steps_arr)),
        "steps_max": int(steps_arr.max()),
        "converged_fraction": float(np.mean(conv)),
        "settle_time_s": float(np.median(times)),
        "energy_j": float(np.median(joules)),
        "time_per_step_s": float(per_step),
        "contraction_per_step": contraction,
        "readout_residual_floor": floor,
        "budgets_tried": tried,
        "converged_budget": converged_budget,
        "converged_steps_max": converged_steps,
        "recommended_max_steps": recommended_steps(converged_steps, device.info.limits.max_settle_steps),
    }
    return SettleProfile(summary=summary, residual=res.astype(np.float32), steps=steps_arr)
