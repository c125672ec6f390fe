"""`hil plot RUN`'s help said its PNGs go to "RUN without .zarr, + '-plots'": for the run folder
the README gives it (`hil plot runs/tdh-vae`) that reads as runs/tdh-vae-plots, but they go
inside the folder, to runs/tdh-vae/run-plots (the store run.zarr's name, + '-plots'). The help
now says where each kind of RUN puts them; both defaults are checked here."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from hil.cli import app
from hil.runlog import RunLog


def _run_log(path: Path) -> None:
    with RunLog.create(path, {"sizes": [4, 3]}) as log:
        for step in range(3):
            log.metrics("train", step=step, epoch=step, loss=1.0 / (step + 1))


def test_the_help_says_where_the_pngs_of_each_kind_of_run_go() -> None:
    result = CliRunner().invoke(app, ["plot", "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert "RUN/run-plots for a run folder RUN" in result.output
    assert "runs/NAME-plots for a store runs/NAME.zarr" in result.output


@pytest.mark.parametrize(
    ("store", "given", "plots"),
    [
        ("tdh-vae/run.zarr", "tdh-vae", "tdh-vae/run-plots"),  # a run folder, as hil train vae writes
        ("classifier-1.zarr", "classifier-1.zarr", "classifier-1-plots"),  # a store, as hil train classifier
    ],
)
def test_the_default_out_is_what_the_help_says(tmp_path: Path, store: str, given: str, plots: str) -> None:
    _run_log(tmp_path / store)
    result = CliRunner().invoke(app, ["plot", str(tmp_path / given)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / plots / "loss.png").is_file(), result.output
    assert not (tmp_path / "tdh-vae-plots").exists()
