"""The CI audit: `hil` as a build step sees it, stdout and stderr pipes or files, no terminal.

Each command runs as a real subprocess, so that what is (or is not) a terminal is the
process's own streams."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path
from typing import Any

import pytest

from hil.testing import BoardServers

HIL = [sys.executable, "-c", "from hil.cli import main; main()"]
EMU = "emulator://?preset=rram&seed=0"
TINY = ["train.epochs=2", "data.limit_train=64", "data.limit_test=32", "model.sizes=[64,16,10]"]
TINY_VAE = ["train.epochs=1", "data.limit_train=64", "data.limit_test=32", "eval.samples=32"]
TINY_VAE += ["eval.eps_draws=1"]


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("COLUMNS", "LINES", "TERMINAL_WIDTH", "FORCE_COLOR", "PY_COLORS", "GITHUB_ACTIONS"):
        env.pop(var, None)
    return env


def _sets(*items: str) -> list[str]:
    return [a for s in items for a in ("--set", s)]


def _hil(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*HIL, *map(str, args)], capture_output=True, text=True, env=_env(), timeout=timeout
    )


# ------------------------------------------------------------------ 1. progress bars
@pytest.mark.parametrize(
    "command, line",
    [
        (["train", "classifier", *_sets(*TINY)], "epoch   2"),
        (["train", "vae", *_sets(*TINY_VAE)], "epoch   1/1"),
        (["gradcheck", "--sizes", "64,16,10", "--batch", "8", "--betas", "0.01"], "centered"),
        (["calibrate", EMU, "--routines", "adc", "--channels", "8"], "adc        done in"),
    ],
    ids=["train-classifier", "train-vae", "gradcheck", "calibrate"],
)
def test_no_progress_bar_when_stderr_is_not_a_terminal(tmp_path: Path, command: list[str], line: str) -> None:
    """`hil train classifier ... 2> err` wrote one line of ~40 carriage-return tqdm frames: with
    neither --progress nor --no-progress, a command whose stderr is not a terminal draws no bar
    and prints its plain lines (one per epoch or stage) instead."""
    out = {"train": ["--out", tmp_path / "run"], "calibrate": ["--out", tmp_path / "cal.zarr"]}
    done = _hil(*command, *out.get(command[0], []))
    assert done.returncode == 0, done.stderr
    assert "%|" not in done.stderr, done.stderr[:500]  # no tqdm frame (text mode reads \r as \n)
    assert line in done.stdout, done.stdout


def test_progress_forces_the_bar_and_a_terminal_gets_one_by_default(tmp_path: Path) -> None:
    """--progress still draws the bar into a file; with no option, stderr on a terminal (a pty)
    gets the bar and stdout no epoch lines."""
    forced = _hil("train", "classifier", *_sets(*TINY), "--out", tmp_path / "a", "--progress")
    assert forced.returncode == 0, forced.stderr
    assert forced.stderr.count("batch/s") >= 2, forced.stderr  # frames (text mode reads \r as \n)
    assert "epoch   1" not in forced.stdout

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 0 x 0: no bar fits
    try:
        proc = subprocess.Popen(
            [*HIL, "train", "classifier", *_sets(*TINY), "--out", str(tmp_path / "b")],
            stdout=subprocess.PIPE,
            stderr=follower,
            text=True,
            env=_env(),
        )
        os.close(follower)
        seen = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the terminal's other end is closed: the process is done with it
                break
            if not chunk:
                break
            seen += chunk
        stdout, _ = proc.communicate(timeout=300)
    finally:
        os.close(leader)
    assert proc.returncode == 0, seen.decode(errors="replace")
    assert b"\r" in seen and b"batch" in seen, seen
    assert "epoch   1" not in stdout, stdout


# ------------------------------------------------------------------ 2. gradcheck as a gate
GRADCHECK = ["gradcheck", "--no-progress", "--sizes", "64,16,10", "--batch", "8"]


def test_gradcheck_fails_a_build_when_ep_misses_at_its_smallest_beta(tmp_path: Path) -> None:
    """`hil gradcheck --betas 0.1,2.0` printed cosines down to 0.77 and exited 0. At the smallest
    beta every cosine must reach --min-cosine (0.999 by default: what EP reaches at small beta):
    exit 1, the table still on stdout, one FAIL line naming the rows; --json FILE records them."""
    out = tmp_path / "gc.json"
    done = _hil(*GRADCHECK, "--betas", "0.1,2.0", "--json", out)
    assert done.returncode == 1, done.stderr
    assert "cos centered" in done.stdout and "input:s0" in done.stdout
    fails = [line for line in done.stderr.splitlines() if line.startswith("FAIL: ")]
    assert len(fails) == 1 and "at beta 0.1 " in fails[0] and "--min-cosine 0.999" in fails[0], done.stderr
    record = json.loads(out.read_text())
    assert record["ok"] is False and record["checked_beta"] == 0.1 and record["min_cosine"] == 0.999
    assert record["failed"]
    for r in record["failed"]:
        assert (r["beta"], r["mode"]) == (0.1, "centered") and r["cosine"] < 0.999, r
        assert f"{r['param']} {r['cosine']:.6f}" in fails[0]
    assert {r["beta"] for r in record["rows"]} == {0.1, 2.0} and len(record["rows"]) == 2 * 2 * 5
    assert record["network"]["sizes"] == [64, 16, 10] and record["identity"].startswith("xbar-hil,")

    lenient = _hil(*GRADCHECK, "--betas", "0.1,2.0", "--min-cosine", "-1")
    assert lenient.returncode == 0, lenient.stderr
    assert "FAIL" not in lenient.stderr and "PASS" in lenient.stdout


def test_gradcheck_passes_at_small_beta_and_writes_json_to_stdout() -> None:
    """With --json - the JSON object is all of stdout (the table goes to stderr)."""
    done = _hil(*GRADCHECK, "--betas", "0.1,0.001", "--json", "-")
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["ok"] is True and record["failed"] == [] and record["checked_beta"] == 0.001
    assert min(r["cosine"] for r in record["rows"] if (r["beta"], r["mode"]) == (0.001, "centered")) >= 0.999
    assert "cos centered" in done.stderr and "PASS" in done.stderr


# ------------------------------------------------------------------ 3. info and inspect --json
INFO_KEYS = ["uri", "idn", "identity", "preset", "limits", "capabilities", "extra", "status", "safety"]
INFO_KEYS += ["meter", "owner", "wear"]
INSPECT_KEYS = ["path", "kind", "name", "status", "created", "finished", "error", "stopped", "resumes"]
INSPECT_KEYS += [
    "versions",
    "device",
    "boards",
    "ranks",
    "device_state",
    "calibration_id",
    "resolved",
    "config",
]
INSPECT_KEYS += ["metrics", "traces", "tiles", "program", "snapshots"]


def test_info_json_over_a_real_transport(board_servers: BoardServers, tmp_path: Path) -> None:
    """`hil info --json -`: one JSON object, all of stdout, with the documented keys and the
    board's own values; --json FILE keeps the text on stdout."""
    from drivers import open_device

    uri = board_servers.uri("visa-tcp")
    done = _hil("info", uri, "--json", "-", timeout=120)
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert list(record) == INFO_KEYS
    with open_device(uri + "?lock=0") as dev:
        info = dev.info
    assert record["uri"] == uri and record["idn"] == info.identity.idn()
    assert record["identity"]["model"] == info.identity.model
    assert record["capabilities"] == sorted(info.capabilities)
    assert record["limits"]["g_max"] == info.limits.g_max and record["limits"]["adc_range"] == [0.0, 1.0]
    assert record["limits"]["clamp_max"] == info.limits.clamp_max
    assert record["safety"] == {"refused": 0, "violations": 0}
    assert set(record["status"]) == {"epoch", "transaction", "configured", "arrays_id"}
    assert type(record["status"]["arrays_id"]) is int  # the emulator keeps its arrays' generation
    assert record["wear"] is None  # the board declares no pulse endurance

    out = tmp_path / "info.json"
    both = _hil("info", uri, "--json", out, timeout=120)
    assert both.returncode == 0, both.stderr
    assert both.stdout.startswith("device ") and json.loads(out.read_text())["idn"] == record["idn"]
    missing = _hil("info", uri, "--json", tmp_path / "nope" / "info.json", timeout=120)
    assert missing.returncode == 2 and missing.stderr.startswith("error: --json "), missing.stderr


def test_inspect_json(tmp_path: Path) -> None:
    """`hil inspect RUN --json -`: the summary's content with stable keys and the run's numbers."""
    from hil.runlog import open_run

    run = tmp_path / "run.zarr"
    trained = _hil("train", "classifier", *_sets(*TINY), "--out", run)
    assert trained.returncode == 0, trained.stderr
    done = _hil("inspect", run, "--json", "-")
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert list(record) == INSPECT_KEYS
    log = open_run(run)
    assert (record["kind"], record["status"]) == ("train-classifier", "complete")
    assert record["config"] == log.config and record["device"]["idn"] == log.device["idn"]
    train = log.table("metrics/train")
    assert record["metrics"]["train"]["rows"] == len(train["step"])
    assert record["metrics"]["train"]["columns"]["loss"]["last"] == float(train["loss"][-1])
    assert record["metrics"]["test"]["epochs"] == [1, 2]
    assert record["tiles"]["W0"]["shape"] == [65, 16] and record["snapshots"]["kept"] == len(log.snapshots)
    assert set(record["program"]["W0"]["last"]) == {"iterations", "within_tol", "residual_max", "gave_up"}


def test_conformance_json_to_stdout() -> None:
    """`--json -` means the same in every command: the object on stdout, the lines on stderr."""
    done = _hil("conformance", "emulator://?preset=ideal&seed=0", "--json", "-", timeout=300)
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert (
        record["ok"] is True
        and record["failed"] == 0
        and record["passed"] == len([c for c in record["checks"] if c["status"] == "PASS"])
    )
    assert "passed, 0 failed" in done.stderr


# ------------------------------------------------------------------ 4. exit codes, nothing left behind
DEAD = "visa://TCPIP0::127.0.0.1::1::SOCKET"  # nothing listens on port 1: refused at once


def _one_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, (done.returncode, done.stdout[-2000:], done.stderr[-2000:])
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


def test_a_sweep_on_a_dead_board_is_one_line_before_any_trial(tmp_path: Path) -> None:
    """A sweep whose board does not answer ran every trial against it and exited 1 ("no trial
    completed"): its board is opened before the first trial and the sweep folder, as a bad
    device URI is answered everywhere (one line, exit 2)."""
    spec = tmp_path / "dead.toml"
    spec.write_text(
        '[sweep]\ntrainer = "classifier"\nobjective = "test_acc"\nn_trials = 3\nbatch = 1\n'
        f'[base]\ndevice = "{DEAD}"\nmodel.sizes = [64, 8, 10]\ntrain.epochs = 1\n'
        'data.limit_train = 32\ndata.limit_test = 16\n[space."train.lr"]\ntype = "float"\n'
        "low = 0.01\nhigh = 0.5\n"
    )
    out = tmp_path / "sweep"
    line = _one_line(_hil("sweep", spec, "--out", out))
    assert f"cannot open the board {DEAD}" in line and "Connection refused" in line, line
    assert not out.exists()
    # --board URI in place of the base config's device: that board is the one checked
    line = _one_line(_hil("sweep", spec, "--out", out, "--board", DEAD.replace("::1::", "::2::")))
    assert "127.0.0.1::2::SOCKET" in line and not out.exists()


@pytest.mark.parametrize(
    "command, sets",
    [
        (["train", "classifier"], ["model.sizes=[64,32,7]"]),  # 10 classes, not 7
        (["train", "classifier"], [f"device={DEAD}", "model.sizes=[64,8,10]"]),
        (["train", "vae"], [f"device={DEAD}"]),
        (["train", "vae"], ["data.name=mnist", "data.root=nowhere"]),
    ],
    ids=["classifier-sizes", "classifier-dead-board", "vae-dead-board", "vae-no-data"],
)
def test_a_run_that_cannot_start_leaves_no_run_behind(
    tmp_path: Path, command: list[str], sets: list[str]
) -> None:
    """`--set model.sizes=[64,32,7]` exited 2 and left an empty run store at --out (a rerun was
    then refused as "already exists"): the data, the model and its boards are checked before
    the run log is created; the default run folder (runs/...) is not made either."""
    out = tmp_path / "runs" / "x3"
    _one_line(_hil(*command, *_sets(*sets), "--out", out))
    assert not out.exists() and not (tmp_path / "runs").exists()
    default = subprocess.run(
        [*HIL, *command, *_sets(*sets)], capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=300
    )
    _one_line(default)
    assert not (tmp_path / "runs").exists()


def test_a_resume_on_a_dead_board_leaves_the_run_log_as_it_was(tmp_path: Path) -> None:
    """The board is opened before the run log is reopened for the resume: the log keeps its
    status and resumes, and the line says how to go on once the board is back."""
    from hil.runlog import open_run

    run = tmp_path / "run.zarr"
    assert _hil("train", "classifier", *_sets(*TINY), "--out", run).returncode == 0
    before = open_run(run).attrs
    done = _hil("train", "classifier", "--resume", run, *_sets(f"device={DEAD}"))
    assert done.returncode == 2 and done.stderr.startswith("error: "), done.stderr
    assert f"--resume {run}" in done.stderr  # once the board is back
    after = open_run(run).attrs
    assert (after["status"], after.get("resumes"), after["config"]) == (
        before["status"], before.get("resumes"), before["config"]
    )  # fmt: skip


# ------------------------------------------------------------------ 5. two runs of one seed
# What may differ between two runs of one seed: the wall clock and the process, nothing else.
# Arrays: none (`program/*/time_s`, `traces/settles/settle_time_s` are the board's simulated
# time). Attributes: docs/runlog.md ("Root attributes", "Snapshots").
ARRAYS_ALLOWED_TO_DIFFER: frozenset[str] = frozenset()
ROOT_ATTRS_ALLOWED_TO_DIFFER = frozenset({"created", "finished", "writer"})  # writer: host, pid, argv
SNAPSHOT_ATTRS_ALLOWED_TO_DIFFER = frozenset({"time"})


def _seeded_hil(global_seed: int) -> list[str]:
    """`hil` with the process's global generators (torch, numpy, random) seeded first."""
    code = (
        "import random, numpy, torch; "
        f"torch.manual_seed({global_seed}); numpy.random.seed({global_seed}); random.seed({global_seed}); "
        "from hil.cli import main; main()"
    )
    return [sys.executable, "-c", code]


def _arrays(group: Any, prefix: str = "") -> dict[str, Any]:
    import zarr

    out = {}
    for name, member in group.members():
        path = f"{prefix}/{name}"
        out.update(_arrays(member, path) if isinstance(member, zarr.Group) else {path: member})
    return out


def _groups(group: Any, prefix: str = "") -> dict[str, Any]:
    import zarr

    out = {prefix or "/": group}
    for name, member in group.members():
        if isinstance(member, zarr.Group):
            out.update(_groups(member, f"{prefix}/{name}"))
    return out


def _without_wall_clock(state: dict[str, Any]) -> dict[str, Any]:
    """A snapshot's state less each epoch's wall-clock `seconds` (its `history`)."""
    extra = dict(state.get("extra", {}))
    extra["history"] = [{k: v for k, v in h.items() if k != "seconds"} for h in extra.get("history", [])]
    return {**state, "extra": extra}


def test_two_runs_of_one_seed_write_the_same_run_log(tmp_path: Path) -> None:
    """The same seed gave the same weights and metrics, but every snapshot's `rng.torch` and
    `rng.numpy.1` differed: the process's global generator states were saved, never seeded,
    and never drawn from by the trainers (tests/test_global_rng.py). Two runs in processes
    whose global generators start in different states write the same arrays, and the same
    attributes but for the wall clock."""
    import numpy as np
    import zarr

    sets = [*TINY, "log.snapshot_every_s=0"]  # a snapshot at every epoch
    stores = []
    for global_seed in (1, 2):
        store = tmp_path / f"run{global_seed}.zarr"
        done = subprocess.run(
            [*_seeded_hil(global_seed), "train", "classifier", *_sets(*sets), "--out", str(store)],
            capture_output=True,
            text=True,
            env=_env(),
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        stores.append(zarr.open_group(str(store), mode="r"))
    a, b = stores
    arrays_a, arrays_b = _arrays(a), _arrays(b)
    assert sorted(arrays_a) == sorted(arrays_b)
    assert any(p.startswith("/snapshots/") for p in arrays_a) and len(a["snapshots"].attrs["committed"]) == 2
    assert not [p for p in arrays_a if ".rng" in p or "/rng." in p]  # no global generator state kept
    differ = sorted(
        p
        for p in arrays_a
        if arrays_a[p].shape != arrays_b[p].shape
        or not np.array_equal(arrays_a[p][...], arrays_b[p][...], equal_nan=arrays_a[p].dtype.kind == "f")
    )
    assert set(differ) <= ARRAYS_ALLOWED_TO_DIFFER, differ

    groups_a, groups_b = _groups(a), _groups(b)
    assert sorted(groups_a) == sorted(groups_b)
    for path, group in groups_a.items():
        x, y = group.attrs.asdict(), groups_b[path].attrs.asdict()
        if path == "/":
            allowed = ROOT_ATTRS_ALLOWED_TO_DIFFER
            for when in ("start", "end"):  # each board's counters, read at a wall-clock `time`
                for rec in (*x["device_state"][when].values(), *y["device_state"][when].values()):
                    rec.pop("time")
                    rec["status"].pop("arrays_id", None)  # random per board started (docs/protocol.md)
        elif path.startswith("/snapshots/"):
            allowed = SNAPSHOT_ATTRS_ALLOWED_TO_DIFFER
            assert "rng" not in x["state"]
            x["state"], y["state"] = _without_wall_clock(x["state"]), _without_wall_clock(y["state"])
        else:
            allowed = frozenset()
        assert sorted(x) == sorted(y), path
        assert [k for k in x if k not in allowed and x[k] != y[k]] == [], path


# ------------------------------------------------------------------ 6. help and usage, piped
def _help_paths() -> list[list[str]]:
    import typer

    from hil.cli import app

    def walk(cmd: Any, path: list[str]) -> list[list[str]]:
        out = [path]
        for name, sub in getattr(cmd, "commands", {}).items():
            out += walk(sub, [*path, name])
        return out

    return walk(typer.main.get_command(app), [])


def test_piped_help_wraps_instead_of_cutting() -> None:
    """`hil train classifier --help | cat` was cut at 80 columns, words longer than the help
    column ending in an ellipsis ("model.sizes=[64,…", "'device=emulator…"): help written to a
    pipe is drawn wide enough for every option text of every command."""
    done = _hil("train", "classifier", "--help")
    assert done.returncode == 0, done.stderr
    assert "…" not in done.stdout, done.stdout
    flat = " ".join(done.stdout.replace("│", " ").split())
    for text in (
        "--set model.sizes=[64,128,10]",
        "'device=emulator://?preset=rram&seed=0'",
        "ep.programming=NAME.",
    ):
        assert text in flat, text

    from typer.testing import CliRunner

    from hil.cli import app

    cut = {}
    for path in _help_paths():
        shown = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": None, "TERMINAL_WIDTH": None})
        assert shown.exit_code == 0, shown.output
        if "…" in shown.output:
            cut[" ".join(path)] = [line for line in shown.output.splitlines() if "…" in line]
    assert cut == {}
    # the user's COLUMNS still rules
    narrow = CliRunner().invoke(app, ["train", "classifier", "--help"], env={"COLUMNS": "80"})
    assert max(len(line) for line in narrow.output.splitlines()) <= 80


def test_a_group_given_no_command_shows_piped_help_as_wide_as_its_help_option() -> None:
    """`hil train` with no command prints its help (exit 2), drawn by the group's argument
    parsing rather than by ``--help``: piped, it was 80 columns wide while ``hil train --help``
    was `PIPED_WIDTH`. Every group of the tree now draws both alike."""
    import typer
    from typer.testing import CliRunner

    from hil.cli import app
    from hil.cli.help_format import PIPED_WIDTH

    root = typer.main.get_command(app)
    groups = [p for p in _help_paths() if p and getattr(_command(root, p), "no_args_is_help", False)]
    assert ["train"] in groups
    for path in groups:
        bare = CliRunner().invoke(app, path, env={"COLUMNS": None, "TERMINAL_WIDTH": None})
        helped = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": None, "TERMINAL_WIDTH": None})
        assert bare.exit_code == 2 and "Usage: " in bare.output, (path, bare.output)
        widths = {max(len(line) for line in r.output.splitlines()) for r in (bare, helped)}
        assert widths == {PIPED_WIDTH}, (path, widths)


def _command(root: Any, path: list[str]) -> Any:
    for name in path:
        root = root.commands[name]
    return root


def test_usage_errors_are_plain_text_when_stderr_is_not_a_terminal() -> None:
    """A usage error in a CI log is click's plain text, not a box of rich's frame characters;
    on a terminal (a pty) it keeps the box."""
    done = _hil("train", "classifier", "--bogus")
    assert done.returncode == 2
    assert "Error: No such option: --bogus" in done.stderr and "╭" not in done.stderr, done.stderr
    assert done.stderr.startswith("Usage: ") and "train classifier [OPTIONS]" in done.stderr, done.stderr

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        proc = subprocess.run(
            [*HIL, "train", "classifier", "--bogus"],
            stderr=follower,
            stdout=subprocess.PIPE,
            env=_env(),
            timeout=60,
        )
        os.close(follower)
        seen = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(leader)
    assert proc.returncode == 2
    assert "╭".encode() in seen and b"No such option" in seen, seen
