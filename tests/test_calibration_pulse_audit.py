"""The pulse routine on boards whose `pulse` call is small or large (`max_pulses`), and the
pulse budget's refusals: what the audit of `hil calibrate` found."""

from __future__ import annotations

import numpy as np
import pytest

import calibration.pulse as pulse_mod
from calibration import SessionOptions, run_session
from calibration.pulse import PulseBudgetError, measure_pulse_response, pulse_worst_case
from calibration.pulse_fit import fit_pulse_model
from calibration.report import summary
from calibration.session import tile_topology
from drivers import open_device


def test_a_board_of_small_pulse_calls_still_reaches_the_plateau() -> None:
    """max_pulses 10: the saturation stopped after 16 calls of 10 pulses, far from the
    plateau, and the fit took that for the window (g_lo 2.4 uS against 1.0, kind linear)."""
    dev = open_device("emulator://?preset=rram&seed=0&max_pulses=10&wire_resistance=0")
    record = run_session(
        dev, SessionOptions(routines=("stuck", "pulse"), tile_shapes=((8, 8),), pulse_chunks=60)
    )
    pm = record.tiles[0].pulse
    dev.configure(tile_topology([(8, 8)]))
    truth = {k: v.numpy() for k, v in dev.board.tile("T0").truth().items()}  # type: ignore[attr-defined]
    model = dev.board.preset.device  # type: ignore[attr-defined]
    v = pm.valid & ~truth["stuck"]
    span = model.g_max - model.g_min
    assert pm.kind == model.kind and pm.summary["plateau_held"]
    assert abs(float(np.mean(pm.g_lo[v] - truth["g_min"][v]))) <= 0.01 * span
    assert abs(float(np.mean(pm.g_hi[v] - truth["g_max"][v]))) <= 0.01 * span
    assert abs(float(np.mean(pm.dw_up[v])) / float(np.mean(truth["dw_up"][v])) - 1) <= 0.10


def test_a_plateau_that_does_not_hold_marks_the_tile_invalid_and_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pulse_mod, "SATURATE_BURST", 2)  # far too few pulses to reach a bound
    dev = open_device("emulator://?preset=rram&seed=0&wire_resistance=0")
    dev.configure(tile_topology([(4, 4)]))
    data = measure_pulse_response(dev, "T0", (4, 4), chunks=20, max_bursts=3)
    assert not data.plateau
    lim = dev.info.limits
    pm = fit_pulse_model(data, None, lim.g_max - lim.g_min)
    assert not pm.valid.any() and pm.summary["plateau_held"] is False
    record = run_session(dev, SessionOptions(routines=("stuck",), tile_shapes=((4, 4),)))
    record.tiles[0].pulse = pm
    assert "INVALID: the conductance did not plateau" in summary(record)


def test_the_worst_case_does_not_grow_with_the_boards_call_size() -> None:
    """max_pulses 100000: the worst case was 44 200 007, over any budget allowed (10^6)."""
    assert pulse_worst_case(100_000) == pulse_worst_case(1000) == 442_007
    assert pulse_worst_case(10) < 442_007
    dev = open_device("emulator://?preset=rram&seed=0&max_pulses=100000")
    options = SessionOptions(routines=("pulse",), tile_shapes=((2, 2),), pulse_chunks=12)
    record = run_session(dev, options)
    assert record.session["pulses_per_device"]["max"] <= pulse_worst_case(100_000, chunks=12)


def test_a_budget_over_a_short_endurance_names_the_way_out_not_a_circle(tmp_path) -> None:
    """endurance 1000, --pulse-budget 500000: the advice was 'at most 1000, or the default',
    both refused next (worst case 442007), whose refusal then suggested 442007 > 1000."""
    from typer.testing import CliRunner

    from hil.cli import app

    uri = "emulator://?preset=rram&pulse_endurance=1000"
    out = tmp_path / "cal.zarr"
    for extra in (["--pulse-budget", "500000"], []):
        result = CliRunner().invoke(app, ["calibrate", uri, "--out", str(out), "--no-progress", *extra])
        assert result.exit_code == 2
        text = " ".join(result.output.split())
        assert "no budget the board allows covers it" in text, text
        assert "--pulse-budget 442007" not in text and "at most 1000" not in text
        assert "--routines adc,dac,mvm,stuck,gmap,settle` runs the other routines" in text
    dev = open_device("emulator://?preset=rram&pulse_endurance=500000")  # room for the routine
    with pytest.raises(PulseBudgetError, match=r"Give --pulse-budget from 442007 .* to 500000"):
        run_session(dev, SessionOptions(routines=("pulse",), tile_shapes=((2, 2),), pulse_budget=10**6))


def test_the_pulse_fit_is_a_stage_of_its_own(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """The fit reported no stage: `--no-progress` charged its seconds to the next stage
    ('settle done in 1.8 s' where settle took 0.03 s and the fit 1.74 s)."""
    import time

    import calibration.session as session_mod
    from hil.cli.calibrate import StageLines

    fit = session_mod.fit_pulse_model

    def slow_fit(*args, **kw):  # type: ignore[no-untyped-def]
        time.sleep(1.0)
        return fit(*args, **kw)

    monkeypatch.setattr(session_mod, "fit_pulse_model", slow_fit)
    dev = open_device("emulator://?preset=rram&seed=0&wire_resistance=0")
    options = SessionOptions(routines=("pulse", "settle"), tile_shapes=((4, 4),), pulse_chunks=12)
    record = run_session(dev, options, StageLines())
    times = {
        line[:10].strip(): float(line.split("done in")[1].split()[0])
        for line in capsys.readouterr().out.splitlines()
        if " done in " in line
    }
    assert times["pulse fit"] >= 1.0, times
    assert times["settle"] < record.session["durations_s"]["settle"] + 0.5, times


def test_the_report_labels_rows_columns_tiles_and_channels(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """The maps had no axis labels and no divider between G+ and G- (x ran 0 to 2C), the
    tile-k pages' pulse panel did not name its tile, and the gain and offset panels called
    node channels and mvm output lines both 'channel'."""
    import matplotlib.figure

    from calibration.report import plot

    seen = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **kw: seen.append(fig))
    dev = open_device("emulator://?preset=rram&seed=0&wire_resistance=0")
    options = SessionOptions(
        routines=("stuck", "gmap", "pulse"), tile_shapes=((4, 4), (4, 3)), reads=4, pulse_chunks=12
    )
    record = run_session(dev, options)
    plot(record, tmp_path / "cal-tile1.png", tile=1)
    axes = {ax.get_title(): ax for ax in seen[0].axes}
    pulse = [t for t in axes if t.startswith("pulse response")]
    assert pulse and pulse[0].startswith("pulse response, tile 1 ("), pulse
    for title in ("conductance map, tile 1", "stuck devices, tile 1"):
        ax = next(a for t, a in axes.items() if t.startswith(title))
        assert ax.get_ylabel() == "row" and "G+ 0..2 | G- 3..5" in ax.get_xlabel()
        assert any(list(line.get_xdata()) == [2.5, 2.5] for line in ax.get_lines())  # the divider
    # the gain and offset panels, with a node-channel bank and the mvm bank
    from calibration import ChannelCal

    ones, zeros = np.ones(4), np.zeros(4)
    for bank in ("dac", "mvm"):
        record.converters[bank] = ChannelCal(bank, ones, zeros, zeros, zeros, ones > 0, 0.01, "V")
    seen.clear()
    plot(record, tmp_path / "cal.png")
    gain = next(a for a in seen[0].axes if a.get_title() == "per-channel gain error")
    assert "node channel" in gain.get_xlabel() and "output line" in gain.get_xlabel()
    labels = [t.get_text() for t in gain.get_legend().get_texts()]
    assert labels == ["DAC (node channel)", "mvm ADC (output line)"]
