"""`hil emulator serve`'s fault options are refused by their own names: --reset-rate 1.5 said
"fault rate p_reset must be in [0, 1]" and --late-ms -5 "delay_s must be a finite number of
seconds >= 0", the fault plan's field names, not the options typed (and only after the board
had opened). The rates now take [0, 1] and the delays >= 0 as option ranges (shown in --help),
and a value no range catches (inf) names its option too. --scpi-port -1 serves nothing, so the
old code's acceptance would end in "nothing to serve", never in a server."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from hil.cli import app


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--reset-rate", "1.5"),
        ("--ber", "-1"),
        ("--close-rate", "2"),
        ("--corrupt-rate", "1.01"),
        ("--late-ms", "-5"),
        ("--delay-ms", "inf"),
        ("--late-ms", "nan"),
    ],
)
def test_a_fault_option_out_of_range_is_refused_by_its_name(option: str, value: str) -> None:
    result = CliRunner().invoke(app, ["emulator", "serve", "--scpi-port", "-1", option, value])
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert option in result.output, result.output
    for field in ("p_reset", "p_close", "p_corrupt", "delay_s", "fault rate"):
        assert field not in result.output, result.output


def test_the_help_shows_the_ranges() -> None:
    result = CliRunner().invoke(app, ["emulator", "serve", "--help"], env={"COLUMNS": "200"})
    assert "--reset-rate" in result.output and "[0.0<=x<=1.0]" in result.output
