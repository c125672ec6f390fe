"""An analog settle's two step sizes (`SettlePlanner.step_sizes`).

A settle that checks its convergence starts at the budget's `dt` and falls back to the
energy-descent bound ``1.8 / (1 + gain |W|)`` once `drivers.topology.STALL_CHECKS` checks in a
row made no new smallest residual; one that does not check runs the bound throughout. These
tests run the emulator's settles on dense networks whose couplings make the bound bind, with
the compiled loop and the Python loop, and read the circuit time the board's clock advanced,
which counts every step at the size it ran at; the host-iterated settles of a board that only
multiplies (`HostSettle`) step the same way.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from drivers import Equilibrium, SettleBudget, Topology, open_device, topology
from emulator.settle_types import SettleResult
from hil.host_settle import HostSettle
from hil.reference import DHN
from tests.test_emulator import program_weights

GROUPS = {"x": 8, "h": 24, "y": 6}
MVM_ONLY = "capabilities=mvm,pulse,program_verify"
BATCH = 4


def _weights(scale: float) -> np.ndarray:
    """The dense tile's matrix: symmetric couplings of spectral radius about `scale` with a
    zero diagonal, and a bias row."""
    rng = np.random.default_rng(1)
    n = sum(GROUPS.values())
    w = rng.normal(0, scale / np.sqrt(n), (n, n))
    w = (w + w.T) / 2
    np.fill_diagonal(w, 0)
    return np.vstack([w, rng.uniform(-0.5, 0.5, (1, n))])


def _settle(
    scale: float, budget: SettleBudget, bold: bool = True, scripted: bool = True
) -> tuple[SettleResult, float, np.ndarray, torch.Tensor]:
    """Settle a dense network with symmetric couplings of spectral radius about `scale` (the
    bound then caps a step of 1 at about 1.8 / (1 + scale)); return the result, the circuit
    time in steps of size 1 (the clock's advance over the time of a step of budget.dt, times
    budget.dt), the tile's weights as programmed and the clamp."""
    topo = Topology.dense(GROUPS, budget=budget)
    dev = open_device("emulator://?preset=ideal&seed=0")
    try:
        dev.configure(topo)
        engine = dev.board.engine  # type: ignore[attr-defined]
        engine.bold_steps, engine.scripted = bold, scripted
        full = _weights(scale)
        program_weights(dev, "W", full)
        x = torch.from_numpy(np.random.default_rng(5).uniform(0, 1, (BATCH, GROUPS["x"])).astype(np.float32))
        before = dev.board.clock  # type: ignore[attr-defined]
        result = dev.board.settle({"x": x})  # type: ignore[attr-defined]
        step_s = dev.board.preset.periphery.settle_step_s  # type: ignore[attr-defined]
        circuit = (dev.board.clock - before) / (step_s * BATCH) * budget.dt  # type: ignore[attr-defined]
        return result, circuit, np.clip(full, -1, 1), x
    finally:
        dev.close()


def _fixed_point_error(result: SettleResult, w: np.ndarray, x: torch.Tensor) -> float:
    """max |rho(u) - s| over the free nodes, u computed in float64 from the programmed weights."""
    s = np.concatenate([x.numpy(), np.asarray(result.states["h"]), np.asarray(result.states["y"])], 1)
    u = s.astype(np.float64) @ w[:-1] + w[-1]
    free = slice(GROUPS["x"], None)
    return float(np.abs(np.clip(u[:, free], 0, 1) - s[:, free]).max())


def _same(a: SettleResult, b: SettleResult) -> bool:
    return (
        a.steps == b.steps
        and a.residual == b.residual
        and all(torch.equal(torch.as_tensor(a.states[g]), torch.as_tensor(b.states[g])) for g in ("h", "y"))
    )


@pytest.mark.parametrize("scale", [1.0, 1.5])
def test_a_settle_runs_the_asked_step_and_reaches_the_bounded_fixed_point_sooner(scale: float) -> None:
    budget = SettleBudget(max_steps=3000, tol=1e-6, dt=1.0, check_every=5)
    bold, bold_time, w, x = _settle(scale, budget)
    safe, safe_time, _, _ = _settle(scale, budget, bold=False)
    assert bold.converged and safe.converged
    safe_dt = safe_time / safe.steps
    assert safe_dt < 0.9  # the bound binds: the asked step of 1 would be cut
    assert bold.steps < safe.steps
    assert bold_time == pytest.approx(bold.steps * 1.0)  # every step ran at the asked size
    for g in ("h", "y"):  # the step changes the path, not the equilibrium (unique here)
        assert np.abs(np.asarray(bold.states[g]) - np.asarray(safe.states[g])).max() < 1e-4
    assert _fixed_point_error(bold, w, x) < 1e-5
    assert _same(bold, _settle(scale, budget, scripted=False)[0])  # compiled loop == Python loop


def test_a_settle_that_stops_progressing_falls_back_to_the_bound_and_converges(monkeypatch) -> None:
    """Strong couplings: a step of 1 (the synchronous fixed-point map) oscillates; the settle
    falls back after STALL_CHECKS checks and converges to a fixed point of the network. Without
    the fallback the same settle never converges."""
    budget = SettleBudget(max_steps=3000, tol=1e-5, dt=1.0, check_every=5)
    result, circuit, w, x = _settle(3.0, budget)
    safe, safe_time, _, _ = _settle(3.0, budget, bold=False)
    safe_dt = safe_time / safe.steps
    assert result.converged and _fixed_point_error(result, w, x) < 1e-4
    stalled = topology.STALL_CHECKS * budget.check_every
    assert result.steps > stalled
    # some steps at 1, the rest at the bound: the clock counts each at its size
    assert result.steps * safe_dt + stalled * (1 - safe_dt) <= circuit + 1e-6
    assert circuit < result.steps * 1.0
    assert _same(result, _settle(3.0, budget, scripted=False)[0])
    monkeypatch.setattr(topology, "STALL_CHECKS", 10**6)
    for scripted in (True, False):
        never, _, _, _ = _settle(3.0, budget, scripted=scripted)
        assert not never.converged and never.steps == budget.max_steps


def test_a_settle_without_checks_runs_the_bound_throughout() -> None:
    """With tol = 0 no residual is checked before the last step, so nothing could catch an
    overshoot: the settle runs the bound, exactly as with the bold steps switched off."""
    budget = SettleBudget(max_steps=60, tol=0.0, dt=1.0)
    unchecked, circuit, _, _ = _settle(1.5, budget)
    off, off_circuit, _, _ = _settle(1.5, budget, bold=False)
    assert unchecked.steps == off.steps == 60
    assert circuit == pytest.approx(off_circuit) and circuit < 0.9 * 60
    assert _same(unchecked, off)


@pytest.mark.parametrize("bold", [True, False])
def test_the_bound_is_computed_only_for_a_settle_that_needs_it(bold: bool) -> None:
    """After a write the bound may need a power iteration (`SettlePlanner._fresh_norm`); a
    settle that converges at the asked step never asks for the bound, so it skips that work."""
    budget = SettleBudget(max_steps=3000, tol=1e-6, dt=0.8, check_every=5)
    topo = Topology.dense(GROUPS, budget=budget)
    n = sum(GROUPS.values())
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.uniform(0, 1, (BATCH, GROUPS["x"])).astype(np.float32))
    with open_device("emulator://?preset=ideal&seed=0") as dev:
        dev.configure(topo)
        board = dev.board  # type: ignore[attr-defined]
        board.engine.bold_steps = bold
        for scale in (1.5, 2.0):  # the first plan starts from a power iteration; then a write
            w = rng.normal(0, scale / np.sqrt(n), (n, n))
            w = (w + w.T) / 2
            np.fill_diagonal(w, 0)
            program_weights(dev, "W", np.vstack([w, np.zeros((1, n))]))
            result = board.settle({"x": x})
        plan = board.engine.planner.plans[frozenset({"x"})][1]
        assert result.converged
        assert 1.8 / (1 + plan.coupling_norm) < budget.dt  # the bound binds
        assert plan.norm_fresh is not bold  # the bound-only settle needed the power iteration


def _host_settle(scale: float, budget: SettleBudget, bold: bool = True) -> tuple[Equilibrium, int, float]:
    """The same network on a board that only multiplies, settled by the host through `mvm`
    (`HostSettle`, synchronous update, the reference giving the bound): the equilibrium, the
    board's mvm calls and the largest distance to the analog board's fixed point at the
    bound (the same weights on the in-process emulator)."""
    full = _weights(scale)
    topo = Topology.dense(GROUPS, budget=budget)
    x = np.random.default_rng(5).uniform(0, 1, (BATCH, GROUPS["x"])).astype(np.float32)
    with open_device(f"emulator://?preset=ideal&seed=0&{MVM_ONLY}") as dev:
        dev.configure(topo)
        program_weights(dev, "W", full)
        ref = DHN(topo, {"W": torch.from_numpy(np.clip(full, -1, 1))})
        host = HostSettle(dev, reference=lambda: ref, bold_steps=bold)
        before = dev.meter().mvm_calls
        eq = host({"x": x})
        calls = dev.meter().mvm_calls - before
    board, _, _, _ = _settle(scale, budget, bold=False)
    far = max(float(np.abs(eq.states[g] - np.asarray(board.states[g])).max()) for g in ("h", "y"))
    return eq, calls, far


def test_a_host_iterated_settle_runs_the_asked_step_too_in_fewer_mvm_calls() -> None:
    budget = SettleBudget(max_steps=3000, tol=1e-6, dt=1.0, check_every=5)
    bold, bold_calls, far = _host_settle(1.5, budget)
    safe, safe_calls, safe_far = _host_settle(1.5, budget, bold=False)
    assert bold.converged and safe.converged
    assert bold.steps < safe.steps and bold_calls < safe_calls
    assert far < 1e-4 and safe_far < 1e-4  # both at the analog board's (unique) fixed point


def test_a_host_iterated_settle_that_stalls_falls_back(monkeypatch) -> None:
    budget = SettleBudget(max_steps=3000, tol=1e-5, dt=1.0, check_every=5)
    eq, _, _ = _host_settle(3.0, budget)
    assert eq.converged and eq.steps > topology.STALL_CHECKS * budget.check_every
    monkeypatch.setattr(topology, "STALL_CHECKS", 10**6)
    never, _, _ = _host_settle(3.0, budget)
    assert not never.converged and never.steps == budget.max_steps


def test_the_bound_is_a_function_of_the_weights_not_of_earlier_settles() -> None:
    """The bound's power iteration started from the vector the previous estimate ended with,
    so a step depended on every settle the process had run before, and a run resumed in a
    fresh process (the main job after a crash) ended elsewhere than the uninterrupted run.
    A board that estimated other weights first gives the same figure as a fresh one."""
    topo = Topology.dense(GROUPS, budget=SettleBudget(max_steps=50, tol=0.0, dt=1.0, check_every=50))

    def estimate(*scales: float) -> float:
        dev = open_device("emulator://?preset=ideal&seed=0")
        try:
            dev.configure(topo)
            planner = dev.board.engine.planner  # type: ignore[attr-defined]
            for scale in scales:  # each: program, then the estimate of those weights
                program_weights(dev, "W", _weights(scale))
                norm = planner._coupling_norm(planner.plan(frozenset({"x"})))
            return norm
        finally:
            dev.close()

    assert estimate(0.7, 1.5) == estimate(1.5)
