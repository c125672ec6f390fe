"""Wear-out (`emulator.wear`, docs/emulator.md "Wear"): a board that declares a pulse endurance
counted each device's pulses and refused past it, but a device near or at its endurance still
behaved as a new one. Now a worn device's window narrows (linearly in log pulses from
``wear_onset`` of the endurance, closed at it) and a spent one is stuck at the bound it failed
at. These tests see it from a host, through the real SCPI server: the window measured by pulse
saturation, the calibration's stuck map, the reads of spent devices and `hil info`'s wear line;
and a board without an endurance is unchanged."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch

from calibration.conductance import find_stuck
from calibration.measure import read_stats
from drivers import ConfigurationError, Device, LimitViolation, Topology, open_device
from drivers.emulated import EmulatedDevice
from emulator.array import TileArray
from emulator.presets import RRAM_DEVICE
from emulator.wear import window_left
from hil.cli.info import wear_lines
from hil.testing import BoardServers

ENDURANCE = 20000
ONSET = 0.05  # the window narrows past 1000 pulses: a measurement of a few hundred leaves it whole
BOARD = (
    f"emulator://?preset=rram&seed=0&pulse_endurance={ENDURANCE}&wear_onset={ONSET}&max_pulses={ENDURANCE}"
)
W0, W1 = (5, 3), (4, 2)  # the tiles of a 4-3-2 layered network (inputs and the bias row)
WORN_PULSES = 10000  # a share 1 - log(10) / log(20) = 0.23 of the window left
SATURATE = 300  # soft bounds at dw_min 0.14 uS on 9 uS: within ~1 % of a bound
READS = 4


def _emulated(dev: Device) -> EmulatedDevice:
    assert isinstance(dev, EmulatedDevice)
    return dev


def _window(dev: Device, tile: str, shape: tuple[int, int], skip: np.ndarray) -> np.ndarray:
    """Each device's window as a host measures it: saturate up, read, saturate down, read
    (devices in `skip`, (2, rows, cols), get no pulses)."""
    n = np.where(skip, 0, SATURATE).astype(np.int32)
    dev.pulse(tile, n[0], n[1])
    top = read_stats(dev, tile, READS).mean
    dev.pulse(tile, -n[0], -n[1])
    bottom = read_stats(dev, tile, READS).mean
    return top - bottom


def test_worn_windows_narrow_and_spent_devices_read_stuck_over_scpi(
    emulated_board: Callable[..., BoardServers],
) -> None:
    served = emulated_board(BOARD)
    board = _emulated(served.device).board
    with open_device(served.uris["visa-tcp"]) as dev:
        dev.configure(Topology.layered([4, 3, 2]))
        window = dev.info.limits.g_max - dev.info.limits.g_min
        # W0: four devices worn to half their life, the others new
        worn = np.zeros((2, *W0), bool)
        worn[0, 0, 0] = worn[0, 0, 1] = worn[1, 0, 2] = worn[1, 1, 0] = True
        n = np.where(worn, WORN_PULSES, 0).astype(np.int32)
        dev.pulse("W0", n[0], n[1])
        measured = _window(dev, "W0", W0, np.zeros_like(worn))
        fresh = float(np.median(measured[~worn]))
        assert fresh > 0.8 * window  # new devices keep their window (600 pulses, before the onset)
        left = float(window_left(torch.tensor(WORN_PULSES), ENDURANCE, ONSET))
        assert 0.2 < left < 0.26
        # the worn devices' windows narrowed to the share the model leaves them (they still move)
        assert np.all(measured[worn] < 0.4 * fresh), measured[worn] / fresh
        assert np.all(measured[worn] > 0.1 * fresh), measured[worn] / fresh
        # the calibration's stuck map sees them: a write at 20 % and one at 80 % of the window
        # land within the narrowed window, too close to tell from a stuck device
        stuck = find_stuck(dev, "W0", W0)
        assert np.all(stuck.stuck[worn])
        assert np.all((stuck.high - stuck.low)[worn] < 0.25 * window)
        new_working = ~worn & ~board.tile("W0").truth()["stuck"].numpy()
        assert not stuck.stuck[new_working].any()

        # W1: the eight devices of its first two rows spent, driven up or down by their last
        # pulses (a checkerboard); the other eight new
        spent = np.zeros((2, *W1), bool)
        spent[:, :2, :] = True
        sign = np.array([[1, -1], [-1, 1]])
        drive = np.zeros((2, *W1), np.int32)
        drive[:, :2, :] = ENDURANCE * sign
        dev.pulse("W1", drive[0], drive[1])
        truth = board.tile("W1").truth()
        assert truth["stuck"].numpy()[spent].all()  # the stuck-fault bookkeeping, reused
        at = truth["stuck_value"].numpy()
        first = read_stats(dev, "W1", READS).mean
        _window(dev, "W1", W1, spent)  # the other devices move up and down around them
        second = read_stats(dev, "W1", READS).mean
        noise = RRAM_DEVICE.read_noise * 6 / math.sqrt(READS)
        assert np.all(np.abs(first - at)[spent] < noise) and np.all(np.abs(second - at)[spent] < noise)
        # each is stuck at a bound of its window, and some at the one its last pulses drove it from
        g_min, g_max = truth["g_min"].numpy(), truth["g_max"].numpy()
        assert np.all(g_min[spent] == g_max[spent])  # the window closed
        middle = 0.5 * (dev.info.limits.g_min + dev.info.limits.g_max)
        against = ((drive > 0) & (at < middle)) | ((drive < 0) & (at > middle))
        assert 0 < int(against[spent].sum()) < 8  # (a new device would sit where it was driven)
        # and no request reaches them any more
        with pytest.raises(LimitViolation, match="pulse endurance"):
            dev.pulse("W1", np.ones(W1, np.int32), np.zeros(W1, np.int32))

        # hil info's wear line counts them, through the same server
        lines = {line.split(":")[0].split()[-1]: line for line in wear_lines(dev)}
        assert lines["W1"].endswith(" 8 spent") and lines["W0"].endswith(" 0 spent"), lines


def test_a_tile_drawn_anew_over_worn_devices_is_as_worn() -> None:
    with open_device(BOARD) as dev:
        board = _emulated(dev).board
        dev.configure(Topology.layered([4, 3, 2]))
        n = np.zeros(W0, np.int32)
        n[0, 0] = ENDURANCE
        dev.pulse("W0", n, np.zeros(W0, np.int32))
        tile = board.tile("W0")
        assert bool(tile.truth()["stuck"][0, 0, 0])
        tile.weights(board.clock)
        epoch = tile.weights_epoch
        dev.configure(Topology.layered([4, 3, 2]))  # the same tiles: worn as they were, caches kept
        assert board.tile("W0") is tile
        tile.weights(board.clock)
        assert tile.weights_epoch == epoch
        dev.configure(Topology.layered([3, 2]))  # W0 becomes 4 x 2: a new draw over the same wear
        assert board.tile("W0") is not tile
        assert bool(board.tile("W0").truth()["stuck"][0, 0, 0])


def test_boards_without_an_endurance_or_below_the_onset_are_unchanged() -> None:
    """No endurance: the model never runs. An endurance no device nears: the same numbers as
    none, draw for draw (declaring one takes no random draw)."""

    def run(uri: str) -> tuple[torch.Tensor, ...]:
        with open_device(uri) as dev:
            board = _emulated(dev).board
            dev.configure(Topology.layered([4, 3]))
            dev.pulse("W0", np.full(W0, 50, np.int32), np.full(W0, -20, np.int32))
            dev.program("W0", np.full(W0, 5e-6, np.float32), np.full(W0, 3e-6, np.float32), verify=True)
            return board.tile("W0").state(board.clock).clone(), board.tile("W0").truth()["g_max"]

    plain = run("emulator://?preset=rram&seed=1")
    rated = run("emulator://?preset=rram&seed=1&pulse_endurance=1000000")
    assert all(torch.equal(a, b) for a, b in zip(plain, rated, strict=True))


def test_wear_parameters_are_checked_and_enter_the_fingerprint_only_with_an_endurance() -> None:
    with pytest.raises(ConfigurationError, match="wear_onset"):
        open_device("emulator://?preset=rram&wear_onset=0")
    with pytest.raises(ConfigurationError, match="wear_stuck_high"):
        open_device("emulator://?preset=rram&wear_stuck_high=1.5")
    with pytest.raises(ConfigurationError, match="wear_onset"):
        window_left(torch.tensor([1]), 10, 1.5)

    def config(uri: str) -> str:
        with open_device(uri) as dev:
            return _emulated(dev).board.configuration

    assert config("emulator://?preset=rram") == config("emulator://?preset=rram&wear_onset=0.5")
    rated = "emulator://?preset=rram&pulse_endurance=1000"
    assert config(rated) != config(rated + "&wear_onset=0.5")


def test_window_left_is_whole_to_the_onset_and_closed_at_the_endurance() -> None:
    wear = torch.tensor([0, 100, 101, 1000, 9999, 10000, 10001])
    left = window_left(wear, 10000, 0.01)
    assert left[:2].tolist() == [1.0, 1.0]
    assert 0.99 < float(left[2]) < 1.0
    assert float(left[3]) == pytest.approx(0.5)  # one decade of two
    assert 0.0 < float(left[4]) < 1e-4
    assert left[5:].tolist() == [0.0, 0.0]
    assert window_left(wear, 10000, 1.0).tolist() == [1.0] * 5 + [0.0, 0.0]


def test_wear_out_refuses_wear_of_another_shape() -> None:
    model = dataclasses.replace(RRAM_DEVICE, pulse_endurance=10)
    tile = TileArray(2, 2, model, torch.Generator().manual_seed(0), torch.device("cpu"))
    with pytest.raises(ConfigurationError, match="device shape"):
        tile.wear_out(torch.zeros((2, 3, 2), dtype=torch.int64))
