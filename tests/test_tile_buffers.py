"""A tile's writes and noisy reads reuse the buffers of its former states and reads
(`emulator.array.Spares`), and never one that anything still holds."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from emulator.array import TileArray
from emulator.presets import PRESETS

CPU = torch.device("cpu")


def tile(preset: str, rows: int = 300, cols: int = 256) -> TileArray:
    # 153600 devices: past `noise_table_min`, the large tile's noise path
    return TileArray(rows, cols, PRESETS[preset].device, torch.Generator().manual_seed(0), CPU)


def targets(t: TileArray, k: int) -> torch.Tensor:
    m = t.model
    g = torch.rand((2, t.rows, t.cols), generator=torch.Generator().manual_seed(k))
    return g.mul_(0.8 * (m.g_max - m.g_min)).add_(m.g_min + 0.1 * (m.g_max - m.g_min))


@pytest.mark.parametrize("preset", ["ideal", "rram"])
def test_a_write_reuses_a_former_state_nothing_holds(preset: str) -> None:
    t = tile(preset)
    gen = torch.Generator().manual_seed(1)
    t.write_stacked(targets(t, 0), 0.0, gen)
    first = weakref.ref(t.state(0.0))
    seen = set()
    for k in range(1, 6):
        t.write_stacked(targets(t, k), float(k), gen)
        seen.add(id(t.state(float(k))))
    gc.collect()
    # the first write's state is alive again as a later state (the old code let it go and
    # allocated a new tensor every write)
    assert first() is not None
    assert len(seen) <= 3


def test_an_ep_step_reuses_states_and_reads_in_the_steady_state() -> None:
    """Written as a scheme writes (the report of the last write held, as `EBBlock` holds it
    in `last_reports`, until the next write's replaces it): every write after the first two
    reuses a buffer, states with one kept, reads with two."""
    t = tile("rram")
    gen = torch.Generator().manual_seed(1)
    taken = {"states": 0, "reads": 0}
    pools = {"states": t._spare_states, "reads": t._spare_reads}
    for name, pool in pools.items():
        plain = pool.take

        def counted(plain=plain, name=name):  # type: ignore[no-untyped-def]
            b = plain()
            taken[name] += b is not None
            return b

        pool.take = counted  # type: ignore[method-assign]
    report = None
    for k in range(8):
        t.write_stacked(targets(t, k), float(k), gen)
        read = t.read_stacked(float(k), gen)
        report = (read[0], read[1])  # replaces the last one, as `last_reports` does
        del read
    assert report is not None
    assert taken == {"states": 7, "reads": 6}


@pytest.mark.parametrize("preset", ["ideal", "rram"])
def test_what_a_caller_holds_is_never_written_over(preset: str) -> None:
    t = tile(preset)
    gen = torch.Generator().manual_seed(1)
    t.write_stacked(targets(t, 0), 0.0, gen)
    held_state = t.state(0.0)  # the tensor itself
    kept_state = held_state.clone()
    view = t.state(0.0)[1]  # a view of its storage only (a report's G-)
    t.write_stacked(targets(t, 1), 1.0, gen)
    view2 = t.state(1.0)[0]
    kept_view2 = view2.clone()
    read = t.read_stacked(1.0, gen)
    read_view = read[0]
    kept_read = read.clone()
    del read
    for k in range(2, 8):
        t.write_stacked(targets(t, k), float(k), gen)
        t.read_stacked(float(k), gen)
    assert torch.equal(held_state, kept_state)
    assert torch.equal(view, kept_state[1])
    assert torch.equal(view2, kept_view2)
    assert torch.equal(read_view, kept_read[0])
    # the memory the pools keep while callers hold old states: one former state, two reads
    assert len(t._spare_states._bufs) <= 1
    assert len(t._spare_reads._bufs) <= 2


def test_reused_buffers_give_the_same_numbers() -> None:
    a, b = tile("rram"), tile("rram")
    ga, gb = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    held = []
    for k in range(6):
        tgt = targets(a, k)
        a.write_stacked(tgt, float(k), ga)
        b.write_stacked(tgt.clone(), float(k), gb)
        held.append(b.state(float(k)))  # b holds every state: it never reuses one
        assert torch.equal(a.state(float(k)), b.state(float(k)))
        assert torch.equal(a.read_stacked(float(k), ga), b.read_stacked(float(k), gb))


def test_the_pool_hands_out_only_what_nothing_else_holds() -> None:
    from emulator.array import Spares

    pool = Spares((2, 3, 4), CPU, keep=3)
    held = torch.zeros(2, 3, 4)
    viewed = torch.zeros(2, 3, 4)
    view = viewed[1]
    ids = (id(held), id(viewed))
    pool.give(held)
    pool.give(viewed)
    del viewed  # only its view is held now
    assert pool.take() is None  # one is held as a tensor, the other through a view
    del held
    got = pool.take()
    assert id(got) == ids[0]
    assert pool.take() is None  # the viewed one still
    del view
    got = pool.take()
    assert id(got) == ids[1]
