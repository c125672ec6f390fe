"""Issue 22 part 1, conv and dense couplings larger than a tile (`drivers.placement`,
`drivers.tiled.TiledDevice`): conv maps split by channels into column blocks (one tile per
destination part) and row blocks (one tile per source part, summed at the destination; with
pooling through a node-side pool, `Coupling.pool_group`), dense couplings into diagonal dense
tiles and one bipartite tile per pair of parts."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers import ConfigurationError, Nudge, SettleBudget, Topology, open_device
from drivers.placement import Placement, place
from drivers.tiled import TiledDevice
from drivers.topology import BIAS, Coupling
from drivers.wire.payload import topology_from_dict, topology_to_dict
from hil.ep import EBBlock
from hil.init import gaussian_init

IDEAL = "emulator://?preset=ideal&seed=0"
# 20 x 4 tiles: a 3x4x4 -> 6 -> 4 conv chain's W0 (28 x 6) lies on 2 x 2 tiles (source parts of
# (20 - 1) // 9 = 2 channels; s1 in parts of 2 channels for W1's rows, packed into column blocks
# of at most 4 channels: s1#0 + s1#1, then s1#2), W1 (55 x 4) on 3 x 1 (row blocks of the split
# s1, the destination of W0, as the next conv's source)
SMALL = IDEAL + "&tile_rows_max=20&tile_cols_max=4&max_tiles=32"
BUDGET = SettleBudget(max_steps=3000, tol=1e-6, dt=0.5, check_every=5)


def _chain(pools: list[int], pool_mode: str = "max") -> Topology:
    return Topology.convolutional(
        (3, 4, 4), [6, 4], pools=pools, pool_mode=pool_mode, head=[3], budget=BUDGET
    )


def _limits(rows: int, cols: int) -> object:
    return replace(open_device(IDEAL).info.limits, tile_rows_max=rows, tile_cols_max=cols, max_tiles=100_000)


@pytest.mark.parametrize("pools", [[1, 2], [2, 1]])
def test_placement_of_a_conv_chain(pools: list[int]) -> None:
    """Row blocks by source channels (the bias row on the last), column blocks of destination
    channel parts (a tile may drive several parts); a pooled conv's row tiles of one column
    block share one pool group."""
    topo = _chain(pools)
    p = place(topo, open_device(SMALL).info.limits)
    assert p.grid("W0") == (2, 2) and p.grid("W1") == (3, 1) and p.grid("W2") == (1, 1)
    assert [q.size for q in p.parts["s0"]] == [32, 16]
    assert [q.size for q in p.parts["s1"]] == [2 * 16 // pools[0] ** 2] * 3
    s1 = (2, 4 // pools[0], 4 // pools[0])
    assert p.physical.shapes["s1#2"] == s1 and p.physical.shapes["s2"] == topo.shapes["s2"]
    phys = {c.tile: c for c in p.physical.couplings}
    assert phys["W0#1_1"].rows == ("s0#1", BIAS) and phys["W0#0_1"].rows == ("s0#0",)
    assert phys["W0#0_0"].cols == ("s1#0", "s1#1") and phys["W0#1_1"].cols == ("s1#2",)
    assert p.physical.tile_shape("W0#0_0") == (18, 4) and p.physical.tile_shape("W0#1_1") == (10, 2)
    assert p.physical.tile_shape("W1#2_0") == (19, 4)
    groups = {t: c.pool_group for t, c in phys.items() if c.kind == "conv"}
    if pools == [1, 2]:  # W0 sums its row blocks' products; W1's pool at the nodes
        assert {groups[f"W0#{i}_{j}"] for i in range(2) for j in range(2)} == {""}
        assert {groups[f"W1#{i}_0"] for i in range(3)} == {"W1"}
    else:
        want = [f"W0#{j}" for j in range(2) for _ in range(2)]  # one pool per column block
        assert [groups[f"W0#{i}_{j}"] for j in range(2) for i in range(2)] == want
        assert {groups[f"W1#{i}_0"] for i in range(3)} == {""}
    pooled = "W1" if pools == [1, 2] else "W0"
    assert p.as_dict()["node_pools"] == [pooled] and f"{pooled} conv" in p.describe()
    assert "(node-side pool)" in p.describe() and p.cells == topo.cells()


def test_pool_groups_are_checked_and_travel_on_the_wire() -> None:
    topo = place(_chain([1, 2]), open_device(SMALL).info.limits).physical
    back = topology_from_dict(topology_to_dict(topo))
    assert back == topo and back.coupling("W1#1_0").pool_group == "W1"
    assert "pool_group" not in topology_to_dict(_chain([1, 2]))["couplings"][0]  # older peers see nothing new
    c = topo.couplings
    bad = tuple(replace(x, pool_group="W1") if x.tile == "W0#0_0" else x for x in c)
    with pytest.raises(ConfigurationError, match=r"share pool group 'W1' but differ in destination"):
        replace(topo, couplings=bad)
    with pytest.raises(ConfigurationError, match=r"pool_group are for conv couplings"):
        Topology({"a": 2, "b": 2}, (Coupling("W", ("a",), ("b",), pool_group="g"),))


def test_conv_tile_operations_through_the_split_equal_the_unsplit() -> None:
    """program / read_conductance / mvm (both directions, as the host-iterated settle reads a
    conv tile: one row per position) on the ideal board."""
    small, big = TiledDevice(open_device(SMALL)), TiledDevice(open_device(IDEAL))
    topo = _chain([1, 2])
    small.configure(topo)
    big.configure(topo)
    lim = small.info.limits
    rng = np.random.default_rng(0)
    for tile in ("W0", "W1"):
        shape = topo.tile_shape(tile)
        gp = rng.uniform(lim.g_min, lim.g_max, shape).astype(np.float32)
        gm = rng.uniform(lim.g_min, lim.g_max, shape).astype(np.float32)
        rs, rb = small.program(tile, gp, gm), big.program(tile, gp, gm)
        np.testing.assert_allclose(rs.g_plus, rb.g_plus, rtol=1e-6)
        for a, b in zip(small.read_conductance(tile), big.read_conductance(tile), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6)
        x = rng.uniform(0, 1, (7, shape[0])).astype(np.float32)
        np.testing.assert_allclose(small.mvm(tile, x), big.mvm(tile, x), rtol=1e-5, atol=1e-5)
        xt = rng.uniform(0, 1, (7, shape[1])).astype(np.float32)
        xt_s, xt_b = small.mvm(tile, xt, transpose=True), big.mvm(tile, xt, transpose=True)
        np.testing.assert_allclose(xt_s, xt_b, rtol=1e-5, atol=1e-5)
    # W0's block (1, 1): source channel 2 (rows 18:27) plus the bias row 27, destination channels 4:6
    block = small.inner.read_conductance("W0#1_1")[0]
    np.testing.assert_allclose(block, big.read_conductance("W0")[0][18:28, 4:6], rtol=1e-6)


@pytest.mark.parametrize("settle", ["board", "host"])
@pytest.mark.parametrize(("pools", "pool_mode"), [([1, 2], "max"), ([2, 1], "max"), ([1, 2], "avg")])
def test_conv_ep_through_the_split_equals_the_unsplit(pools: list[int], pool_mode: str, settle: str) -> None:
    """The same free and nudged fixed points (1e-5), energies, EP gradients (relative error
    below 1e-4) and input gradients as the unsplit conv chain: row and column splits, with and
    without pooling, a split destination feeding the next conv. An average-pooled conv's row
    tiles need no pool group (a mean of sums is a sum of means)."""
    topo = _chain(pools, pool_mode)
    # biases in the middle of the linear range: every layer's states away from 0
    w = gaussian_init(topo, 1.0, torch.Generator().manual_seed(3), bias="mid")
    kw = {"weights": w, "settle": settle}
    a = EBBlock(TiledDevice(open_device(SMALL)), topo, **kw)  # type: ignore[arg-type]
    b = EBBlock(TiledDevice(open_device(IDEAL)), topo, **kw)  # type: ignore[arg-type]
    assert a.device.placement.tiles == 8 and not b.device.placement.split
    groups = {c.pool_group for c in a.device.placement.physical.couplings if c.kind == "conv"} - {""}
    assert bool(groups) == (pool_mode == "max")
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, (4, 48)).astype(np.float32)
    y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 4)]
    fa, fb = a.free(x), b.free(x)
    assert fa.converged and fb.converged
    for g in ("s1", "s2", "s3"):
        assert float(fb.states[g].mean()) > 0.1  # states worth comparing
        np.testing.assert_allclose(fa.states[g], fb.states[g], rtol=0, atol=1e-5, err_msg=g)
    if settle == "board":
        np.testing.assert_allclose(fa.energy, fb.energy, rtol=1e-5, atol=1e-5)
    nudge = {"s3": Nudge(0.3, target=y, grad=y - 0.5)}
    na, nb = a.settle(x, nudge=nudge), b.settle(x, nudge=nudge)
    for g in ("s1", "s2", "s3"):
        np.testing.assert_allclose(na.states[g], nb.states[g], rtol=0, atol=1e-5, err_msg=g)
    ra, rb = a.ep(x, target=y, beta=0.2), b.ep(x, target=y, beta=0.2)
    for t in rb.grads:
        ga, gb = ra.grads[t], rb.grads[t]
        assert float(gb.abs().max()) > 1e-3, t
        rel = float((ga - gb).norm() / gb.norm())
        assert rel < 1e-4, (t, rel)
    gi_a, gi_b = ra.input_grads["s0"], rb.input_grads["s0"]
    assert float(gi_b.abs().max()) > 1e-4
    assert float((gi_a - gi_b).norm() / gi_b.norm()) < 1e-4


def _covers_once(p: Placement) -> None:
    """Every logical cell of every tile in exactly one physical block (a dense off-diagonal
    block covers its mirror too), each block the shape of its physical tile and within the
    limits, conv blocks on whole source and destination channels."""
    topo, phys = p.logical, p.physical
    for c in topo.couplings:
        rows, cols = topo.tile_shape(c.tile)
        seen = np.zeros((rows, cols), np.int64)
        for b in p.blocks[c.tile]:
            seen[b.r0 : b.r1, b.c0 : b.c1] += 1
            if b.bias_row >= 0:
                seen[b.bias_row, b.c0 : b.c1] += 1
            if b.mirror:
                seen[b.c0 : b.c1, b.r0 : b.r1] += 1
            r, k = phys.tile_shape(b.tile)
            assert (r, k) == b.shape and r <= p.tile_rows_max and k <= p.tile_cols_max
            pc = phys.coupling(b.tile)
            if c.kind == "conv":
                geometry = ("kernel", "padding", "pool", "pool_mode")
                assert pc.kind == "conv" and all(getattr(pc, f) == getattr(c, f) for f in geometry)
                assert b.r0 % c.kernel**2 == 0 and sum(phys.shapes[d][0] for d in pc.cols) == b.c1 - b.c0
                assert bool(pc.pool_group) == (c.pool > 1 and c.pool_mode == "max" and p.grid(c.tile)[0] > 1)
        assert (seen == 1).all(), c.tile
    for g, parts in p.parts.items():
        assert parts[0].start == 0 and parts[-1].stop == topo.groups[g]
        assert all(phys.groups[q.name] == q.size for q in parts)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    channels=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    pools=st.lists(st.sampled_from([1, 2]), min_size=3, max_size=3),
    c_in=st.integers(1, 6),
    side=st.sampled_from([4, 8]),
    kernel=st.sampled_from([1, 3]),
    rmax=st.integers(10, 40),
    cmax=st.integers(1, 12),
    mode=st.sampled_from(["max", "avg"]),
)
def test_conv_placement_covers_every_cell_once(
    channels: list[int], pools: list[int], c_in: int, side: int, kernel: int, rmax: int, cmax: int, mode: str
) -> None:
    pools = pools[: len(channels)]
    if side >> sum(p == 2 for p in pools) < 1:
        return
    topo = Topology.convolutional(
        (c_in, side, side), channels, pools=pools, pool_mode=mode, kernel=kernel, padding=kernel // 2
    )
    try:
        p = place(topo, _limits(rmax, cmax))  # type: ignore[arg-type]
    except ConfigurationError as exc:  # a kernel of one channel, or a channel, larger than a tile side
        assert "one source channel" in str(exc) or "channel of feature map" in str(exc)
        return
    _covers_once(p)
    assert p.cells == topo.cells() and 0 < p.utilisation <= 1


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    sizes=st.lists(st.integers(1, 30), min_size=1, max_size=4),
    bias=st.booleans(),
    rmax=st.integers(2, 17),
    cmax=st.integers(1, 17),
)
def test_dense_placement_covers_every_cell_once(sizes: list[int], bias: bool, rmax: int, cmax: int) -> None:
    """A dense coupling in parts: diagonal dense tiles with the bias row, one bipartite tile per
    pair; its physical cells are the diagonal blocks' and one per pair across parts."""
    groups = {f"g{i}": n for i, n in enumerate(sizes)}
    topo = Topology.dense(groups, bias=bias)
    p = place(topo, _limits(rmax, cmax))  # type: ignore[arg-type]
    _covers_once(p)
    n = sum(sizes)
    side = min(rmax - bias, cmax)
    if n + bias > rmax or n > cmax:
        diag = [b.r1 - b.r0 for b in p.blocks["W"] if not b.mirror]
        assert all(k <= side for k in diag) and sum(diag) == n
        assert p.cells == sum(k * (k + bias) for k in diag) + (n * n - sum(k * k for k in diag)) // 2
    else:
        assert not p.split


def test_conv_classifier_trains_on_small_tiles_as_on_whole_ones(tmp_path) -> None:
    """A conv ff-EBM (digits 1x8x8 -> 4 -> 6 channels, pools 1 and 2, head in the block) on
    20 x 4 tiles (W1 in pooled row blocks at a node-side pool, its column blocks on several
    destination maps) trains with the same loss (1e-4)
    and accuracy as on tiles that hold every coupling, and its run log carries the placement."""
    from hil.config import load_config
    from hil.runlog import RunLog, open_run
    from hil.train_classifier import train_classifier

    torch.set_num_threads(1)
    base = [
        "model.kind=ffebm", "model.channels=[4,6]", "model.pools=[1,2]", "model.block_layers=2",
        "train.epochs=1", "data.limit_train=32", "data.limit_test=32", "train.batch_size=16",
    ]  # fmt: skip
    small = load_config(None, [*base, f"device={IDEAL}&tile_rows_max=20&tile_cols_max=4&max_tiles=64"])
    with RunLog.create(tmp_path / "run.zarr", small, kind="train-classifier") as log:
        res = train_classifier(small, progress=False, log=log)
    res.model.close()  # type: ignore[union-attr]
    whole = train_classifier(load_config(None, base), progress=False)
    whole.model.close()  # type: ignore[union-attr]
    placement = open_run(tmp_path / "run.zarr").boards[0]["placement"]
    assert placement["node_pools"] == ["W1"] and placement["kinds"]["W1"] == "conv"
    # W0 whole on s1's parts; W1 2 row blocks x 2 column blocks (s2's six 1-channel parts, split
    # for the head's 20-row tiles, packed 4 + 2); the head 6 x 3: 1 + 4 + 18 tiles
    assert placement["grid"] == {"W0": [1, 1], "W1": [2, 2], "W2": [6, 3]} and placement["tiles"] == 23
    assert res.history[-1].test_acc == pytest.approx(whole.history[-1].test_acc, abs=1e-9)
    assert res.history[-1].train_loss == pytest.approx(whole.history[-1].train_loss, rel=1e-4)


@pytest.mark.parametrize("settle", ["board", "host", "host-alternating"])
def test_a_physical_topology_with_pool_groups_runs_as_the_logical_one(settle: str) -> None:
    """The split topology itself (its pool groups declared, no `TiledDevice`) on a board whose
    tiles hold it: the board's settle, the host-iterated settle (synchronous, or alternating:
    a member's transposed read may then come before its group's forward read), the pure-torch
    reference and the EP estimator all sum a pool group's pre-activations before pooling, so
    states and EP gradients (reassembled per block) are the logical network's."""
    from hil.reference import DHN

    topo = _chain([2, 2])  # both convs pooled; W0 on 2 x 2 tiles, W1 on 3 x 1
    p = place(topo, open_device(SMALL).info.limits)
    assert p.pooled("W0") and p.pooled("W1")
    w = gaussian_init(topo, 1.0, torch.Generator().manual_seed(3), bias="mid")
    wp = {b.tile: w[t][b.r0 : b.r1, b.c0 : b.c1].clone() for t, bs in p.blocks.items() for b in bs}
    path = settle.split("-")[0]
    logical = EBBlock(open_device(IDEAL), topo, weights=w, settle=path)  # type: ignore[arg-type]
    physical = EBBlock(open_device(IDEAL), p.physical, weights=wp, settle=path, inputs=("s0#0", "s0#1"))  # type: ignore[arg-type]
    if settle == "host-alternating":
        logical.host_update = physical.host_update = "alternating"
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, (4, 48)).astype(np.float32)
    y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 4)]
    xs = {"s0#0": x[:, :32], "s0#1": x[:, 32:]}

    def joined(states: dict[str, np.ndarray], g: str) -> np.ndarray:
        return np.concatenate([np.asarray(states[q.name]) for q in p.parts[g]], axis=1)

    fa, fb = physical.free(xs), logical.free(x)
    for g in ("s1", "s2", "s3"):
        assert float(fb.states[g].mean()) > 0.1
        np.testing.assert_allclose(joined(fa.states, g), fb.states[g], rtol=0, atol=1e-5, err_msg=g)
    ref_a = DHN(p.physical, wp).settle({k: torch.from_numpy(v) for k, v in xs.items()}, newton=True)
    ref_b = DHN(topo, w).settle({"s0": torch.from_numpy(x)}, newton=True)
    for g in ("s1", "s2", "s3"):
        got = torch.cat([ref_a.states[q.name] for q in p.parts[g]], 1)
        torch.testing.assert_close(got, ref_b.states[g], rtol=0, atol=1e-8)
    ra = physical.ep(xs, target={"s3": y}, beta=0.2)
    rb = logical.ep(x, target=y, beta=0.2)
    for t, blocks in p.blocks.items():
        got = torch.zeros_like(rb.grads[t])
        for b in blocks:
            got[b.r0 : b.r1, b.c0 : b.c1] = ra.grads[b.tile]
        assert float((got - rb.grads[t]).norm() / rb.grads[t].norm()) < 1e-4, t
    gi = torch.cat([ra.input_grads["s0#0"], ra.input_grads["s0#1"]], 1)
    assert float((gi - rb.input_grads["s0"]).norm() / rb.input_grads["s0"].norm()) < 1e-4


@pytest.mark.parametrize("transport", ["visa-tcp", "serial-socket"])
def test_a_split_conv_network_on_a_served_board_settles_as_in_process(transport: str, device_on) -> None:
    """Over the real servers the physical topology (pool groups, tiles driving several
    destination parts) crosses the wire at configure; the board's settle of the split network
    equals the unsplit one in process (1e-5)."""
    topo = _chain([2, 2])
    w = gaussian_init(topo, 1.0, torch.Generator().manual_seed(3), bias="mid")
    remote = TiledDevice(device_on(transport, board=SMALL))
    a = EBBlock(remote, topo, weights=w, settle="board")
    b = EBBlock(TiledDevice(open_device(IDEAL)), topo, weights=w, settle="board")
    assert remote.placement.pooled("W0") and remote.inner.topology == remote.placement.physical
    x = np.random.default_rng(1).uniform(0, 1, (4, 48)).astype(np.float32)
    fa, fb = a.free(x), b.free(x)
    for g in ("s1", "s2", "s3"):
        assert float(fb.states[g].mean()) > 0.1
        np.testing.assert_allclose(fa.states[g], fb.states[g], rtol=0, atol=1e-5, err_msg=g)
