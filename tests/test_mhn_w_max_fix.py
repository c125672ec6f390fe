"""`hil mhn phase` (and `MHNBlock`) on a board with a small w_max: the error said only
"patterns need w_max 0.587 > the board's 0.5", naming no fix. It now names `out_range`, the
knob w_max is proportional to, with a value that fits, and that value runs. (The defaults,
10 patterns of d = 64, need 0.587 at out_range 4.)"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from drivers import ConfigurationError, open_device
from hil.mhn.phase import equidistant_patterns
from hil.mhn.tile import Encoding

BOARD = "emulator://?preset=ideal&seed=0&max_w_max=0.5"


def _phase(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "hil.cli", "mhn", "phase", "--device", BOARD, "--starts", "1"]
    return subprocess.run(
        [*cmd, "--out", str(tmp_path / "phase"), *extra], capture_output=True, text=True, timeout=120
    )


def test_the_w_max_error_names_an_out_range_that_fits_and_it_runs(tmp_path: Path) -> None:
    done = _phase(tmp_path)
    assert done.returncode == 2, done.stderr
    assert "patterns need w_max 0.587 > the board's 0.5" in done.stderr
    found = re.search(r"hil mhn phase --out-range ([0-9.]+)", done.stderr)
    assert found, done.stderr
    assert "out_range=3.409 or less" in done.stderr and "Scaling the patterns changes nothing" in done.stderr
    again = _phase(tmp_path, "--out-range", found.group(1))
    assert again.returncode == 0, again.stderr
    assert "wrote " in again.stdout


@pytest.mark.parametrize(("n", "d", "norm"), [(2, 4, 1.0), (4, 16, 0.1), (10, 64, 10.0)])
def test_the_named_out_range_fits_the_board(n: int, d: int, norm: float) -> None:
    limits = open_device("emulator://?preset=ideal&seed=0&max_w_max=0.3").info.limits
    xi = torch.as_tensor(equidistant_patterns(n, d, norm, cos=0.0, seed=0))
    with pytest.raises(ConfigurationError, match=r"give out_range=") as info:
        Encoding.of(xi, limits)
    fits = float(re.search(r"give out_range=([0-9.]+)", str(info.value)).group(1))  # type: ignore[union-attr]
    assert Encoding.of(xi, limits, out_range=fits).w_max <= 0.3
