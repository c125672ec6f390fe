"""`hil train vae`: the main job's command, its run log, pictures and resume."""

from __future__ import annotations

from pathlib import Path

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


def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    """Deterministic ideal preset: a run that dies after its first epoch's snapshot and is
    resumed ends with the metrics of a run that never stopped."""
    from hil.config import load_into
    from hil.runlog import RunLog

    cfg = load_into(VAERunConfig(), None, [*SMALL, "train.epochs=2"])

    class Crash(RuntimeError):
        pass

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
