"""What `hil sweep` prints about its trials: a count of one said as "1 trial", and a failed
trial's line that says the error and where its full traceback is (trials/NNNN/error.txt in the
sweep folder), not an internal file:line of the code that raised it."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from hil.cli import app

# one trial that fails at once: its data set is missing (no board work)
FAILS = (
    '[sweep]\nn_trials = 1\n[base]\ndata.root = "/nonexistent"\n'
    '[space."data.name"]\ntype = "categorical"\nchoices = ["mnist"]\n'
)


def _sweep(tmp_path: Path) -> tuple[str, Path]:
    spec = tmp_path / "fails.toml"
    spec.write_text(FAILS)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["sweep", str(spec), "--out", str(out)])
    assert res.exit_code == 1, res.output
    return res.output, out


def test_one_trial_is_counted_as_one_trial(tmp_path: Path) -> None:
    output, _ = _sweep(tmp_path)
    assert "1 trials" not in output, output
    assert "sweep fails: 1 trial of the classifier trainer" in output
    assert "summary.json (1 trial, 1 failed)" in output


def test_a_failed_trial_says_its_error_and_where_its_traceback_is(tmp_path: Path) -> None:
    output, out = _sweep(tmp_path)
    [line] = [x for x in output.splitlines() if "FAILED" in x]
    assert "FAILED DataError: mnist: missing" in line
    head, _, params = line.rpartition("  ")
    assert params == "data.name=mnist", line
    assert head.endswith("(traceback: trials/0000/error.txt)"), line
    assert ".py:" not in line, line  # no internal file:line
    text = (out / "trials" / "0000" / "error.txt").read_text()
    assert text.startswith("Traceback (most recent call last):") and "DataError: mnist: missing" in text
    [trial] = json.loads((out / "summary.json").read_text())["trials"]
    assert trial["error"].endswith("(traceback: trials/0000/error.txt)"), trial["error"]
