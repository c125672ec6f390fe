"""`hil demo --beta` and `hil gradcheck --betas` refuse a nudge strength that is not a finite
positive number, naming the option: demo --beta -0.2 ran and printed phases named "nudged +-0.2"
and "nudged --0.2", demo --beta nan failed deep in the board with "nudge 's2' beta must be
finite", and gradcheck --betas nan passed its `b <= 0` test (NaN compares false) to fail with
the EP block's "beta must be > 0 (the mode sets the sign), got nan"."""

from __future__ import annotations

import pytest

from tests.cli_errors import one_line_error


@pytest.mark.parametrize("beta", ["-0.2", "0", "nan", "-inf"])
def test_demo_refuses_a_beta_that_is_not_positive(beta: str) -> None:
    assert one_line_error("demo", "--beta", beta).startswith("error: --beta: the nudge strength, > 0"), beta


@pytest.mark.parametrize("betas", ["0.1,nan", "nan", "0.1,-0.01"])
def test_gradcheck_refuses_a_beta_that_is_not_positive(betas: str) -> None:
    assert one_line_error("gradcheck", "--betas", betas, "--batch", "4") == (
        f"error: --betas must be finite and > 0, got {betas!r}"
    )
