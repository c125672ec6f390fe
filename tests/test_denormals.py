"""Settles flush subnormal floats to zero and leave the caller's floating-point mode as it was
(`drivers.numerics`).

A unit held at the lower clamp decays as ``(1 - dt)^k`` from where it started; at ``dt = 0.5``
a float32 state started at 1 is subnormal from step 127 to step 149 (2^-149 is the smallest),
a float64 one from step 1023 to 1074. Each settle here starts every free unit at 1, with biases
that hold most units at the clamp, and stops inside that window: without the flush the states
it returns hold subnormals (on any CPU; on Intel Xeons each one also costs ~100 times a normal
element, which made the README's main job 20 times slower there).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from drivers import SettleBudget, open_device
from drivers.numerics import denormals_flushed, flushing_denormals
from hil.ep import EBBlock
from hil.gradcheck import check_block
from hil.host_settle import HostSettle

IDEAL = "emulator://?preset=ideal&seed=0"
FLOAT32_STEPS = SettleBudget(max_steps=140, tol=0.0, dt=0.5, check_every=140)  # 2^-140: subnormal
FLOAT64_STEPS = SettleBudget(max_steps=1050, tol=0.0, dt=0.5, check_every=1050)


def _subnormals(x: np.ndarray | torch.Tensor) -> int:
    a = np.asarray(x)
    return int(np.count_nonzero((a != 0) & (np.abs(a) < np.finfo(a.dtype).tiny)))


def _decayed(x: np.ndarray | torch.Tensor) -> int:
    """Units that decayed into the window (or through it: a flushed decay stops at 0 or, where the
    update rounds ``s - dt s`` back to ``s``, at the smallest normal float)."""
    a = np.asarray(x)
    return int(np.count_nonzero(np.abs(a) < (1e-30 if a.dtype == np.float32 else 1e-300)))


def _setup(budget: SettleBudget, settle: str = "auto") -> tuple[EBBlock, np.ndarray, dict[str, np.ndarray]]:
    """A 16-12-4 layered block whose biases hold most hidden and output units at zero, a batch of
    inputs, and an initial state of 1 for every free unit."""
    blk = check_block(open_device(IDEAL), [16, 12, 4], bias=(-0.6, -0.3), budget=budget, settle=settle)
    x = np.random.default_rng(0).random((8, 16), dtype=np.float32)
    free = [g for g in blk.topology.groups if g not in blk.inputs]
    return blk, x, {g: np.ones((8, blk.topology.size(g)), np.float32) for g in free}


def test_a_board_settle_returns_no_subnormal_state_and_restores_the_mode() -> None:
    blk, x, init = _setup(FLOAT32_STEPS)
    (inp,) = blk.inputs
    assert not flushing_denormals()
    eq = blk.device.settle({inp: x}, init=init)
    assert not flushing_denormals()  # the caller's mode is back
    assert sum(_decayed(eq.states[g]) for g in init) > 0  # units did decay at the clamp
    assert sum(_subnormals(eq.states[g]) for g in init) == 0
    # a caller that flushes already keeps flushing after a settle
    with denormals_flushed():
        blk.device.settle({inp: x}, init=init)
        assert flushing_denormals()
    assert not flushing_denormals()


def test_a_host_iterated_settle_returns_no_subnormal_state() -> None:
    blk, x, init = _setup(FLOAT32_STEPS, settle="host")
    (inp,) = blk.inputs
    eq = HostSettle(blk.device, reference=blk.device_weights)({inp: x}, init=init)
    assert not flushing_denormals()
    assert sum(_decayed(eq.states[g]) for g in init) > 0
    assert sum(_subnormals(eq.states[g]) for g in init) == 0


def test_the_float64_reference_settle_returns_no_subnormal_state() -> None:
    blk, x, init = _setup(FLOAT64_STEPS)
    (inp,) = blk.inputs
    net = blk.reference()
    eq = net.settle(
        {inp: x}, init={g: torch.from_numpy(v).double() for g, v in init.items()}, budget=FLOAT64_STEPS
    )
    assert not flushing_denormals()
    states = {g: eq.states[g].numpy() for g in init}
    assert sum(_decayed(v) for v in states.values()) > 0
    assert sum(_subnormals(v) for v in states.values()) == 0


def test_the_mode_is_restored_when_the_block_raises() -> None:
    with pytest.raises(RuntimeError, match="inside"), denormals_flushed():
        assert flushing_denormals()
        raise RuntimeError("inside")
    assert not flushing_denormals()
