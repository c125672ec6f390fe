"""The compiled settle loop (emulator.settle_script) gives the Python loop's settles bit for bit.

A noise-free analog settle on the CPU runs as one TorchScript call; the same settle with
`SettleEngine.scripted = False` runs its calls one at a time from Python. Both must end in
equal states (torch.equal), after the same number of steps, with the same residual: for every
activation, with a gain, with and without convergence checks, with a nudge current, on
layered and dense networks, and when the compiled loop is missing.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import emulator.settle_script as settle_script
from drivers import SettleBudget, Topology, open_device
from tests.test_emulator import program_weights

ACTIVATIONS = [("hard_sigmoid", 1.0), ("hard_sigmoid", 1.5), ("logistic", 1.0), ("soft_sigmoid:0.1", 1.2)]
BUDGETS = [
    SettleBudget(max_steps=40, tol=0.0, dt=0.5),
    SettleBudget(max_steps=300, tol=1e-4, dt=0.5, check_every=5),
    # the last mark off the checks' grid (5, 10, ..., 35, then 37), and checks sparser than the
    # budget (one, at step 7): the compiled loop counts its marks itself
    SettleBudget(max_steps=37, tol=1e-9, dt=0.5, check_every=5),
    SettleBudget(max_steps=7, tol=1e-9, dt=0.5, check_every=10),
]


def _topology(kind: str, activation: str, gain: float, budget: SettleBudget) -> Topology:
    if kind == "layered":
        return Topology.layered([16, 12, 8, 5], gain=gain, budget=budget, activation=activation)
    return Topology.dense({"x": 16, "h": 12, "y": 5}, gain=gain, budget=budget, activation=activation)


def _settle(topo: Topology, scripted: bool, nudge: bool, calls: list[int]):
    """Program the topology's tiles with fixed weights, settle a fixed batch twice (the second
    reuses the cached clamp) and return the results."""
    dev = open_device("emulator://?preset=ideal&seed=0")
    try:
        dev.configure(topo)
        dev.board.engine.scripted = scripted  # type: ignore[attr-defined]
        rng = np.random.default_rng(3)
        for c in topo.couplings:
            program_weights(dev, c.tile, rng.uniform(-0.3, 0.3, topo.tile_shape(c.tile)))
        first = next(iter(topo.groups))
        last = list(topo.groups)[-1]
        x = torch.from_numpy(rng.uniform(0, 1, (6, topo.groups[first])).astype(np.float32))
        currents = {last: (0.3, None, torch.full((6, topo.groups[last]), 0.5))} if nudge else None
        before = len(calls)
        out = [dev.board.settle({first: x}, currents) for _ in range(2)]  # type: ignore[attr-defined]
        return out, len(calls) - before
    finally:
        dev.close()


@pytest.mark.parametrize("kind", ["layered", "dense"])
@pytest.mark.parametrize(("activation", "gain"), ACTIVATIONS)
@pytest.mark.parametrize("budget", BUDGETS, ids=["fixed-steps", "checked", "off-grid", "sparse"])
@pytest.mark.parametrize("nudge", [False, True])
def test_compiled_loop_gives_the_python_loops_settles(
    monkeypatch, kind: str, activation: str, gain: float, budget: SettleBudget, nudge: bool
) -> None:
    calls: list[int] = []
    run = settle_script.run

    def counted(*args, **kwargs):
        calls.append(1)
        return run(*args, **kwargs)

    monkeypatch.setattr(settle_script, "run", counted)
    topo = _topology(kind, activation, gain, budget)
    compiled, n_compiled = _settle(topo, True, nudge, calls)
    python, n_python = _settle(topo, False, nudge, calls)
    assert n_compiled == 2 and n_python == 0  # each path was the one taken
    for a, b in zip(compiled, python, strict=True):
        assert a.steps == b.steps
        assert a.residual == b.residual
        assert a.converged == b.converged
        assert a.states.keys() == b.states.keys()
        for g in a.states:
            assert torch.equal(torch.as_tensor(a.states[g]), torch.as_tensor(b.states[g])), g
    if budget.tol >= 1e-4:
        assert compiled[0].steps < budget.max_steps  # the checks stopped it: they were made
    elif budget.tol > 0:  # too tight to stop: the whole budget ran, checked at its last step
        assert compiled[0].steps == budget.max_steps and 0 < compiled[0].residual < float("inf")


def test_without_the_compiled_loop_the_engine_runs_its_own(monkeypatch) -> None:
    """Where TorchScript cannot compile the loop, `run` says so and the Python loop settles."""
    topo = _topology("layered", "hard_sigmoid", 1.0, BUDGETS[1])
    want, _ = _settle(topo, False, True, [])
    monkeypatch.setattr(settle_script, "loop", lambda: None)
    zero = torch.zeros(1)
    assert settle_script.run([], 1, 1, 0.0, ("hard_sigmoid", 1.0, 0.0), zero, zero, 0.5) is None
    got, _ = _settle(topo, True, True, [])
    for a, b in zip(got, want, strict=True):
        assert a.steps == b.steps
        for g in a.states:
            assert torch.equal(torch.as_tensor(a.states[g]), torch.as_tensor(b.states[g]))


@pytest.mark.parametrize("kind", ["layered", "dense"])
def test_inference_mode_changes_no_number_and_leaks_no_inference_tensor(kind: str) -> None:
    """The compiled loop runs in `torch.inference_mode` (`SettleEngine.inference`): the same
    states, steps and residuals as with autograd's dispatch, and what a caller gets back (the
    states, which the host may use under autograd) and what the next settle reuses (the
    workspace's buffers) are ordinary tensors."""
    topo = _topology(kind, "hard_sigmoid", 1.0, BUDGETS[1])
    dev = open_device("emulator://?preset=ideal&seed=0")
    try:
        dev.configure(topo)
        rng = np.random.default_rng(4)
        for c in topo.couplings:
            program_weights(dev, c.tile, rng.uniform(-0.3, 0.3, topo.tile_shape(c.tile)))
        first = next(iter(topo.groups))
        x = torch.from_numpy(rng.uniform(0, 1, (6, topo.groups[first])).astype(np.float32))
        engine = dev.board.engine  # type: ignore[attr-defined]
        results = {}
        for inference in (False, True):
            engine.inference = inference
            results[inference] = dev.board.settle({first: x}, None)  # type: ignore[attr-defined]
        off, on = results[False], results[True]
        assert (on.steps, on.residual) == (off.steps, off.residual) and on.steps < BUDGETS[1].max_steps
        for g, s in on.states.items():
            assert torch.equal(s, off.states[g]) and not s.is_inference()
            w = torch.ones_like(s, requires_grad=True)
            (w * s).sum().backward()  # usable under autograd
        for plan_key, (_, plan) in engine.planner.plans.items():
            for ws in plan.workspaces.values():
                assert not any(t.is_inference() for t in (ws.state, ws.new, ws.drive)), plan_key
    finally:
        dev.close()
