"""The CI audit: `hil` as a build step sees it, stdout and stderr pipes or files, no terminal.

Each command runs as a real subprocess, so that what is (or is not) a terminal is the
process's own streams."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

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
        (["gradcheck", "--sizes", "64,12,10", "--batch", "8", "--betas", "0.01"], "centered"),
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
