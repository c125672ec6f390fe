"""The safety audit: one pulse-calibration routine on an 8x8 rram tile applied up to 6598
pulses per device (worst case 442 007 with max_pulses 1000), with no declared, printed or
capped total. The session now declares a per-device pulse budget, refuses a routine whose
worst case exceeds it before its first pulse, and records what was applied."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from calibration import SessionOptions, run_session
from calibration.pulse import DEFAULT_PULSE_BUDGET, PULSE_BUDGET_MAX, PulseBudgetError, pulse_worst_case
from drivers import open_device

HIL = [sys.executable, "-c", "from hil.cli import main; main()"]


def test_the_default_budget_is_the_default_routines_worst_case() -> None:
    assert pulse_worst_case(1000) == 3 * 16 * 1000 + 1 + 2 * (3 + 197 * 1000) == DEFAULT_PULSE_BUDGET
    assert pulse_worst_case(1000, chunks=40) < DEFAULT_PULSE_BUDGET
    for bad in (0, PULSE_BUDGET_MAX + 1, 1.5, True):
        with pytest.raises(ValueError, match="pulse budget"):
            SessionOptions(pulse_budget=bad)  # type: ignore[arg-type]


def test_a_routine_over_the_budget_is_refused_before_it_pulses() -> None:
    with open_device("emulator://?preset=rram&seed=0") as dev:
        opts = SessionOptions(routines=("pulse",), tile_shapes=((2, 2),), pulse_budget=1000)
        with pytest.raises(
            PulseBudgetError, match=r"up to 442007 pulses per device.*budget of 1000: nothing was pulsed"
        ):
            run_session(dev, opts)


def test_the_record_counts_the_pulses_per_device() -> None:
    with open_device("emulator://?preset=rram&seed=0") as dev:
        opts = SessionOptions(routines=("pulse",), tile_shapes=((2, 2),), pulse_chunks=12)
        record = run_session(dev, opts)
    counts = record.session["pulses_per_device"]
    assert 0 < counts["max"] <= counts["worst_case"] == pulse_worst_case(1000, chunks=12)
    assert counts["mean"] == counts["max"] and counts["budget"] == DEFAULT_PULSE_BUDGET


def test_hil_calibrate_prints_the_worst_case_and_refuses_one_over_the_budget(tmp_path) -> None:
    cmd = [*HIL, "calibrate", "emulator://?preset=rram&seed=0", "--routines", "pulse", "--tiles", "2x2"]
    cmd += ["--out", str(tmp_path / "cal.zarr"), "--pulse-budget", "5000", "--no-progress"]
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 2, run.stderr
    assert "pulse routine: at most 442007 pulses per device of each tile (budget 5000" in run.stdout
    assert "error: the pulse routine on 'T0' may apply up to 442007" in run.stderr
    assert "--pulse-budget 442007" in run.stderr
