"""The safety audit: `hil calibrate` killed by SIGTERM (a batch scheduler's time limit, `kill`)
stopped mid pulse request, never sent SAFE_STATE, printed nothing and wrote no record. Every
`hil` command now takes SIGTERM as Ctrl-C (`hil.cli.main`): the board goes to its safe state,
the routines that finished are written as a partial record, and the exit code is 143 (128 +
SIGTERM, what batch schedulers expect of a terminated job; Ctrl-C's is 130)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from calibration import load
from hil.testing import BoardServers

HIL = [sys.executable, "-c", "from hil.cli import main; main()"]


@pytest.mark.parametrize("sigint", ["default", "ignored"])
def test_sigterm_mid_pulse_routine_leaves_the_board_safe_and_keeps_the_finished_routines(
    sigint: str, emulated_board: Callable[..., BoardServers], tmp_path: Path
) -> None:
    """`ignored`: a job a non-interactive shell starts in the background inherits SIGINT
    ignored, which swallowed the SIGINT that SIGTERM is turned into."""
    s = emulated_board("emulator://?preset=rram&seed=0")
    calls: list[str] = []
    lock = threading.Lock()
    inner_safe, inner_pulse = s.device.safe_state, s.device.pulse

    def safe() -> None:
        with lock:
            calls.append("safe")
        inner_safe()

    def pulse(*args: object, **kw: object) -> object:
        with lock:
            calls.append("pulse")
        return inner_pulse(*args, **kw)

    s.device.safe_state = safe  # type: ignore[method-assign]
    s.device.pulse = pulse  # type: ignore[method-assign]
    out = tmp_path / "cal.zarr"
    cmd = [*HIL, "calibrate", s.uri("serial-socket"), "--routines", "stuck,pulse", "--tiles", "8x8"]
    cmd += ["--out", str(out), "--no-progress"]

    def ignore_sigint() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        preexec_fn=ignore_sigint if sigint == "ignored" else None,
    )
    try:
        deadline = time.monotonic() + 120
        while calls.count("pulse") < 3:  # the pulse routine runs
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no pulse request within 120 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, (stdout, stderr)
    with lock:
        last_pulse = len(calls) - 1 - calls[::-1].index("pulse")
        assert "safe" in calls[last_pulse:], calls[-5:]  # the board was made safe after its last pulse
    said = [line for line in stderr.splitlines() if line.startswith("interrupted: ")]
    assert len(said) == 1 and f"is at {out}, marked partial" in said[0], stderr
    record = load(out)
    assert record.partial and record.routines == ("stuck",)
    assert record.session["stopped_in"] == "pulse[0]"
    assert record.tiles[0].stuck is not None and record.tiles[0].pulse is None
