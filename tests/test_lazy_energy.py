"""Issue 17: the energy of a settle is computed when someone reads it, not by every settle.

The in-process board hands back an `Equilibrium` whose energy is deferred
(`Equilibrium.defer_energy`); a training step never reads it. What the deferred energy
uses must be what the settle ended with, even after the board's weights are written again
(the settle engine keeps copies of the free-to-free matrices and the constant drive), and
the value must equal the energy computed at once (the same settle on a board with the clamp
cache off, which computes it eagerly)."""

from __future__ import annotations

import copy
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.peer_ep import IDEAL, project
from drivers import Nudge, SettleBudget, Topology, open_device
from tests.test_clamp_cache import program_weights, random_layered


def test_deferred_energy_equals_the_energy_at_once_after_later_writes() -> None:
    rng = np.random.default_rng(0)
    a = open_device("emulator://?preset=ideal&seed=0")
    b = open_device("emulator://?preset=ideal&seed=0")
    b.board.engine.reuse_clamp = False  # no cached drive: energies computed at once
    with a, b:
        for dev in (a, b):
            random_layered(dev, [12, 9, 4], seed=3, budget=SettleBudget(max_steps=25, tol=0.0))
        x = rng.uniform(0, 1, (6, 12)).astype(np.float32)
        grad = rng.normal(0, 1, (6, 4)).astype(np.float32)
        target = rng.uniform(0, 1, (6, 4)).astype(np.float32)
        calls = [
            ({"s0": x}, None),
            ({"s0": x}, {"s2": Nudge(0.3, target=target)}),
            ({"s0": np.concatenate([x, x])}, {"s2": Nudge(1.0, grad=np.concatenate([grad, -grad]))}),
        ]
        lazy = [a.settle(c, n) for c, n in calls]
        eager = [b.settle(c, n) for c, n in calls]
        assert all(eq.energy_pending for eq in lazy)
        assert not any(eq.energy_pending for eq in eager)
        # later writes, settles and changed nudge arrays must not reach the deferred energies
        new = rng.uniform(-0.5, 0.5, (10, 4)).astype(np.float32)
        program_weights(a, "W1", new)
        target[:] = 0.0
        a.settle({"s0": rng.uniform(0, 1, (6, 12)).astype(np.float32)})
        for (clamp, _n), p, q in zip(calls, lazy, eager, strict=True):
            if len(clamp["s0"]) == len(x):
                np.testing.assert_array_equal(p.energy, q.energy)
            else:  # the doubled batch's product over 2B rows may round otherwise (test_clamp_cache)
                np.testing.assert_allclose(p.energy, q.energy, rtol=1e-5, atol=1e-5)
            assert not p.energy_pending


def test_a_training_step_computes_no_energy_and_copies_carry_it() -> None:
    # batch 32: the free-to-free matrices (2 x 12 x 10) are smaller than the states (22 x 32),
    # so the settle defers its energy (with larger matrices it computes it at once)
    clf = project(IDEAL, [20, 12, 10], 32, 20, 8)
    try:
        g = torch.Generator().manual_seed(0)
        x, y = torch.rand(32, 20, generator=g), torch.randint(0, 10, (32,), generator=g)
        clf.step(x, y)
        settles = clf.last_settles
        assert set(settles) == {"free", "nudged+", "nudged-"}
        assert all(eq.energy_pending for eq in settles.values())
        free = settles["free"]
        kept = pickle.loads(pickle.dumps(free))  # a pickle computes and carries the value
        assert not kept.energy_pending and kept.energy.shape == (32,)
        np.testing.assert_array_equal(copy.copy(free).energy, kept.energy)
        plus, minus = settles["nudged+"], settles["nudged-"]
        assert plus.energy.shape == minus.energy.shape == (32,)  # the two halves of one settle
    finally:
        clf.close()


@pytest.mark.parametrize("preset", ["ideal", "rram"])
def test_traced_and_noisy_settles_report_the_same_energy_as_before(preset: str) -> None:
    """A traced settle computes its energies at once; its final energy is the trace's last."""
    rng = np.random.default_rng(1)
    with open_device(f"emulator://?preset={preset}&seed=0") as dev:
        topo = Topology.layered([12, 9, 4], budget=SettleBudget(max_steps=30, tol=0.0))
        dev.configure(topo)
        for c in topo.couplings:
            program_weights(dev, c.tile, rng.uniform(-0.5, 0.5, topo.tile_shape(c.tile)).astype(np.float32))
        x = rng.uniform(0, 1, (5, 12)).astype(np.float32)
        eq = dev.settle({"s0": x}, trace=10)
        np.testing.assert_allclose(eq.energy, eq.trace["energy"][-1], rtol=1e-5, atol=1e-6)


def test_dense_settles_defer_their_energy_too() -> None:
    """A dense tile's clamped sources enter the energy with factor 1/2, which the
    constant-drive shortcut does not cover: those settles keep copies of the plan's matrices
    (one per weights version) and of the nudge, and the deferred energy equals the one read at
    once, bit for bit, after later writes and settles."""
    rng = np.random.default_rng(1)
    groups = {"x": 10, "h": 7, "o": 3}
    topo = Topology.dense(groups, budget=SettleBudget(max_steps=200, tol=1e-4, dt=0.5))
    w0 = rng.uniform(-0.4, 0.4, topo.tile_shape("W")).astype(np.float32)
    x = rng.uniform(0, 1, (5, 10)).astype(np.float32)
    target = rng.uniform(0, 1, (5, 3)).astype(np.float32)
    calls = [({"x": x}, None), ({"x": x}, {"o": Nudge(0.3, target=target)}), ({"h": x[:, :7]}, None)]
    a = open_device("emulator://?preset=ideal&seed=0")
    b = open_device("emulator://?preset=ideal&seed=0")
    with a, b:
        at_once = []
        for dev in (a, b):
            dev.configure(topo)
            program_weights(dev, "W", w0)
        lazy = [a.settle(c, n) for c, n in calls]
        for c, n in calls:
            eq = b.settle(c, n)
            at_once.append(eq.energy.copy())
        assert all(eq.energy_pending for eq in lazy)
        program_weights(a, "W", rng.uniform(-0.4, 0.4, topo.tile_shape("W")).astype(np.float32))
        target[:] = 0.0
        a.settle({"x": rng.uniform(0, 1, (5, 10)).astype(np.float32)})
        a.reset()  # the board forgets its topology: a deferred energy needs nothing of it
        for p, e in zip(lazy, at_once, strict=True):
            np.testing.assert_array_equal(p.energy, e)
