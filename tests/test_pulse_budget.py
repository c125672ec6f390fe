"""The safety audit: one pulse-calibration routine on an 8x8 rram tile applied up to 6598
pulses per device (worst case 442 007 with max_pulses 1000), with no declared, printed or
capped total. The session now declares a per-device pulse budget, refuses a routine whose
worst case exceeds it before its first pulse, and records what was applied. Its default is
1 % of the endurance the board declares for its devices (442 007, the routine's own worst
case, only where it declares none)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Callable

import pytest

from calibration import SessionOptions, run_session
from calibration.pulse import (
    FALLBACK_PULSE_BUDGET,
    PULSE_BUDGET_MAX,
    PulseBudgetError,
    default_pulse_budget,
    pulse_worst_case,
)
from drivers import open_device
from drivers.base import Limits
from hil.cli.info import describe
from hil.testing import BoardServers

HIL = [sys.executable, "-c", "from hil.cli import main; main()"]


def test_without_a_declared_endurance_the_budget_is_the_default_routines_worst_case() -> None:
    assert pulse_worst_case(1000) == 3 * 16 * 1000 + 1 + 2 * (3 + 197 * 1000) == FALLBACK_PULSE_BUDGET
    assert pulse_worst_case(1000, chunks=40) < FALLBACK_PULSE_BUDGET
    with open_device("emulator://?preset=rram&seed=0") as dev:  # the presets declare no endurance
        assert dev.info.limits.pulse_endurance is None
        budget, source = default_pulse_budget(dev.info.limits)
    assert budget == FALLBACK_PULSE_BUDGET and "declares no device endurance" in source
    for bad in (0, PULSE_BUDGET_MAX + 1, 1.5, True):
        with pytest.raises(ValueError, match="pulse budget"):
            SessionOptions(pulse_budget=bad)  # type: ignore[arg-type]


def test_a_routine_over_the_budget_is_refused_before_it_pulses() -> None:
    with open_device("emulator://?preset=rram&seed=0") as dev:
        opts = SessionOptions(routines=("pulse",), tile_shapes=((2, 2),), pulse_budget=1000)
        with pytest.raises(
            PulseBudgetError,
            match=r"up to 442007 pulses per device.*budget of 1000 \(set by the session.*nothing was run",
        ):
            run_session(dev, opts)


def test_the_record_counts_the_pulses_per_device() -> None:
    with open_device("emulator://?preset=rram&seed=0") as dev:
        opts = SessionOptions(routines=("pulse",), tile_shapes=((2, 2),), pulse_chunks=12)
        record = run_session(dev, opts)
    counts = record.session["pulses_per_device"]
    assert 0 < counts["max"] <= counts["worst_case"] == pulse_worst_case(1000, chunks=12)
    assert counts["mean"] == counts["max"] and counts["budget"] == FALLBACK_PULSE_BUDGET
    assert "declares no device endurance" in record.session["options"]["pulse_budget_source"]


def test_hil_calibrate_prints_the_worst_case_and_refuses_one_over_the_budget(tmp_path) -> None:
    cmd = [*HIL, "calibrate", "emulator://?preset=rram&seed=0", "--routines", "pulse", "--tiles", "2x2"]
    cmd += ["--out", str(tmp_path / "cal.zarr"), "--pulse-budget", "5000", "--no-progress"]
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 2, run.stderr
    assert (
        "pulse routine: at most 442007 pulses per device of each tile (1000 per call on this board); "
        "budget 5000: --pulse-budget" in run.stdout
    )
    assert "error: the pulse routine may apply up to 442007" in run.stderr
    assert "--pulse-budget 442007" in run.stderr


def test_the_default_budget_is_one_percent_of_the_declared_endurance() -> None:
    lim = Limits(1.0, 1.0, 0.0, 1.0, 8, 8, (0.0, 1.0), 8, 8, 1, 10, 1000, 0.0)
    for endurance, budget in ((10**6, 10**4), (10**8, PULSE_BUDGET_MAX), (50, 1)):
        got, source = default_pulse_budget(dataclasses.replace(lim, pulse_endurance=endurance))
        assert got == budget and f"of the {endurance} pulses per device" in source


def test_a_board_declaring_a_short_endurance_refuses_the_default_routine_before_anything_runs() -> None:
    """1 % of 10^7 pulses is 100 000, below the routine's worst case of 442 007: refused before
    any routine ran (the adc routine first would have been wasted), saying where the budget came
    from; an explicit budget runs it. A board rated for 10^8 pulses runs it by default."""
    with open_device("emulator://?preset=rram&seed=0&pulse_endurance=10000000") as dev:
        assert dev.info.limits.pulse_endurance == 10**7
        opts = SessionOptions(routines=("adc", "pulse"), tile_shapes=((2, 2),))
        with pytest.raises(
            PulseBudgetError, match=r"budget of 100000 \(1% of the 10000000 pulses.*nothing was run"
        ):
            run_session(dev, opts)
        assert dev.meter().clock_s == 0.0  # nothing ran  # type: ignore[union-attr]
        small = SessionOptions(
            routines=("pulse",), tile_shapes=((2, 2),), pulse_chunks=12, pulse_budget=442_007
        )
        assert run_session(dev, small).session["options"]["pulse_budget"] == 442_007
    with open_device("emulator://?preset=rram&seed=0&pulse_endurance=100000000") as dev:
        record = run_session(dev, SessionOptions(routines=("pulse",), tile_shapes=((2, 2),), pulse_chunks=12))
    assert record.session["pulses_per_device"]["budget"] == PULSE_BUDGET_MAX


@pytest.mark.parametrize("transport", ["visa-tcp", "serial-socket"])
def test_hil_calibrate_derives_the_budget_from_a_served_boards_endurance(
    transport: str, emulated_board: Callable[..., BoardServers], tmp_path
) -> None:
    """The endurance travels in the board's limits over both protocols; `hil calibrate`
    prints the budget it derived and refuses the routine it does not cover."""
    s = emulated_board("emulator://?preset=rram&seed=0&pulse_endurance=10000000")
    with open_device(s.uri(transport, lock="0")) as dev:
        assert dev.info.limits.pulse_endurance == 10**7
        assert "endurance     10000000 pulses per device" in describe(dev, s.uris[transport])
    cmd = [*HIL, "calibrate", s.uris[transport], "--routines", "pulse", "--tiles", "2x2"]
    cmd += ["--out", str(tmp_path / "cal.zarr"), "--no-progress"]
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 2, run.stderr
    assert "; budget 100000: 1% of the 10000000 pulses per device the board's devices endure\n" in run.stdout
    assert (
        "error: the pulse routine may apply up to 442007" in run.stderr
        and "--pulse-budget 442007" in run.stderr
    )
    assert not (tmp_path / "cal.zarr").exists()


def test_the_budget_line_quotes_the_boards_own_max_pulses(
    tmp_path, emulated_board: Callable[..., BoardServers]
) -> None:  # type: ignore[no-untyped-def]
    """The printed budget line said 'the default routine's worst case at max_pulses 1000' on a
    board of 32 pulses per call, whose worst case is 60 615, and gave that board 442 007. The
    default on a board that declares no endurance is now the routine's worst case at the board's
    own max_pulses, and the line names it (framed server over TCP)."""
    from typer.testing import CliRunner

    from hil.cli import app

    served = emulated_board("emulator://?preset=rram&seed=0&max_pulses=32")
    worst = pulse_worst_case(32)
    assert worst == 3 * 16 * 1000 + 1 + 2 * (3 + 197 * 32) == 60_615
    uri = served.uri("serial-socket")
    args = ["calibrate", uri, "--out", str(tmp_path / "c.zarr"), "--routines", "pulse", "--tile-size", "2"]
    res = CliRunner().invoke(app, [*args, "--no-progress"])
    assert res.exit_code == 0, res.output
    line = next(s for s in res.output.splitlines() if s.startswith("pulse routine:"))
    assert f"at most {worst} pulses per device" in line and f"budget {worst}:" in line
    assert "max_pulses 32" in line and "max_pulses 1000" not in line
    assert default_pulse_budget(served.device.info.limits)[0] == worst
