"""Write and read noise of a large tile, drawn from its noise table (issue 17; see
`emulator.array.TileArray` and `emulator.noise_table.NoisePool.fresh_window`): through the
real board, the noise of one write is N(0, write_noise) device by device and independent
across devices, read noise N(0, read_noise) and independent of the write's, a device never
gets the same value twice, and a seed reproduces the numbers.

Sampling tolerances: with N devices per write (N = 2 x 257 x 256 = 131584 here), a sample
mean of N(0, s) values has std s / sqrt(N) (0.0028 s), a sample std relative std
1 / sqrt(2 N) (0.2 %), a sample correlation of independent values std 1 / sqrt(N) (0.0028).
Every check allows 5 of those stds."""

from __future__ import annotations

import math

import pytest
import torch

from drivers import Topology
from emulator.array import TileArray
from emulator.board import Board
from emulator.noise_table import NoisePool
from emulator.presets import PRESETS

SIZES = [256, 256]  # tile W0: 257 x 256 (the bias row included)


def _board(seed: int = 0) -> tuple[Board, TileArray, torch.Tensor]:
    board = Board(PRESETS["rram"], seed=seed)
    board.configure(Topology.layered(SIZES))
    tile = board.tile("W0")
    m = tile.model
    # mid-window targets: 18 write-noise stds from either bound, so nothing is clipped
    target = torch.full((2, *tile.shape), 0.5 * (m.g_min + m.g_max))
    return board, tile, target


def _write_errors(board: Board, tile: TileArray, target: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
    rep = board.program("W0", target[0], target[1], verify=False, tol=None, max_iters=1)
    assert rep["iterations"] == 0
    return (tile.state(board.clock) - target)[free].double()


def _check_normal(x: torch.Tensor, std: float) -> None:
    n = x.numel()
    assert abs(float(x.mean())) <= 5 * std / math.sqrt(n)
    assert abs(float(x.std()) / std - 1.0) <= 5 / math.sqrt(2 * n)


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_the_tile_draws_from_its_table() -> None:
    board, tile, target = _board()
    assert 2 * tile.cells >= TileArray.noise_table_min  # the table path is the one under test
    board.program("W0", target[0], target[1], verify=False, tol=None, max_iters=1)
    assert isinstance(tile._table, NoisePool) and tile._table.gen is board.noise


def test_write_noise_is_normal_with_the_model_std_and_independent_across_devices() -> None:
    board, tile, target = _board()
    wn = tile.model.write_noise
    free = ~tile.params.stuck
    lim = 5 / math.sqrt(int(free.sum()))
    for _ in range(4):  # several writes, each on its own
        e = _write_errors(board, tile, target, free)
        _check_normal(e, wn)
        # independence across devices within the write: neighbours along a row, along a column,
        # and the two devices of one cell
        full = (tile.state(board.clock) - target).double()
        ok = free
        for a, b, m in (
            (full[:, :, 1:], full[:, :, :-1], ok[:, :, 1:] & ok[:, :, :-1]),
            (full[:, 1:, :], full[:, :-1, :], ok[:, 1:, :] & ok[:, :-1, :]),
            (full[0], full[1], ok[0] & ok[1]),
        ):
            assert abs(_corr(a[m], b[m])) <= lim


def test_writes_do_not_share_their_noise_device_by_device_and_are_uncorrelated() -> None:
    board, tile, target = _board()
    free = ~tile.params.stuck
    writes = torch.stack([_write_errors(board, tile, target, free) for _ in range(24)])  # (24, N)
    lim = 5 / math.sqrt(writes.shape[1])
    # device by device, consecutive writes and writes further apart are uncorrelated
    for lag in (1, 2, 5):
        for k in range(0, writes.shape[0] - lag, 3):
            assert abs(_corr(writes[k], writes[k + lag])) <= lim
    # no two writes share their noise device by device (the table bars the offsets of its live
    # windows): exact repeats come only from float32 rounding of the landed values (about
    # 5e-7 per device and pair of writes, ~0.07 devices per pair here), not by the tile
    for k in range(writes.shape[0]):
        same = (writes[k + 1 :] == writes[k]).sum(dim=1)
        assert k == writes.shape[0] - 1 or int(same.max()) <= 10


def test_read_noise_is_normal_and_independent_of_the_write_noise() -> None:
    board, tile, target = _board()
    rn = tile.model.read_noise
    free = ~tile.params.stuck
    lim = 5 / math.sqrt(int(free.sum()))
    for _ in range(3):
        w = _write_errors(board, tile, target, free)
        true = tile.state(board.clock)
        r1 = (tile.read_stacked(board.clock, board.noise) - true)[free].double()
        r2 = (tile.read_stacked(board.clock, board.noise) - true)[free].double()
        _check_normal(r1, rn)
        _check_normal(r2, rn)
        assert abs(_corr(r1, w)) <= lim and abs(_corr(r1, r2)) <= lim


def test_program_reports_the_devicewise_residual_and_within_tol() -> None:
    board, tile, target = _board()
    m = tile.model
    gen = torch.Generator().manual_seed(5)
    # targets across the whole window and a little past it (clipped devices included)
    target = torch.rand((2, *tile.shape), generator=gen) * (m.g_range + 1e-6) + m.g_min - 0.5e-6
    tol = 0.02 * m.g_range
    for _ in range(2):
        noise = board.noise.get_state()
        rep = board.program("W0", target[0], target[1], verify=False, tol=tol, max_iters=1)
        true = tile.state(board.clock)
        read = torch.stack((rep["g_plus"], rep["g_minus"]))
        assert rep["residual_max"] == float((read - target).abs().max())
        assert rep["within_tol"] == float(((true - target).abs() <= tol).float().mean())
        assert not torch.equal(board.noise.get_state(), noise)


def test_a_seed_reproduces_the_noise_and_another_seed_does_not() -> None:
    def run(seed: int) -> list[torch.Tensor]:
        board, tile, target = _board(seed)
        out = []
        for _ in range(3):
            rep = board.program("W0", target[0], target[1], verify=False, tol=None, max_iters=1)
            out.append(tile.state(board.clock).clone())
            out.append(rep["g_plus"].clone())
        return out

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not any(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_fresh_window_bars_live_offsets_and_keeps_its_windows_standard_normal() -> None:
    gen = torch.Generator().manual_seed(2)
    pool = NoisePool(gen, 1000, torch.device("cpu"), blocks=2)  # 3000 values, offsets in [0, 2000)
    fresh = 125  # the whole pool drawn anew every 24 windows
    seen: list[tuple[int, int]] = []  # (values drawn when used, offset)
    for _ in range(400):
        w = pool.fresh_window((1000,), fresh)
        offset = w.storage_offset()
        for drawn, o in seen:
            if drawn > pool.drawn - pool.values.numel():  # a window still live
                assert o != offset
        seen.append((pool.drawn, offset))
        assert len(pool._live) <= math.ceil(pool.values.numel() / fresh)
        # each window on its own: 1000 i.i.d. N(0, 1) values (5 sampling stds)
        w = w.double()
        assert abs(float(w.mean())) <= 5 / math.sqrt(1000)
        assert abs(float(w.std()) - 1.0) <= 5 / math.sqrt(2000)
    with pytest.raises(ValueError):
        pool.fresh_window((1001,), fresh)
