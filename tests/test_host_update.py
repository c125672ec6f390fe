"""How the host-iterated settle updates the groups (`HostSettle.update`, config key
``ep.host_update``): all from the same states (``synchronous``), or a layered network's two
halves in turn (``alternating``, the asynchronous fixed-point iteration of the EP codebases).
Both must reach the same fixed point, EP through the alternating settle must match implicit
differentiation, and the alternating one must need fewer steps where the feedback is strong."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from drivers import ConfigurationError, Nudge, SettleBudget, Topology, open_device
from hil.classifier import Classifier
from hil.config import ConfigError, load_config
from hil.ep import EBBlock
from hil.gradcheck import check_block, gradcheck
from hil.host_settle import HostSettle
from hil.init import goe_init

IDEAL = "emulator://?preset=ideal&seed=0"
TIGHT = SettleBudget(max_steps=4000, tol=1e-7, dt=0.5, check_every=1)


def deep_block(init_scale: float = 0.5) -> EBBlock:
    return check_block(open_device(IDEAL), [64, 24, 24, 24, 24, 10], init_scale=init_scale, budget=TIGHT,
                       settle="host")  # fmt: skip


def settle(host: HostSettle, clamp: dict, dt: float, nudge: dict | None = None):
    """One settle of `host`'s device at step size `dt` (the topology's budget otherwise)."""
    topo = host.device.topology
    host.device.configure(replace(topo, budget=replace(topo.budget, dt=dt)))
    return host(clamp, nudge=nudge)


def test_alternating_reaches_the_synchronous_fixed_point_in_fewer_steps(digits) -> None:
    """A 5-layer block (init scale 0.5: one fixed point; from 0.8 up the two updates can end
    in different minima of the energy, as any two dynamics can): free, with an elastic nudge
    and with an injected current, the alternating settle at dt 1 lands on the synchronous
    one's fixed point (dt 0.5) to 1e-5, checked at every step, in at most half the steps
    (292 against 1120 free)."""
    x, y = digits
    blk = deep_block()
    (inp,), (out,) = blk.inputs, blk.outputs
    sync = HostSettle(blk.device, reference=blk.device_weights)
    alt = HostSettle(blk.device, reference=blk.device_weights, update="alternating")
    for nudge in (None, {out: Nudge(0.5, target=y)}, {out: Nudge(0.3, grad=y - 0.5)}):
        a = settle(sync, {inp: x}, 0.5, nudge)
        b = settle(alt, {inp: x}, 1.0, nudge)
        assert a.converged and b.converged
        for g in blk.free_groups:
            np.testing.assert_allclose(b.states[g], a.states[g], rtol=0, atol=1e-5, err_msg=g)
        assert 2 * b.steps <= a.steps, (b.steps, a.steps)
    # the same products per step: each tile read once forwards and once transposed
    assert alt.stats.per_step == sync.stats.per_step == 2 * 4  # W0 forwards: once per settle


def test_alternating_updates_one_half_from_the_other_halfs_new_states() -> None:
    """One step at dt 1 from 0 on a 3-layer chain: the half next to the input (s1, s3) is set
    from the states at the step's start, the other half (s2) from that half's new states."""
    topo = Topology.layered([4, 3, 3, 2], budget=SettleBudget(max_steps=1, tol=0.0, dt=1.0))
    dev = open_device(IDEAL)
    blk = EBBlock(dev, topo, init_scale=1.0, seed=3, settle="host")
    blk.host_update = "alternating"
    x = torch.rand(5, 4, generator=torch.Generator().manual_seed(0))
    eq = blk.free(x)
    ref = blk.device_weights()
    zero = {g: torch.zeros(5, topo.size(g)) for g in blk.free_groups}
    first = {g: u.clamp(0, 1) for g, u in ref.drive({"s0": x, **zero}).items()}  # s1 and s3
    s2 = ref.drive({"s0": x, **zero, "s1": first["s1"], "s3": first["s3"]})["s2"].clamp(0, 1)
    np.testing.assert_allclose(eq.states["s1"], first["s1"].numpy(), atol=1e-6)
    np.testing.assert_allclose(eq.states["s3"], first["s3"].numpy(), atol=1e-6)
    np.testing.assert_allclose(eq.states["s2"], s2.numpy(), atol=1e-6)
    # a synchronous step at dt 1 sets s2 from the states at the start of the step (0) instead
    assert not np.allclose(s2.numpy(), first["s2"].numpy(), atol=1e-3)


def test_a_pooled_conv_block_reaches_the_same_fixed_point() -> None:
    """Two conv layers with 2 x 2 max-pooling and a head: the transposed read of the pooled
    tile routes by the winners of its latest forward read, which the alternating settle reads
    first when the transposed read comes before it."""
    topo = Topology.convolutional((2, 8, 8), [3, 4], pools=[2, 1], head=[3], budget=TIGHT)
    x = torch.rand(6, topo.size(next(iter(topo.groups))), generator=torch.Generator().manual_seed(2))
    ends = {}
    for update, dt in (("synchronous", 0.5), ("alternating", 1.0)):
        blk = EBBlock(open_device(IDEAL), topo, init_scale=0.8, seed=0, settle="host")
        blk.host_update = update  # type: ignore[assignment]
        blk.budgets = {"free": replace(TIGHT, dt=dt)}
        eq = blk.free(x)
        assert eq.converged
        ends[update] = {g: np.asarray(eq.states[g]) for g in blk.free_groups}
    for g, v in ends["synchronous"].items():
        np.testing.assert_allclose(ends["alternating"][g], v, rtol=0, atol=1e-5, err_msg=g)


@pytest.mark.parametrize("kind", ["layered", "conv"])
def test_ep_through_alternating_settles_matches_implicit_differentiation(kind: str, digits) -> None:
    """Centered EP at beta 0.01 through alternating settles at dt 1: cosine at least 0.999 and
    relative error at most 5 % per weight, bias and the input, on the networks of the
    synchronous checks (tests/test_host_settle.py; tests/test_conv_ep.py: two conv layers,
    each max-pooled 2 x 2, and a head, units off the kinks)."""
    x, y = digits
    if kind == "layered":
        blk = check_block(open_device(IDEAL), [64, 24, 10], budget=TIGHT, settle="host")
    else:
        topo = Topology.convolutional((1, 8, 8), [4, 6], pools=[2, 2], head=[3], budget=TIGHT)
        w = goe_init(topo, 0.5, torch.Generator().manual_seed(0))
        g = torch.Generator().manual_seed(1)
        for t in w.values():
            t[-1] = 0.2 + 0.2 * torch.rand(t.shape[1], generator=g)
        blk = EBBlock(open_device(IDEAL), topo, weights=w, settle="host")
        gen = torch.Generator().manual_seed(2)
        x, y = torch.rand(8, 64, generator=gen).numpy(), torch.rand(8, 3, generator=gen).numpy()
    blk.host_update = "alternating"
    blk.budgets = {"free": replace(TIGHT, dt=1.0), "nudge": replace(TIGHT, dt=1.0)}
    rows = gradcheck(blk, x, y, betas=(0.01,), modes=("centered",))
    assert {"W0.weight", "W0.bias", "W1.weight", "input:s0"} <= {r.param for r in rows}
    for r in rows:
        assert r.cosine >= 0.999, r
        assert r.rel_error <= 0.05, r


def test_what_cannot_alternate_is_refused() -> None:
    dense = check_block(open_device(IDEAL), [6, 5, 3], dense=True, budget=TIGHT, settle="host")
    dense.host_update = "alternating"
    with pytest.raises(ConfigurationError, match=r"dense tile .*host_update=.synchronous."):
        dense.free(np.zeros((2, 6), np.float32))
    board = check_block(open_device(IDEAL), [6, 5, 3], budget=TIGHT)
    assert board.settle_path == "board"
    with pytest.raises(ConfigurationError, match=r"ep\.settle=host"):
        board.host_update = "alternating"
    board.host_update = "synchronous"  # what the board does anyway
    host = check_block(open_device(IDEAL), [6, 5, 3], budget=TIGHT, settle="host")
    with pytest.raises(ConfigurationError, match="host_update must be one of"):
        host.host_update = "gauss-seidel"  # type: ignore[assignment]


def test_use_settle_moves_a_trained_block_to_the_host() -> None:
    blk = check_block(open_device(IDEAL), [6, 5, 3], budget=TIGHT)
    x = np.random.default_rng(0).random((3, 6), dtype=np.float32)
    board = blk.free(x)
    blk.use_settle("host", "alternating")
    assert blk.settle_path == "host" and blk.host_update == "alternating"
    host = blk.free(x)
    np.testing.assert_allclose(host.states["s2"], board.states["s2"], atol=1e-5)
    blk.use_settle("board")
    assert blk.host_settle is None and blk.host_update == "synchronous"


def test_the_config_key_reaches_every_block() -> None:
    ov = ["model.kind=ffebm", "model.sizes=[64,16,16,10]", "model.block_layers=1", "ep.settle=host",
          "ep.host_update=alternating", f"device={IDEAL}"]  # fmt: skip
    clf = Classifier(load_config(None, ov), 64, 10, open_device)
    assert [b.host_update for b in clf.blocks()] == ["alternating"] * len(clf.blocks())
    with pytest.raises(ConfigError, match="host_update"):
        load_config(None, ["ep.host_update=jacobi"])
    with pytest.raises(ConfigurationError, match=r"ep\.settle=host"):
        Classifier(load_config(None, ["ep.host_update=alternating", f"device={IDEAL}"]), 64, 10, open_device)
