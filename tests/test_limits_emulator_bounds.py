"""A board parameter set from a URI or `hil emulator serve --set` that is a physical quantity
has a declared bound (the safety audit of 2026-12-07): a line-current limit of 2 (meant as
2 mA, taken as 2 A, 1000 times the presets' design point) served a board whose line check
passed every request a real 2 mA periphery would refuse."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from drivers import ConfigurationError, open_device


@pytest.mark.parametrize("value", ["2", "1e30", "1.0000001"])
def test_a_line_current_limit_in_the_wrong_unit_is_refused(value: str) -> None:
    with pytest.raises(ConfigurationError, match=r"max_line_current_a=.* is outside \(0, 1\] A.*2e-3"):
        open_device(f"emulator://?preset=rram&max_line_current_a={value}")


def test_hil_emulator_serve_refuses_it_before_serving() -> None:
    """The real command in its own process (a board it accepted would be served until killed:
    the timeout fails the test instead of hanging it)."""
    hil = Path(sys.executable).with_name("hil")
    args = [str(hil), "emulator", "serve", "--scpi-port", "0", "--set", "max_line_current_a=2"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "max_line_current_a" in r.stderr and "(0, 1] A" in r.stderr
    assert "visa://" not in r.stdout  # nothing was served


@pytest.mark.parametrize("value", ["2e-3", "1"])
def test_a_limit_in_amps_is_served_as_given(value: str) -> None:
    with open_device(f"emulator://?preset=rram&max_line_current_a={value}") as d:
        assert d.info.limits.max_line_current_a == float(value)
