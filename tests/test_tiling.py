"""Issue 22 part 1: couplings larger than the board's tiles, placed on grids of physical tiles
(`drivers.placement`, `drivers.tiled.TiledDevice`)."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from calibration.apply import channel_offsets
from drivers import (
    ConfigurationError,
    Device,
    DeviceError,
    LimitViolation,
    Nudge,
    SettleBudget,
    Topology,
    open_device,
)
from drivers.placement import place
from drivers.tiled import TiledDevice
from drivers.topology import BIAS, Coupling
from drivers.wrapper import DeviceWrapper
from hil.boards import open_board
from hil.ep import EBBlock

IDEAL = "emulator://?preset=ideal&seed=0"
# 10 x 8 tiles: a 20-12-8 network's W0 (21 x 12) lies on a 3 x 2 grid, W1 (13 x 8) on 2 x 1
SMALL = IDEAL + "&tile_rows_max=10&tile_cols_max=8&max_tiles=16"
SIZES = [20, 12, 8]
BUDGET = SettleBudget(max_steps=3000, tol=1e-6, dt=0.5, check_every=5)


def _pair() -> tuple[TiledDevice, TiledDevice]:
    return TiledDevice(open_device(SMALL)), TiledDevice(open_device(IDEAL))


def test_placement_of_the_small_network() -> None:
    """W0 (20 inputs + bias = 21 rows, 12 columns) on 10 x 8 tiles: s0 in parts of 8 (8, 8, 4
    + bias), s1 in parts of 8 (8, 4): a 3 x 2 grid; W1 (12 + 1 rows, 8 columns) 2 x 1."""
    lim = open_device(SMALL).info.limits
    topo = Topology.layered(SIZES)
    p = place(topo, lim)
    assert p.split and p.grid("W0") == (3, 2) and p.grid("W1") == (2, 1)
    assert p.tiles == 8 and p.cells == topo.cells()
    assert p.utilisation == pytest.approx(topo.cells() / (8 * 10 * 8))
    assert [q.size for q in p.parts["s0"]] == [8, 8, 4] and [q.size for q in p.parts["s1"]] == [8, 4]
    assert p.physical.coupling("W0#2_0").rows == ("s0#2", BIAS)
    assert "3x2 tiles" in p.describe() and p.as_dict()["tiles"] == 8


def test_a_fitting_topology_passes_through_unchanged() -> None:
    dev = TiledDevice(open_device(IDEAL))
    topo = Topology.layered(SIZES)
    p = place(topo, dev.info.limits)
    assert not p.split and p.physical is topo
    dev.configure(topo)
    assert dev.inner.topology is topo and dev.topology is topo


def test_tile_operations_through_the_split_equal_the_unsplit() -> None:
    """program / read_conductance / mvm (both directions) / pulse reports on the ideal board."""
    small, big = _pair()
    topo = Topology.layered(SIZES)
    small.configure(topo)
    big.configure(topo)
    rng = np.random.default_rng(0)
    lim = small.info.limits
    for tile in ("W0", "W1"):
        shape = topo.tile_shape(tile)
        gp = rng.uniform(lim.g_min, lim.g_max, shape).astype(np.float32)
        gm = rng.uniform(lim.g_min, lim.g_max, shape).astype(np.float32)
        rs, rb = small.program(tile, gp, gm), big.program(tile, gp, gm)
        np.testing.assert_allclose(rs.g_plus, rb.g_plus, rtol=1e-6)
        np.testing.assert_allclose(rs.g_minus, rb.g_minus, rtol=1e-6)
        assert rs.tile == tile and rs.within_tol == pytest.approx(rb.within_tol)
        for a, b in zip(small.read_conductance(tile), big.read_conductance(tile), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6)
        x = rng.uniform(0, 1, (5, shape[0])).astype(np.float32)
        np.testing.assert_allclose(small.mvm(tile, x), big.mvm(tile, x), rtol=1e-5, atol=1e-5)
        xt = rng.uniform(0, 1, (5, shape[1])).astype(np.float32)
        np.testing.assert_allclose(
            small.mvm(tile, xt, transpose=True), big.mvm(tile, xt, transpose=True), rtol=1e-5, atol=1e-5
        )
    # the inner board holds the blocks: W0's block (1, 1) is rows 8:16, columns 8:12
    gp_small, _ = small.inner.read_conductance("W0#1_1")
    np.testing.assert_allclose(gp_small, big.read_conductance("W0")[0][8:16, 8:12], rtol=1e-6)
    with pytest.raises(ConfigurationError, match=r"expected shape \(21, 12\)"):
        small.program("W0", np.zeros((3, 3), np.float32), np.zeros((3, 3), np.float32))
    with pytest.raises(ConfigurationError, match=r"expected shape \(batch, 21\)"):
        small.mvm("W0", np.zeros((2, 5), np.float32))
    with pytest.raises(ConfigurationError, match=r"unknown tile 'W0#0_0'"):
        small.mvm("W0#0_0", np.zeros((2, 8), np.float32))


def _blocks(settle: str) -> tuple[EBBlock, EBBlock]:
    small, big = _pair()
    topo = Topology.layered(SIZES, budget=BUDGET)
    kw = {"seed": 3, "settle": settle}
    return EBBlock(small, topo, **kw), EBBlock(big, topo, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("settle", ["board", "host"])
def test_ep_through_the_split_equals_the_unsplit(settle: str) -> None:
    """The same fixed point (free and nudged) to 1e-5 and the same EP gradients."""
    a, b = _blocks(settle)
    assert a.device.placement.split and not b.device.placement.split
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, (6, SIZES[0])).astype(np.float32)
    y = np.eye(SIZES[-1], dtype=np.float32)[rng.integers(0, SIZES[-1], 6)]
    fa, fb = a.free(x), b.free(x)
    assert fa.converged and fb.converged and set(fa.states) == set(fb.states) == {"s0", "s1", "s2"}
    for g in fb.states:
        np.testing.assert_allclose(fa.states[g], fb.states[g], rtol=0, atol=1e-5, err_msg=g)
    na = a.settle(x, nudge={"s2": Nudge(0.3, target=y, grad=y - 0.5)})
    nb = b.settle(x, nudge={"s2": Nudge(0.3, target=y, grad=y - 0.5)})
    for g in nb.states:
        np.testing.assert_allclose(na.states[g], nb.states[g], rtol=0, atol=1e-5, err_msg=g)
    ra, rb = a.ep(x, target=y, beta=0.2), b.ep(x, target=y, beta=0.2)
    for t in rb.grads:
        ga, gb = ra.grads[t], rb.grads[t]
        assert float(gb.abs().max()) > 1e-3  # a gradient worth comparing
        rel = float((ga - gb).norm() / gb.norm())
        assert rel < 1e-4, (t, rel)
    torch.testing.assert_close(ra.input_grads["s0"], rb.input_grads["s0"], rtol=1e-4, atol=1e-5)


def test_settle_tensors_and_trace_are_reassembled() -> None:
    small, big = _pair()
    topo = Topology.layered(SIZES, budget=BUDGET)
    EBBlock(small, topo, seed=5)
    EBBlock(big, topo, seed=5)
    x = torch.rand(3, SIZES[0], generator=torch.Generator().manual_seed(0))
    ea = small.settle_tensors({"s0": x}, trace=50)
    eb = big.settle_tensors({"s0": x}, trace=50)
    assert isinstance(ea.states["s1"], torch.Tensor) and ea.states["s1"].shape == (3, 12)
    for g in eb.states:
        torch.testing.assert_close(ea.states[g], eb.states[g], rtol=0, atol=1e-5)
    assert ea.trace is not None and ea.trace["s1"].shape == eb.trace["s1"].shape
    np.testing.assert_array_equal(ea.trace["step"], eb.trace["step"])
    assert ea.energy is not None and np.allclose(ea.energy, eb.energy, atol=1e-4)


def test_open_board_wraps_and_places() -> None:
    dev = open_board(SMALL)
    try:
        assert isinstance(dev, TiledDevice)
        dev.configure(Topology.layered(SIZES))
        assert dev.placement is not None and dev.placement.tiles == 8
        assert len(dev.inner.topology.couplings) == 8
    finally:
        dev.close()


def test_a_calibration_record_corrects_the_split_network_as_the_unsplit(tmp_path) -> None:
    """Boards with converter gain and offset errors, each calibrated (DAC and state ADC): the
    split network behind its record settles where the unsplit one behind its own does (1e-5),
    and the record moves the states by more than 1e-2 (it is applied per node channel, through
    the `CalibratedDevice` under the `TiledDevice`, which sees the physical topology)."""
    from calibration import CalibratedDevice, write
    from calibration.session import SessionOptions, run_session

    err = "&gain_error=0.03&offset_error=2"
    out = {}
    for name, uri in (("split", SMALL + err), ("whole", IDEAL + err)):
        board = open_device(uri)
        options = SessionOptions(routines=("adc", "dac"), tile_shapes=((10, 8),), channels=40)
        record = run_session(board, options)
        board.close()
        write(record, tmp_path / f"{name}.zarr")
    x = np.random.default_rng(1).uniform(0, 1, (6, SIZES[0])).astype(np.float32)
    topo = Topology.layered(SIZES, budget=BUDGET)
    for name, uri, cal in (
        ("split", SMALL + err, str(tmp_path / "split.zarr")),
        ("whole", IDEAL + err, str(tmp_path / "whole.zarr")),
        ("raw", SMALL + err, ""),
    ):
        dev = open_board(uri, cal)
        try:
            out[name] = EBBlock(dev, topo, seed=3).free(x).states
            if name == "split":
                assert isinstance(dev.inner, CalibratedDevice) and dev.record is dev.inner.record
                assert len(dev.inner.topology.couplings) == 8
        finally:
            dev.close()
    for g in ("s1", "s2"):
        np.testing.assert_allclose(out["split"][g], out["whole"][g], rtol=0, atol=1e-5, err_msg=g)
        assert float(np.abs(out["split"][g] - out["raw"][g]).max()) > 1e-2


def test_what_cannot_be_split_is_refused_with_a_reason() -> None:
    lim = open_device(SMALL).info.limits
    conv = Topology.convolutional((3, 8, 8), [2], kernel=5, padding=2, pools=[2])  # 25 rows a channel
    with pytest.raises(ConfigurationError, match=r"conv tile 'W0'.*one source channel \(5\^2 rows.*10-row"):
        place(conv, lim)
    # the head's rows from a map split by whole channels: a channel of s1 has 16 nodes > 10 rows
    head = Topology.convolutional((3, 8, 8), [16], pools=[2], head=[4])
    with pytest.raises(ConfigurationError, match=r"tile 'W1'.*channel of feature map 's1'.*16 nodes"):
        place(head, lim)
    one_row = replace(lim, tile_rows_max=1)
    with pytest.raises(ConfigurationError, match=r"dense tile 'W'.*no room for a node besides the bias"):
        place(Topology.dense({"a": 12}), one_row)
    with pytest.raises(LimitViolation, match=r"physical tiles of the split network.*limit 16"):
        place(Topology.layered([60, 40]), lim)  # 7 x 5 = 35 tiles
    clash = Topology({"a": 20, "a#0": 3}, (Coupling("W", ("a",), ("a#0",)),))
    with pytest.raises(ConfigurationError, match=r"clash.*rename the groups"):
        place(clash, lim)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    sizes=st.lists(st.integers(1, 40), min_size=2, max_size=4),
    bias=st.booleans(),
    rmax=st.integers(2, 17),
    cmax=st.integers(1, 17),
)
def test_placement_covers_every_cell_once(sizes: list[int], bias: bool, rmax: int, cmax: int) -> None:
    """Every logical cell of every tile lies in exactly one physical block, each block's shape
    is its physical tile's and within the limits, and the sub-groups tile each group on the
    same node channels (so a calibration record's per-channel converter corrections apply to
    the split network as to the logical one)."""
    topo = Topology.layered(sizes, bias=bias)
    lim = replace(open_device(IDEAL).info.limits, tile_rows_max=rmax, tile_cols_max=cmax, max_tiles=10_000)
    p = place(topo, lim)
    phys = p.physical
    channels_l, channels_p = channel_offsets(topo), channel_offsets(phys)
    for g, parts in p.parts.items():
        assert parts[0].start == 0 and parts[-1].stop == topo.groups[g]
        assert all(a.stop == b.start for a, b in itertools.pairwise(parts))
        assert all(phys.groups[q.name] == q.size for q in parts)
        assert all(channels_p[q.name] == channels_l[g] + q.start for q in parts)
    assert sum(phys.groups.values()) == sum(topo.groups.values())
    for c in topo.couplings:
        rows, cols = topo.tile_shape(c.tile)
        seen = np.zeros((rows, cols), np.int64)
        for b in p.blocks[c.tile]:
            seen[b.r0 : b.r1, b.c0 : b.c1] += 1
            r, k = phys.tile_shape(b.tile)
            assert (r, k) == (b.r1 - b.r0, b.c1 - b.c0)
            assert r <= rmax and k <= cmax
        assert (seen == 1).all()
    assert p.cells == topo.cells() and 0 < p.utilisation <= 1


def test_classifier_trains_on_small_tiles_and_logs_the_placement(tmp_path) -> None:
    """A 64-24-10 classifier on 16 x 16 tiles (W0 65 x 24 on 5 x 2 tiles, W1 25 x 10 on 2 x 1):
    the run trains, its program tables name the logical tiles, and the board record carries
    the placement; the same run on a board whose tiles fit gives the same training loss and
    test accuracy."""
    from hil.config import load_config
    from hil.runlog import RunLog, open_run
    from hil.train_classifier import train_classifier

    torch.set_num_threads(1)
    base = ["train.epochs=1", "model.sizes=[64,24,10]", "data.limit_train=64", "data.limit_test=64"]
    small = load_config(None, [*base, f"device={IDEAL}&tile_rows_max=16&tile_cols_max=16"])
    with RunLog.create(tmp_path / "run.zarr", small, kind="train-classifier") as log:
        res = train_classifier(small, progress=False, log=log)
    res.model.close()  # type: ignore[union-attr]
    whole = train_classifier(load_config(None, base), progress=False)
    whole.model.close()  # type: ignore[union-attr]
    run = open_run(tmp_path / "run.zarr")
    placement = run.boards[0]["placement"]
    assert placement["tiles"] == 12 and placement["grid"] == {"W0": [5, 2], "W1": [2, 1]}
    assert placement["cells"] == 65 * 24 + 25 * 10
    assert run.table("program/W0")["step"].tolist() == [1, 2, 3, 4]
    assert res.history[-1].test_acc == pytest.approx(whole.history[-1].test_acc, abs=1e-9)
    assert res.history[-1].train_loss == pytest.approx(whole.history[-1].train_loss, rel=1e-4)


# a dense network of 22 nodes (+ bias) on 10 x 8 tiles: parts of at most min(10 - 1, 8) = 8 nodes
DENSE = {"a": 12, "b": 4, "c": 6}


def test_placement_of_a_dense_network() -> None:
    """a (12) in parts of 8 and 4; the parts [a#0], [a#1, b], [c]: three diagonal dense tiles
    (each with the bias row) and one bipartite tile per pair, the upper triangle of a 3 x 3 grid."""
    lim = open_device(SMALL).info.limits
    p = place(Topology.dense(DENSE), lim)
    assert p.split and p.grid("W") == (3, 3) and p.tiles == 6
    kinds = {c.tile: (c.kind, c.rows, c.cols) for c in p.physical.couplings}
    assert kinds["W#1_1"] == ("dense", ("a#1", "b", BIAS), ("a#1", "b"))
    assert kinds["W#0_2"] == ("bipartite", ("a#0",), ("c",))
    assert set(kinds) == {"W#0_0", "W#0_1", "W#0_2", "W#1_1", "W#1_2", "W#2_2"}
    # half the cells across parts: 8x8 + 8x8 + 8x6 + 8x6 off the diagonal, against 2 * that unsplit
    assert p.cells == 9 * 8 + 9 * 8 + 7 * 6 + 8 * 8 + 8 * 6 + 8 * 6
    assert "W dense 23x22 in 3 parts on 6 tiles" in p.describe()
    assert p.as_dict()["kinds"] == {"W": "dense"} and p.as_dict()["physical_tiles"] == {"W": 6}


def _dense_blocks(settle: str) -> tuple[EBBlock, EBBlock]:
    small, big = _pair()
    topo = Topology.dense(DENSE, budget=BUDGET)
    kw = {"seed": 3, "settle": settle}
    return EBBlock(small, topo, **kw), EBBlock(big, topo, **kw)  # type: ignore[arg-type]


def test_dense_tile_operations_through_the_split_equal_the_unsplit() -> None:
    """On a symmetric W: program read-backs, read_conductance and mvm (both directions) equal
    the unsplit tile's; an asymmetric target is programmed as its symmetric part; pulses of a
    symmetric count table move the pair as the unsplit tile moves both devices."""
    small, big = _pair()
    topo = Topology.dense(DENSE)
    small.configure(topo)
    big.configure(topo)
    lim = small.info.limits
    rng = np.random.default_rng(0)
    shape = topo.tile_shape("W")
    n = shape[1]

    def sym(a: np.ndarray) -> np.ndarray:
        a[:n] = 0.5 * (a[:n] + a[:n].T)
        return a

    gp = sym(rng.uniform(lim.g_min, lim.g_max, shape).astype(np.float32))
    gm = sym(rng.uniform(lim.g_min, lim.g_max, shape).astype(np.float32))
    rs, rb = small.program("W", gp, gm), big.program("W", gp, gm)
    np.testing.assert_allclose(rs.g_plus, rb.g_plus, rtol=1e-6)
    np.testing.assert_allclose(rs.g_minus, rb.g_minus, rtol=1e-6)
    for a, b in zip(small.read_conductance("W"), big.read_conductance("W"), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    x = rng.uniform(0, 1, (5, shape[0])).astype(np.float32)
    np.testing.assert_allclose(small.mvm("W", x), big.mvm("W", x), rtol=1e-5, atol=1e-5)
    xt = rng.uniform(0, 1, (5, shape[1])).astype(np.float32)
    xt_s, xt_b = small.mvm("W", xt, transpose=True), big.mvm("W", xt, transpose=True)
    np.testing.assert_allclose(xt_s, xt_b, rtol=1e-5, atol=1e-5)
    counts = rng.integers(0, 3, shape).astype(np.int32)
    counts[:n] = np.triu(counts[:n]) + np.triu(counts[:n], 1).T
    small.pulse("W", counts, 0 * counts)
    big.pulse("W", counts, 0 * counts)
    np.testing.assert_allclose(small.read_conductance("W")[0], big.read_conductance("W")[0], rtol=1e-6)
    # the off-diagonal pair (a#0, c) is one device per pair: an asymmetric target gives its mean
    asym = rng.uniform(lim.g_min, lim.g_max, shape).astype(np.float32)
    got = small.program("W", asym, gm).g_plus
    mean = 0.5 * (asym[0:8, 16:22] + asym[16:22, 0:8].T)
    np.testing.assert_allclose(got[0:8, 16:22], mean, rtol=1e-6)
    np.testing.assert_array_equal(got[16:22, 0:8], got[0:8, 16:22].T)
    np.testing.assert_allclose(small.inner.read_conductance("W#0_2")[0], mean, rtol=1e-6)


@pytest.mark.parametrize("settle", ["board", "host"])
def test_dense_ep_through_the_split_equals_the_unsplit(settle: str) -> None:
    """The same free and nudged fixed points (1e-5) and EP gradients (relative error below
    1e-4, input gradients too) as the dense network on one tile."""
    a, b = _dense_blocks(settle)
    assert a.device.placement.tiles == 6 and not b.device.placement.split
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, (6, DENSE["a"])).astype(np.float32)
    y = np.eye(DENSE["c"], dtype=np.float32)[rng.integers(0, DENSE["c"], 6)]
    fa, fb = a.free(x), b.free(x)
    assert fa.converged and fb.converged
    for g in fb.states:
        assert float(np.abs(fb.states[g]).max()) > 1e-2 or g == "a"  # states worth comparing
        np.testing.assert_allclose(fa.states[g], fb.states[g], rtol=0, atol=1e-5, err_msg=g)
    nudge = {"c": Nudge(0.3, target=y, grad=y - 0.5)}
    na, nb = a.settle(x, nudge=nudge), b.settle(x, nudge=nudge)
    for g in nb.states:
        np.testing.assert_allclose(na.states[g], nb.states[g], rtol=0, atol=1e-5, err_msg=g)
    ra, rb = a.ep(x, target={"c": y}, beta=0.2), b.ep(x, target={"c": y}, beta=0.2)
    for t in rb.grads:
        ga, gb = ra.grads[t], rb.grads[t]
        assert float(gb.abs().max()) > 1e-3
        rel = float((ga - gb).norm() / gb.norm())
        assert rel < 1e-4, (t, rel)
    gi_a, gi_b = ra.input_grads["a"], rb.input_grads["a"]
    assert float(gi_b.abs().max()) > 1e-4
    assert float((gi_a - gi_b).norm() / gi_b.norm()) < 1e-4


# ---- a split tile is checked whole before its first block is written (safety audit) -------


def _split_w0() -> tuple[TiledDevice, np.ndarray]:
    """W0 (7 rows + bias = 8 rows, 3 columns) on tiles of 4 rows: blocks rows 0..3 and 4..7,
    programmed to g_min."""
    dev = TiledDevice(open_device(IDEAL + "&tile_rows_max=4"))
    dev.configure(Topology({"s0": 7, "s1": 3}, (Coupling("W0", ("s0", BIAS), ("s1",)),)))
    lo = np.full((8, 3), dev.info.limits.g_min, np.float32)
    dev.program("W0", lo, lo)
    return dev, lo


def test_a_bad_target_in_a_later_block_is_refused_before_any_block_is_written() -> None:
    """The audit: a target above g_max in the second block was refused after the first block
    had been written (the tile left half-programmed), by an error naming only the physical
    tile. Every block is checked first; the error names the logical tile and the block."""
    dev, lo = _split_w0()
    lim = dev.info.limits
    before = dev.read_conductance("W0")[0].copy()
    new = np.full((8, 3), 0.5 * (lim.g_min + lim.g_max), np.float32)
    new[6, 0] = 2 * lim.g_max
    with pytest.raises(
        LimitViolation, match=r"logical tile 'W0', rows 4\.\.7 x cols 0\.\.2 .*nothing of 'W0'"
    ):
        dev.program("W0", new, lo)
    assert np.array_equal(dev.read_conductance("W0")[0], before)
    counts = np.zeros((8, 3), np.int32)
    counts[1, 1], counts[5, 2] = 3, lim.max_pulses + 1
    with pytest.raises(
        LimitViolation, match=r"logical tile 'W0', rows 4\.\.7 x cols 0\.\.2 .*pulses per device"
    ):
        dev.pulse("W0", counts, np.zeros_like(counts))
    assert np.array_equal(dev.read_conductance("W0")[0], before)


class _LinkLostOnSecondWrite(DeviceWrapper):
    """A board whose link goes down after the first block's write (the error a RemoteDevice
    raises when its retries are spent): the stand-in for pulling a cable mid-program."""

    def __init__(self, inner: Device) -> None:
        super().__init__(inner)
        self.writes = 0

    def _write(self) -> None:
        self.writes += 1
        if self.writes == 2:
            raise DeviceError("link lost")

    def program(self, tile, g_plus, g_minus, **kw):  # type: ignore[override]
        self._write()
        return self.inner.program(tile, g_plus, g_minus, **kw)

    def pulse(self, tile, counts_plus, counts_minus):  # type: ignore[override]
        self._write()
        return self.inner.pulse(tile, counts_plus, counts_minus)


@pytest.mark.parametrize("op", ["program", "pulse"])
def test_a_write_stopped_between_blocks_says_which_blocks_were_written(op: str) -> None:
    dev, lo = _split_w0()
    dev = TiledDevice(_LinkLostOnSecondWrite(dev.inner))
    dev.configure(Topology({"s0": 7, "s1": 3}, (Coupling("W0", ("s0", BIAS), ("s1",)),)))
    with pytest.raises(DeviceError, match="link lost") as info:
        if op == "program":
            dev.program("W0", lo, lo)
        else:
            dev.pulse("W0", np.ones((8, 3), np.int32), np.zeros((8, 3), np.int32))
    note = " ".join(getattr(info.value, "__notes__", []))
    assert f"{op} of 'W0' stopped after 1 of its 2 blocks: logical tile 'W0', rows 0..3 x cols 0..2" in note
    assert ("program 'W0' again" if op == "program" else "read 'W0' back") in note
