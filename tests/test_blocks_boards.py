"""Issue 22 part 2: the EB blocks of one ff-EBM on different boards, and several on one board
(`RunConfig.devices`, `drivers.shared.SharedBoard`), with the run log saying which board held
which block."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from drivers import (
    ConfigurationError,
    Device,
    LimitViolation,
    ProgramReport,
    SettleBudget,
    Topology,
    open_device,
)
from drivers.shared import SharedBoard
from drivers.wrapper import DeviceWrapper
from hil.classifier import Classifier
from hil.config import ConfigError, RunConfig, eb_blocks, load_config
from hil.ffebm import split_conv, split_layered
from hil.runlog import RunLog, open_run
from hil.train_classifier import TrainResult, train_classifier

U0 = "emulator://?preset=ideal&seed=0"
U1 = "emulator://?preset=ideal&seed=1"
# two EB blocks ([64, 24, 16] and [16, 10]) with a digital Linear + Clamp01 between them
MODEL = ["model.kind=ffebm", "model.sizes=[64,24,16,10]", "model.block_layers=2", "model.between=linear"]
SHORT = ["train.epochs=1", "train.batch_size=16", "data.limit_train=48", "data.limit_test=32",
         "ep.free_steps=40", "ep.nudge_steps=30"]  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _devices(*uris: str) -> str:
    return "devices=[" + ", ".join(f'"{u}"' for u in uris) + "]"


def _train(*overrides: str, log: RunLog | None = None) -> TrainResult:
    cfg = load_config(None, [*MODEL, *SHORT, *overrides])
    return train_classifier(cfg, log=log)


def _params(res: TrainResult) -> list[torch.Tensor]:
    model = res.model
    assert isinstance(model, Classifier) and model.ffebm is not None
    return [p.detach().clone() for p in model.ffebm.block_parameters() + model.ffebm.digital_parameters()]


class CountingCloses(DeviceWrapper):
    """A real board that counts its `close` calls and records the tiles it is asked to program."""

    def __init__(self, inner: Device) -> None:
        super().__init__(inner)
        self.closes = 0
        self.programmed: list[tuple[str, np.ndarray]] = []

    def program(self, tile: str, g_plus: np.ndarray, g_minus: np.ndarray, **kw: Any) -> ProgramReport:
        self.programmed.append((tile, np.array(g_plus, copy=True)))
        return super().program(tile, g_plus, g_minus, **kw)

    def close(self) -> None:
        self.closes += 1
        super().close()


# ---------------------------------------------------------------------------------- training
def test_blocks_on_two_boards_train_like_blocks_sharing_one_board() -> None:
    """Ideal preset, same seed: three batches of BP-EP chaining end at the same weights whether
    the two blocks live on two boards, on one shared board, or on today's default boards."""
    two = _train(_devices(U0, U1))
    one = _train(_devices(U0, U0))
    default = _train()
    m2, m1 = two.model, one.model
    assert isinstance(m2, Classifier) and isinstance(m1, Classifier)
    assert len(m2.devices) == 2 and m2.block_boards == [0, 1]
    assert len(m1.devices) == 1 and m1.block_boards == [0, 0]
    p2, p1, p0 = _params(two), _params(one), _params(default)
    assert len(p2) == len(p1) == len(p0) >= 5  # two blocks' tiles (3) + Linear weight and bias
    init = Classifier(load_config(None, [*MODEL, *SHORT]), 64, 10, open_device)
    try:
        moved = [p.detach() for p in init.ffebm.block_parameters() + init.ffebm.digital_parameters()]  # type: ignore[union-attr]
    finally:
        init.close()
    assert any(not torch.allclose(a, b) for a, b in zip(p2, moved, strict=True))  # training moved them
    for a, b, c in zip(p2, p1, p0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
    assert two.test_acc == one.test_acc == default.test_acc
    # the conductances on the shared board are the ones of the separate boards, tile by tile
    for k, blk2 in enumerate(m2.blocks()):
        blk1 = m1.blocks()[k]
        for tile in blk2.weights:
            g2, g1 = blk2.device.read_conductance(tile), blk1.device.read_conductance(tile)
            np.testing.assert_allclose(g2[0], g1[0], rtol=1e-5, atol=1e-12)
            np.testing.assert_allclose(g2[1], g1[1], rtol=1e-5, atol=1e-12)
    for r in (two, one, default):
        assert isinstance(r.model, Classifier)
        r.model.close()


def test_run_log_records_which_board_held_which_block(tmp_path) -> None:
    cfg = load_config(None, [*MODEL, *SHORT, _devices(U1, U1)])
    path = tmp_path / "run.zarr"
    with RunLog.create(path, cfg) as log:
        res = train_classifier(cfg, log=log)
    assert isinstance(res.model, Classifier)
    res.model.close()
    boards = open_run(path).boards
    idn = res.devices[0]
    assert len(res.devices) == 1
    assert [(b["block"], b["board"], b["uri"], b["idn"]) for b in boards] == [
        (0, 0, U1, idn),
        (1, 0, U1, idn),
    ]
    assert boards[0]["tiles"] == ["b0.W0", "b0.W1"] and boards[1]["tiles"] == ["b1.W0"]

    path2 = tmp_path / "two.zarr"
    cfg2 = load_config(None, [*MODEL, *SHORT, _devices(U0, U1)])
    with RunLog.create(path2, cfg2) as log:
        res2 = train_classifier(cfg2, log=log)
    assert isinstance(res2.model, Classifier)
    res2.model.close()
    boards2 = open_run(path2).boards
    assert [(b["board"], b["uri"], b["idn"]) for b in boards2] == [
        (0, U0, res2.devices[0]),
        (1, U1, res2.devices[1]),
    ]
    assert res2.devices[0] != res2.devices[1]  # the *IDN serials tell the two boards apart

    from hil.runlog.summary import summary

    text = summary(open_run(path2))
    assert f"block 1      board 1: {res2.devices[1]}  uri {U1}" in text


# ---------------------------------------------------------------------------------- config errors
@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ([*MODEL, _devices(U0)], r"devices: 1 board URI\(s\) for the 2 EB block\(s\)"),
        ([*MODEL, _devices(U0, U1, U0)], r"devices: 3 board URI\(s\) for the 2 EB block\(s\)"),
        (
            [_devices(U0, U1)],
            r"devices: 2 board URI\(s\) for the 1 EB block\(s\) of this model \(model.kind = 'dhn'",
        ),
        ([*MODEL, _devices(U0, " ")], r"devices\[1\]: an empty URI"),
        ([*MODEL, "devices=emulator"], r"devices: expected a list of str"),
    ],
)
def test_config_errors_name_devices(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_classifier_checks_devices_without_load_config() -> None:
    cfg = load_config(None, MODEL)
    cfg.devices = [U0, U1, U1]  # set after validation
    with pytest.raises(ConfigError, match=r"devices: 3 board URI\(s\) for the 2 EB block\(s\)"):
        Classifier(cfg, 64, 10, open_device)
    lab = RunConfig(device="visa://TCPIP0::192.0.2.1::5025::SOCKET")
    lab.model.kind, lab.model.sizes = "ffebm", [64, 24, 16, 10]
    with pytest.raises(ConfigError, match=r"List one URI per block in `devices`"):
        Classifier(lab, 64, 10, open_device)


def test_shared_board_without_enough_tiles_is_refused() -> None:
    small = "emulator://?preset=ideal&seed=0&max_tiles=2"  # block 0 needs 2 tiles, block 1 one more
    cfg = load_config(None, [*MODEL, _devices(small, small)])
    opened: list[CountingCloses] = []

    def opener(uri: str) -> Device:
        opened.append(CountingCloses(open_device(uri)))
        return opened[-1]

    with pytest.raises(
        LimitViolation, match=r"tile count of the blocks sharing this board exceeded: requested 3"
    ):
        Classifier(cfg, 64, 10, opener)
    assert [d.closes for d in opened] == [1]  # the board opened before the refusal is closed
    # on two such boards the blocks fit
    ok = load_config(None, [*MODEL, _devices(small, small.replace("seed=0", "seed=1"))])
    model = Classifier(ok, 64, 10, open_device)
    assert [d.info.limits.max_tiles for d in model.devices] == [2, 2]
    model.close()


# ---------------------------------------------------------------------------------- SharedBoard
def _topo(sizes: list[int], budget: SettleBudget | None = None) -> Topology:
    return Topology.layered(sizes, budget=budget or SettleBudget(max_steps=60, tol=1e-4))


def _program(dev, topo: Topology, gen: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    lim = dev.info.limits
    out = {}
    for c in topo.couplings:
        shape = topo.tile_shape(c.tile)
        gp = gen.uniform(lim.g_min, lim.g_max, shape).astype(np.float32)
        gm = gen.uniform(lim.g_min, lim.g_max, shape).astype(np.float32)
        dev.program(c.tile, gp, gm)
        out[c.tile] = (gp, gm)
    return out


def test_views_keep_programmed_tiles_and_settle_like_a_board_of_their_own() -> None:
    a, b = _topo([6, 5, 4]), _topo([4, 3])
    gen = np.random.default_rng(0)
    shared = SharedBoard(open_device(U0))
    va, vb = shared.view("b0"), shared.view("b1")
    va.configure(a)
    ga = _program(va, a, gen)
    vb.configure(b)  # re-configures the merged topology: block 0's tiles must keep their targets
    gb = _program(vb, b, gen)
    assert shared.merged is not None and set(shared.merged.groups) == {
        "b0.s0",
        "b0.s1",
        "b0.s2",
        "b1.s0",
        "b1.s1",
    }
    for tile, (gp, gm) in ga.items():
        rp, rm = va.read_conductance(tile)
        np.testing.assert_allclose(rp, gp, rtol=1e-6)
        np.testing.assert_allclose(rm, gm, rtol=1e-6)
    alone_a, alone_b = open_device(U1), open_device(U1.replace("seed=1", "seed=2"))
    alone_a.configure(a)
    alone_b.configure(b)
    for dev, g in ((alone_a, ga), (alone_b, gb)):
        for tile, (gp, gm) in g.items():
            dev.program(tile, gp, gm)
    x = gen.uniform(0, 1, (5, 6)).astype(np.float32)
    x2 = gen.uniform(0, 1, (5, 4)).astype(np.float32)
    for view, alone, clamp in ((va, alone_a, {"s0": x}), (vb, alone_b, {"s0": x2})):
        got, want = view.settle(clamp), alone.settle(clamp)
        assert set(got.states) == set(want.states)
        assert got.steps == want.steps and got.converged == want.converged
        for g in want.states:
            np.testing.assert_allclose(got.states[g], want.states[g], rtol=1e-5, atol=1e-6)
        # hard sigmoid: the other blocks, clamped at 0, add nothing to the energy
        assert got.energy is not None and want.energy is not None
        np.testing.assert_allclose(got.energy, want.energy, rtol=1e-5, atol=1e-7)
        assert view.topology is not None
        ones = np.ones((2, view.topology.tile_shape("W0")[0]), np.float32)
        np.testing.assert_allclose(view.mvm("W0", ones), alone.mvm("W0", ones), rtol=1e-5, atol=1e-6)
    # a budget change of one block (free -> nudge) keeps the other block's budget for its settles
    va.configure(_topo([6, 5, 4], SettleBudget(max_steps=3, tol=0.0)))
    assert va.topology is not None and va.topology.couplings is not a.couplings
    assert va.settle({"s0": x}).steps == 3
    assert vb.settle({"s0": x2}).steps == alone_b.settle({"s0": x2}).steps
    for d in (alone_a, alone_b):
        d.close()
    shared.close()


def test_view_errors_and_closing() -> None:
    board = CountingCloses(open_device(U0))
    shared = SharedBoard(board)
    va, vb = shared.view("b0"), shared.view("b1")
    with pytest.raises(ConfigurationError, match=r"block 'b0' already has a view"):
        shared.view("b0")
    with pytest.raises(ConfigurationError, match=r"without '\.'"):
        shared.view("a.b")
    with pytest.raises(ConfigurationError, match=r"block 'b0' has no topology yet"):
        va.read_conductance("W0")
    va.configure(_topo([4, 3]))
    with pytest.raises(ConfigurationError, match=r"unknown tile 'W1'"):
        va.mvm("W1", np.ones((1, 5), np.float32))
    with pytest.raises(ConfigurationError, match=r"clamp names unknown group 's9' of block 'b0'"):
        va.settle({"s9": np.ones((1, 4), np.float32)})
    other_gain = Topology.layered([4, 3], gain=2.0)
    with pytest.raises(ConfigurationError, match=r"share gain: block 'b1' has 2.0, block 'b0' 1.0"):
        vb.configure(other_gain)
    va.close()
    assert board.closes == 0  # b1 is still open: the board stays open
    vb.close()
    assert board.closes == 1
    shared.close()
    assert board.closes == 1  # closed once


def test_a_pulsed_tile_is_rewritten_as_it_reads_when_another_block_configures() -> None:
    board = CountingCloses(open_device(U0))
    shared = SharedBoard(board)
    va, vb = shared.view("b0"), shared.view("b1")
    a = _topo([5, 4])
    va.configure(a)
    target = _program(va, a, np.random.default_rng(1))["W0"][0]
    counts = np.zeros(a.tile_shape("W0"), np.int32)
    counts[0, :] = 3
    va.pulse("W0", counts, np.zeros_like(counts))
    after_pulse = va.read_conductance("W0")[0]
    assert not np.allclose(after_pulse[0], target[0], rtol=1e-5, atol=0)  # the pulses moved row 0
    board.programmed.clear()
    vb.configure(_topo([3, 2]))
    assert [t for t, _ in board.programmed] == ["b0.W0"]  # block 0's tile, written again
    np.testing.assert_allclose(board.programmed[0][1], after_pulse, rtol=1e-6)
    np.testing.assert_allclose(va.read_conductance("W0")[0], after_pulse, rtol=1e-6)
    board.programmed.clear()
    va.configure(dataclasses.replace(a, budget=SettleBudget(max_steps=5)))  # budget only
    assert board.programmed == []  # the same networks: nothing written
    shared.close()


@pytest.mark.parametrize(
    ("model", "want"),
    [
        (["model.sizes=[64,24,16,10]", "model.block_layers=1"], None),
        (["model.sizes=[64,24,16,10]", "model.block_layers=2"], None),
        (["model.sizes=[64,24,16,10]", "model.block_layers=3"], None),
        (["model.sizes=[64,24,16,10]", "model.block_layers=5"], None),
        (["model.channels=[4,4,8]", "model.block_layers=2"], "conv"),
        (["model.channels=[4,4,8,8]", "model.block_layers=1", "model.pools=[1,2,1,2]"], "conv"),
    ],
)
def test_eb_blocks_counts_the_blocks_the_model_builds(model: list[str], want: str | None) -> None:
    cfg = load_config(None, ["model.kind=ffebm", *model])
    m = cfg.model
    if want == "conv":
        n = len(split_conv((1, 8, 8), m.channels, m.pools or [2] * len(m.channels), m.block_layers))
    else:
        n = len(split_layered(m.sizes, m.block_layers))
    assert eb_blocks(cfg) == n
    assert eb_blocks(load_config(None, [])) == 1  # a DHN


def test_resume_may_move_the_blocks_boards_but_not_the_blocks() -> None:
    """A resumed run may find its boards at new addresses (`devices`), never with other blocks."""
    from hil.cli.common import resumed_config

    uris = ["emulator://?preset=ideal&seed=0", "emulator://?preset=ideal&seed=1"]
    stored = load_config(None, [*MODEL, _devices(*uris)])
    moved = dataclasses.replace(stored, devices=[uris[1], uris[0]])
    assert resumed_config(stored, moved).devices == [uris[1], uris[0]]
    other = dataclasses.replace(stored, model=dataclasses.replace(stored.model, block_layers=1))
    with pytest.raises(ConfigError, match=r"model\.block_layers"):
        resumed_config(stored, other)


def test_the_command_names_the_boards_it_used(tmp_path: Path) -> None:
    """The sweep audit: with `devices` set, the last line named the unused `device` URI."""
    from typer.testing import CliRunner

    from hil.cli import app

    args = [a for s in [*MODEL, *SHORT, _devices(U0, U1)] for a in ("--set", s)]
    res = CliRunner().invoke(
        app, ["train", "classifier", *args, "--out", str(tmp_path / "r"), "--no-progress"]
    )
    assert res.exit_code == 0, res.output
    last = res.stdout.strip().splitlines()[-1]
    assert f"({U0} ; {U1})" in last, last


def test_blocks_on_a_shared_board_chunk_their_settles_by_the_merged_network(monkeypatch) -> None:
    """A block on a shared board settles the merged network (every block's groups in the clamps
    and the reply), so its chunks must fit the bound on one settle's values counted over the
    merged nodes: with the bound lowered to 1300 values, block 0 (104 nodes of its own, 130
    merged) chunked a batch of 16 by its own count (12) and the board refused 12 x 130. Ideal
    preset and fixed step counts (a noise-free batch stops as one at tol, so with tol > 0 its
    chunks would stop elsewhere): the chunked run ends at the unchunked run's weights."""
    import drivers.checks

    whole = _train(_devices(U0, U0), "ep.tol=0")
    monkeypatch.setattr(drivers.checks, "MAX_SETTLE_VALUES", 1300)
    chunked = _train(_devices(U0, U0), "ep.tol=0")
    m = chunked.model
    assert isinstance(m, Classifier) and m.block_boards == [0, 0]
    assert [blk.settle_batch_most() for blk in m.blocks()] == [10, 10]  # 1300 // 130
    for a, b in zip(_params(chunked), _params(whole), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert chunked.test_acc == whole.test_acc
    for r in (whole, chunked):
        assert isinstance(r.model, Classifier)
        r.model.close()


def test_a_pulsed_tile_that_reads_past_the_window_is_rewritten_within_it() -> None:
    """A noisy board's read of a device at g_max (or g_min) lies past it by the read noise; the
    re-write after another block's configure took those reads as program targets, the host
    refused them (LimitViolation, g_plus of b0.W0 past g_max) and the other block's configure
    failed, block 0's tile left unwritten. The targets are the reads within [g_min, g_max]."""
    board = open_device("emulator://?preset=rram&seed=0")
    lim = board.info.limits
    shared = SharedBoard(board)
    va, vb = shared.view("b0"), shared.view("b1")
    a = Topology.layered([6, 5, 3])
    va.configure(a)
    shape = a.tile_shape("W0")
    va.program("W0", np.full(shape, lim.g_max, np.float32), np.full(shape, lim.g_min, np.float32))
    ones = np.ones(shape, np.int32)
    va.pulse("W0", ones, ones)
    gp = va.read_conductance("W0")[0]
    assert gp.max() > lim.g_max  # read noise: past the window (so would the target be)
    refused = board.safety().refused
    vb.configure(Topology.layered([4, 3]))  # re-configures the merged network, then re-writes b0.W0
    assert board.safety().refused == refused and board.safety().violations == 0
    after = va.read_conductance("W0")[0]
    # written again near what it read (rram: write and read noise of a few % of g_max)
    assert np.abs(after - np.clip(gp, lim.g_min, lim.g_max)).max() < 0.1 * lim.g_max
    shared.close()
