"""A calibration engineer's audit of `hil calibrate` (in-process and served): interrupted
writes, --overwrite with an interrupt, and what the record and the command say afterwards."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import calibration
import calibration.record
import calibration.session
from calibration import CalibrationError, SessionOptions, load, run_session, write
from drivers import open_device
from hil.cli import app

BOARD = "emulator://?preset=rram&seed=0"


def _small_record(routines: tuple[str, ...] = ("stuck",)) -> calibration.CalibrationRecord:
    dev = open_device(BOARD)
    return run_session(dev, SessionOptions(routines=routines, tile_shapes=((4, 4),), reads=4))


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, sections: int) -> None:
    """The next record write is interrupted (as by SIGTERM) after `sections` sections."""
    inner = calibration.record._write_section
    calls = [0]

    def section(group, obj) -> None:  # type: ignore[no-untyped-def]
        calls[0] += 1
        if calls[0] > sections:
            raise KeyboardInterrupt
        inner(group, obj)

    monkeypatch.setattr(calibration.record, "_write_section", section)


# ------------------------------------------------------------- 1: the record's final write


def test_an_interrupted_write_leaves_the_previous_record_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write replaced the store first (`open_group(mode="w")`), then filled it: stopped
    half-way, it left a store marked complete with empty sections, and the good record gone."""
    out = tmp_path / "cal.zarr"
    good = _small_record(("stuck", "gmap"))
    write(good, out)
    _interrupt_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        write(_small_record(("stuck", "gmap")), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal.zarr"]  # no temporary store left
    again = load(out)
    assert again.routines == good.routines and again.tiles[0].gmap is not None
    assert not again.partial


def test_an_interrupted_first_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "cal.zarr"
    _interrupt_after(monkeypatch, 0)
    with pytest.raises(KeyboardInterrupt):
        write(_small_record(), out)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(CalibrationError, match="no calibration record"):
        load(out)


KILL_BETWEEN_RENAMES = """
import os, signal, sys
import calibration.record as record
from calibration import SessionOptions, run_session
from drivers import open_device
inner = os.replace
def replace(src, dst):
    if str(dst) == sys.argv[1]:  # the new store's rename into place: killed before it
        os.kill(os.getpid(), signal.SIGKILL)
    inner(src, dst)
os.replace = replace
dev = open_device("emulator://?preset=rram&seed=0")
rec = run_session(dev, SessionOptions(routines=("stuck", "gmap"), tile_shapes=((4, 4),), reads=4))
record.write(rec, sys.argv[1])
"""


def test_a_write_killed_between_its_renames_names_both_records_and_the_rename(tmp_path: Path) -> None:
    """SIGKILL after the old store was moved aside and before the new one was moved in: the
    record's path is empty and nothing could put the old one back; `load` said only "no
    calibration record" and the previous record sat hidden in ``.cal.zarr.old-PID``."""
    out = tmp_path / "cal.zarr"
    good = _small_record(("stuck",))
    write(good, out)
    proc = subprocess.run([sys.executable, "-c", KILL_BETWEEN_RENAMES, str(out)], timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    with pytest.raises(CalibrationError) as err:
        load(out)
    msg = str(err.value)
    old = next(tmp_path.glob(".cal.zarr.old-*"))
    new = next(tmp_path.glob(".cal.zarr.tmp-*"))
    assert "stopped between its two renames" in msg, msg
    assert f"`mv {old} {out}` restores it" in msg, msg
    assert f"`mv {new} {out}` keeps it" in msg, msg
    new.rename(out)
    assert load(out).routines == ("stuck", "gmap")
    out.rename(tmp_path / "kept.zarr")
    old.rename(out)
    assert load(out).routines == good.routines


def test_a_damaged_store_is_a_calibration_error_naming_the_rerun(tmp_path: Path) -> None:
    """A store whose sections are empty (an interrupted write of an older version) failed
    with `TypeError: StuckMap.__init__() missing 6 required positional arguments`."""
    import zarr

    out = tmp_path / "cal.zarr"
    write(_small_record(), out)
    root = zarr.open_group(str(out), mode="a")
    del root["tiles/0/stuck"]
    root["tiles/0"].create_group("stuck")
    with pytest.raises(CalibrationError, match=r"damaged calibration record.*--overwrite"):
        load(out)
    check = CliRunner().invoke(app, ["calibrate", BOARD, "--check", str(out)])
    assert check.exit_code != 0 and "damaged calibration record" in check.output
    assert "Traceback" not in check.output and not isinstance(check.exception, TypeError)


def test_hil_calibrate_interrupted_in_its_final_write_says_so_and_keeps_the_old_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "cal.zarr"
    args = ["calibrate", BOARD, "--out", str(out), "--tile-size", "8", "--routines", "stuck", "--no-progress"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    _interrupt_after(monkeypatch, 0)
    second = CliRunner().invoke(app, [*args, "--overwrite"])
    assert second.exit_code != 0
    assert f"interrupted while writing the record to {out}: the record already at {out} is kept" in (
        second.output
    )
    assert load(out).routines == ("stuck",)
    assert (tmp_path / "cal.png").exists()  # the old report still describes the old record


# ------------------------------------------------------ 5, 10: --overwrite and the report


def test_overwrite_then_an_interrupt_keeps_the_complete_record_and_its_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The partial record replaced the complete one, and the old PNG stayed beside it."""
    out = tmp_path / "cal.zarr"
    args = ["calibrate", BOARD, "--out", str(out), "--tile-size", "8", "--no-progress"]
    first = CliRunner().invoke(app, [*args, "--routines", "stuck,gmap", "--reads", "4"])
    assert first.exit_code == 0, first.output
    png = (tmp_path / "cal.png").read_bytes()

    def stop(*args: object, **kw: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(calibration.session, "measure_pulse_response", stop)
    second = CliRunner().invoke(app, [*args, "--routines", "stuck,pulse", "--overwrite"])
    assert second.exit_code != 0
    partial = tmp_path / "cal.partial.zarr"
    assert f"is at {partial}, marked partial" in second.output, second.output
    assert f"the complete record at {out} and its report are kept" in second.output
    assert load(out).routines == ("stuck", "gmap") and not load(out).partial
    assert (tmp_path / "cal.png").read_bytes() == png
    kept = load(partial)
    assert kept.partial and kept.routines == ("stuck",) and kept.session["stopped_in"] == "pulse[0]"


def test_a_partial_record_at_out_leaves_no_report_of_another_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--overwrite with a report but no record at --out: the report went on describing
    another record beside the new partial one."""
    out = tmp_path / "cal.zarr"
    (tmp_path / "cal.png").write_bytes(b"old report")
    (tmp_path / "cal-tile1.png").write_bytes(b"old report")

    def stop(*args: object, **kw: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(calibration.session, "measure_pulse_response", stop)
    args = ["calibrate", BOARD, "--out", str(out), "--tile-size", "8", "--no-progress"]
    result = CliRunner().invoke(app, [*args, "--routines", "stuck,pulse", "--overwrite"])
    assert f"is at {out}, marked partial" in result.output, result.output
    assert load(out).partial
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal.zarr"]


def test_overwrite_with_fewer_tiles_removes_the_old_extra_pages(tmp_path: Path) -> None:
    out = tmp_path / "two.zarr"
    args = ["calibrate", BOARD, "--out", str(out), "--routines", "stuck", "--no-progress"]
    first = CliRunner().invoke(app, [*args, "--tiles", "8x8,4x4"])
    assert first.exit_code == 0, first.output
    assert (tmp_path / "two-tile1.png").exists()
    second = CliRunner().invoke(app, [*args, "--tiles", "8x8", "--overwrite"])
    assert second.exit_code == 0, second.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two.png", "two.zarr"]


# ---------------------------------------------------------- 6, 7, 8: partial records, --check


def _partial(tmp_path: Path, stopped_in: str | None) -> Path:
    record = _small_record(("stuck", "gmap"))
    record.session["options"]["routines"] = ["stuck", "gmap", "pulse", "settle"]
    record.session.update(partial=True, stopped_in=stopped_in)
    return write(record, tmp_path / "cal.zarr")


def test_check_of_a_partial_record_says_what_was_never_measured(tmp_path: Path) -> None:
    out = _partial(tmp_path, "pulse[0]")
    check = CliRunner().invoke(app, ["calibrate", BOARD, "--check", str(out)])
    assert check.exit_code == 0, check.output
    text = " ".join(check.output.split())
    assert "calibration still holds for what the record measured; the record is partial (its session " in text
    assert "stopped in pulse[0]): pulse, settle never measured" in text


def test_a_record_stopped_between_routines_reloads_as_stopped_between_routines(tmp_path: Path) -> None:
    """`stopped_in` None came back NaN (truthy): "stopped in nan"."""
    from calibration import CalibratedDevice, drift_check
    from drivers import Topology

    out = _partial(tmp_path, None)
    record = load(out)
    assert record.session["stopped_in"] is None
    assert "stopped in nan" not in str(drift_check(open_device(BOARD), record))
    assert "stopped between routines" in str(drift_check(open_device(BOARD), record))
    dev = open_device(BOARD)
    with pytest.warns(UserWarning, match="its session stopped between routines"):
        CalibratedDevice(dev, record).configure(Topology.layered([3, 4]))


def test_check_refuses_every_option_of_a_new_session(tmp_path: Path) -> None:
    """--tile-size, --reads, --pulse-budget (and --seed, --out, --png, --overwrite) were
    silently ignored with --check."""
    out = _partial(tmp_path, None)
    args = [
        "calibrate",
        BOARD,
        "--check",
        str(out),
        "--tile-size",
        "8",
        "--reads",
        "4",
        "--pulse-budget",
        "10",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "which --tile-size, --reads, --pulse-budget do not change" in text, text
    for option, value in (("--seed", "1"), ("--png", "x.png"), ("--overwrite", None), ("--out", "y.zarr")):
        given = [option] if value is None else [option, value]
        result = CliRunner().invoke(app, ["calibrate", BOARD, "--check", str(out), *given])
        assert result.exit_code == 2 and f"which {option} do not change" in result.output


# ------------------------------------------------------------ 9: training with a short record


def test_too_few_channels_names_the_networks_tiles_the_first_time() -> None:
    """The refusal named the record's tiles (`--tiles 4x4 --channels N`): following it, the next
    configure warned that the network's own tiles were not calibrated, a second session."""
    import numpy as np

    from calibration import CalibratedDevice, ChannelCal
    from drivers import Topology

    record = _small_record(("stuck",))  # a 4 x 4 tile
    ones, zeros = np.ones(4), np.zeros(4)
    record.converters["dac"] = ChannelCal("dac", ones, zeros, zeros, zeros, ones > 0, 0.01, "V")
    topology = Topology.layered([5, 6])
    shape = "x".join(str(n) for n in topology.tile_shape(topology.couplings[0].tile))
    dev = CalibratedDevice(open_device(BOARD), record, session="hil calibrate URI --out cal.zarr")
    # with the record's routines and the converter routines it lacks (whose paths would
    # otherwise be warned about as uncorrected: a second hint)
    match = rf"--overwrite --tiles {shape} --channels 11 --routines adc,dac,mvm,stuck`"
    with pytest.raises(CalibrationError, match=match):
        dev.configure(topology)
