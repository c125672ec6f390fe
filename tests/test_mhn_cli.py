"""Issue 19: `hil mhn phase` on the ideal board."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hil.cli import app

IDEAL = "emulator://?preset=ideal&seed=0"


def test_phase_command_writes_the_plot_and_places_the_users_beta(tmp_path: Path) -> None:
    out = tmp_path / "phase"
    args = ["mhn", "phase", "--device", IDEAL, "--n", "5", "--d", "16", "--norm", "2.0", "--starts", "12"]
    res = CliRunner().invoke(app, [*args, "--beta", "2.0", "--out", str(out)])
    assert res.exit_code == 0, res.output
    # 5 orthogonal patterns of norm 2: beta_c = N / r^2 = 1.25, so beta 2 is 1.6 of it
    assert "beta_c derived 1.25 " in res.output
    # the ratio of effective temperatures, named as such, is the one the next line gives
    assert "beta_eff / beta_eff_c = beta / beta_c = 1.6" in res.output
    assert "beta is 1.6 of beta_c" in res.output
    assert "retrieval phase" in res.output
    png = (out / "phase.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    data = json.loads((out / "phase.json").read_text())
    assert data["beta_c_derived"] == pytest.approx(1.25)
    assert data["beta_c_measured"] == pytest.approx(1.25, rel=0.1)
    assert any(p["beta"] == 2.0 for p in data["points"])  # the user's beta was measured too


def test_a_board_whose_starts_escape_at_every_beta_measures_no_transition(tmp_path: Path) -> None:
    """The MHN audit: on a 2-bit ADC every near-centre start escapes at the sweep's lowest beta,
    and the command reported that point (or the user's own --beta) as "measured on the board",
    with advice built on it. It says the transition lies below the sweep and gives no advice."""
    board = "emulator://?preset=ideal&seed=0&adc_bits=2"
    args = ["mhn", "phase", "--device", board, "--n", "4", "--d", "16", "--starts", "8", "--beta", "0.1"]
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "measured on the board below the sweep" in res.output, res.output
    assert "On this board the transition was measured" not in res.output
    data = json.loads((tmp_path / "phase.json").read_text())
    assert data["beta_c_measured"] == float("-inf")
    assert all(p["escaped"] >= 0.5 for p in data["points"])


def test_phase_command_on_digits_below_the_transition(tmp_path: Path) -> None:
    args = ["mhn", "phase", "--digits", "--n", "4", "--starts", "8", "--beta", "0.5"]
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "single-attractor branch at a fold" in res.output or "crossover" in res.output
    assert "single-attractor phase" in res.output


def test_phase_command_refuses_bad_input_in_one_line(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["mhn", "phase", "--digits", "--n", "11", "--out", str(tmp_path)])
    assert res.exit_code == 2
    assert "--n must be 1 to 10" in res.output
    res = CliRunner().invoke(app, ["mhn", "phase", "--n", "9", "--d", "4", "--out", str(tmp_path)])
    assert res.exit_code == 2
    assert "n <= d" in res.output


@pytest.mark.parametrize(
    ("option", "value"), [("--beta", "0"), ("--beta", "-1"), ("--beta", "1e7"), ("--norm", "0")]
)
def test_phase_command_names_the_option_out_of_range(tmp_path: Path, option: str, value: str) -> None:
    out = tmp_path / "run"
    args = ["mhn", "phase", "--n", "4", "--d", "8", "--starts", "2", option, value, "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2
    assert f"{option}: " in res.output and f"{float(value):g}" in res.output
    assert not out.exists()


def test_the_printed_ratio_is_the_effective_temperatures_and_agrees_with_the_verdict() -> None:
    from hil.mhn.diagnose import describe
    from hil.mhn.phase import critical_beta, equidistant_patterns

    crit = critical_beta(equidistant_patterns(10, 64, 1.0))  # beta_c 10
    report = type("R", (), {"crit": crit, "beta_c_measured": 10.0, "beta_c_readback": 10.0, "points": []})()
    report.points = [type("P", (), {"beta": 2.5})()]
    lines = describe(report, 0.125)  # type: ignore[arg-type]
    assert "beta_eff / beta_eff_c = beta / beta_c = 0.0125" in lines[1]
    assert "beta is 0.0125 of beta_c" in lines[2]
