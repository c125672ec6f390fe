"""Issue 7: weight programming schemes (write-verify, pulsed updates, mixed precision, refresh)."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from drivers import Device, SettleBudget, Topology, open_device
from hil.classifier import Classifier
from hil.cli import app
from hil.config import load_config
from hil.ep import EBBlock
from hil.programming import (
    ClippedWeightsWarning,
    StepModel,
    make_scheme,
    probe_steps,
    read_weights,
    tune_pairs,
    write_weights,
)
from hil.train_classifier import train_classifier

RRAM = "emulator://?preset=rram&seed=0"
PCM = "emulator://?preset=pcm&seed=0"


def _configure(dev: Device, n: int = 64) -> str:
    """One n x n tile (n - 1 inputs plus the bias row) named W0."""
    dev.configure(Topology.layered([n - 1, n], budget=SettleBudget(max_steps=20)))
    return "W0"


def _mean_read(dev: Device, tile: str, reads: int = 8) -> np.ndarray:
    return np.mean([read_weights(dev, tile) for _ in range(reads)], axis=0)


def _weights(seed: int, n: int = 64, scale: float = 0.5) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-scale, scale, (n, n))


def test_write_verify_rram_within_two_percent_of_range() -> None:
    with open_device(RRAM) as dev:
        tile = _configure(dev)
        scheme = make_scheme("verify")
        w = _weights(0)
        (res,) = scheme.program(dev, tile, w)
        rep = res.report
        assert rep.kind == "write" and rep.scheme == "verify"
        assert rep.iterations >= 1 and rep.pulses > 2 * w.size  # the direct write plus corrections
        assert rep.energy_j > 0 and rep.within_tol >= 0.99
        # independently: the mean of several reads against the targets, in siemens
        lim = dev.info.limits
        g_range = lim.g_max - lim.g_min
        gp, gm, _ = scheme.tiles[tile].mapping.to_conductance(w.astype(np.float32))
        reads = [np.stack(dev.read_conductance(tile)) for _ in range(8)]
        err = np.abs(np.mean(reads, axis=0) - np.stack([gp, gm]))
        assert float((err <= 0.02 * g_range).mean()) >= 0.99
        assert scheme.history[-1]["iterations"] == rep.iterations


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_pulsed_update_moves_weights_by_the_requested_amount_on_average(sign: float) -> None:
    with open_device(RRAM) as dev:
        tile = _configure(dev)
        scheme = make_scheme("pulsed", seed=1)
        w0 = _weights(1, scale=0.2)
        scheme.program(dev, tile, w0)
        before = _mean_read(dev, tile)
        dw = sign * 0.05  # ~3 mid-range pulses per device
        (res,) = scheme.program(dev, tile, w0 + dw)
        assert res.report.kind == "pulse" and res.report.pulses > 0 and res.report.energy_j > 0
        moved = _mean_read(dev, tile) - before
        assert float(np.mean(moved)) == pytest.approx(dw, rel=0.2)
        assert scheme.history[-1]["devices_pulsed"] > 0.9 * 2 * w0.size


def test_pulsed_schemes_keep_to_the_boards_pulse_limit() -> None:
    """A board declaring 8 pulses per device per call refused the pulsed schemes' 32 with a
    LimitViolation (the programming audit); the schemes now clip to it, report the shortfall in
    the update (applied below requested) and carry it (mixed) to the next update."""
    with open_device(RRAM + "&max_pulses=8") as dev:
        assert dev.info.limits.max_pulses == 8
        tile = _configure(dev)
        scheme = make_scheme("mixed", seed=1)
        w0 = _weights(1, scale=0.2)
        scheme.program(dev, tile, w0)
        (res,) = scheme.program(dev, tile, w0 + 0.3)  # ~18 mid-range pulses per device asked
        hist = scheme.history[-1]
        assert res.report.pulses > 0 and hist["applied"] < 0.9 * hist["requested"]
        assert float(np.abs(scheme.tiles[tile].acc).max()) > 0  # owed to the next update
        assert (dev.safety().refused, dev.safety().violations) == (0, 0)


@pytest.mark.parametrize("name", ["pulsed", "mixed"])
def test_pulsed_updates_clip_and_count_weights_past_w_max(name: str) -> None:
    """A pulse update to weights past +-w_max reported 0 clipped (the writes count them), and
    mixed kept the unreachable part owed for good (the programming audit)."""
    with open_device(RRAM) as dev:
        tile = _configure(dev)
        scheme = make_scheme(name, seed=1)
        w0 = _weights(1, scale=0.2)
        scheme.program(dev, tile, w0)
        w1 = w0.copy()
        w1.flat[:40] = 1.8
        (res,) = scheme.program(dev, tile, w1)
        assert res.clipped == 40
        st = scheme.tiles[tile]
        np.testing.assert_array_equal(st.host.flat[:40], 1.0)  # the scheme aims at w_max, reachable
        assert float(np.abs(st.host).max()) <= 1.0


def test_write_weights_warns_of_weights_it_clipped_and_training_stays_quiet() -> None:
    """write_weights clipped 5.0 to w_max 1 silently (the count only in WriteResult.clipped,
    which the bring-up example never printed); it now warns, naming the count and the fix.
    Training (EBBlock, which clips and counts on its own) and in-range writes warn of nothing."""
    with open_device(RRAM) as dev:
        dev.configure(Topology.layered([8, 6, 3]))
        with pytest.warns(ClippedWeightsWarning) as caught:
            res = write_weights(dev, "W0", np.full((9, 6), 5.0, np.float32))
        assert res.clipped == 54 and len(caught) == 1
        text = str(caught[0].message)
        assert "write_weights('W0'): 54 of 54 weights" in text and "+-w_max = +-1" in text, text
        assert "scale the weights" in text and "larger w_max" in text, text
        assert caught[0].filename == __file__  # points at the caller's line
        with warnings.catch_warnings():
            warnings.simplefilter("error", ClippedWeightsWarning)
            write_weights(dev, "W0", np.full((9, 6), 0.5, np.float32))
    with open_device(RRAM) as dev, warnings.catch_warnings():
        warnings.simplefilter("error", ClippedWeightsWarning)
        topo = Topology.layered([5, 4, 3], w_max=0.5, budget=SettleBudget(max_steps=20))
        for scheme in ("verify", "pulsed"):
            blk = EBBlock(dev, topo, weights={"W1": torch.full((5, 3), 0.9)}, programming=scheme)
            with torch.no_grad():
                blk.weights["W1"].add_(0.5)
            blk.sync()
            assert blk.clipped >= 30  # W1 at construction and after the step (W0 drawn may add)


def test_stochastic_rounding_is_unbiased() -> None:
    scheme = make_scheme("pulsed", seed=3)
    for x in (0.3, -1.7, 2.5):
        n = scheme.round_counts(np.full(200_000, x))
        assert set(np.unique(n)) <= {np.floor(x), np.ceil(x)}
        assert float(n.mean()) == pytest.approx(x, abs=0.01)
    assert make_scheme("mixed").round_counts(np.array([0.4, -0.6, 1.2])).tolist() == [0.0, -1.0, 1.0]


def test_accumulator_keeps_sub_pulse_remainders() -> None:
    with open_device(RRAM) as dev:
        tile = _configure(dev)
        scheme = make_scheme("mixed", seed=2)
        w = _weights(2, scale=0.2)
        scheme.program(dev, tile, w)
        st = scheme.tiles[tile]
        m = st.mapping
        w_dev0 = m.to_weight(st.g_est[0], st.g_est[1]).astype(np.float64)
        before = _mean_read(dev, tile)
        assert st.steps is not None
        step_w = 2 * st.steps.dw_up * m.w_max / m.g_range  # one pulse on each device of a pair
        gen = np.random.default_rng(0)
        start = w.copy()
        for _ in range(12):  # updates of a third of a step each: most are below one pulse
            w = w + np.abs(gen.normal(0.33 * step_w, 0.05 * step_w, w.shape))
            scheme.program(dev, tile, w)
        applied = m.to_weight(st.g_est[0], st.g_est[1]).astype(np.float64) - w_dev0
        requested = w - start
        np.testing.assert_allclose(applied + st.acc, requested, atol=1e-5)
        # nearest rounding: under half a step, where both devices of the pair can move
        assert st.stuck is not None
        free = ~st.stuck.stuck.any(axis=0)
        assert float(np.abs(st.acc[free]).max()) <= 0.5 * step_w * 1.01
        # and on the devices: the mean move is the requested one
        moved = _mean_read(dev, tile) - before
        assert float(moved.mean()) == pytest.approx(float(requested.mean()), rel=0.2)
        # the reports add up
        h = [r for r in scheme.history if r["kind"] == "pulse"]
        assert len(h) == 12 and h[-1]["remainder"] == pytest.approx(float(np.abs(st.acc).sum()))


def test_refresh_restores_drifted_pcm_weights() -> None:
    with open_device(PCM) as dev:
        tile = _configure(dev)
        scheme = make_scheme("mixed", seed=4)
        w = _weights(4, scale=0.3)
        scheme.program(dev, tile, w)
        assert scheme.tiles[tile].one_sided  # measured: a negative count RESETs the device
        for k in range(3):
            w = w + 0.02 * (-1) ** k
            scheme.program(dev, tile, w)
        committed = scheme.commit(dev, tile)
        dev.wait(86400.0)
        drifted = _mean_read(dev, tile)
        assert scheme.drift(dev, tile) > 0.2  # power-law drift, nu ~ 0.05, one day
        res = scheme.refresh_if_drifted(dev, tile)
        assert res is not None and res.report.kind == "refresh" and res.report.iterations >= 1
        restored = _mean_read(dev, tile)
        err_drift = float(np.abs(drifted - committed).mean())
        err_restored = float(np.abs(restored - committed).mean())
        assert err_restored < 0.3 * err_drift
        assert scheme.refresh_if_drifted(dev, tile) is None  # nothing to do right after


def test_block_uses_the_scheme_and_periodic_refresh() -> None:
    with open_device(RRAM) as dev:
        topo = Topology.layered([8, 6, 3], budget=SettleBudget(max_steps=20))
        blk = EBBlock(dev, topo, programming=make_scheme("mixed", refresh_every=2))
        assert {r.kind for r in blk.last_reports.values()} == {"write"}
        for k in range(4):
            with torch.no_grad():
                blk.weights["W0"].add_(0.01 * (k + 1))
            blk.sync()
        kinds = [r["kind"] for r in blk.programming.history if r["tile"] == "W0"]
        st = blk.programming.tiles["W0"]
        assert st.stuck is not None
        # a second write when the first found stuck devices (their partners then carry the weights)
        writes = ["write"] * (2 if st.stuck.stuck.any() else 1)
        assert kinds == [*writes, "pulse", "pulse", "refresh", "pulse", "pulse", "refresh"]
        assert blk.last_reports["W0"].kind == "refresh"
        w = blk.device_weights().weights["W0"].detach().numpy()
        assert np.abs(w - blk.weights["W0"].detach().numpy()).mean() < 0.05


def test_config_selects_the_scheme() -> None:
    torch.set_num_threads(1)
    cfg = load_config(
        None,
        ["device=" + RRAM, "ep.programming=mixed", "train.epochs=1", "model.sizes=[64,32,10]",
         "data.limit_train=64", "data.limit_test=32", "ep.refresh_every=3"],
    )  # fmt: skip
    res = train_classifier(cfg)
    assert isinstance(res.model, Classifier)
    scheme = res.model.block.programming
    assert scheme.name == "mixed" and scheme.refresh_policy.every == 3
    kinds = {r["kind"] for r in scheme.history}
    assert kinds == {"write", "pulse", "refresh"}
    res.model.close()
    bad = CliRunner().invoke(app, ["train", "classifier", "--set", "ep.programming=sideways"])
    assert bad.exit_code == 2 and "ep.programming" in bad.output


def _drifted_pcm(mode: str | None, scheme_name: str = "mixed") -> tuple[Device, Any, np.ndarray]:
    """A pcm tile trained by a few updates, committed, one simulated day later."""
    dev = open_device(PCM)
    tile = _configure(dev)
    scheme = make_scheme(scheme_name, seed=4, refresh_mode=mode)
    w = _weights(4, scale=0.3)
    scheme.program(dev, tile, w)
    for k in range(3):
        w = w + 0.02 * (-1) ** k
        scheme.program(dev, tile, w)
    committed = scheme.commit(dev, tile)
    dev.wait(86400.0)
    return dev, scheme, committed


def test_tuning_restores_drifted_pcm_pairs_closer_than_a_rewrite() -> None:
    errors = {}
    for mode in ("tune", "verify"):
        dev, scheme, committed = _drifted_pcm(mode)
        res = scheme.refresh(dev, "W0")
        assert res.report.kind == "refresh" and res.report.iterations >= 1 and res.report.pulses > 0
        errors[mode] = float(np.abs(_mean_read(dev, "W0") - committed).mean())
        if mode == "tune":
            h = scheme.history[-1]
            assert h["mode"] == "tune" and h["reads"] > h["iterations"] and h["within_tol"] > 0.5
            # the scheme goes on from the tuned state: no drift left, nothing to refresh
            assert scheme.refresh_if_drifted(dev, "W0") is None
        dev.close()
    lim_range = 25e-6  # pcm window, siemens
    w_per_siemens = 1.0 / lim_range  # w_max = 1
    assert errors["tune"] < 0.6 * errors["verify"]
    assert errors["tune"] < 0.15e-6 * w_per_siemens  # mean error below one read's noise


def test_refresh_by_tuning_needs_no_setup_measurement() -> None:
    """A scheme that never pulsed (verify) probes the tile's pulse response in place."""
    dev, scheme, committed = _drifted_pcm(None, "verify")
    assert scheme.tiles["W0"].steps is None and not scheme.tiles["W0"].one_sided
    before = float(np.abs(_mean_read(dev, "W0") - committed).mean())
    res = scheme.refresh(dev, "W0")
    st = scheme.tiles["W0"]
    assert st.steps is not None and st.one_sided  # the probe saw a RESET
    assert 0.3e-6 < st.steps.dw_up < 1.5e-6  # pcm SET step near RESET: ~0.7-1 uS
    assert res.report.pulses > st.steps.pulses > 0  # the probe's pulses are counted
    after = float(np.abs(_mean_read(dev, "W0") - committed).mean())
    assert after < 0.3 * before
    dev.close()


def test_probe_steps_measures_bidirectional_rram_in_place() -> None:
    with open_device(RRAM) as dev:
        tile = _configure(dev)
        scheme = make_scheme("pulsed", seed=5)
        scheme.program(dev, tile, _weights(5, scale=0.2))
        setup = scheme.tiles[tile].steps
        assert setup is not None and not setup.one_sided
        probed = probe_steps(dev, tile)
        assert not probed.one_sided
        assert probed.dw_up == pytest.approx(setup.dw_up, rel=0.3)
        assert probed.dw_down == pytest.approx(setup.dw_down, rel=0.3)


def test_step_model_interpolates_exponentially() -> None:
    m = StepModel(1.0, float("nan"), True, g_up=0.0, dw_mid=0.25, g_mid=2.0)
    np.testing.assert_allclose(m.up_step(np.array([-1.0, 0.0, 1.0, 2.0])), [1.0, 1.0, 0.5, 0.25])
    flat = StepModel(1.0, float("nan"), True)  # no mid-window step: constant
    np.testing.assert_allclose(flat.up_step(np.array([0.0, 5.0])), [1.0, 1.0])


@pytest.mark.parametrize("level", [0.1, 0.5])
def test_pcm_pulses_follow_the_shrinking_set_step(level: float) -> None:
    """PCM SET steps shrink with G (~0.7 uS near RESET, ~0.2 uS mid-window): a pulsed update
    must ask for more pulses higher in the window to move the weight as requested."""
    with open_device(PCM) as dev:
        tile = _configure(dev)
        scheme = make_scheme("pulsed", seed=6)
        w0 = np.full((64, 64), level)  # one-sided mapping: G+ = level * 25 uS, G- at RESET
        scheme.program(dev, tile, w0)
        before = _mean_read(dev, tile)
        (res,) = scheme.program(dev, tile, w0 + 0.04)  # 1 uS more on every G+
        moved = _mean_read(dev, tile) - before
        assert float(np.median(moved)) == pytest.approx(0.04, rel=0.25)
        per_device = res.report.pulses / res.report.devices_pulsed
        assert per_device > (3.0 if level > 0.3 else 1.0)


def test_tuning_near_the_top_resets_the_partner_not_the_pair() -> None:
    """G+ near the top of its window cannot go up: the tuning RESETs G- instead, which climbs
    to the difference wanted; a RESET of the whole pair would start both from scratch."""
    with open_device(PCM) as dev:
        tile = _configure(dev, 16)
        scheme = make_scheme("pulsed", seed=7)
        scheme.program(dev, tile, np.zeros((16, 16)))  # measures the pulse response
        st = scheme.tiles[tile]
        full = np.full((16, 16), 23.5e-6, np.float32)
        dev.program(tile, full, np.full((16, 16), 12e-6, np.float32))
        target = np.full((16, 16), 20e-6)  # G+ - G- from ~11.5 to 20 uS: G- must fall
        res = tune_pairs(
            dev, tile, target, lambda g, d: scheme.pulse_counts(st, d, g), one_sided=True,
            g_min=0.0, g_max=25e-6, tol=0.1e-6,
        )  # fmt: skip
        gp = np.mean([dev.read_conductance(tile)[0] for _ in range(16)], axis=0)
        assert float(np.median(gp)) > 22e-6  # G+ kept its state
        assert res.resets >= target.size  # every G- was RESET at least once
        diff = _mean_read(dev, tile, 16) * 25e-6  # weights -> G+ - G- (w_max = 1)
        assert float(np.median(np.abs(diff - target))) < 0.1e-6
        assert res.within_tol > 0.5


def test_stuck_devices_found_from_read_backs_and_compensated_by_the_partner() -> None:
    with open_device(RRAM) as dev:
        tile = _configure(dev)
        truth = dev.board.tile(tile).truth()  # type: ignore[attr-defined]
        stuck_high = (truth["stuck"] & (truth["stuck_value"] > 5e-6)).numpy()
        assert stuck_high.sum() >= 3
        scheme = make_scheme("ideal")
        w = _weights(8, scale=0.2)
        scheme.program(dev, tile, w)
        assert not scheme.tiles[tile].stuck.stuck.any()  # one direct write is not enough evidence
        scheme.program(dev, tile, w + 0.01)
        found = scheme.tiles[tile].stuck.stuck
        np.testing.assert_array_equal(found, stuck_high)
        scheme.program(dev, tile, w + 0.02)  # now the partners carry the weights
        target = w + 0.02
        err = np.abs(_mean_read(dev, tile) - target)
        pairs = stuck_high.any(axis=0)
        # a stuck-high G+ can only carry weights >= 0 (G- climbs to G+_stuck - dG), a G- <= 0
        reach = (stuck_high[0] & (target >= 0)) | (stuck_high[1] & (target <= 0))
        assert reach.sum() >= 2
        assert float(err[reach].max()) < 0.12  # a stuck-high device alone would add ~+-0.9
        assert np.all(err[pairs & ~reach] < np.abs(target[pairs & ~reach]) + 0.12)  # pinned near 0
        assert float(err[~pairs].mean()) < 0.05


def test_schemes_by_name_and_their_options() -> None:
    from hil.config import ConfigError
    from hil.programming import SCHEME_CLASSES, MixedPrecision, RefreshPolicy

    assert sorted(SCHEME_CLASSES) == ["ideal", "mixed", "pulsed", "verify"]
    mixed = make_scheme("mixed", refresh_every=3, drift_tol=0.1, seed=1)
    assert isinstance(mixed, MixedPrecision) and mixed.rounding == "nearest"
    assert mixed.refresh_policy == RefreshPolicy(every=3, drift_tol=0.1)
    assert make_scheme(mixed) is mixed and make_scheme(None).name == "ideal"
    with pytest.raises(ValueError, match="one of"):
        make_scheme("write-verify")
    with pytest.raises(TypeError, match=r"'ideal'.*rounding"):
        make_scheme("ideal", rounding="nearest")  # only pulsed schemes round
    with pytest.raises(ValueError, match="refresh_every must be >= 0"):
        make_scheme("verify", refresh_every=-1)
    with pytest.raises(ConfigError, match=r'ep\.verify.*removed.*ep\.programming = "verify"'):
        load_config(overrides=["ep.verify=true"])
