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
