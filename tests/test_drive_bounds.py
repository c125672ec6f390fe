"""The nudge current a run injects is checked against the board's declared `max_drive` as the
board opens, before anything is programmed and before the run log exists.

The safety audit: `hil train classifier` (ce loss: the nudge injects beta x tau (softmax -
onehot), up to ep.beta x ep.tau = 1.2 by default) and `hil train vae` (the grad scaled to a
peak of 1: it injects ep.beta) on a board declaring max_drive 0.01 programmed every tile,
created the run log and were refused at the first nudge ("injected nudge current |beta *
grad| ... exceeded"), leaving a run log with no snapshot. The boards are served over TCP
(pyvisa-py SCPI).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hil.cli import app
from hil.testing import BoardServers

SMALL = ["--set", "train.epochs=1", "--set", "data.limit_train=32", "--set", "data.limit_test=16"]


@pytest.mark.parametrize(
    ("trainer", "board", "message"),
    [
        ("classifier", "preset=ideal&seed=0&max_drive=0.01", "ep.beta x ep.tau = 1.2 "),
        ("vae", "preset=ideal&seed=0&max_drive=0.01", "ep.beta = 0.2 "),
    ],
)
def test_a_nudge_current_past_max_drive_is_refused_before_programming_and_the_run_log(
    tmp_path: Path, emulated_board: Callable[..., BoardServers], trainer: str, board: str, message: str
) -> None:
    served = emulated_board(f"emulator://?{board}")
    uri = served.uri("visa-tcp")
    out = tmp_path / "run"
    res = CliRunner().invoke(
        app, ["train", trainer, "--set", f"device={uri}", *SMALL, "--out", str(out), "--no-progress"]
    )
    assert res.exit_code != 0, res.output
    assert message in res.output and "declares max_drive 0.01" in res.output, res.output
    assert not out.exists()  # no run log
    assert served.device.topology is None  # nothing configured, so nothing programmed
    assert served.device.safety().refused == 0


def test_a_ce_run_within_max_drive_trains(
    tmp_path: Path, emulated_board: Callable[..., BoardServers]
) -> None:
    """ep.beta x ep.tau at the bound (0.2 x 6 = 1.2) runs on a board declaring 1.2."""
    served = emulated_board("emulator://?preset=ideal&seed=0&max_drive=1.2")
    out = tmp_path / "run"
    args = ["train", "classifier", "--set", f"device={served.uri('visa-tcp')}", *SMALL]
    res = CliRunner().invoke(
        app, [*args, "--set", "model.sizes=[64,8,10]", "--out", str(out), "--no-progress"]
    )
    assert res.exit_code == 0, res.output
    assert served.device.safety().refused == 0


def test_a_sweep_of_ep_beta_past_max_drive_through_the_ce_loss_is_refused(
    tmp_path: Path, emulated_board: Callable[..., BoardServers]
) -> None:
    served = emulated_board("emulator://?preset=ideal&seed=0&max_drive=1.2")
    spec = tmp_path / "s.toml"
    spec.write_text(
        '[sweep]\ntrainer = "classifier"\nobjective = "train_acc"\nn_trials = 1\n\n[base]\n'
        "model.sizes = [64, 8, 10]\ntrain.epochs = 1\ndata.limit_train = 32\ndata.limit_test = 16\n\n"
        '[space."ep.beta"]\ntype = "float"\nlow = 0.05\nhigh = 0.5\n'
    )
    out = tmp_path / "sweep"
    res = CliRunner().invoke(app, ["sweep", str(spec), "--out", str(out), "--board", served.uri("visa-tcp")])
    assert res.exit_code == 2, res.output
    assert "space.ep.beta: the value 0.5 makes ep.beta x ep.tau = 3, past the board's declared max_drive" in (
        res.output
    )
    assert not out.exists()
