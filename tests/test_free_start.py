"""Where a free settle starts (`ep.free_start`): from 0, or from one feedforward sweep through
the weights the device holds (`EBBlock.forward_start`). Both must reach the same fixed point;
the sweep's start must be that fixed point for a block of one layer, and nearer to it than 0
for a deeper block whose feedback is weak."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from drivers import SettleBudget, Topology, open_device
from hil.config import ConfigError, load_config
from hil.ep import EBBlock

BUDGET = SettleBudget(max_steps=600, tol=1e-6, dt=0.5)


def block(topo: Topology, scale: float, free_start: str = "zero", settle: str = "auto") -> EBBlock:
    dev = open_device("emulator://?preset=ideal&seed=0")
    blk = EBBlock(dev, topo, init_scale=scale, seed=0, settle=settle)  # type: ignore[arg-type]
    blk.free_start = free_start  # type: ignore[assignment]
    return blk


def states(eq, groups) -> dict[str, np.ndarray]:
    return {g: np.asarray(eq.states[g]) for g in groups}


def conv_topology() -> Topology:
    return Topology.convolutional((2, 8, 8), [3, 4], pools=[2, 1], head=[3], budget=BUDGET)


def test_the_sweep_visits_the_layers_from_the_input_up() -> None:
    layered = block(Topology.layered([6, 5, 4, 3], budget=BUDGET), 0.5)
    assert layered.sweep_order() == [["s1"], ["s2"], ["s3"]]
    conv = block(conv_topology(), 0.5)
    order = conv.sweep_order()
    assert [g for layer in order for g in layer] == conv.free_groups
    assert order[0] == [conv.free_groups[0]]


def test_a_one_layer_block_starts_at_its_fixed_point() -> None:
    """A block of one layer with its input clamped has no feedback: the sweep's start is
    ``rho(W x + b)``, its fixed point, and the settle stops at its first check."""
    topo = Topology.layered([12, 7], budget=SettleBudget(max_steps=200, tol=1e-5, dt=0.5))
    x = torch.rand(5, 12, generator=torch.Generator().manual_seed(1))
    zero, fwd = block(topo, 1.0), block(topo, 1.0, "forward")
    a, b = zero.free(x), fwd.free(x)
    start = fwd.forward_start(x)["s1"].numpy()
    np.testing.assert_allclose(start, np.asarray(a.states["s1"]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(b.states["s1"]), np.asarray(a.states["s1"]), atol=1e-5)
    assert b.steps <= topo.budget.check_every < a.steps


@pytest.mark.parametrize(("kind", "settle"), [("layered", "auto"), ("conv", "auto"), ("layered", "host")])
def test_both_starts_reach_the_same_fixed_point_the_sweep_sooner(kind: str, settle: str) -> None:
    """Weak feedback (init scale 0.5): the settles from 0 and from the sweep end at the same
    states, and the one from the sweep, checked every step, stops sooner (the damped
    relaxation's rate sets the tail; the sweep saves the steps the input takes to climb the
    layers). On the board's own relaxation and on the host's iteration through `mvm`."""

    def topology(budget: SettleBudget) -> Topology:
        if kind == "layered":
            return Topology.layered([20, 16, 12, 5], budget=budget)
        return Topology.convolutional((2, 8, 8), [3, 4], pools=[2, 1], head=[3], budget=budget)

    topo = topology(BUDGET)
    x = torch.rand(6, topo.size(next(iter(topo.groups))), generator=torch.Generator().manual_seed(2))
    zero, fwd = block(topo, 0.5, settle=settle), block(topo, 0.5, "forward", settle)
    a, b = zero.free(x), fwd.free(x)
    assert a.converged and b.converged
    for g, v in states(a, zero.free_groups).items():
        np.testing.assert_allclose(np.asarray(b.states[g]), v, atol=1e-5, err_msg=g)
    # the sweep's start is nearer the fixed point than 0 is
    start = fwd.forward_start(x)
    far = max(float(np.abs(v).max()) for v in states(a, zero.free_groups).values())
    near = max(float(np.abs(start[g].numpy() - v).max()) for g, v in states(a, zero.free_groups).items())
    assert near < far
    every = topology(SettleBudget(max_steps=600, tol=1e-4, dt=0.5, check_every=1))
    steps = [block(every, 0.5, origin, settle).free(x).steps for origin in ("zero", "forward")]
    assert steps[1] < steps[0]


def test_the_config_key_reaches_every_block_and_a_bad_value_is_refused() -> None:
    from hil.classifier import Classifier
    from hil.data import load_dataset

    ds = load_dataset("digits")
    over = ["model.kind=ffebm", "model.sizes=[64,16,16,10]", "model.block_layers=2", "ep.free_start=forward",
            "ep.free_steps=30", "ep.nudge_steps=10", "train.batch_size=8"]  # fmt: skip
    cfg = load_config(None, over)
    clf = Classifier(cfg, 64, 10, open_device)
    assert [b.free_start for b in clf.blocks()] == ["forward", "forward"]
    loss, _, _ = clf.step(torch.as_tensor(ds.x_train[:8]).float(), torch.as_tensor(ds.y_train[:8]).long())
    assert np.isfinite(loss)
    with pytest.raises(ConfigError, match="free_start"):
        load_config(None, ["ep.free_start=ones"])
    blk = clf.blocks()[0]
    blk.free_start = "ones"  # type: ignore[assignment]
    with pytest.raises(ValueError, match="'zero' or 'forward'"):
        blk.free(torch.zeros(2, 64))
