"""The settle engine's noise pool (emulator.noise_table.NoisePool): values N(0, 1), drawn in place
(no new tensor), each settle renewing as many values as its largest window, round robin."""

from __future__ import annotations

import torch

from emulator.noise_table import NoisePool


def test_refresh_renews_exactly_n_values_in_place_round_robin() -> None:
    gen = torch.Generator().manual_seed(0)
    pool = NoisePool(gen, 100, torch.device("cpu"), blocks=3)  # 400 values
    storage = pool.values.data_ptr()
    before = pool.values.clone()
    pool.refresh(150)
    changed = (pool.values != before).nonzero().flatten()
    assert changed.min() == 0 and changed.max() == 149 and len(changed) >= 148
    before = pool.values.clone()
    pool.refresh(300)  # 150..399, then wraps to 0..49
    changed = pool.values != before
    assert changed[150:].float().mean() > 0.99 and changed[:50].float().mean() > 0.99
    assert not changed[50:150].any()
    assert pool.values.data_ptr() == storage


def test_windows_are_standard_normal_and_fit_the_pool() -> None:
    gen = torch.Generator().manual_seed(1)
    pool = NoisePool(gen, 512 * 64, torch.device("cpu"))
    draws = []
    for _ in range(200):
        pool.refresh(512 * 64)
        w = pool.draw((512, 64))
        assert w.shape == (512, 64)
        draws.append(w.clone())
    x = torch.stack(draws)
    assert abs(float(x.mean())) < 0.01 and abs(float(x.std()) - 1.0) < 0.01


def test_a_window_of_rows_is_the_window_draw_gives() -> None:
    """`draw_rows` (one as_strided call) reads the same values at the same offsets as `draw`
    (slice, then view), call by call, windows running into the pool's spare block included."""
    pools = [NoisePool(torch.Generator().manual_seed(2), 60, torch.device("cpu"), blocks=2) for _ in range(2)]
    assert torch.equal(pools[0].values, pools[1].values)
    reached = 0
    for k in range(300):
        rows = 1 + k % 6
        a, b = pools[0].draw((rows, 10)), pools[1].draw_rows(rows, 10)
        assert b.shape == (rows, 10) and b.is_contiguous()
        assert torch.equal(a, b)
        reached = max(reached, b.data_ptr() // 4 + b.numel() - pools[1].values.data_ptr() // 4)
    # some window ran past the offsets' range into the pool's spare block, and none past its end
    assert pools[1].size < reached <= pools[1].values.numel()
