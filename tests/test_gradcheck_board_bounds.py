"""`hil gradcheck` on an emulated board that declares a chip's tight bounds (small tiles, a
short settle budget): it runs within them, or stops naming the option to change."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from hil.cli import app

ARGS = ["gradcheck", "--betas", "0.01", "--batch", "8", "--no-progress", "--min-cosine", "-1"]


def test_a_layer_wider_than_the_boards_tiles_is_placed_on_several_tiles() -> None:
    """64-40-10 on 32 x 32 tiles: W0 (65 x 40) spans 3 x 2 tiles. Before, the check opened the
    board bare and stopped with 'open the board with hil.boards.open_board(uri)' (an internal);
    now it places the layer as `hil train` does and checks its gradients."""
    uri = "emulator://?preset=ideal&seed=0&tile_rows_max=32&tile_cols_max=32"
    res = CliRunner().invoke(app, [*ARGS, "--uri", uri, "--sizes", "64,40,10"])
    assert res.exit_code == 0, res.output
    assert "layered 64-40-10" in res.output
    assert "centered" in res.output


def test_the_checks_settle_budget_stays_within_the_boards_max_settle_steps() -> None:
    """The check settles with up to 20000 steps to tol 1e-7; a board declaring
    max_settle_steps=200 refused that at configure, naming SettleBudget.max_steps (nothing a
    user of the command can set). Now each settle takes at most the board's 200 steps, on a
    settling board and through the host's settle on one that only multiplies, and says so."""
    for caps in ("", "&capabilities=mvm,pulse,program_verify"):
        uri = f"emulator://?preset=ideal&seed=0&max_settle_steps=200{caps}"
        res = CliRunner().invoke(app, [*ARGS, "--uri", uri, "--sizes", "64,12,10"])
        assert res.exit_code == 0, res.output
        assert "at most 200 steps a settle (the board's max_settle_steps)" in res.output
        assert "SettleBudget" not in res.output


def test_betas_past_the_boards_max_beta_are_refused_naming_the_option_before_programming() -> None:
    """The default --betas 0.1,0.01,0.001 on a board declaring max_beta=0.05 ran the free phase
    and was then refused at the first nudged settle as "|beta| of the nudge on 's2'" (a group,
    not the option)."""
    uri = "emulator://?preset=ideal&seed=0&max_beta=0.05"
    res = CliRunner().invoke(
        app, ["gradcheck", "--batch", "8", "--no-progress", "--uri", uri, "--sizes", "64,12,10"]
    )
    assert res.exit_code == 2
    assert "--betas 0.1,0.01,0.001: 0.1 is past the max_beta 0.05" in res.output
    assert "pass --betas of at most 0.05" in res.output
    assert "free phase" not in res.output  # refused before the network was programmed and settled


def test_a_ce_nudge_current_past_max_drive_is_refused_naming_betas_and_tau(emulated_board) -> None:  # type: ignore[no-untyped-def]
    """--loss ce injects beta x tau (softmax - onehot), up to beta x tau: on a board declaring
    max_drive 0.05 the default --betas 0.1,... ran the free phase and was refused at the first
    nudge as "injected nudge current |beta * grad| on 's2'" (a group, not an option). Served
    over TCP (pyvisa-py SCPI)."""
    served = emulated_board("emulator://?preset=ideal&seed=0&max_drive=0.05")
    uri = served.uri("visa-tcp")
    base = ["gradcheck", "--batch", "8", "--no-progress", "--uri", uri, "--sizes", "64,12,10", "--loss", "ce"]
    res = CliRunner().invoke(app, base)
    assert res.exit_code == 2, res.output
    assert "--betas 0.1,0.01,0.001 with --loss ce --tau 6: the nudge injects a current of up to" in res.output
    assert "pass --betas of at most 0.008333 or --tau of at most 0.5" in res.output
    assert "free phase" not in res.output
    assert served.device.topology is None and served.device.safety().refused == 0
    res = CliRunner().invoke(app, [*base, "--betas", "0.008,0.001", "--min-cosine", "-1"])
    assert res.exit_code == 0, res.output
    assert served.device.safety().refused == 0


@pytest.mark.parametrize("dense", [False, True], ids=["layered", "dense"])
def test_a_board_of_a_narrower_gain_or_weight_scale_is_checked_within_it(emulated_board, dense: bool) -> None:  # type: ignore[no-untyped-def]
    """The checked network had gain 1 and w_max 1: on a board declaring max_gain 0.5 (or
    max_w_max 0.5) its configure was refused naming 'Topology.gain' (or a coupling's w_max),
    no option of the command. It now runs at the board's bound, and the reference (which takes
    both from the topology) agrees. Served over pyvisa-py SCPI/TCP."""
    for bound in ("max_gain=0.5", "max_w_max=0.5"):
        served = emulated_board(f"emulator://?preset=ideal&seed=0&{bound}")
        args = [*ARGS, "--uri", served.uri("visa-tcp"), "--sizes", "64,12,10", "--min-cosine", "0.99"]
        res = CliRunner().invoke(app, [*args, *(["--dense"] if dense else [])])
        assert res.exit_code == 0, res.output
        assert "check    PASS" in res.output
        assert served.device.safety().refused == 0


def test_an_output_layer_other_than_the_digits_classes_is_refused_naming_sizes() -> None:
    """--sizes 64,8,4 ended in a traceback ('Class values must be smaller than num_classes')."""
    res = CliRunner().invoke(app, [*ARGS, "--sizes", "64,8,4"])
    assert res.exit_code == 2, res.output
    assert "--sizes: the last size must be 10 (the digits' classes), got '64,8,4'" in res.output
