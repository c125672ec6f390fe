"""`hil train vae`: the main job's command, its run log, pictures and resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from hil.cli import app
from hil.runlog import open_for_resume, open_run
from hil.vae.config import VAERunConfig
from hil.vae.train import train_vae

SMALL = [
    "data.limit_train=96",
    "data.limit_test=48",
    "eval.samples=48",
    "eval.eps_draws=1",
    "model.hidden=16",
]


def _args(*sets: str) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def test_train_vae_on_a_board_that_does_not_settle_says_it_settles_on_the_host(tmp_path: Path) -> None:
    board = "emulator://?preset=rram&seed=0&capabilities=mvm,pulse,program_verify"
    out = tmp_path / "mvm"
    args = [
        "train",
        "vae",
        "--out",
        str(out),
        "--no-progress",
        *_args(*SMALL, "train.epochs=1", f"device={board}"),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"({board}); settles on the host" in result.output
    assert open_run(out / "run.zarr").attrs["resolved"]["ep.settle"] == "host"


def test_train_vae_prints_cells_and_writes_run_log_and_pictures(tmp_path: Path) -> None:
    out = tmp_path / "tdh"
    result = CliRunner().invoke(
        app,
        [
            "train",
            "vae",
            "--model",
            "tdh-vae",
            "--out",
            str(out),
            "--no-progress",
            *_args(*SMALL, "train.epochs=2"),
        ],
    )
    assert result.exit_code == 0, result.output
    text = result.output
    n = (64 + 16 + 8 + 1) * (64 + 16 + 8)
    assert f"TDH-VAE {n}, DH-VAE {2 * n}" in text
    assert "test -ELBO" in text and "Frechet" in text and "converged" in text
    assert (out / "samples.png").stat().st_size > 1000 and (out / "reconstructions.png").stat().st_size > 1000
    run = open_run(out / "run.zarr")
    assert run.attrs["status"] == "complete" and run.attrs["config"]["model"]["variant"] == "tdh-vae"
    # the config keeps "auto"; the run records and prints what it became for this variant
    assert run.attrs["config"]["model"]["activation"] == "auto"
    assert run.attrs["resolved"] == {
        "model.activation": "hard_sigmoid",
        "model.init": "gaussian",
        "model.init_bias": "mid",
        "ep.settle": "board",
    }
    assert "crossbar cells, hard_sigmoid neuron" in text and "; settles on the board" in text
    # every step's settle steps, split between the encoding and the decoding settles
    train = run.table("metrics/train")
    assert len(train["settle_steps"]) == 2 * 96 // 32
    assert (train["encoder_steps"] > 0).all() and (train["decoder_steps"] > 0).all()
    np.testing.assert_array_equal(train["encoder_steps"] + train["decoder_steps"], train["settle_steps"])
    # two sub-second epochs, the default log.snapshot_every_s (10 s): the last epoch's snapshot only
    assert [run.snapshot_attrs(name)["step"] for name in run.snapshots] == [2 * 96 // 32]
    assert run.attrs["log"]["snapshot_every_s"] == 10.0
    root = zarr.open_group(str(out / "run.zarr"), mode="r")
    assert "metrics" in root and "traces" in root
    # a second run into the same folder is refused without --overwrite
    again = CliRunner().invoke(app, ["train", "vae", "--out", str(out), *_args(*SMALL, "train.epochs=1")])
    assert again.exit_code == 2 and "already exists" in again.output


def test_bad_config_names_the_key(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["train", "vae", "--out", str(tmp_path / "x"), "--set", "model.hiden=3"])
    assert result.exit_code == 2 and "model.hiden" in result.output
    result = CliRunner().invoke(app, ["train", "vae", "--out", str(tmp_path / "y"), "--model", "vae-9000"])
    assert result.exit_code == 2 and "model.variant" in result.output
    # the classifier's validation split is not something this trainer has: refused, not ignored
    result = CliRunner().invoke(
        app, ["train", "vae", "--out", str(tmp_path / "z"), "--set", "data.validation=50"]
    )
    assert (
        result.exit_code == 2
        and "data.validation: the VAE trainer holds out no validation split" in result.output
    )


def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    """Deterministic ideal preset: a run that dies after its first epoch's snapshot and is
    resumed ends with the metrics of a run that never stopped."""
    from hil.config import load_into
    from hil.runlog import RunLog

    cfg = load_into(VAERunConfig(), None, [*SMALL, "train.epochs=2", "log.snapshot_every_s=0"])

    class Crash(RuntimeError):
        """The failure the test injects after the first epoch."""

    def crash(epoch: int, row: dict) -> None:
        if epoch == 0:
            raise Crash("simulated crash after epoch 1")

    path = tmp_path / "run.zarr"
    with pytest.raises(Crash), RunLog.create(path, cfg) as log:
        train_vae(cfg, progress=False, log=log, on_epoch=crash)
    assert open_run(path).attrs["status"] == "failed"
    log, state = open_for_resume(path)
    assert state is not None
    with log:
        resumed = train_vae(cfg, progress=False, log=log, state=state)
    straight = train_vae(cfg, progress=False)
    assert resumed.final.neg_elbo == pytest.approx(straight.final.neg_elbo, abs=1e-6)
    assert resumed.final.frechet == pytest.approx(straight.final.frechet, abs=1e-6)


def _final_elbo(output: str) -> float:
    line = next(x for x in output.splitlines() if x.startswith("test -ELBO"))
    return float(line.split()[2])


def test_sigkill_mid_run_then_resume_matches_uninterrupted(tmp_path: Path) -> None:
    """`hil train vae` killed with SIGKILL after its first epoch snapshot leaves a store that
    opens; `--resume` finishes it with the final metrics of an uninterrupted run. A snapshot at
    every epoch (the default waits 10 s between them, longer than this whole run, so its one
    snapshot came after the last epoch and the kill landed in the final evaluation): the kill
    comes before the last epoch's snapshot, and the resume trains the rest."""
    import os
    import signal
    import subprocess
    import sys
    import time

    sets = _args(*SMALL, "train.epochs=12", "log.snapshot_every_s=0")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "hil.cli.__main__", "train", "vae", "--no-progress"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "--out", str(killed), *sets], env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            if open_run(killed / "run.zarr").snapshots:
                break
        except Exception:  # the store is being created
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = open_run(killed / "run.zarr")
    assert run.attrs["status"] == "running" and len(run.snapshots) >= 1  # died mid-run
    killed_at = run.snapshot_attrs(run.snapshots[-1])["step"]
    resumed = subprocess.run([*cmd, "--resume", str(killed)], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    straight = subprocess.run(
        [*cmd, "--out", str(tmp_path / "straight"), *sets], env=env, capture_output=True, text=True
    )
    assert straight.returncode == 0, straight.stderr
    assert _final_elbo(resumed.stdout) == pytest.approx(_final_elbo(straight.stdout), abs=1e-3)
    done, ref = open_run(killed / "run.zarr"), open_run(tmp_path / "straight" / "run.zarr")
    assert done.attrs["status"] == "complete"
    assert killed_at < ref.snapshot_attrs(ref.snapshots[-1])["step"]  # before the last epoch's snapshot
    a, b = done.table("metrics/test"), ref.table("metrics/test")
    for key in ("neg_elbo", "frechet", "recon_mse"):
        assert abs(float(a[key][-1]) - float(b[key][-1])) <= 1e-6, key


def test_the_shared_layered_net_gets_the_logistic_by_default(tmp_path: Path) -> None:
    """`model.activation = "auto"`: the logistic for the shared layered net (docs/vae.md), which
    the run records, the summary prints and `hil inspect` shows; an explicit curve wins."""
    out = tmp_path / "sl"
    args = ["train", "vae", "--model", "shared-layered", "--no-progress", *_args(*SMALL, "train.epochs=1")]
    result = CliRunner().invoke(app, [*args[:4], "--out", str(out), *args[4:]])
    assert result.exit_code == 0, result.output
    assert "crossbar cells, logistic neuron" in result.output
    assert open_run(out / "run.zarr").attrs["resolved"]["model.activation"] == "logistic"
    shown = CliRunner().invoke(app, ["inspect", str(out)])
    assert "model.activation = logistic" in shown.output
    hard = tmp_path / "hard"
    result = CliRunner().invoke(
        app, [*args[:4], "--out", str(hard), *args[4:], "--set", "model.activation=hard_sigmoid"]
    )
    assert result.exit_code == 0, result.output
    assert open_run(hard / "run.zarr").attrs["resolved"]["model.activation"] == "hard_sigmoid"


def test_the_digital_baseline_prints_no_board_and_no_settle(tmp_path) -> None:
    """F-VAE has no board: it printed 'device digital (no device) (emulator://...)' and a settle
    line of 0 J, 100 % converged (the VAE audit)."""
    from typer.testing import CliRunner

    from hil.cli import app

    sets = ["train.epochs=1", "data.limit_train=32", "data.limit_test=32", "eval.samples=32"]
    res = CliRunner().invoke(
        app, ["train", "vae", "--model", "f-vae", "--out", str(tmp_path / "f"), "--no-progress",
              *[a for s in sets for a in ("--set", s)]],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "device       none (f-vae is digital" in res.output
    assert "emulator://" not in res.output and "settle " not in res.output
