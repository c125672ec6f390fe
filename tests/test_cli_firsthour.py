"""The first hour as the README writes it: every command a new user types, run as typed."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner, Result

from calibration import load
from hil.cli import app
from hil.runlog import open_run

EMU = "emulator://?preset=rram&seed=0"
DEAD = "visa://TCPIP0::127.0.0.1::1::SOCKET"  # nothing listens on port 1: refused at once
FAST_VAE = ["data.limit_train=64", "data.limit_test=32", "eval.samples=32", "eval.eps_draws=1"]
FAST_CLASSIFIER = ["train.epochs=1", "data.limit_train=64", "data.limit_test=32", "model.sizes=[64,16,10]"]


def _sets(*items: str) -> list[str]:
    return [a for s in items for a in ("--set", s)]


def _hil(*args: str | Path) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


def _one_line_error(result: Result) -> str:
    """The command failed as bad input must: exit 2, one line on stderr, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


# ------------------------------------------------------------------------ 1. calibrate, then train
def test_default_calibration_covers_every_default_network() -> None:
    from drivers import Topology
    from hil.cli.calibrate import DEFAULT_CHANNELS
    from hil.config import RunConfig
    from hil.vae.config import VAEModelConfig
    from hil.vae.hopfield import dense_topology, layered_encoder_topology

    m = VAEModelConfig()
    nets = {
        "classifier": Topology.layered(RunConfig().model.sizes),
        "gradcheck": Topology.layered([64, 256, 10]),
        "vae dense": dense_topology(64, m.hidden, m.latent * m.copies),
        "vae layered": layered_encoder_topology(64, m.hidden, m.latent * m.copies),
    }
    for name, topo in nets.items():
        assert sum(topo.groups.values()) <= DEFAULT_CHANNELS, name


def test_calibrate_then_train_vae_with_the_record(tmp_path: Path) -> None:
    """README: `hil calibrate URI --out cal.zarr`, then `hil train vae --set calibration=cal.zarr`
    (the default TDH-VAE has 136 nodes: more than the 128 channels a 64 x 64 tile implies).
    The record covers the network's 136 node channels exactly, not the default 512 (the test
    above checks the default covers every default network; the DAC and state-ADC routines
    take about 3 times as long for 512 channels as for 136): the boundary the training run's
    check of the record's channels must pass."""
    cal = tmp_path / "cal.zarr"
    board = EMU  # the preset's wires on: the converter routines keep them out of the gains
    done = _hil("calibrate", board, "--out", cal, "--routines", "adc,dac", "--channels", "136")
    assert done.exit_code == 0, done.output
    run = _hil(
        "train", "vae", "--out", tmp_path / "run", "--no-progress",
        *_sets(f"device={board}", f"calibration={cal}", "train.epochs=1", *FAST_VAE),
    )  # fmt: skip
    assert run.exit_code == 0, run.output
    assert "test -ELBO" in run.output


def test_a_short_record_names_the_session_to_rerun(tmp_path: Path) -> None:
    cal = tmp_path / "short.zarr"
    assert _hil("calibrate", EMU, "--out", cal, "--routines", "adc,dac", "--channels", "100").exit_code == 0
    run = _hil("train", "vae", "--out", tmp_path / "run", *_sets(f"device={EMU}", f"calibration={cal}"))
    line = _one_line_error(run)
    assert "136 node channels" in line
    # the command to paste asks for the channels the network needs, keeps the record's routines
    # and adds the mvm routine it lacks (the run would otherwise warn that mvm outputs pass
    # uncorrected: a second hint), on a square tile of the network's longest side (137: its
    # 136 nodes' tile with the bias row), so that its mvm lines are all measured
    rerun = line.split("`")[1]
    assert (
        rerun
        == shlex.join(["hil", "calibrate", EMU, "--out", str(cal)])
        + " --overwrite --tiles 137x137 --channels 137 --routines adc,dac,mvm"
    )


# ------------------------------------------------------------------------ 2. folders and --overwrite
@pytest.fixture(scope="module")
def vae_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("runs") / "tdh-vae"
    done = _hil("train", "vae", "--out", folder, "--no-progress", *_sets("train.epochs=1", *FAST_VAE))
    assert done.exit_code == 0, done.output
    return folder


def test_inspect_and_plot_take_the_run_folder(vae_run: Path, tmp_path: Path) -> None:
    shown = _hil("inspect", vae_run)
    assert shown.exit_code == 0, shown.output
    assert "status       complete" in shown.output
    plotted = _hil("plot", vae_run, "--out", tmp_path / "plots")
    assert plotted.exit_code == 0, plotted.output
    assert (tmp_path / "plots" / "metrics.png").stat().st_size > 1000


def test_a_second_vae_run_into_the_folder_names_the_flag(vae_run: Path) -> None:
    line = _one_line_error(_hil("train", "vae", "--out", vae_run, *_sets(*FAST_VAE)))
    assert "--overwrite" in line and f"--resume {vae_run}" in line and "overwrite=True" not in line


def test_calibrate_refuses_to_overwrite_without_the_flag(tmp_path: Path) -> None:
    cal = tmp_path / "cal.zarr"
    args = ("calibrate", EMU, "--out", cal, "--routines", "settle")
    assert _hil(*args).exit_code == 0
    stamp = zarr.open_group(str(cal), mode="r").attrs["created"]
    line = _one_line_error(_hil(*args))
    assert "already exists" in line and "--overwrite" in line
    assert zarr.open_group(str(cal), mode="r").attrs["created"] == stamp
    assert _hil(*args, "--overwrite").exit_code == 0


def test_classifier_overwrite_flag(tmp_path: Path) -> None:
    run = tmp_path / "c.zarr"
    args = ("train", "classifier", "--out", run, "--no-progress", *_sets(*FAST_CLASSIFIER))
    assert _hil(*args).exit_code == 0
    line = _one_line_error(_hil(*args))
    assert "--overwrite" in line and "overwrite=True" not in line
    again = _hil(*args, "--overwrite")
    assert again.exit_code == 0, again.output


def test_default_run_folders_of_runs_started_in_the_same_second_differ(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --out each run claims its own folder under runs/: two in one second (a shell
    loop starting one per GPU) used to collide, and all but one stopped at "already exists"."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from hil.cli.common import claim_new_run

    monkeypatch.chdir(tmp_path)
    real = time.strftime
    monkeypatch.setattr(
        time, "strftime", lambda fmt, *a: "20261204-183935" if fmt == "%Y%m%d-%H%M%S" else real(fmt, *a)
    )
    for _ in range(2):
        r = _hil("train", "classifier", "--no-progress", *_sets(*FAST_CLASSIFIER))
        assert r.exit_code == 0, r.output
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["classifier-20261204-183935-2.zarr", "classifier-20261204-183935.zarr"]
    assert all(open_run(tmp_path / "runs" / name).status == "complete" for name in runs)
    with ThreadPoolExecutor(8) as pool:  # claimed by mkdir: one winner per name
        claimed = list(pool.map(lambda _: claim_new_run("classifier"), range(16)))
    assert len(set(claimed)) == 16 and all(p.is_dir() and not any(p.iterdir()) for p in claimed)


# ------------------------------------------------------------------------ 3. a board that never opened
def test_a_run_that_never_reached_its_board_does_not_block_its_folder(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    _one_line_error(_hil("train", "vae", "--out", folder, *_sets(f"device={DEAD}", *FAST_VAE)))
    again = _hil("train", "vae", "--out", folder, "--no-progress", *_sets("train.epochs=1", *FAST_VAE))
    assert again.exit_code == 0, again.output


def _failed_run(path: Path, cfg: Any, kind: str, name: str) -> None:
    """A run log whose board stopped answering before its first snapshot (a board that does not
    answer at the start leaves no run log: the board is opened before it is created)."""
    from hil.runlog import RunLog

    with pytest.raises(ConnectionError), RunLog.create(path, cfg, kind=kind, name=name):
        raise ConnectionError(f"{cfg.device}: the board stopped answering")


def test_resume_takes_a_new_device_and_nothing_else(tmp_path: Path) -> None:
    from hil.config import load_into
    from hil.vae.config import VAERunConfig

    folder = tmp_path / "run"
    sets = [f"device={DEAD}", "train.epochs=1", *FAST_VAE]
    _one_line_error(_hil("train", "vae", "--out", folder, *_sets(*sets)))
    assert not folder.exists()  # the board is opened before the run folder is made
    cfg = load_into(VAERunConfig(), None, sets)
    _failed_run(folder / "run.zarr", cfg, "train-vae", cfg.model.variant)
    line = _one_line_error(
        _hil("train", "vae", "--resume", folder, *_sets(f"device={EMU}", "train.epochs=3"))
    )
    assert "train.epochs" in line and "device" in line
    done = _hil("train", "vae", "--resume", folder, "--no-progress", *_sets(f"device={EMU}"))
    assert done.exit_code == 0, done.output
    run = open_run(folder / "run.zarr")
    assert run.status == "complete" and run.config["device"] == EMU
    assert run.device is not None and run.device["uri"] == EMU
    assert run.attrs["resumes"][-1]["device_before"] == DEAD


def test_classifier_resume_takes_a_new_device(tmp_path: Path) -> None:
    from hil.config import load_config

    run = tmp_path / "c.zarr"
    _one_line_error(_hil("train", "classifier", "--out", run, *_sets(f"device={DEAD}", *FAST_CLASSIFIER)))
    assert not run.exists()  # the board is opened before the run log is created
    cfg = load_config(None, [f"device={DEAD}", *FAST_CLASSIFIER])
    _failed_run(run, cfg, "train-classifier", cfg.name)
    done = _hil("train", "classifier", "--resume", run, "--no-progress", *_sets(f"device={EMU}"))
    assert done.exit_code == 0, done.output
    assert open_run(run).config["device"] == EMU


# ------------------------------------------------------------------------ 4. one line, exit 2
@pytest.mark.parametrize(
    "args",
    [
        ("demo", "--device", "nope://x"),
        ("demo", "--device", DEAD),
        ("gradcheck", "--device", "nope://x"),
        ("gradcheck", "--device", DEAD),
        ("train", "classifier", "--set", "device=nope://x"),
        ("train", "vae", "--set", f"device={DEAD}"),
        ("calibrate", "nope://x"),
        ("calibrate", DEAD),
        ("calibrate", EMU, "--check", "missing.zarr"),
        ("calibrate", EMU, "--tiles", "64by64"),
        ("train", "vae", "--set", "calibration=missing.zarr"),
        ("train", "classifier", "--config", "missing.toml"),
        ("inspect", "missing"),
        ("plot", "missing"),
        ("sweep", "missing.toml"),
        ("sweep", "examples/sweep_digits.toml", "--board", "nope://x"),
        ("emulator", "serve", "--preset", "nope", "--scpi-port", "0"),
        ("emulator", "serve", "--scpi-port", "-1"),
    ],
    ids=lambda a: " ".join(a)[:40],
)
def test_bad_uri_or_missing_file_is_one_line_and_exit_2(
    args: tuple[str, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = Path(__file__).resolve().parents[1]
    args = tuple(str(root / a) if a.startswith("examples/") else a for a in args)
    monkeypatch.chdir(tmp_path)
    out = ("--out", str(tmp_path / "out")) if args[0] in ("train", "calibrate", "sweep") else ()
    _one_line_error(_hil(*args, *out))


def test_serve_refuses_a_port_out_of_range_before_binding() -> None:
    done = _hil("emulator", "serve", "--scpi-port", "99999")
    assert done.exit_code == 2 and "Traceback" not in done.output
    assert "--scpi-port" in done.output and "65535" in done.output


@pytest.mark.parametrize(("option", "value"), [("--drop-rate", "-1"), ("--corrupt-rate", "5")])
def test_serve_refuses_a_link_fault_rate_outside_0_1(option: str, value: str) -> None:
    # --scpi-port -1 and no pty: nothing is served even where the rate got through; refused as
    # the option's range (click's usage error, as --scpi-port's), not by the fault plan's field
    # (p_drop, p_corrupt: tests/test_serve_fault_options.py)
    done = _hil("emulator", "serve", "--scpi-port", "-1", option, value)
    assert done.exit_code == 2 and "Traceback" not in done.output
    assert f"'{option}'" in done.output and "p_" not in done.output


# ------------------------------------------------------------------------ 5. progress and wall time
def test_gradcheck_shows_progress_and_wall_time() -> None:
    # --progress: the bar is drawn by default only when stderr is a terminal (tests/test_cli_ci.py)
    done = _hil("gradcheck", "--betas", "0.1,0.01", "--sizes", "64,16,10", "--batch", "8", "--progress")
    assert done.exit_code == 0, done.output
    assert "beta 0.01 centered" in done.stderr and "5/5" in done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith("done in ")
    assert "warning" not in done.stderr  # the ideal board settles to the check's tolerance


def test_gradcheck_warns_when_a_noisy_board_stops_the_free_phase_at_its_noise() -> None:
    uri = "emulator://?preset=rram&seed=0&wire_resistance=0"
    done = _hil("gradcheck", "--device", uri, "--betas", "0.01", "--sizes", "64,16,10", "--batch", "8")
    # the cosines measure the board's noise, not EP: the check (--min-cosine) fails
    assert done.exit_code == 1, done.output
    assert "warning: the free states still move by" in done.stderr
    assert "emulator://?preset=ideal" in done.stderr
    assert "FAIL: EP does not match implicit differentiation at beta 0.01" in done.stderr


def test_vae_without_progress_bar_prints_a_line_per_epoch(tmp_path: Path) -> None:
    done = _hil("train", "vae", "--out", tmp_path / "r", "--no-progress", *_sets("train.epochs=2", *FAST_VAE))
    assert done.exit_code == 0, done.output
    epochs = [line for line in done.stdout.splitlines() if line.startswith("epoch ")]
    assert [e.split()[1] for e in epochs] == ["1/2", "2/2"]
    assert done.stdout.strip().splitlines()[-1].startswith("wall time")


def test_stage_lines_time_a_stage_from_the_end_of_the_one_before(capsys: pytest.CaptureFixture[str]) -> None:
    """A routine reports its first step once that step is done: the line must still count it."""
    import time

    from hil.cli.calibrate import StageLines

    lines = StageLines()
    time.sleep(0.3)  # the stage's first step, before its first report
    lines("drift", 5, 5)
    seconds = float(capsys.readouterr().out.split("done in")[1].split()[0])
    assert seconds >= 0.3


def test_calibrate_refuses_what_would_fail_after_the_session(tmp_path: Path) -> None:
    """A report that cannot be written, or would replace another one, is refused before the
    board is touched (it used to fail after the session, losing the summary); --check says
    the session options it would ignore."""
    line = _one_line_error(
        _hil("calibrate", EMU, "--out", tmp_path / "a.zarr", "--png", tmp_path / "no" / "a.png")
    )
    assert "does not exist" in line and not (tmp_path / "a.zarr").exists()
    (tmp_path / "b.png").write_bytes(b"another record's report")
    line = _one_line_error(_hil("calibrate", EMU, "--out", tmp_path / "a.zarr", "--png", tmp_path / "b.png"))
    assert "b.png already exists; add --overwrite" in line
    line = _one_line_error(_hil("calibrate", EMU, "--check", tmp_path / "a.zarr", "--tiles", "8x8"))
    assert "--check runs the drift check" in line and "--tiles" in line
    line = _one_line_error(_hil("calibrate", EMU, "--out", tmp_path / "a.zarr", "--tiles", "0x10"))
    assert "at least 1 row and 1 column, got '0x10'" in line
    line = _one_line_error(_hil("calibrate", EMU, "--out", tmp_path / "a.zarr", "--tiles", "5000x5000"))
    assert "--tiles 5000x5000: this board's tiles hold at most 1024 rows x 1024 columns" in line
    # a page of the report per tile
    args = ("--routines", "stuck", "--tiles", "6x6,4x3", "--no-progress")
    done = _hil("calibrate", EMU, "--out", tmp_path / "two.zarr", *args)
    assert done.exit_code == 0, done.output
    assert f"report    {tmp_path / 'two.png'}, {tmp_path / 'two-tile1.png'}" in done.stdout
    assert (tmp_path / "two-tile1.png").stat().st_size > 10_000
    # channels the session raises above --channels are said, not changed silently
    args = ("--routines", "dac", "--tile-size", "8", "--channels", "8", "--no-progress")
    done = _hil("calibrate", EMU, "--out", tmp_path / "c.zarr", *args)
    assert done.exit_code == 0, done.output
    assert "calibrating 16 state-ADC channels (the DAC routine reads" in done.stdout
    assert load(tmp_path / "c.zarr").converters["adc"].channels == 16


def test_calibrate_without_progress_prints_a_line_per_stage(tmp_path: Path) -> None:
    args = ("--routines", "adc,dac", "--channels", "8", "--no-progress")  # 8 channels: the lines, fast
    done = _hil("calibrate", EMU, "--out", tmp_path / "cal.zarr", *args)
    assert done.exit_code == 0, done.output
    stages = [line.split()[0] for line in done.stdout.splitlines() if " done in " in line]
    assert "adc" in stages and len(stages) == len(set(stages))
    assert "%|" not in done.stderr  # no tqdm bar


MVM_ONLY = "emulator://?preset=rram&seed=0&capabilities=mvm,pulse,program_verify"


def test_calibrate_on_a_board_that_does_not_settle_runs_what_it_can(tmp_path: Path) -> None:
    done = _hil("calibrate", MVM_ONLY, "--out", tmp_path / "cal.zarr", "--no-progress")
    assert done.exit_code == 0, done.output
    assert (
        "skipping adc (needs 'settle'), dac (needs 'settle'), mvm (needs dac, which cannot run)"
        in done.stdout
    )
    stages = {line.split()[0] for line in done.stdout.splitlines() if " done in " in line}
    assert {"stuck", "gmap", "pulse"} <= stages and not stages & {"adc", "dac", "mvm", "settle"}
    # asked for by name, a routine it cannot run is refused with the command that runs the rest
    c2 = tmp_path / "c2.zarr"
    line = _one_line_error(_hil("calibrate", MVM_ONLY, "--out", c2, "--routines", "mvm", "--tiles", "8x4"))
    # quoted for a shell (the URI's & would end the command), with this call's --out and --tiles
    rerun = shlex.join(["hil", "calibrate", MVM_ONLY, "--out", str(c2), "--routines", "stuck,gmap,pulse"])
    assert f"`{rerun} --tiles 8x4` runs what it can" in line
    assert shlex.split(line.split("`")[1])[2] == MVM_ONLY
    # its record, with no converter banks, trains: what it leaves uncorrected is said once
    # (in-process, pytest takes the warning the CLI would print as one `warning:` line)
    run = tmp_path / "c.zarr"
    sets = _sets(f"device={MVM_ONLY}", f"calibration={tmp_path / 'cal.zarr'}", *FAST_CLASSIFIER)
    with pytest.warns(UserWarning) as said:
        trained = _hil("train", "classifier", "--out", run, "--no-progress", *sets)
    assert trained.exit_code == 0, trained.output
    told = [w for w in said if "record has no dac, adc, mvm calibration" in str(w.message)]
    assert len(told) == 1 and "pass uncorrected" in str(told[0].message)
    assert "test accuracy" in trained.stdout


def test_calibrate_asked_for_routines_it_partly_cannot_run_suggests_only_the_rest_asked_for(
    tmp_path: Path,
) -> None:
    """`--routines adc,stuck` on a board that does not settle: the refusal names adc and why,
    and the command it suggests runs stuck, the one asked for that can run, not every routine
    the board can (stuck,gmap,pulse: calibration the user did not ask for, pulses included)."""
    out = tmp_path / "c.zarr"
    line = _one_line_error(_hil("calibrate", MVM_ONLY, "--out", out, "--routines", "adc,stuck"))
    assert "cannot run adc (needs 'settle');" in line, line
    rerun = shlex.join(["hil", "calibrate", MVM_ONLY, "--out", str(out), "--routines", "stuck"])
    assert f"`{rerun}` runs the others asked for" in line, line


def test_demo_on_a_board_that_does_not_settle_shows_no_nan() -> None:
    done = _hil("demo", "--device", MVM_ONLY)
    assert done.exit_code == 0, done.output
    assert "settles   on the host" in done.stdout and "nan" not in done.stdout
    assert "energy    - : a host-iterated settle reads products from the board" in done.stdout


# ------------------------------------------------------------------------ 6. metrics figure
def test_metrics_figure_has_one_panel_per_metric() -> None:
    from hil.runlog.plots import metrics_figure

    steps = np.arange(10)
    tables = {
        "train": {"step": steps, "epoch": steps, "settle_steps": 100.0 + steps, "kl": np.ones(10)},
        "test": {"step": steps[:2], "epoch": steps[:2], "neg_elbo": np.array([50.0, 20.0])},
    }
    fig = metrics_figure(tables)
    assert fig is not None
    assert sorted(ax.get_title() for ax in fig.axes) == ["kl", "neg_elbo", "settle_steps"]


# ------------------------------------------------------------------------ 7. --threads
def test_classifier_threads_default_is_what_its_help_says() -> None:
    import inspect
    import typing

    from hil.cli.train import classifier

    default = inspect.signature(classifier).parameters["threads"].default
    option = typing.get_type_hints(classifier, include_extras=True)["threads"].__metadata__[0]
    assert f"Default {default}" in option.help


def test_help_keeps_every_bracketed_word() -> None:
    """Rich markup reads ``[data]`` as a style tag and drops it ("the mnist5k subset from the
    extra"): every ``[word]`` in a command's help or its options' help reaches the screen."""
    import re
    from collections import Counter

    import typer

    token = re.compile(r"\\?\[([A-Za-z_][\w.-]*)\]")

    def walk(cmd: Any, path: list[str]) -> list[tuple[list[str], Any]]:
        out = [(path, cmd)]
        for name, sub in getattr(cmd, "commands", {}).items():  # typer's groups (its own click)
            out += walk(sub, [*path, name])
        return out

    checked = 0
    for path, cmd in walk(typer.main.get_command(app), []):
        texts = [cmd.help or ""] + [getattr(p, "help", None) or "" for p in cmd.params]
        words = Counter(m.group(1) for t in texts for m in token.finditer(t))
        if not words:
            continue
        shown = _hil(*path, "--help")
        assert shown.exit_code == 0, shown.output
        missing = sorted(w for w, n in words.items() if shown.output.count(f"[{w}]") < n)
        assert not missing, (path, missing)
        checked += sum(words.values())
    assert checked >= 6  # [data] [model] [ep] [train] of --config, [data] extra, [ray] of sweep


def test_help_descriptions_are_filled_paragraphs_at_80_columns() -> None:
    """A command's description is wrapped in the source at about 90 columns; on an 80-column
    terminal (a pipe gets 120: tests/test_cli_ci.py) its paragraphs are refilled, not wrapped
    twice into ragged lines ("... on the" / "ideal" / "emulator ..."): every line of a
    paragraph but its last is at least 60 columns wide."""
    import typer

    def walk(cmd: Any, path: list[str]) -> list[list[str]]:
        out = [path]
        for name, sub in getattr(cmd, "commands", {}).items():
            out += walk(sub, [*path, name])
        return out

    paragraphs = 0
    for path in walk(typer.main.get_command(app), []):
        shown = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "80"})  # an 80-column terminal
        assert shown.exit_code == 0, shown.output
        lines = shown.output.splitlines()
        start = next(i for i, line in enumerate(lines) if line.strip().startswith("Usage:")) + 1
        end = next(i for i, line in enumerate(lines) if line.lstrip().startswith("╭"))
        text = "\n".join(line.rstrip() for line in lines[start:end]).strip("\n")
        for para in text.split("\n\n"):
            body = para.splitlines()
            paragraphs += 1
            assert all(len(line) >= 60 for line in body[:-1]), (path, body)
    assert paragraphs >= 20


def test_help_option_columns_are_short_metavars() -> None:
    """Typer's type labels (``<int range>``, ``<path>``, ``<bool>`` on flags that take no
    value) left the descriptions about 25 of 80 columns: every option shows INT, FLOAT,
    PATH, TEXT, a choice, or nothing for a flag, in every command's --help."""
    import re

    import typer

    def walk(cmd: Any, path: list[str]) -> list[list[str]]:
        out = [path]
        for name, sub in getattr(cmd, "commands", {}).items():
            out += walk(sub, [*path, name])
        return out

    flags = values = 0
    for path in walk(typer.main.get_command(app), []):
        shown = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "80"})  # an 80-column terminal
        assert shown.exit_code == 0, shown.output
        options = shown.output[shown.output.index("─ Options ─") :]  # arguments keep Typer's labels
        assert not re.search(r"<(int|float|str|path|bool|list)[^>]*>", options), (path, options)
        for line in shown.output.splitlines():
            row = re.match(r"│ (?:\*\s+)?(--[\w-]+)(?:\s+-\w)?(?:\s+--no-[\w-]+)?\s{2,}(\S+)", line)
            if row and row.group(1) in ("--help", "--overwrite"):
                flags += 1
                assert not row.group(2).isupper(), line  # the description, no type
            elif row and row.group(2) in ("INT", "FLOAT", "PATH", "TEXT"):
                values += 1
    assert flags >= 10 and values >= 30


def test_every_integer_option_that_sets_an_amount_of_work_declares_a_bound() -> None:
    """``hil mhn phase --d 100000000`` took 16 GB before the board's tile limit was looked at,
    and ``hil calibrate --reads 1000000000`` ran on: every integer option but a seed or a port
    declares its largest value, and one past it is refused before any work (exit 2)."""
    import typer

    def walk(cmd: Any, path: list[str]) -> list[tuple[list[str], Any]]:
        out = [(path, p) for p in getattr(cmd, "params", [])]
        for name, sub in getattr(cmd, "commands", {}).items():
            out += walk(sub, [*path, name])
        return out

    bounded = []
    for path, p in walk(typer.main.get_command(app), []):
        if "int" not in str(p.display_type(None)) or "seed" in p.name or p.name.endswith("_port"):
            continue
        assert p.max is not None, (path, p.name)
        bounded.append((path, p))
    assert len(bounded) >= 18
    path, p = next((path, p) for path, p in bounded if path == ["mhn", "phase"] and p.name == "d")
    shown = _hil(*path, f"--{p.name}", str(p.max + 1))
    assert shown.exit_code == 2 and "less than or equal to 1024" in shown.output, shown.output


def test_help_texts_keep_their_placeholders() -> None:
    """The help is rendered as markdown, where ``<date-time>`` is an HTML tag and vanished:
    ``--out`` read "Default: runs/classifier-.zarr." No option or command help holds an
    angle-bracket placeholder, and the run log's default name shows in full."""
    import re

    import typer

    def walk(cmd: Any) -> list[Any]:
        out = [cmd, *getattr(cmd, "params", [])]
        for sub in getattr(cmd, "commands", {}).values():
            out += walk(sub)
        return out

    tagged = [
        (getattr(o, "name", None), o.help)
        for o in walk(typer.main.get_command(app))
        if re.search(r"<[A-Za-z][\w -]*>", getattr(o, "help", None) or "")
    ]
    assert tagged == []
    shown = CliRunner().invoke(app, ["train", "classifier", "--help"], env={"COLUMNS": "200"})
    assert "runs/classifier-DATE-TIME.zarr" in shown.output, shown.output


def test_readme_lists_every_benchmark() -> None:
    """The README's benchmarks table names every script in benchmarks/ (a new one is found)."""
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    scripts = sorted(p.name for p in (root / "benchmarks").iterdir() if p.suffix in (".py", ".sh"))
    assert len(scripts) >= 20
    assert [s for s in scripts if f"`benchmarks/{s}`" not in readme] == []


def test_a_full_or_read_only_disk_is_named_with_what_to_do(capsys: pytest.CaptureFixture[str]) -> None:
    """The crash audit: a full disk ended training with "[Errno 28] No space left on device",
    no path and no word of what to do; a read-only store gave a 231-line traceback on resume."""
    import errno

    import typer

    from hil.cli.common import one_line_errors

    for code, fix in ((errno.ENOSPC, "free some space"), (errno.EROFS, "make it writable")):
        with pytest.raises(typer.Exit) as info, one_line_errors():
            raise OSError(code, os.strerror(code), "/data/run.zarr/metrics/train/c/3")
        assert info.value.exit_code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "run.zarr/metrics/train/c/3" in err and fix in err, err


@pytest.mark.parametrize("command", [["train", "classifier"], ["train", "vae"]])
@pytest.mark.parametrize("extra", [["--out", "elsewhere"], ["--overwrite"]])
def test_resume_refuses_the_options_of_a_new_run(
    command: list[str], extra: list[str], tmp_path: Path
) -> None:
    """The crash audit: --resume with --out (or --overwrite) ignored them without a word."""
    line = _one_line_error(_hil(*command, "--resume", tmp_path / "run", *extra))
    assert "--out and --overwrite are for a new run: drop them" in line
