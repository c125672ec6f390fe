"""Runs stopped part-way (Ctrl-C, SIGTERM, a board that vanished, a full disk, two runs on
one folder): what they leave behind and what the user is told (the interrupted-runs audit)."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest


def test_a_picture_cut_by_a_full_disk_leaves_the_one_before_whole(tmp_path: Path, monkeypatch) -> None:
    """`save_grid` wrote the PNG in place: a full disk (or a kill) mid-write left a truncated
    picture where a whole one was. Now the old one stays, and no temporary file is left."""
    from matplotlib.figure import Figure

    from hil.vae.images import save_grid, save_reconstructions

    images = np.random.default_rng(0).random((20, 64)).astype(np.float32)
    path = save_grid(tmp_path / "samples.png", images, (8, 8), "before")
    before = path.read_bytes()
    assert before.startswith(b"\x89PNG")

    def full_disk(self, fname, *args, **kwargs):
        with open(fname, "wb") as f:
            f.write(before[:50])  # part of a PNG, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full_disk)
    with pytest.raises(OSError, match="No space"):
        save_grid(path, images[::-1], (8, 8), "after")
    with pytest.raises(OSError, match="No space"):
        save_reconstructions(tmp_path / "recon.png", images, images, (8, 8), "after")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.png"]


def _create_racing(path: str, barrier, tag: int, overwrite: bool, results) -> None:
    """One of two processes starting a run at `path` at once: ("won", tag) if its run log was
    created, written and closed, else the error it got."""
    from hil.runlog import RunExistsError, RunLog, RunLogError

    barrier.wait()
    try:
        log = RunLog.create(path, {"tag": tag}, overwrite=overwrite)
    except RunExistsError as exc:
        results.put(("exists", tag, str(exc)))
        return
    except RunLogError as exc:
        results.put(("refused", tag, str(exc)))
        return
    except Exception as exc:  # what the old code did: the store pulled from under its creator
        results.put(("crashed", tag, f"{type(exc).__name__}: {exc}"))
        return
    try:
        with log:
            log.metrics("train", step=1, tag=float(tag))
        results.put(("won", tag, ""))
    except Exception as exc:
        results.put(("crashed", tag, f"{type(exc).__name__}: {exc}"))


@pytest.mark.parametrize("start", ["new", "never-started"])
def test_two_runs_started_on_one_folder_at_once_give_one_run_and_one_refusal(
    tmp_path: Path, start: str
) -> None:
    """`RunLog.create` checked the folder, then let zarr delete and create it: two runs started
    at once both "succeeded" (one run log, one run's config and the other's metrics), or one
    crashed with "cannot create the store: No such file or directory: ...partial". Now exactly
    one wins and the other is told the run exists, every time; also where the folder holds a
    run that never started (which a new run may replace)."""
    import multiprocessing as mp

    from hil.runlog import RunLog, open_run

    ctx = mp.get_context("fork")
    for i in range(12):
        path = tmp_path / f"r{i}.zarr"
        if start == "never-started":
            with pytest.raises(RuntimeError), RunLog.create(path, {"tag": -1}):
                raise RuntimeError("the board could not be opened")
        barrier, results = ctx.Barrier(2), ctx.Queue()
        procs = [
            ctx.Process(target=_create_racing, args=(str(path), barrier, t, False, results)) for t in (0, 1)
        ]
        for p in procs:
            p.start()
        got = sorted((results.get(timeout=60) for _ in procs), key=lambda r: r[0] != "won")
        for p in procs:
            p.join(timeout=60)
        assert [r[0] for r in got] == ["won", "exists"], got
        assert "already exists" in got[1][2]
        run = open_run(path)
        assert run.status == "complete"
        assert run.config == {"tag": got[0][1]}  # the winner's config with the winner's metrics
        assert run.table("metrics/train")["tag"].tolist() == [float(got[0][1])]


VAE_SMALL = [
    "train.epochs=1", "data.limit_train=32", "data.limit_test=16", "eval.samples=16", "eval.eps_draws=1",
]  # fmt: skip
CLASSIFIER_SMALL = ["train.epochs=1", "data.limit_train=32", "data.limit_test=16", "model.sizes=[64,8,10]"]


@pytest.mark.parametrize("trainer", ["vae", "classifier"])
def test_a_run_interrupted_before_its_first_step_records_the_board_it_opened(
    tmp_path: Path, monkeypatch, trainer: str
) -> None:
    """A VAE run stopped early (while the digits features loaded) had `device: null`, which
    docs/runlog.md reads as "its board could not be opened", and which lets a new run replace
    the store without --overwrite. The board is recorded as soon as it is open (the
    classifier recorded it after the open-transaction check, the same gap)."""
    import hil.train_classifier as classifier_train
    import hil.vae.train as vae_train
    from hil.config import load_config, load_into
    from hil.runlog import RunExistsError, RunLog, never_started, open_run
    from hil.vae.config import VAERunConfig

    def stopped(*_args, **_kw):
        raise KeyboardInterrupt

    board = "emulator://?preset=ideal&seed=0"
    path = tmp_path / "run.zarr"
    if trainer == "vae":
        monkeypatch.setattr(vae_train.DigitsFeatures, "load_or_train", staticmethod(stopped))
        cfg = load_into(VAERunConfig(), None, [*VAE_SMALL, f"device={board}"])
        with pytest.raises(KeyboardInterrupt), RunLog.create(path, cfg) as log:
            vae_train.train_vae(cfg, progress=False, log=log)
    else:
        monkeypatch.setattr(classifier_train, "report_open_transactions", stopped)
        cfg = load_config(None, [*CLASSIFIER_SMALL, f"device={board}"])
        with pytest.raises(KeyboardInterrupt), RunLog.create(path, cfg) as log:
            classifier_train.train_classifier(cfg, log=log)
    run = open_run(path)
    assert run.device is not None and run.device["uri"] == board
    assert not never_started(path)
    with pytest.raises(RunExistsError):
        RunLog.create(path, {})


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_an_interrupted_run_says_by_which_signal_and_after_which_step(tmp_path: Path, sig: str) -> None:
    """An interrupted run was recorded as ``error: KeyboardInterrupt``, after SIGTERM too (which
    the command line takes as Ctrl-C), and nothing said where it stopped. Now the error says
    "interrupted by SIGTERM after step 5 (epoch 2)", the root attribute ``stopped`` holds the
    same, `hil inspect` prints it, and a resume clears it (keeping it in its ``resumes`` entry)."""
    import os
    import signal
    import time

    from hil.cli.common import sigterm_as_interrupt
    from hil.runlog import RunLog, open_for_resume, open_run
    from hil.runlog.summary import summary, summary_record

    path = tmp_path / "run.zarr"
    before = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt(), RunLog.create(path, {}) as log:
            for step in range(1, 6):
                log.metrics("train", step=step, epoch=(step - 1) // 3, loss=1.0 / step)
            log.metrics("test", step=3, epoch=1, acc=0.5)  # an older step of another stream
            os.kill(os.getpid(), getattr(signal, sig))
            time.sleep(5)  # the signal arrives as KeyboardInterrupt well before
    finally:
        signal.signal(signal.SIGTERM, before)  # sigterm_as_interrupt leaves a received SIGTERM ignored
    run = open_run(path)
    assert run.status == "failed"
    assert run.attrs["error"] == f"interrupted by {sig} after step 5 (epoch 2)"
    assert run.attrs["stopped"] == {"by": sig, "step": 5, "epoch": 2}
    assert f"stopped      by {sig} after step 5 (epoch 2)" in summary(run)
    assert summary_record(run)["stopped"] == {"by": sig, "step": 5, "epoch": 2}
    log, _ = open_for_resume(path)
    with log:
        pass
    run = open_run(path)
    assert run.attrs["stopped"] is None and run.attrs["resumes"][-1]["stopped_before"]["by"] == sig


def test_a_run_that_failed_on_an_error_records_where_it_stopped(tmp_path: Path) -> None:
    from hil.runlog import RunLog, open_run

    path = tmp_path / "run.zarr"
    with pytest.raises(RuntimeError), RunLog.create(path, {}) as log:
        log.metrics("train", step=1, epoch=0, loss=1.0)
        raise RuntimeError("boom")
    run = open_run(path)
    assert run.attrs["error"] == "RuntimeError: boom"
    assert run.attrs["stopped"] == {"by": "error", "step": 1, "epoch": 1}


def test_the_closing_line_says_what_resume_does_with_and_without_a_snapshot(tmp_path: Path, capsys) -> None:
    """Ctrl-C said the run log "keeps what was logged up to its last snapshot; --resume
    continues from there" when there was no snapshot, and a board or disk error before the
    first snapshot gave no resume hint at all. One line now, in both cases: the snapshot's step
    and the resume command, or "no snapshot yet" and that the resume starts again."""
    import typer

    from drivers import DeviceError
    from hil.cli.common import one_line_errors, resume_hint
    from hil.runlog import RunLog

    run = tmp_path / "run.zarr"
    log = RunLog.create(run, {})
    log.metrics("train", step=1, loss=1.0)

    def closing(stop: type[BaseException] | BaseException) -> str:
        with (
            pytest.raises((KeyboardInterrupt, typer.Exit)),
            resume_hint("hil train vae", run),
            one_line_errors(),
        ):
            raise stop
        lines = [line for line in capsys.readouterr().err.splitlines() if "--resume" in line]
        assert len(lines) == 1, lines
        return lines[0]

    resume = f"`hil train vae --resume {run}`"
    for stop in (KeyboardInterrupt, DeviceError("the board is gone"), OSError(28, "No space left on device")):
        line = closing(stop)
        assert f"no snapshot yet: {resume} starts again from the first step" in line, line
        assert "last snapshot" not in line
    log.snapshot(7, {"extra": {"step": 7}})
    for stop in (KeyboardInterrupt, DeviceError("the board is gone")):
        line = closing(stop)
        assert f"up to its last snapshot (step 7): {resume} continues from there" in line, line
    assert closing(KeyboardInterrupt).startswith("interrupted: ")
    log.close()


def test_a_stop_signal_while_the_stop_is_reported_still_leaves_the_resume_line(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    """A torchrun rank reporting that another rank stopped got torchrun's SIGTERM while it made
    its resume line (which reads the run log): the signal's KeyboardInterrupt replaced the line,
    and the user was told nothing of how to go on (flaky under load). The line is now made and
    written with SIGINT and SIGTERM held; the signal is taken after it."""
    import os
    import signal

    from drivers import DeviceError
    from hil.cli import common
    from hil.runlog import RunLog

    run = tmp_path / "run.zarr"
    RunLog.create(run, {}).close()
    plain = common._snapshot_step

    def read_while_signalled(path: Path) -> int | None:
        os.kill(os.getpid(), signal.SIGTERM)  # as torchrun does, while the run log is read
        return plain(path)

    def as_the_cli_takes_it(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(common, "_snapshot_step", read_while_signalled)
    before = signal.signal(signal.SIGTERM, as_the_cli_takes_it)
    try:
        with (
            pytest.raises(KeyboardInterrupt),
            common.resume_hint("hil train classifier", run),
            common.one_line_errors(),
        ):
            raise DeviceError("another rank stopped")
    finally:
        signal.signal(signal.SIGTERM, before)
    err = capsys.readouterr().err
    assert f"`hil train classifier --resume {run}` starts again from the first step" in err, err


def test_a_board_lost_mid_run_is_one_error_naming_the_step_and_no_end_of_run_retries(
    tmp_path: Path, emulated_board, caplog
) -> None:
    """The server of a VAE run's board went away after its first epoch: the user got some 13
    "... failed; reconnecting, attempt 2 of 4" warnings (the end-of-run reads of safety, meter
    and status, and the safe state, each through the whole retry budget on a board already
    given up) and an error naming the operation alone. Now the run's error says it lost the
    board, after which step, and why; only the failed operation's own retries are warned of;
    the run log records the end-of-run counters as not read."""
    import logging

    import hil.vae.train as vae_train
    from hil.boards import BoardLost
    from hil.config import load_into
    from hil.runlog import RunLog, open_run
    from hil.runlog.meta import LINK_LOST
    from hil.vae.config import VAERunConfig

    servers = emulated_board(board="emulator://?preset=ideal&seed=0")
    uri = servers.uri("visa-tcp", attempts="3", timeout="2")
    small = [s for s in VAE_SMALL if not s.startswith("train.epochs=")]
    sets = [*small, "train.epochs=3", "log.snapshot_every_s=0", f"device={uri}"]
    cfg = load_into(VAERunConfig(), None, sets)
    path = tmp_path / "run.zarr"

    def board_gone(epoch: int, row: dict[str, float]) -> None:
        servers.close()  # the lab's server killed after the first epoch

    caplog.set_level(logging.WARNING, logger="drivers.wire")
    with pytest.raises(BoardLost) as err, RunLog.create(path, cfg) as log:
        vae_train.train_vae(cfg, progress=False, log=log, on_epoch=board_gone)
    message = str(err.value)
    assert message.startswith(f"lost the board {uri} after step 1 (epoch 1): "), message
    assert "failed 3 time(s)" in message and "\n" not in message
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 2, warned  # attempts 2 and 3 of the operation that failed, nothing after
    ops = {w.split(": ", 1)[1].split(" failed")[0] for w in warned}
    assert len(ops) == 1 and not ops & {"safety", "meter", "status", "safe_state"}, warned
    run = open_run(path)
    assert run.attrs["error"].startswith("BoardLost: lost the board")
    end = run.attrs["device_state"]["end"][uri]
    assert end["safety"] == end["meter"] == end["status"] == {"error": LINK_LOST}
    assert end["recovery"]["exhausted"] == 1
