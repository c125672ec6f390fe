"""`hil train vae --out DIR`: the run went to DIR, but its run log's config (and --show-config)
said `out = "runs"`, the default folder the run did not go under. The recorded config now says
where the run went: DIR's parent (`out` is the folder the run folder goes under)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from typer.testing import CliRunner

from hil.cli import app
from hil.runlog import open_run

SMALL = (
    "data.limit_train=96",
    "data.limit_test=48",
    "eval.samples=48",
    "eval.eps_draws=1",
    "model.hidden=16",
    "train.epochs=1",
)


def _args(out: Path, *extra: str) -> list[str]:
    sets = [a for s in SMALL for a in ("--set", s)]
    return ["train", "vae", "--model", "f-vae", "--out", str(out), "--no-progress", *sets, *extra]


def test_the_run_logs_config_says_where_the_run_went(tmp_path: Path) -> None:
    out = tmp_path / "lab" / "myrun"
    result = CliRunner().invoke(app, _args(out))
    assert result.exit_code == 0, result.output
    config = open_run(out / "run.zarr").attrs["config"]
    assert config["out"] == str(tmp_path / "lab"), config["out"]


def test_show_config_with_out_prints_the_config_the_run_would_record(tmp_path: Path) -> None:
    out = tmp_path / "lab" / "myrun"
    result = CliRunner().invoke(app, _args(out, "--show-config"))
    assert result.exit_code == 0, result.output
    assert tomllib.loads(result.output)["out"] == str(tmp_path / "lab")
    assert not out.exists()
