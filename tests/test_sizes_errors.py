"""`hil demo --sizes` and `hil gradcheck --sizes` name the option and say what fits: demo said
"sizes must start with 64 (digits pixels) and end with 10 (classes)" (not the option, not the
value given, no example), and a layer of 0 nodes got the topology's "size of group 's1' must be
>= 1, got 0" from both, a group name the user never typed. Their help now says the last layer
is the 10 classes too (gradcheck's said only "input first")."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from hil.cli import app
from tests.cli_errors import one_line_error


def test_demo_names_the_sizes_given_and_an_example_that_fits() -> None:
    line = one_line_error("demo", "--sizes", "10,5,3")
    assert line == (
        "error: --sizes 10,5,3: the layers run from the digits' 64 pixels to their 10 classes, "
        "e.g. --sizes 64,256,10"
    )


@pytest.mark.parametrize("command", ["demo", "gradcheck"])
def test_an_empty_layer_is_named_by_the_option(command: str) -> None:
    line = one_line_error(command, "--sizes", "64,0,10", "--batch", "4")
    assert line.startswith("error: --sizes") and "at least one node" in line, line
    assert "group" not in line


@pytest.mark.parametrize("command", ["demo", "gradcheck"])
def test_the_help_names_both_ends(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "400"})
    assert "from the 64 inputs (the digits' pixels) to the 10 outputs (their classes)" in result.output
