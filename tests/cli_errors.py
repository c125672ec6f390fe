"""How the tests read a command's refusal: `hil` run in process (typer's runner), exit code 2
and exactly one ``error: ...`` line on stderr, which is returned."""

from __future__ import annotations

from typer.testing import CliRunner

from hil.cli import app


def one_line_error(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]
