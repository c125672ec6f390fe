"""Config values that set an amount of work have a declared bound and a clear error through
the real CLI (the safety audit of 2026-12-07): a negative image limit was taken as a slice's
end (every image but the last N, with no word) and a negative evaluation interval evaluated
every epoch, and a negative ce logit scale (ep.tau) trained toward the wrong classes."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from hil.cli import app


@pytest.mark.parametrize(
    ("command", "setting", "named"),
    [
        ("classifier", "data.limit_train=-5", "data.limit_train"),
        ("classifier", "data.limit_test=-1", "data.limit_test"),
        ("classifier", "ep.tau=-6", "ep.tau"),
        ("classifier", "ep.tau=0", "ep.tau"),
        ("classifier", "ep.tau=1e9", "ep.tau"),
        ("classifier", "train.momentum=1.0", "train.momentum"),
        ("classifier", "train.lr_digital=0", "train.lr_digital"),
        ("vae", "data.limit_train=-1000", "data.limit_train"),
        ("vae", "data.limit_test=-3", "data.limit_test"),
        ("vae", "eval.every=-1", "eval.every"),
        ("vae", "model.lv_max=1000", "model.lv_max"),
        ("vae", "model.lv_min=-1000", "model.lv_min"),
        ("vae", "model.mu_scale=1e30", "model.mu_scale"),
        ("vae", "likelihood.sigma=1e-300", "likelihood.sigma"),
        ("vae", "eval.eps_draws=100000000", "eval.eps_draws"),
        ("vae", "eval.samples=1000000000", "eval.samples"),
        ("classifier", "ep.free_steps=1000000000", "ep.free_steps"),
        ("classifier", "ep.nudge_steps=100001", "ep.nudge_steps"),
        ("vae", "ep.steps=1000000000", "ep.steps"),
        ("classifier", "model.gain=0", "model.gain"),
        ("classifier", "model.gain=-1", "model.gain"),
        ("classifier", "model.w_max=-2", "model.w_max"),
        ("vae", "model.gain=-0.5", "model.gain"),
        ("vae", "model.w_max=0", "model.w_max"),
    ],
)
def test_a_count_past_its_bound_is_refused_before_the_run_starts(
    tmp_path: Path, command: str, setting: str, named: str
) -> None:
    out = tmp_path / "run"
    args = ["train", command, "--out", str(out), "--set", "train.epochs=1", "--set", setting, "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert named in result.output
    assert not (out / "run.zarr").exists()  # refused before anything was trained or written


@pytest.mark.parametrize(
    "setting", ["data.limit_train=0", "eval.every=0", "eval.eps_draws=1", "ep.steps=100000"]
)
def test_the_bounds_keep_what_ran_before(setting: str) -> None:
    from hil.config import load_into
    from hil.vae.config import VAERunConfig, validate_vae

    validate_vae(load_into(VAERunConfig(), None, [setting]))
