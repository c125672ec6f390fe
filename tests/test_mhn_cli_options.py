"""`hil mhn phase` names the option for every bad value, as it did for --beta, --norm and
--n with --digits: --cos 1 said "cos must be in (-1/(n-1), 1), got 1.0", --programming foo
"programming scheme must be one of ('ideal', ...)", --n 20 --d 8 "equidistant patterns need
1 <= n <= d, got n=20, d=8" (the last two after the board had opened)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from hil.cli import app


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--cos", "1", "--n", "4", "--d", "8"],
            "--cos 1: the cosine of 4 equidistant patterns is in (-1/(n-1), 1)",
        ),
        (["--cos", "-0.5", "--n", "4", "--d", "8"], "= (-0.3333, 1)"),
        (["--programming", "foo"], "--programming takes ideal, verify, pulsed, mixed"),
        (["--n", "20", "--d", "8"], "--n 20 equidistant patterns need --d of at least 20 (n <= d), got --d"),
    ],
)
def test_a_bad_value_is_named_by_its_option(args: list[str], message: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["mhn", "phase", "--out", str(tmp_path / "m"), *args])
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0], lines[0]
    assert not (tmp_path / "m").exists()


def test_the_board_is_named_by_uri_as_in_demo_and_gradcheck(tmp_path: Path) -> None:
    """`hil demo --uri URI` and `hil gradcheck --uri URI` take the board as --uri (or --device);
    `hil mhn phase --uri URI` was a usage error that offered --out instead. It takes both now:
    the URI given reaches the board's opening, whose error names its scheme."""
    for flag in ("--uri", "--device"):
        args = ["mhn", "phase", flag, "nosuch://board", "--out", str(tmp_path / "m")]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, (flag, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (flag, result.stderr)
        assert "unknown device scheme 'nosuch'" in lines[0], (flag, lines[0])
        assert not (tmp_path / "m").exists()
