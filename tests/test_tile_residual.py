"""Issue 17: `TileArray.deviation` takes ``max |g - target|`` from the min and max of the signed
difference and leaves it in the tile's scratch buffer, which `within` turns into ``|g - target|``
in place when it follows with the same tensors. Whatever the order of the calls, both give the
numbers of the devicewise computation; a NaN shows as NaN."""

from __future__ import annotations

import math

import pytest
import torch

from drivers import Topology, open_device


@pytest.fixture
def tile_and_board():  # type: ignore[no-untyped-def]
    with open_device("emulator://?preset=rram&seed=0") as dev:
        dev.configure(Topology.layered([40, 24]))
        board = dev.board  # type: ignore[attr-defined]
        yield board.tile("W0"), board


@pytest.mark.parametrize("order", ["deviation_first", "within_first"])
def test_deviation_and_within_in_either_order(tile_and_board, order: str) -> None:  # type: ignore[no-untyped-def]
    tile, board = tile_and_board
    m = tile.model
    gen = torch.Generator().manual_seed(11)
    tol = 0.02 * m.g_range
    for _ in range(3):
        target = torch.rand((2, *tile.shape), generator=gen) * m.g_range + m.g_min
        tile.write_stacked(target, board.clock, board.noise)
        g = tile.read_stacked(board.clock, board.noise)
        d = (g - target).abs()
        if order == "deviation_first":
            dev = tile.deviation(g, target)
            inside = tile.within(g, target, tol)
        else:
            inside = tile.within(g, target, tol)
            dev = tile.deviation(g, target)
        assert dev == float(d.max())
        assert inside == float((d <= tol).float().mean())
        # a second within on the same tensors (the scratch already absolute) counts the same
        assert tile.within(g, target, tol) == inside


def test_deviation_sees_a_changed_tensor_and_nan(tile_and_board) -> None:  # type: ignore[no-untyped-def]
    tile, _board = tile_and_board
    m = tile.model
    target = torch.full((2, *tile.shape), m.g_min + 0.5 * m.g_range)
    g = target.clone()
    assert tile.deviation(g, target) == 0.0
    assert math.copysign(1.0, tile.deviation(g, target)) == 1.0  # never -0.0
    g[1, 3, 2] += 1e-6  # changed in place: the scratch must not be reused
    assert tile.deviation(g, target) == float((g - target).abs().max())
    g[0, 0, 0] = -1e-6
    assert tile.deviation(g, target) == float((g - target).abs().max())
    g[0, 1, 1] = float("nan")
    assert math.isnan(tile.deviation(g, target))


def test_within_counts_in_the_scratch_and_the_tile_keeps_one_buffer(tile_and_board) -> None:  # type: ignore[no-untyped-def]
    """`within` writes its comparison over the difference in the one scratch buffer (no second
    tile-sized buffer kept for it); a `deviation` after it computes the difference again."""
    tile, board = tile_and_board
    m = tile.model
    gen = torch.Generator().manual_seed(12)
    tol = 0.02 * m.g_range
    target = torch.rand((2, *tile.shape), generator=gen) * m.g_range + m.g_min
    tile.write_stacked(target, board.clock, board.noise)
    g = tile.read_stacked(board.clock, board.noise)
    d = (g - target).abs()
    for _ in range(2):
        assert tile.deviation(g, target) == float(d.max())
        assert tile.within(g, target, tol) == float((d <= tol).float().mean())
        assert tile.deviation(g, target) == float(d.max())  # not the comparison's 0 / 1
    buffers = [v for k, v in vars(tile).items() if k.startswith("_scratch") and isinstance(v, torch.Tensor)]
    assert len(buffers) == 1
