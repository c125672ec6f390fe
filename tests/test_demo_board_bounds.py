"""`hil demo` on emulated boards that declare a chip's tight bounds: it runs within them, or
stops before programming anything, naming the option to change."""

from __future__ import annotations

from typer.testing import CliRunner

from hil.cli import app

MVM_ONLY = "&capabilities=mvm,pulse,program_verify"


def _demo(uri: str, *args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(app, ["demo", "--uri", uri, "--sizes", "64,40,10", "--batch", "8", *args])


def test_a_layer_wider_than_the_boards_tiles_is_placed_on_several_tiles() -> None:
    """Before, the demo opened the board bare and stopped at configure with 'open the board with
    hil.boards.open_board(uri)' (an internal); now it places the layer as `hil train` does."""
    for caps in ("", MVM_ONLY):
        res = _demo(f"emulator://?preset=ideal&seed=0&tile_rows_max=32&tile_cols_max=32{caps}")
        assert res.exit_code == 0, res.output
        assert "safety    0 refused requests, 0 limit violations" in res.output, res.output


def test_the_demos_settle_budget_stays_within_the_boards_max_settle_steps() -> None:
    """The demo settles with up to 200 steps; a board declaring max_settle_steps=100 refused
    that at configure, naming SettleBudget.max_steps (the demo has no option for it)."""
    for caps in ("", MVM_ONLY):
        res = _demo(f"emulator://?preset=ideal&seed=0&max_settle_steps=100{caps}")
        assert res.exit_code == 0, res.output
        assert "SettleBudget" not in res.output
        assert "safety    0 refused requests, 0 limit violations" in res.output, res.output


def test_a_batch_or_beta_past_the_board_is_refused_naming_the_option_before_programming() -> None:
    """--batch past max_batch was refused at the first settle, after the network was programmed,
    as 'batch size of clamp 's0' exceeded' (naming a group, not the option); --beta past
    max_beta only at the first nudged settle."""
    res = _demo("emulator://?preset=ideal&seed=0&max_batch=4")
    assert res.exit_code != 0
    assert "--batch 8" in res.output and "max_batch 4" in res.output and "--batch 4 or fewer" in res.output
    assert "program" not in res.output.split("error:")[0]  # nothing printed before the refusal
    res = _demo("emulator://?preset=ideal&seed=0&max_beta=0.1", "--beta", "0.2")
    assert res.exit_code != 0
    assert "--beta 0.2" in res.output and "max_beta 0.1" in res.output and "--beta 0.1 or less" in res.output


def test_a_board_of_a_narrower_gain_or_weight_scale_runs_within_it(emulated_board) -> None:  # type: ignore[no-untyped-def]
    """The demo's network had gain 1 and w_max 1: a board declaring max_gain 0.5 (or max_w_max
    0.5) refused its configure naming 'Topology.gain' (or a coupling's w_max), nothing the demo
    lets a user set. It now runs at the board's bound (served over pyvisa-py SCPI/TCP)."""
    for bound in ("max_gain=0.5", "max_w_max=0.5"):
        served = emulated_board(f"emulator://?preset=ideal&seed=0&{bound}")
        res = _demo(served.uri("visa-tcp"))
        assert res.exit_code == 0, res.output
        assert "safety    0 refused requests, 0 limit violations" in res.output, res.output
        assert served.device.safety().refused == 0
