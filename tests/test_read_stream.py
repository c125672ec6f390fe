"""A host's reads draw their noise from their own stream (`board.read`): reading a tile (a run
log's tile snapshots, a calibration) leaves the noise of the board's later writes, MVMs and
settles as it was, so a noisy run trains to the same numbers with a run log as without."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from drivers import Topology, open_device
from drivers.base import Device
from tests.test_emulator import program_weights

RRAM = "emulator://?preset=rram&seed=3"


def _program(dev: Device, topology: Topology, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for c in topology.couplings:
        rows, cols = topology.tile_shape(c.tile)
        program_weights(dev, c.tile, rng.normal(0, 1 / np.sqrt(rows), (rows, cols)).astype(np.float32))


def _session(dev: Device, sizes: list[int], read: bool) -> list[np.ndarray]:
    """Program, settle, MVM, program again and settle, with a read of every tile after each
    programming when `read`; what the board gave back, reads left out."""
    topology = Topology.layered(sizes)
    dev.configure(topology)
    x = np.random.default_rng(1).uniform(0, 1, (8, sizes[0])).astype(np.float32)
    out: list[np.ndarray] = []
    for seed in (0, 1):
        _program(dev, topology, seed)
        if read:
            for c in topology.couplings:
                gp, gm = dev.read_conductance(c.tile)
                assert np.isfinite(gp).all() and np.isfinite(gm).all()
        out += list(dev.settle({"s0": x}).states.values())
        out.append(dev.mvm("W0", np.hstack([x, np.ones((8, 1), np.float32)])))  # the bias row's input
    out += [np.asarray(g) for c in topology.couplings for g in dev.board.tile(c.tile).state(dev.board.clock)]
    return out


# [256, 256]: a 257 x 256 tile, large enough that its writes draw from its noise table
@pytest.mark.parametrize("sizes", [[12, 8, 4], [256, 256]])
def test_reads_leave_the_boards_later_noise_as_it_was(sizes: list[int]) -> None:
    with open_device(RRAM) as quiet, open_device(RRAM) as reading:
        assert quiet.board.preset.device.read_noise > 0 and quiet.board.preset.device.write_noise > 0
        for a, b in zip(_session(quiet, sizes, False), _session(reading, sizes, True), strict=True):
            np.testing.assert_array_equal(a, b)


def test_reads_are_noisy_and_a_seed_reproduces_them() -> None:
    reads = []
    for _ in range(2):
        with open_device(RRAM) as dev:
            topology = Topology.layered([12, 8])
            dev.configure(topology)
            _program(dev, topology, 0)
            true = dev.board.tile("W0").state(dev.board.clock)[0].clone()
            reads.append([dev.read_conductance("W0")[0] for _ in range(2)])
            sigma = dev.board.preset.device.read_noise
            err = reads[-1][0] - true.numpy()
            assert 0.5 * sigma < float(err.std()) < 1.5 * sigma  # 104 devices: the read's own noise
    assert not np.array_equal(reads[0][0], reads[0][1])  # two reads, two draws
    for a, b in zip(reads[0], reads[1], strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_noisy_run_trains_to_the_same_weights_with_a_run_log(tmp_path) -> None:
    """The run log reads every tile at each epoch's end; on `rram` that used to draw from the
    noise of the board's writes and settles, and the logged run trained to other weights."""
    from hil.config import load_config
    from hil.runlog import RunLog
    from hil.train_classifier import train_classifier

    cfg = load_config(
        None,
        ["train.epochs=2", "data.limit_train=160", "data.limit_test=60", "model.sizes=[64,32,10]",
         "device=emulator://?preset=rram&seed=0"],
    )  # fmt: skip
    with RunLog.create(tmp_path / "run.zarr", cfg) as log:
        logged = train_classifier(cfg, log=log)
    plain = train_classifier(cfg)
    assert logged.test_acc == plain.test_acc
    for tile, w in logged.model.block.weights.items():
        torch.testing.assert_close(w, plain.model.block.weights[tile], atol=0, rtol=0)
