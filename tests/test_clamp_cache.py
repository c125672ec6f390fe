"""Issue 17: the clamped input's product is computed once per batch. The board keeps the
constant drive of the last clamp (`emulator.clamp_cache.ClampCache`) and reuses it when the next
settle clamps the same values (the nudged phases after the free one) or the same values twice
over (`settle_both`'s doubled batch); anything that changes the weights (write, pulse,
drift), a new topology or a reset invalidates it. These tests compare every settle against
the same settle with the cache switched off."""

from __future__ import annotations

import numpy as np
import pytest

from drivers import Device, Nudge, SettleBudget, Topology, open_device


def program_weights(dev: Device, tile: str, w: np.ndarray) -> None:
    lim = dev.info.limits
    span = lim.g_max - lim.g_min
    w = np.clip(w, -1, 1)
    gp = lim.g_min + np.maximum(w, 0) * span
    gm = lim.g_min + np.maximum(-w, 0) * span
    dev.program(tile, gp.astype(np.float32), gm.astype(np.float32))


def random_layered(dev: Device, sizes: list[int], seed: int, **topo: object) -> None:
    topology = Topology.layered(sizes, **topo)  # type: ignore[arg-type]
    dev.configure(topology)
    rng = np.random.default_rng(seed)
    for c in topology.couplings:
        program_weights(dev, c.tile, rng.uniform(-0.6, 0.6, topology.tile_shape(c.tile)).astype(np.float32))


def _pair(preset: str, seed: int = 0):
    """Two boards of one preset and seed, the second with the cache off."""
    a = open_device(f"emulator://?preset={preset}&seed={seed}")
    b = open_device(f"emulator://?preset={preset}&seed={seed}")
    b.board.engine.reuse_clamp = False
    return a, b


def _same(p, q, exact: bool) -> None:
    for g in q.states:
        if exact:
            np.testing.assert_array_equal(p.states[g], q.states[g])
        else:
            np.testing.assert_allclose(p.states[g], q.states[g], atol=1e-5)
    np.testing.assert_allclose(p.energy, q.energy, rtol=1e-5, atol=1e-5)
    assert p.energy_j == pytest.approx(q.energy_j, rel=1e-5)
    assert p.steps == q.steps


@pytest.mark.parametrize("preset", ["ideal", "rram"])
@pytest.mark.parametrize("mode", ["analog", "mvm"])
def test_free_then_nudged_then_doubled_batch_reuse_the_product(preset: str, mode: str) -> None:
    rng = np.random.default_rng(0)
    a, b = _pair(preset)
    with a, b:
        budget = SettleBudget(max_steps=25, tol=0.0)
        for dev in (a, b):
            random_layered(dev, [12, 9, 4], seed=3, budget=budget, mode=mode)
        x = rng.uniform(0, 1, (16, 12)).astype(np.float32)
        grad = rng.normal(0, 1, (16, 4)).astype(np.float32)
        target = rng.uniform(0, 1, (16, 4)).astype(np.float32)
        calls = [
            ({"s0": x}, None),
            ({"s0": x}, {"s2": Nudge(0.2, target=target)}),
            ({"s0": np.concatenate([x, x])}, {"s2": Nudge(1.0, grad=np.concatenate([grad, -grad]))}),
            ({"s0": x.copy()}, {"s2": Nudge(-0.2, grad=grad)}),
        ]
        for clamp, nudge in calls:
            # the same noise stream on both boards: results agree exactly but for the doubled
            # batch, whose product over 2B rows may round differently from the product over B
            _same(a.settle(clamp, nudge), b.settle(clamp, nudge), exact=len(clamp["s0"]) == len(x))
        assert a.board.engine.clamp_reuses == 3
        assert b.board.engine.clamp_reuses == 0


def test_other_clamps_and_changed_arrays_are_not_reused() -> None:
    rng = np.random.default_rng(1)
    a, b = _pair("ideal")
    with a, b:
        for dev in (a, b):
            random_layered(dev, [12, 9, 4], seed=3, budget=SettleBudget(max_steps=25, tol=0.0))
        x = rng.uniform(0, 1, (8, 12)).astype(np.float32)
        for dev in (a, b):
            dev.settle({"s0": x})
        x[3, 5] += 0.25  # the caller changes its array in place
        half = np.concatenate([x, rng.uniform(0, 1, (8, 12)).astype(np.float32)])  # not [x; x]
        for clamp in ({"s0": x}, {"s0": half}, {"s0": x[:4]}):
            _same(a.settle(clamp), b.settle(clamp), exact=True)
        assert a.board.engine.clamp_reuses == 0


@pytest.mark.parametrize("change", ["program", "pulse", "drift", "configure", "reset"])
def test_what_changes_weights_or_configuration_invalidates_the_product(change: str) -> None:
    rng = np.random.default_rng(2)
    preset = "pcm" if change == "drift" else "ideal"
    a, b = _pair(preset)
    with a, b:
        topo = Topology.layered([12, 9, 4], budget=SettleBudget(max_steps=25, tol=0.0))
        w = {
            c.tile: rng.uniform(-0.5, 0.5, topo.tile_shape(c.tile)).astype(np.float32) for c in topo.couplings
        }
        for dev in (a, b):
            dev.configure(topo)
            for t, v in w.items():
                program_weights(dev, t, v)
        x = rng.uniform(0, 1, (8, 12)).astype(np.float32)
        first = a.settle({"s0": x})
        b.settle({"s0": x})
        for dev in (a, b):
            if change == "program":
                program_weights(dev, "W0", -w["W0"])
            elif change == "pulse":
                counts = np.full(topo.tile_shape("W0"), 3, np.int32)
                dev.pulse("W0", counts, np.zeros_like(counts))
            elif change == "drift":
                dev.wait(3600.0)
            elif change == "configure":
                dev.configure(
                    Topology.layered([12, 9, 4], budget=SettleBudget(max_steps=25, tol=0.0), w_max=0.5)
                )
            else:
                dev.reset()
                dev.configure(topo)
        after = a.settle({"s0": x})
        _same(after, b.settle({"s0": x}), exact=True)
        assert a.board.engine.clamp_reuses == 0
        if change != "reset":  # a reset keeps the conductances (non-volatile): the same states
            assert not np.array_equal(after.states["s1"], first.states["s1"])


def test_a_reused_conversion_counts_its_safety_violations_again() -> None:
    """The DAC's conversion of a clamp is reused with the clamp; the safety monitor must count
    what the conversion would have counted (one per converted group), cache or not. The
    host-side checks refuse such a clamp, so two bare boards are driven directly (the DAC
    check is their last line of defence; bare boards also stay out of the suite's check that
    no violation ever reaches an array)."""
    import torch

    from drivers.emulated import EmulatorOptions
    from emulator.board import Board

    preset = EmulatorOptions(preset="ideal").board_preset()  # an unquantised DAC: 1.3 -> 0.26 V > 0.25 V
    a, b = Board(preset, 0), Board(preset, 0)
    b.engine.reuse_clamp = False
    topo = Topology.layered([12, 9, 4], budget=SettleBudget(max_steps=10, tol=0.0))
    rng = np.random.default_rng(5)
    lim = a.limits
    weights = {
        c.tile: rng.uniform(-0.5, 0.5, topo.tile_shape(c.tile)).astype(np.float32) for c in topo.couplings
    }
    for board in (a, b):
        board.configure(topo)
        for c in topo.couplings:
            w = torch.from_numpy(weights[c.tile])
            gp = lim.g_min + w.clamp(min=0) * (lim.g_max - lim.g_min)
            gm = lim.g_min + (-w).clamp(min=0) * (lim.g_max - lim.g_min)
            board.program(c.tile, gp, gm, verify=False, tol=None, max_iters=1)
    x = rng.uniform(0, 1, (8, 12)).astype(np.float32)
    x[0, 0] = 1.3
    for clamp in (x, x.copy(), np.concatenate([x, x])):
        ra = a.settle({"s0": torch.from_numpy(clamp)})
        rb = b.settle({"s0": torch.from_numpy(clamp)})
        torch.testing.assert_close(ra.states["s1"], rb.states["s1"], atol=1e-5, rtol=0)
    assert a.engine.clamp_reuses == 2
    assert a.safety.violations == b.safety.violations == 3
