"""`hil sweep` checks its search space against what the trials' board declares, before any
trial runs.

The safety audit: a space of ``ep.beta`` up to 1 on a board declaring ``max_beta 0.5`` ran
every trial, each refused as its board opened (`hil.boards.check_within_board`), one failed
trial after another, a run folder each, and a sweep of failed trials (exit 1). Now the sweep is
refused first (exit 2, no sweep folder), naming the space key, its end, the bound and the value
to set. The board is served over TCP (pyvisa-py SCPI) and given by --board, as a lab sweep
names its board.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hil.cli import app
from hil.testing import BoardServers

BOARD = "emulator://?preset=ideal&seed=0&max_beta=0.5&max_gain=2&max_settle_steps=40"

SPEC = """
[sweep]
trainer = "classifier"
objective = "val_acc"
n_trials = 2
batch = 1
seed = 0
sampler = "random"

[base]
device = "emulator://?preset=ideal&seed=0"
model.sizes = [64, 8, 10]
train.epochs = 1
train.batch_size = 32
data.limit_train = 100
data.limit_test = 50
data.validation = 30
ep.free_steps = 20
ep.nudge_steps = 10
{base}
[space.{key}]
{entry}
"""


def _sweep(tmp_path: Path, uri: str, key: str, entry: str, base: str = "") -> tuple[int, str, Path]:
    spec = tmp_path / "s.toml"
    spec.write_text(SPEC.format(key=key, entry=entry, base=base))
    out = tmp_path / "sweep"
    res = CliRunner().invoke(app, ["sweep", str(spec), "--out", str(out), "--board", uri])
    return res.exit_code, res.output, out


@pytest.mark.parametrize(
    ("key", "entry", "base", "message"),
    [
        (
            '"ep.beta"',
            'type = "float"\nlow = 0.1\nhigh = 1.0',
            "",
            "space.ep.beta: high = 1.0 is past the board's declared max_beta 0.5 ",
        ),
        (
            '"ep.beta"',
            'type = "float"\nlow = 0.6\nhigh = 1.0',
            "",
            "space.ep.beta: the whole range [0.6, 1.0] is past the board's declared max_beta 0.5 ",
        ),
        (
            '"model.gain"',
            'type = "categorical"\nchoices = [1.0, 4.0]',
            "",
            "space.model.gain: the choice 4.0 is past the board's declared max_gain 2 ",
        ),
        (
            '"ep.free_steps"',
            'type = "int"\nlow = 10\nhigh = 80',
            "",
            "space.ep.free_steps: high = 80 is past the board's declared max_settle_steps 40 ",
        ),
        (
            '"train.lr"',
            'type = "float"\nlow = 0.01\nhigh = 0.1',
            "ep.beta = 0.8",
            "base.ep.beta: 0.8 is past the board's declared max_beta 0.5 ",
        ),
    ],
    ids=["beta-high", "beta-range", "gain-choice", "steps-high", "base"],
)
def test_a_space_past_the_boards_bounds_is_refused_before_any_trial(
    tmp_path: Path,
    emulated_board: Callable[..., BoardServers],
    key: str,
    entry: str,
    base: str,
    message: str,
) -> None:
    served = emulated_board(BOARD)
    uri = served.uri("visa-tcp")
    code, output, out = _sweep(tmp_path, uri, key, entry, base)
    assert code == 2, output
    assert message in output
    assert ("at most" in output or "drop the choices above" in output) and "hil info" in output
    assert not out.exists()  # refused before the sweep folder and any trial's run log
    assert served.device.safety().refused == 0  # nothing reached the board


def test_a_space_within_the_boards_bounds_runs(
    tmp_path: Path, emulated_board: Callable[..., BoardServers]
) -> None:
    served = emulated_board(BOARD)
    code, output, _ = _sweep(
        tmp_path, served.uri("visa-tcp"), '"ep.beta"', 'type = "float"\nlow = 0.1\nhigh = 0.5'
    )
    assert code == 0, output
    assert "FAILED" not in output


def test_on_ray_the_space_is_checked_against_what_each_actors_board_declared(
    tmp_path: Path, emulated_board: Callable[..., BoardServers]
) -> None:
    """With --ray-address the boards open on their hosts only, and the check above did not
    run: every trial past a bound failed on its actor. Each actor now reports what its board
    declared as it opened, and the sweep is refused before its first trial."""
    pytest.importorskip("ray")
    served = emulated_board(BOARD)
    spec = tmp_path / "s.toml"
    spec.write_text(SPEC.format(key='"ep.beta"', entry='type = "float"\nlow = 0.1\nhigh = 1.0', base=""))
    out = tmp_path / "sweep"
    args = ["sweep", str(spec), "--out", str(out), "--ray-address", "local"]
    res = CliRunner().invoke(app, [*args, "--board", f"a={served.uri('visa-tcp')}"])
    assert res.exit_code == 2, res.output
    assert "space.ep.beta: high = 1.0 is past the board's declared max_beta 0.5 " in res.output
    assert "(board a)" in res.output
    assert not out.exists()
