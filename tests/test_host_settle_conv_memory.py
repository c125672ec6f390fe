"""The host-iterated settle of a conv network holds a bounded number of patch values at once:
a conv read's rows are the patches of every position (C_in k^2 + 1 values each), hundreds of
times the states of a map with a wide kernel, so the host reads a few samples at a time
(`hil.host_settle.CONV_READ_VALUES`), with the same equilibrium as one read of the batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hil.host_settle as hs
from drivers import Coupling, SettleBudget, Topology, conv, open_device
from drivers.base import Device
from hil.host_settle import HostSettle

MVM_ONLY = "emulator://?preset=ideal&seed=0&capabilities=mvm,pulse,program_verify"


def _network(pool: int, pool_mode: str) -> Topology:
    """1-channel 6 x 6 input, clamped; a free 2-channel map through a 5 x 5 kernel (padding 2),
    then a free pooled map: both conv tiles are read forwards and transposed every step."""
    side = 6 // pool
    return Topology(
        {"s0": 36, "s1": 72, "s2": 2 * side * side},
        (
            Coupling("W0", ("s0", "bias"), ("s1",), "conv", 1.0, 5, 2, 1),
            Coupling("W1", ("s1", "bias"), ("s2",), "conv", 1.0, 3, 1, pool, pool_mode),
        ),
        shapes={"s0": (1, 6, 6), "s1": (2, 6, 6), "s2": (2, side, side)},
        budget=SettleBudget(max_steps=6, tol=0.0, dt=0.5),
    )


def _programmed(t: Topology) -> Device:
    dev = open_device(MVM_ONLY)
    dev.configure(t)
    rng = np.random.default_rng(3)
    lim = dev.info.limits
    for c in t.couplings:
        shape = t.tile_shape(c.tile)
        dev.program(c.tile, *(rng.uniform(lim.g_min, lim.g_max, shape).astype(np.float32) for _ in range(2)))
    return dev


@settings(max_examples=6, deadline=None, derandomize=True)
@given(
    batch=st.integers(1, 7),
    most=st.integers(1, 3000),
    pool=st.sampled_from([(1, "max"), (2, "max"), (2, "avg"), (3, "max")]),
)
def test_conv_reads_hold_at_most_the_bound_and_settle_as_one_read(
    batch: int, most: int, pool: tuple[int, str]
) -> None:
    t = _network(*pool)
    dev = _programmed(t)
    x = np.random.default_rng(batch).random((batch, 36), dtype=np.float32)
    whole = HostSettle(dev)({"s0": x})

    built: list[int] = []
    patches = conv.patches

    def counted(a: torch.Tensor, g: conv.ConvGeometry) -> torch.Tensor:
        out = patches(a, g)
        built.append(out.numel())
        return out

    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(hs, "CONV_READ_VALUES", most, raising=False)
        mp.setattr(conv, "patches", counted)
        eq = HostSettle(dev)({"s0": x})
    finally:
        mp.undo()
    one_sample = max(conv.ConvGeometry.of(t, c).positions * t.tile_shape(c.tile)[0] for c in t.couplings)
    assert built and max(built) <= max(most, one_sample), (max(built), most)
    for g in ("s1", "s2"):
        np.testing.assert_allclose(eq.states[g], whole.states[g], atol=1e-5)


def test_a_wide_kernel_settle_reads_a_few_samples_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 15 x 15 kernel on a 4-channel map: 901 values per position's patch against 4 states
    per position; with the bound at 4 samples' patches, no read holds more."""
    t = Topology(
        {"s0": 256, "s1": 1024, "s2": 256},
        (
            Coupling("W0", ("s0", "bias"), ("s1",), "conv", 1.0, 15, 7, 1),
            Coupling("W1", ("s1", "bias"), ("s2",), "conv", 1.0, 15, 7, 1),
        ),
        shapes={"s0": (1, 16, 16), "s1": (4, 16, 16), "s2": (1, 16, 16)},
        budget=SettleBudget(max_steps=2, tol=0.0),
    )
    dev = open_device(MVM_ONLY)
    dev.configure(t)
    per_sample = 256 * 901  # positions x the rows of W1
    monkeypatch.setattr(hs, "CONV_READ_VALUES", 4 * per_sample, raising=False)
    built: list[int] = []
    patches = conv.patches
    monkeypatch.setattr(
        conv, "patches", lambda a, g: built.append(a.shape[0] * g.positions * g.rows) or patches(a, g)
    )
    HostSettle(dev)({"s0": np.full((32, 256), 0.5, np.float32)})
    assert max(built) == 4 * per_sample, built  # 32 samples in one read: 8 x as many
