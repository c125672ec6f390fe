"""Issue 15: settles iterated on the host through `Device.mvm`, for boards that only multiply,
and the EP estimator that takes any settle function."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from drivers import LimitViolation, NotSupported, Nudge, SettleBudget, open_device
from drivers.emulated import EmulatedDevice
from emulator.board import Board
from emulator.presets import get_preset
from hil.cli import app
from hil.config import load_config
from hil.ep import EBBlock, settle_path
from hil.estimator import EPEstimator
from hil.gradcheck import check_block, cosine, gradcheck, mse_loss, rel_error
from hil.host_settle import HostSettle
from hil.reference import DHN, reference_settle
from hil.train_classifier import train_classifier

IDEAL = "emulator://?preset=ideal&seed=0"
MVM_ONLY = "capabilities=mvm,pulse,program_verify"
TIGHT = SettleBudget(max_steps=4000, tol=1e-7, dt=0.5, check_every=5)


def _block(dense: bool, settle: str = "auto", uri: str = IDEAL) -> EBBlock:
    return check_block(open_device(uri), [64, 24, 10], dense=dense, budget=TIGHT, settle=settle)


@pytest.mark.parametrize("dense", [False, True], ids=["layered", "dense"])
def test_host_settle_reaches_the_board_fixed_point(dense: bool, digits) -> None:
    """ideal preset: the host-iterated settle lands on the analog settle's fixed point to 1e-5,
    free and nudged (elastic target and injected current)."""
    x, y = digits
    blk = _block(dense)
    dev = blk.device
    host = HostSettle(dev, reference=blk.device_weights)
    (inp,), (out,) = blk.inputs, blk.outputs
    nudges = [None, {out: Nudge(0.5, target=y)}, {out: Nudge(0.3, grad=y - 0.5)}]
    for nudge in nudges:
        board = dev.settle({inp: x}, nudge=nudge)
        mine = host({inp: x}, nudge=nudge)
        assert board.converged and mine.converged
        for g in board.states:
            np.testing.assert_allclose(mine.states[g], board.states[g], rtol=0, atol=1e-5, err_msg=g)
        np.testing.assert_allclose(mine.energy, board.energy, rtol=0, atol=1e-4)
    # one product per coupling and direction that reaches a free group, per step
    assert host.stats.per_step == (1 if dense else 2)


@pytest.mark.parametrize("dense", [False, True], ids=["layered", "dense"])
def test_ep_through_host_settles_matches_implicit_differentiation(dense: bool, digits) -> None:
    x, y = digits
    blk = _block(dense, settle="host")
    assert blk.settle_path == "host"
    rows = gradcheck(blk, x, y, betas=(0.01,), modes=("centered",))
    assert len(rows) == (3 if dense else 5)
    for r in rows:
        assert r.cosine >= 0.999, r
        assert r.rel_error <= 0.05, r


def test_the_estimator_runs_on_the_reference_minimiser(digits) -> None:
    """The pure-torch reference plugs into the same estimator as a board: centered EP at a small
    beta on Newton-exact settles matches implicit differentiation closely."""
    x, y = digits
    blk = _block(dense=False)
    net = DHN(blk.topology, {t: w.detach() for t, w in blk.weights.items()}, dtype=torch.float64)
    est = EPEstimator(blk.topology)
    settle = reference_settle(net)
    clamp = {"s0": x}
    free = settle(clamp)
    phases = est.phases(settle, clamp, free, lambda b: {"s2": Nudge(b, target=y)}, beta=0.01, mode="centered")

    @torch.no_grad()
    def drive(states):
        return net.drive(
            {g: torch.as_tensor(v, dtype=torch.float64) for g, v in states.items()}, targets={"s0"}
        )

    grads, in_grads = est.gradients(phases, len(x), "mean", drive)
    loss = mse_loss("s2", torch.as_tensor(y, dtype=torch.float64))
    _, gw, gx, _ = net.implicit_gradients({"s0": torch.as_tensor(x, dtype=torch.float64)}, loss)
    for t in gw:
        assert cosine(grads[t], gw[t]) >= 0.9999 and rel_error(grads[t], gw[t]) <= 0.01, t
    assert cosine(in_grads["s0"], gx["s0"]) >= 0.999


def test_settle_path_follows_the_capabilities() -> None:
    full = open_device(IDEAL)
    only_mvm = open_device(f"{IDEAL}&{MVM_ONLY}")
    assert settle_path(full) == "board" and settle_path(full, "host") == "host"
    assert settle_path(only_mvm) == "host"
    with pytest.raises(NotSupported, match="settle='host'"):
        settle_path(only_mvm, "board")
    neither = open_device(f"{IDEAL}&capabilities=program_verify")
    with pytest.raises(NotSupported, match="needs 'mvm'"):
        settle_path(neither)
    with pytest.raises(ValueError, match="settle must be one of"):
        settle_path(full, "analog")


def test_budget_semantics_and_accounting(digits) -> None:
    x, _ = digits
    blk = _block(dense=False, uri=f"{IDEAL}&{MVM_ONLY}")
    dev = blk.device
    host = HostSettle(dev)
    dev.configure(replace(blk.topology, budget=SettleBudget(12, 0.0, 0.5, 5)))
    before = dev.meter()
    eq = host({"s0": x}, trace=4)
    after = dev.meter()
    assert eq.steps == 12 and host.stats.per_settle == 1  # tol 0: exactly max_steps, no noise probe
    assert list(eq.trace["step"]) == [0, 4, 8, 12] and eq.trace["s1"].shape == (4, len(x), 24)
    assert after.mvm_calls - before.mvm_calls == host.stats.mvm_calls == 1 + 12 * 2
    assert eq.settle_time_s == pytest.approx(after.clock_s - before.clock_s)
    assert eq.energy_j == pytest.approx(after.energy_j - before.energy_j) and eq.energy_j > 0
    assert eq.energy is None and np.isnan(eq.trace["energy"]).all()  # no reference: energy unknown


def test_noise_aware_convergence_on_a_coarse_adc(digits) -> None:
    """With a 6-bit ADC and read noise past its step (an output noise of 0.06 weight units, half
    a step) the states never stop moving: the floor measured from the noise probe lets the
    settle stop, as the board's own settle does. Without the probes the floor holds the
    converters' steps alone (the read step as the reads show it, tests/test_host_settle_read_step.py:
    without this noise that settle stops in its one-step limit cycle), which this noise exceeds."""
    x, _ = digits
    uri = f"emulator://?preset=rram&seed=0&adc_bits=6&out_noise=0.06&{MVM_ONLY}"
    blk = _block(dense=False, uri=uri, settle="host")
    dev = blk.device
    dev.configure(replace(blk.topology, budget=SettleBudget(300, 1e-4, 0.5, 5)))
    host = HostSettle(dev, reference=blk.device_weights)
    eq = host({"s0": x})
    assert host.stats.noise_floor > 1e-3
    assert eq.converged and eq.steps < 300
    blind = HostSettle(dev, probe_noise=False)
    assert not blind({"s0": x}).converged


@contextlib.contextmanager
def _served(*args: str) -> Iterator[dict[str, str]]:
    """`hil emulator serve ARGS` in a subprocess; its printed device URIs by kind."""
    cmd = [
        sys.executable,
        "-m",
        "hil.cli",
        "emulator",
        "serve",
        "--scpi-port",
        "0",
        "--serial-port",
        "0",
        *args,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        uris: dict[str, str] = {}
        assert proc.stdout is not None
        while len(uris) < 2:
            line = proc.stdout.readline()
            assert line, "hil emulator serve exited before printing its URIs"
            for scheme in ("visa://", "serial+socket://"):
                if scheme in line:
                    uris[scheme] = line[line.index(scheme) :].strip()
        yield uris
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("scheme", ["serial+socket://", "visa://"])
def test_classifier_on_a_served_mvm_only_board_equals_in_process(scheme: str) -> None:
    """Training by EP through host-iterated settles on an MVM-only rram board behind `hil
    emulator serve` gives, over either wire protocol, exactly what the in-process board gives."""
    board = ["--preset", "rram", "--seed", "0", "--capabilities", "mvm,pulse,program_verify"]
    common = ["train.epochs=2", "model.sizes=[64,24,10]", "data.limit_train=240", "data.limit_test=120"]
    local = train_classifier(
        load_config(None, [*common, f"device=emulator://?preset=rram&seed=0&{MVM_ONLY}"])
    )
    with _served(*board) as uris:
        remote = train_classifier(load_config(None, [*common, f"device={uris[scheme]}"]))
    assert remote.devices == local.devices
    assert [(h.train_loss, h.test_acc, h.free_steps) for h in remote.history] == [
        (h.train_loss, h.test_acc, h.free_steps) for h in local.history
    ]
    assert local.test_acc > 0.2  # above chance (0.1) after 2 short epochs: it learned
    for a, b in zip(local.model.blocks(), remote.model.blocks(), strict=True):
        assert a.settle_path == b.settle_path == "host"
        for t in a.weights:
            assert torch.equal(a.weights[t], b.weights[t]), t


def test_demo_and_gradcheck_on_an_mvm_only_board() -> None:
    """The first-look commands work on a board that only multiplies, and say where it settled."""
    board = f"emulator://?preset=ideal&seed=0&{MVM_ONLY}"
    demo = CliRunner().invoke(app, ["demo", "--device", board, "--sizes", "64,16,10", "--batch", "8"])
    assert demo.exit_code == 0, demo.output
    assert "settles   on the host, through the board's mvm" in demo.output
    check = CliRunner().invoke(
        app,
        [
            "gradcheck",
            "--device",
            board,
            "--sizes",
            "64,16,10",
            "--batch",
            "8",
            "--betas",
            "0.01",
            "--no-progress",
        ],
    )
    assert check.exit_code == 0, check.output
    assert "settles on the host" in check.output
    forced = CliRunner().invoke(app, ["demo", "--device", board, "--settle", "board"])
    assert forced.exit_code == 2 and "settle='host'" in forced.output


@pytest.mark.parametrize("variant", ["tdh-vae", "h-vae"])
def test_vae_on_an_mvm_only_ideal_board_trains_as_with_the_board_settle(variant: str) -> None:
    """The VAE family runs unchanged on a board that only multiplies: on the ideal preset the
    host-iterated settles reach the board's fixed points, so a short training ends where the
    board settle's does (dense and layered networks)."""
    from hil.config import load_into
    from hil.vae.config import VAERunConfig
    from hil.vae.train import train_vae

    small = [
        "train.epochs=1",
        "data.limit_train=192",
        "data.limit_test=64",
        "eval.samples=64",
        "eval.eps_draws=1",
    ]
    results = {}
    for board in ("", f"&{MVM_ONLY}"):
        cfg = load_into(VAERunConfig(), None, [*small, f"model.variant={variant}", f"device={IDEAL}{board}"])
        results[board] = train_vae(cfg, progress=False)
    board, host = results[""], results[f"&{MVM_ONLY}"]
    assert host.final.neg_elbo == pytest.approx(board.final.neg_elbo, rel=1e-3)
    assert host.final.neg_elbo < host.initial.neg_elbo  # it learned


def test_a_host_settle_larger_than_max_batch_is_split_into_requests() -> None:
    """1500 samples on a board that takes at most 1024 per request: the products go in two
    requests each, and the states equal two settles of the halves (a deterministic board)."""
    from drivers import SettleBudget, Topology, open_device
    from hil.host_settle import HostSettle

    dev = open_device("emulator://?preset=ideal&seed=0&capabilities=mvm")
    t = Topology.layered([6, 5, 3], budget=SettleBudget(max_steps=20, tol=0.0))
    dev.configure(t)
    for tile in ("W0", "W1"):
        rows, cols = t.tile_shape(tile)
        g = np.random.default_rng(len(tile)).uniform(2e-6, 8e-6, (2, rows, cols)).astype(np.float32)
        dev.program(tile, g[0], g[1])
    assert dev.info.limits.max_batch == 1024
    x = np.random.default_rng(3).random((1500, 6), dtype=np.float32)
    hs = HostSettle(dev)
    whole = hs({"s0": x})
    # every product in two requests: the clamped one once, two per step for 20 steps
    assert hs.stats.mvm_calls == 2 * (1 + 20 * 2)
    parts = [hs({"s0": x[:750]}).states["s2"], hs({"s0": x[750:]}).states["s2"]]
    assert np.allclose(whole.states["s2"], np.concatenate(parts), atol=1e-6)


def _mvm_board(state_top: float) -> EmulatedDevice:
    """An MVM-only rram board whose read-voltage limit allows states up to `state_top` (its
    state range and v_read_max = state_top x v_read; a URI cannot set a state range)."""
    preset = get_preset("rram")
    per = preset.periphery
    per = replace(per, state_range=(0.0, state_top), v_read_max=state_top * per.v_read)
    return EmulatedDevice(Board(replace(preset, periphery=per), 0), capabilities={"mvm", "program_verify"})


def test_a_board_that_refuses_states_of_1_is_refused_before_the_first_settle() -> None:
    """The host-iterated settle sends states up to 1.0 and the bias 1.0 as mvm inputs; a board
    with clamp_max 0.5 passed the block's construction and refused the first settle's first
    product (LimitViolation mid-training). Now the construction says so, naming the fix."""
    dev = _mvm_board(0.5)
    assert dev.info.limits.clamp_max == 0.5
    with pytest.raises(LimitViolation) as info:
        EBBlock.layered(dev, [4, 3, 2])
    text = str(info.value)
    assert "host-iterated settle's mvm inputs" in text and "clamp_max 0.5" in text, text
    assert "declare v_read as the read voltage of state 1.0" in text, text
    with pytest.raises(LimitViolation, match=r"clamp_max 0\.5"):
        HostSettle(dev)
    blk = EBBlock.layered(_mvm_board(1.0), [4, 3, 2])  # states of 1.0 allowed: it settles
    assert blk.free(np.full((2, 4), 0.5, np.float32)).states["s2"].shape == (2, 2)
