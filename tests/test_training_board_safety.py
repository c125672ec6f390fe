"""The boards a host trains on, kept safe: a board that counts violations stops the run (the
firmware audit of 2026-12-06: training ran to the end on a board reporting ``SYST:SAF? 0,1``),
and a run that ends is followed by the boards' safe state (the crash audit: a classifier run
that finished normally never sent ``SYST:SAFE``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from drivers import BoardViolations, Device, SafetyCounters
from drivers.wrapper import DeviceWrapper
from hil.boards import open_board
from hil.config import load_config
from hil.data import load_dataset
from hil.runlog import RunLog, open_run
from hil.train_classifier import train_classifier


class ViolatesAfter(DeviceWrapper):
    """A firmware whose array takes an out-of-limit condition once `reads` safety reads have
    passed (the watch reads once before training, the run log's board state once at the start,
    the watch once per epoch)."""

    def __init__(self, inner: Device, reads: int) -> None:
        super().__init__(inner)
        self.reads, self.seen = reads, 0

    def safety(self) -> SafetyCounters:
        s = self.inner.safety()
        self.seen += 1
        return SafetyCounters(s.refused, s.violations + (self.seen > self.reads))


def test_training_stops_at_the_epoch_whose_board_counted_a_violation(tmp_path: Path) -> None:
    sets = ["train.epochs=4", "data.limit_train=64", "data.limit_test=32", "model.sizes=[64,16,10]"]
    cfg = load_config(None, [*sets, "log.snapshot_every_s=1e9"])  # else only the last epoch is kept
    boards: list[ViolatesAfter] = []

    def opener(uri: str) -> Device:
        boards.append(ViolatesAfter(open_board(uri), reads=3))
        return boards[-1]

    epochs: list[int] = []
    with RunLog.create(tmp_path / "t.zarr", cfg) as log, pytest.raises(BoardViolations) as err:
        train_classifier(cfg, log=log, opener=opener, on_epoch=lambda s: epochs.append(s.epoch))
    text = str(err.value)
    assert "during epoch 2" in text and "1 violation(s)" in text and "hil conformance emulator://" in text
    assert epochs == [1, 2]  # the epoch's results were reported, then the run stopped
    run = open_run(tmp_path / "t.zarr")
    per_epoch = 64 // cfg.train.batch_size
    assert [run.snapshot_attrs(name)["step"] for name in run.snapshots] == [2 * per_epoch]  # resumable
    (end,) = run.attrs["device_state"]["end"].values()  # the failed run's board state, recorded
    assert end["safety"]["violations"] == 1


class SafeStates(DeviceWrapper):
    """Counts the calls of `safe_state` (and `close`, which makes the board safe too)."""

    def __init__(self, inner: Device) -> None:
        super().__init__(inner)
        self.calls: list[str] = []

    def safe_state(self) -> None:
        self.calls.append("safe_state")
        self.inner.safe_state()


def test_a_finished_run_leaves_its_boards_in_the_safe_state() -> None:
    cfg = load_config(
        None, ["train.epochs=1", "data.limit_train=32", "data.limit_test=16", "model.sizes=[64,8,10]"]
    )
    boards: list[SafeStates] = []

    def opener(uri: str) -> Device:
        boards.append(SafeStates(open_board(uri)))
        return boards[-1]

    res = train_classifier(cfg, opener=opener)
    assert boards and all(b.calls == ["safe_state"] for b in boards)
    data = load_dataset("digits")  # the model stays usable: safe, not closed
    assert 0.0 <= res.model.accuracy(data.x_test[:16], data.y_test[:16]) <= 1.0
    res.model.close()


class Transactions(DeviceWrapper):
    """Records begin/commit tags: what a killed host leaves on the board (an open tag)."""

    def __init__(self, inner: Device) -> None:
        super().__init__(inner)
        self.tags: list[str] = []

    def begin(self, tag: str) -> None:
        self.tags.append(f"begin {tag}")
        self.inner.begin(tag)

    def commit(self, tag: str) -> None:
        self.tags.append(f"commit {tag}")
        self.inner.commit(tag)


def test_the_vae_trainer_brackets_each_steps_programming_in_a_transaction(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The crash audit: a VAE host killed mid-write left no mark on the board (66 programs, no
    SYST:TRAN:BEG); the classifier's trainer always bracketed its steps. Each step is now a
    transaction, committed when the step's programming is done."""
    import hil.vae.train as vae_train
    from hil.config import load_into
    from hil.vae.config import VAERunConfig

    boards: list[Transactions] = []

    def opener(uri: str, calibration: str = "") -> Device:
        boards.append(Transactions(open_board(uri, calibration)))
        return boards[-1]

    monkeypatch.setattr(vae_train, "open_board", opener)
    sets = [
        "train.epochs=1",
        "data.limit_train=64",
        "data.limit_test=32",
        "eval.samples=32",
        "eval.eps_draws=1",
    ]
    res = vae_train.train_vae(load_into(VAERunConfig(), None, sets), progress=False)
    steps = 64 // VAERunConfig().train.batch_size
    assert boards and res.final.neg_elbo > 0
    for b in boards:
        assert b.tags == [f"{kind} step-{k}" for k in range(1, steps + 1) for kind in ("begin", "commit")]


def test_a_run_stopped_by_its_link_says_how_to_resume(tmp_path: Path, emulated_board: Any) -> None:
    """The crash audit: only Ctrl-C printed the --resume command; a board that stops answering
    ended the run with the link's error alone. The board hangs up for good (one attempt per
    request) after the first epoch's snapshot."""
    import os
    import subprocess
    import sys

    from hil.testing import FaultPlan

    servers = emulated_board(board="emulator://?preset=ideal&seed=0", plan=FaultPlan(hang_up_after=150))
    sets = ["train.epochs=3", "data.limit_train=64", "data.limit_test=32", "model.sizes=[64,8,10]"]
    args = [a for s in [*sets, "log.snapshot_every_s=0", f"device={servers.uri('visa-tcp', attempts='1')}"]
            for a in ("--set", s)]  # fmt: skip
    run = tmp_path / "run.zarr"
    cmd = [sys.executable, "-m", "hil.cli", "train", "classifier", *args, "--out", str(run), "--no-progress"]
    res = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    # before the error, the board's close says it could not be told to go safe, and when its
    # lease makes it so (drivers.wire.client: RemoteDevice.close)
    said = [line for line in lines if not line.startswith("warning: ")]
    assert said[0].startswith("error: ") and "closed the connection" in said[0], res.stderr
    assert all(
        "closed without putting the board in its safe state" in w for w in lines[: lines.index(said[0])]
    )
    assert f"`hil train classifier --resume {run}` continues from there" in lines[-1], res.stderr
    snapshots = open_run(run, validate=False).snapshots
    assert snapshots
    # resumed on the in-process board: the summary counts this session's epochs only
    resume = [
        *cmd[:5],
        "--resume",
        str(run),
        "--set",
        "device=emulator://?preset=ideal&seed=0",
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    again = subprocess.run(resume, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stderr
    assert re.search(r"^trained epochs [23]-3 in ", again.stdout, re.M), again.stdout


def test_a_run_resumed_on_another_board_says_so_and_keeps_both(tmp_path: Path) -> None:
    """The crash audit: a run resumed on a board of another identity at the same address was
    accepted without a word, and the run log lost which board trained the earlier steps."""
    import dataclasses

    from hil.runlog import AnotherBoardWarning, open_for_resume

    sets = ["train.epochs=2", "data.limit_train=64", "data.limit_test=32", "model.sizes=[64,8,10]"]
    cfg = load_config(None, [*sets, "log.snapshot_every_s=0"])

    def crash(stats: object) -> None:
        raise KeyboardInterrupt

    path = tmp_path / "run.zarr"
    with pytest.raises(KeyboardInterrupt), RunLog.create(path, cfg) as log:
        train_classifier(cfg, log=log, on_epoch=crash)
    other = dataclasses.replace(cfg, device="emulator://?preset=ideal&seed=7")
    log, state = open_for_resume(path)
    with log, pytest.warns(AnotherBoardWarning, match=r"EMU-00000007.*than it ran on .*EMU-00000000"):
        log.set_device_uri(other.device)
        train_classifier(other, log=log, state=state).model.close()
    run = open_run(path)
    assert run.attrs["resumes"][-1]["device_identity_before"].split(",")[2] == "EMU-00000000"
    assert run.attrs["device"]["identity"]["serial"] == "EMU-00000007"


class SafeStatesServed(DeviceWrapper):
    """The board behind a server, counting the safe states the host's requests reached."""

    def __init__(self, inner: Device) -> None:
        super().__init__(inner)
        self.safe_states = 0

    def safe_state(self) -> None:
        self.safe_states += 1
        self.inner.safe_state()


def test_closing_the_boards_carries_on_past_a_board_that_is_gone(emulated_board: Any) -> None:
    """A board whose safe state fails (its server gone) keeps neither the boards after it
    driven nor their ports open: each is put in its safe state and closed, then the first
    error is raised, the later ones as its notes."""
    from drivers import DeviceError, open_device
    from hil.boards import close_boards

    served = [SafeStatesServed(open_device(f"emulator://?preset=ideal&seed={k}")) for k in range(3)]
    servers = [emulated_board(board=b) for b in served]
    devices = [open_device(s.uri("visa-tcp", attempts="1", timeout="2")) for s in servers]
    gone = [servers[0].uri("visa-tcp").split("//")[1], servers[2].uri("visa-tcp").split("//")[1]]
    servers[0].close()
    servers[2].close()
    with pytest.raises(DeviceError, match="safe_state failed") as err:
        close_boards(devices)
    assert gone[0] in str(err.value) and gone[1] not in str(err.value)  # the first board's error
    others = [n for n in err.value.__notes__ if n.startswith("closing another board also failed")]
    assert len(others) == 1 and gone[1] in others[0]  # the third's, noted
    assert served[1].safe_states == 1  # the board between them reached its safe state
    for d in devices:  # and every port was released: a closed device refuses every call
        with pytest.raises(DeviceError, match="is closed"):
            d.safe_state()


def test_a_failed_vae_run_closes_every_board_and_keeps_its_own_error(
    emulated_board: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The VAE trainer made each board safe and closed it in turn, so a board whose safe
    state failed left the next one open, and its error replaced the run's own. A run of two
    boards stopped after the first board's server went away."""
    import hil.vae.train as vae_train
    from drivers import DeviceError, open_device
    from hil.config import load_into
    from hil.vae.config import VAERunConfig

    served = [SafeStatesServed(open_device(f"emulator://?preset=ideal&seed={k}")) for k in range(2)]
    servers = [emulated_board(board=b) for b in served]
    boards: list[Device] = []

    def opener(uri: str, calibration: str = "") -> Device:
        boards.append(open_device(servers[len(boards)].uri("visa-tcp", attempts="1", timeout="2")))
        return boards[-1]

    def board_gone(epoch: int, row: dict[str, float]) -> None:
        servers[0].close()
        raise RuntimeError("the run stops here")

    monkeypatch.setattr(vae_train, "open_board", opener)
    sets = ["model.variant=h-vae", "train.epochs=1", "data.limit_train=32", "data.limit_test=16",
            "eval.samples=16", "eval.eps_draws=1"]  # fmt: skip
    before = served[1].safe_states
    with pytest.raises(RuntimeError, match="the run stops here") as err:
        vae_train.train_vae(load_into(VAERunConfig(), None, sets), progress=False, on_epoch=board_gone)
    assert len(boards) == 2
    assert any("safe_state failed" in note for note in err.value.__notes__)  # noted, not raised instead
    assert served[1].safe_states == before + 1  # the second board reached its safe state
    for d in boards:
        with pytest.raises(DeviceError, match="is closed"):
            d.safe_state()
