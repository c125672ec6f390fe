"""Wear of a network placed on physical tiles (`TiledDevice.wear`), and of one block of several
sharing a board (`BlockView.wear`): reported under the tile names the user configured, each
with the board that holds it and the physical tiles it lies on. The board itself only knows
its physical tiles (``W0#1_0``, ``b1.W0``), which a user never named."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from drivers import TileWear, Topology, open_device
from drivers.shared import SharedBoard
from drivers.tiled import TiledDevice
from hil.testing import BoardServers

ENDURANCE = 1000
# 10 x 8 tiles: a 20-12-8 network's W0 (21 x 12) lies on a 3 x 2 grid, W1 (13 x 8) on 2 x 1
WORN_SMALL = f"emulator://?preset=ideal&seed=0&tile_rows_max=10&tile_cols_max=8&max_tiles=16&pulse_endurance={ENDURANCE}"
SIZES = [20, 12, 8]


def _program_all(dev: TiledDevice | object, topo: Topology) -> None:
    for c in topo.couplings:
        shape = topo.tile_shape(c.tile)
        dev.program(c.tile, np.full(shape, 5e-6, np.float32), np.full(shape, 5e-6, np.float32))  # type: ignore[attr-defined]


@pytest.mark.parametrize("transport", ["visa-tcp", "serial-socket"])
def test_a_split_network_reports_wear_under_its_logical_tiles(
    emulated_board: Callable[..., BoardServers], transport: str
) -> None:
    served = emulated_board(WORN_SMALL)
    topo = Topology.layered(SIZES)
    with TiledDevice(open_device(served.uris[transport])) as dev:
        dev.configure(topo)
        _program_all(dev, topo)  # a write pulses every device once
        counts = np.zeros(topo.tile_shape("W0"), np.int32)
        counts[15, 10] = 7  # one device of W0, in its row block 1, column block 1 (W0#1_1)
        dev.pulse("W0", counts, np.zeros_like(counts))
        raw = dev.inner.wear()
        wear = dev.wear()
        idn = dev.info.identity.idn()
    assert raw is not None and wear is not None
    assert set(raw.tiles) == {"W0#0_0", "W0#0_1", "W0#1_0", "W0#1_1", "W0#2_0", "W0#2_1", "W1#0_0", "W1#1_0"}
    # the user's names, in the topology's order
    assert list(wear.tiles) == ["W0", "W1"]
    assert (wear.endurance, wear.near_from) == (raw.endurance, raw.near_from)
    # the most worn device of the logical tile is the most worn of its blocks; devices are summed
    assert wear.tiles["W0"] == TileWear(max_wear=8, near_end=0, spent=0)
    assert wear.tiles["W0"].max_wear == max(raw.tiles[t].max_wear for t in raw.tiles if t.startswith("W0#"))
    assert wear.tiles["W1"] == TileWear(max_wear=1, near_end=0, spent=0)
    # where each lives: the board, and the physical tiles on it
    assert wear.boards == {"W0": idn, "W1": idn}
    assert wear.physical["W0"] == ("W0#0_0", "W0#0_1", "W0#1_0", "W0#1_1", "W0#2_0", "W0#2_1")
    assert wear.physical["W1"] == ("W1#0_0", "W1#1_0")


def test_near_and_spent_devices_are_summed_over_the_blocks(
    emulated_board: Callable[..., BoardServers],
) -> None:
    served = emulated_board(WORN_SMALL)
    topo = Topology.layered(SIZES)
    with TiledDevice(open_device(served.uris["visa-tcp"])) as dev:
        dev.configure(topo)
        counts = np.zeros(topo.tile_shape("W0"), np.int32)
        counts[0, 0] = counts[15, 10] = 950  # near the end, in two blocks (W0#0_0, W0#1_1)
        dev.pulse("W0", counts, np.zeros_like(counts))
        counts[:] = 0
        counts[0, 0] = counts[20, 11] = 50  # (0, 0) now spent; the bias row's (20, 11) in W0#2_1
        dev.pulse("W0", counts, np.zeros_like(counts))
        wear = dev.wear()
    assert wear is not None
    assert wear.tiles["W0"] == TileWear(max_wear=ENDURANCE, near_end=2, spent=1)


def test_a_fitting_network_names_its_board_too(emulated_board: Callable[..., BoardServers]) -> None:
    served = emulated_board(f"emulator://?preset=ideal&seed=0&pulse_endurance={ENDURANCE}")
    topo = Topology.layered(SIZES)
    with TiledDevice(open_device(served.uris["serial-socket"])) as dev:
        dev.configure(topo)
        _program_all(dev, topo)
        wear, raw, idn = dev.wear(), dev.inner.wear(), dev.info.identity.idn()
    assert wear is not None and raw is not None
    assert wear.tiles == raw.tiles
    assert wear.boards == {"W0": idn, "W1": idn} and wear.physical == {"W0": ("W0",), "W1": ("W1",)}


def test_blocks_sharing_a_board_each_see_their_own_tiles(emulated_board: Callable[..., BoardServers]) -> None:
    """Two blocks on one served board (as `devices = [U, U]` puts them), the second split over
    tiles: each block's view reports its own tiles, by its own names, where the board holds
    ``b0.W0``, ``b1.W0#0_0``, ..."""
    served = emulated_board(WORN_SMALL)
    with TiledDevice(open_device(served.uris["visa-tcp"])) as board:
        shared = SharedBoard(board)
        v0, v1 = shared.view("b0"), shared.view("b1")
        t0, t1 = Topology.layered([6, 4]), Topology.layered([12, 10])
        v0.configure(t0)
        v1.configure(t1)
        _program_all(v0, t0)
        _program_all(v1, t1)
        counts = np.zeros(t1.tile_shape("W0"), np.int32)
        counts[3, 9] = 4
        v1.pulse("W0", counts, np.zeros_like(counts))
        w0, w1, idn = v0.wear(), v1.wear(), board.info.identity.idn()
        raw = board.inner.wear()
    assert raw is not None and w0 is not None and w1 is not None
    assert "b1.W0#0_1" in raw.tiles  # what the board itself calls them
    assert list(w0.tiles) == ["W0"] and list(w1.tiles) == ["W0"]
    assert w0.tiles["W0"] == TileWear(1, 0, 0) and w1.tiles["W0"] == TileWear(5, 0, 0)
    assert w1.boards == {"W0": idn} and w1.physical["W0"] == (
        "b1.W0#0_0",
        "b1.W0#0_1",
        "b1.W0#1_0",
        "b1.W0#1_1",
    )
