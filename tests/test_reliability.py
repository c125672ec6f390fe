"""Reliability under faults (docs/reliability.md): injected link, board and connection faults
are recovered without a lost, duplicated or repeated operation; what cannot be recovered is
reported; a host killed mid-programming leaves a mark the next session finds and repairs."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from drivers import SettleBudget, Topology, open_device
from drivers.errors import BoardLocked, BoardReset, DeviceError, RetriesExhausted
from drivers.wire import codes, scpi
from drivers.wire.payload import Op
from emulator.server.faults import KINDS, FaultPlan
from emulator.server.harness import faulty_board
from emulator.server.ownership import BoardLock
from hil.testing import BoardServers
from tests.killed_host import killed_host
from tests.raw_scpi import RawScpi

TOPO = Topology.layered([6, 5, 3], budget=SettleBudget(max_steps=30))
X = np.linspace(0, 1, 12, dtype=np.float32).reshape(2, 6)
TRANSPORTS = ("visa_uri", "serial_uri")
ALL_TRANSPORTS = (*TRANSPORTS, "serial_pty_uri")


def _workload(dev, steps: int = 12) -> list[np.ndarray]:
    """Program, pulse, settle and read, in a fixed order (all results kept)."""
    rng = np.random.default_rng(0)
    lim = dev.info.limits
    dev.configure(TOPO)
    out: list[np.ndarray] = []
    for _ in range(steps):
        gp, gm = (rng.uniform(lim.g_min, lim.g_max, (7, 5)).astype(np.float32) for _ in range(2))
        out.append(dev.program("W0", gp, gm).g_plus)
        dev.pulse("W1", np.ones((6, 3), np.int32), np.zeros((6, 3), np.int32))
        out.append(dev.settle({"s0": X}).states["s2"])
    return [*out, *dev.read_conductance("W0"), *dev.read_conductance("W1")]


@pytest.fixture(scope="module")
def reference() -> list[np.ndarray]:
    with open_device("emulator://?preset=ideal&seed=5") as dev:
        return _workload(dev)


# ---- the fault plan itself ---------------------------------------------------------------


def test_fault_plan_counts_and_caps_byte_faults() -> None:
    plan = FaultPlan(ber=0.01, drop_rate=0.01, seed=1, limit=30)
    data = bytes(range(256)) * 40
    out = b"".join(bytes(plan.mangle(data)) for _ in range(5))
    n = plan.summary()
    assert n["corrupt"] == 30 and n["drop"] == 30  # capped at the limit
    assert len(out) == 5 * len(data) - 30
    assert FaultPlan().mangle(data) is data  # no faults: not even a copy


def test_byte_faults_strike_the_same_bytes_however_the_stream_is_cut() -> None:
    """Which bytes a seeded plan corrupts or drops depends on their place in the stream, not on
    the reads and writes it came in (a matter of timing): the same bytes in one piece, in 7
    or in pieces of 1 to 300 bytes come out the same. With a binomial count drawn per piece
    they came out different; and the rates hold (one plan, a million bytes)."""
    data = np.random.default_rng(0).integers(0, 256, 200_000, np.uint8).tobytes()

    def cut(sizes: list[int]) -> tuple[bytes, dict[str, int]]:
        plan = FaultPlan(ber=1e-4, drop_rate=5e-4, seed=5)
        out, at = [], 0
        for size in sizes:
            out.append(bytes(plan.mangle(data[at : at + size])))
            at += size
        assert at == len(data)
        return b"".join(out), plan.summary()

    whole, counts = cut([len(data)])
    assert counts["corrupt"] > 100 and counts["drop"] > 50 and len(whole) == len(data) - counts["drop"]
    assert cut([len(data) // 7] * 6 + [len(data) - 6 * (len(data) // 7)]) == (whole, counts)
    sizes = np.random.default_rng(1).integers(1, 300, len(data)).tolist()
    ends = np.cumsum(sizes)
    sizes = sizes[: int(np.searchsorted(ends, len(data)))]
    assert cut([*sizes, len(data) - sum(sizes)]) == (whole, counts)
    # the rates: a flip per byte at 8 * ber, a loss at drop_rate (mean 1000, sd about 32)
    plan = FaultPlan(ber=1e-3 / 8, drop_rate=1e-3, seed=2)
    for _ in range(10):
        plan.mangle(bytes(100_000))
    assert 900 < plan.summary()["corrupt"] < 1100 and 900 < plan.summary()["drop"] < 1100


def _request_faults(plan: FaultPlan, ops: list[int], chunks: int) -> list[str | None]:
    """The request faults `plan` draws for `ops`, each request's bytes passed through
    `plan.mangle` in `chunks` pieces in and out (as a connection's reads and writes)."""
    message = bytes(range(256)) * 4
    out: list[str | None] = []
    for op in ops:
        for piece in np.array_split(np.frombuffer(message, np.uint8), chunks):
            plan.mangle(piece.tobytes())
        out.append(plan.request_fault(op))
        plan.mangle(message)
    return out


def test_request_faults_strike_the_same_requests_whatever_the_byte_traffic() -> None:
    """Each fault kind draws from its own generator: the requests a seeded plan's request
    faults strike do not move with the byte traffic around them (a request read in more
    pieces, a keep-alive, a retransmission), nor with the byte faults it meets. With one
    generator shared by all kinds, the number of reads (timing) shifted every later request
    fault: a kind with a small budget could miss a whole training run (seen in CI)."""
    ops = [int(Op.SETTLE), int(Op.PROGRAM), int(Op.MVM), int(Op.STATUS)] * 50
    rates = dict(p_delay=0.1, p_reset=0.1, p_close=0.1, p_lose=0.1, seed=7, limit=5)
    quiet = _request_faults(FaultPlan(**rates), ops, chunks=1)
    assert {k for k in quiet if k} == {"delay", "reset", "close", "lose"}, quiet
    for chunks in (1, 3, 17):
        noisy = FaultPlan(ber=2e-5, drop_rate=4e-5, **rates)
        assert _request_faults(noisy, ops, chunks) == quiet, chunks
    # ... nor with another kind's draws (delay is drawn after close, on the requests close spared)
    alone = _request_faults(FaultPlan(p_close=0.1, seed=7, limit=5), ops, chunks=1)
    beside = _request_faults(FaultPlan(p_close=0.1, p_delay=0.5, seed=7, limit=5), ops, chunks=1)
    assert [k == "close" for k in beside] == [k == "close" for k in alone]


def test_fault_plan_rejects_bad_rates() -> None:
    with pytest.raises(ValueError, match="p_close"):
        FaultPlan(p_close=1.5)


# ---- recovery of each fault kind ---------------------------------------------------------


@pytest.mark.parametrize("transport", ALL_TRANSPORTS)
def test_every_fault_kind_is_recovered_with_in_process_results(
    transport: str, reference: list[np.ndarray]
) -> None:
    """Byte corruption and loss, late replies, resets and hang-ups, each several times, and
    the results are bit-identical to the in-process board's (ideal preset: a retried settle
    or read gives the same values; a pulse run twice would not)."""
    rates = dict(ber=1e-4, drop_rate=5e-4, p_delay=0.2, p_reset=0.3, p_close=0.2)
    first = _first_strikes(56, **rates)
    # reset at its 3rd draw (a settle or program; the workload makes 24), close at its 9th, delay
    # at its 4th (of about 45 requests); the first loss at byte 9367, the first flip at 1978; none
    # in the SCPI host's first contact, where a delay of 0.4 s raced the 0.5 s the host waits
    # before taking the port for a wrong one (seed 3, this test's seed before: delay at draw 1)
    assert max(first[k] for k in ("reset", "close", "delay")) <= 10 and _spares_the_first_contact(first), (
        first
    )
    plan = _CountingPlan(**rates, delay_s=0.4, seed=56, limit=3)
    with (
        faulty_board("emulator://?preset=ideal&seed=5", plan, timeout=0.25, attempts=16) as served,
        open_device(getattr(served, transport)) as dev,
    ):
        got = _workload(dev)
        rec = dev.recovery
        assert served.device.safety().violations == 0
    assert all(a.tobytes() == b.tobytes() for a, b in zip(reference, got, strict=True))
    assert plan.first == {k: first[k] for k in ("reset", "close", "delay")}, (plan.first, first)
    assert plan.bytes_seen >= max(first["corrupt"], first["drop"]), plan.bytes_seen
    injected = plan.summary()
    # all but `lose`: arrays lost need the trainer's repair (the training tests below inject it)
    assert all(injected[k] >= 1 for k in KINDS if k != "lose"), injected
    assert rec.failures >= 3 and rec.resets >= 1 and rec.reconfigured >= 1 and rec.exhausted == 0


class _HangUpAfterFirstPulse(FaultPlan):
    """The board runs the first pulse it receives, then hangs up before replying."""

    def request_fault(self, op: int | None) -> str | None:
        if op == Op.PULSE and not self.injected["close"]:
            self.injected["close"] += 1
            return "close"
        return None


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_lost_pulse_reply_is_answered_from_the_board_record(transport: str) -> None:
    """The host resends the pulse with the same request id and gets the recorded outcome:
    the pulse is applied once (rram: a second one would also draw fresh write noise)."""
    plan = _HangUpAfterFirstPulse(p_close=1.0)
    counts = (np.full((6, 3), 3, np.int32), np.zeros((6, 3), np.int32))
    with faulty_board("emulator://?preset=rram&seed=5", plan) as served:
        with open_device(getattr(served, transport)) as dev:
            dev.configure(TOPO)
            dev.pulse("W1", *counts)
            g = dev.read_conductance("W1")
            assert dev.recovery.retries == 1
        assert served.scpi.cache is served.framed.cache and served.scpi.cache.hits == 1
    with open_device("emulator://?preset=rram&seed=5") as local:
        local.configure(TOPO)
        local.pulse("W1", *counts)
        want = local.read_conductance("W1")
    assert plan.summary()["close"] == 1
    assert g[0].tobytes() == want[0].tobytes() and g[1].tobytes() == want[1].tobytes()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_reset_during_a_pulse_is_reported_not_repeated(transport: str) -> None:
    """The board runs a pulse, then resets (its record of requests lost): whether the pulse
    counts is unknown to the host, so it raises BoardReset instead of pulsing again."""
    plan = FaultPlan(p_reset=1.0, reset_ops=frozenset({Op.PULSE}), reset_after=True, limit=1)
    with (
        faulty_board("emulator://?preset=ideal&seed=0", plan) as served,
        open_device(getattr(served, transport)) as dev,
    ):
        dev.configure(TOPO)
        with pytest.raises(BoardReset, match="pulse"):
            dev.pulse("W1", np.ones((6, 3), np.int32), np.zeros((6, 3), np.int32))
        assert dev.recovery.resets == 1 and dev.topology == TOPO
        assert served.device.topology == TOPO  # configured again after the reset
        dev.settle({"s0": X})


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_exhausted_budget_names_the_operation_attempts_and_cause(transport: str) -> None:
    plan = FaultPlan(seed=0)
    with (
        faulty_board("emulator://?preset=ideal&seed=0", plan, timeout=0.1, attempts=3) as served,
        open_device(getattr(served, transport)) as dev,
    ):
        dev.configure(TOPO)
        plan.p_delay, plan.delay_s = 1.0, 0.3
        t0 = time.monotonic()
        with pytest.raises(RetriesExhausted, match=r"settle failed 3 time\(s\)") as info:
            dev.settle({"s0": X})
        assert time.monotonic() - t0 < 5
        assert "DeviceTimeout" in str(info.value) and info.value.attempts == 3
        plan.p_delay = 0.0
        assert dev.recovery.exhausted == 1
        dev.settle({"s0": X})  # the link recovers once the board answers in time


def test_silent_reset_is_detected_from_the_configuration_error() -> None:
    """Another session resets the board (no link failure): the next settle meets 'no
    topology', the epoch tells the host it was a reset, it configures again and retries."""
    with faulty_board() as served, open_device(served.serial_uri) as dev:
        dev.configure(TOPO)
        want = dev.settle({"s0": X}).states["s2"]
        served.device.reset()
        assert dev.settle({"s0": X}).states["s2"].tobytes() == want.tobytes()
        assert dev.recovery.resets == 1 and dev.recovery.reconfigured == 1


# ---- checked SCPI ------------------------------------------------------------------------


def test_checked_scpi_refuses_a_corrupted_message_and_seals_responses() -> None:
    with faulty_board() as served, RawScpi(served.visa_uri) as raw:
        raw.send(b"SYST:COMM:CHEC ON\n")
        assert raw.line() == b"0"  # the empty response, sealed
        good = scpi.seal_request(b"*IDN?")
        raw.send(good)
        assert scpi.open_response(raw.line()).startswith(b"xbar-hil,emulator-ideal")
        bad = bytearray(good)
        bad[1] ^= 0x01  # '*JDN?': still a message, but its checksum fails
        raw.send(bytes(bad))
        assert scpi.open_response(raw.line()) == b""  # nothing ran
        raw.send(scpi.seal_request(b"SYST:ERR?"))
        code = scpi.parse_error(scpi.open_response(raw.line()).decode())[0]
        assert code == codes.COMMUNICATION_ERROR
        with pytest.raises(ValueError, match="check"):
            scpi.open_response(b"1;12345")


# ---- programming transactions and a killed host ------------------------------------------


def _until(done: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"waited {timeout_s:g} s for {what}"
        time.sleep(0.02)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_sigkill_mid_programming_is_detected_and_repaired_by_the_next_session(
    transport: str, tmp_path: Path
) -> None:
    script = tmp_path / "host.py"
    script.write_text(killed_host('"programmed W0"'))
    lock = BoardLock(lease_s=2.0)
    with faulty_board(lock=lock) as served:
        uri = getattr(served, transport)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        host = subprocess.Popen(
            [sys.executable, str(script), uri], stdout=subprocess.PIPE, text=True, env=env
        )
        try:
            assert host.stdout is not None and host.stdout.readline().strip() == "programmed W0"
        finally:
            host.send_signal(signal.SIGKILL)
            host.wait(timeout=10)
        assert served.device.status().transaction == "update-7"
        # the killed host owned the board: its lease keeps it a moment (for a reconnect), then
        # frees it; waited for as the server sees it (the killed host's connection closing is
        # noticed by a server thread, later on a loaded machine)
        _until(lambda: lock.state().connections == 0, "the server to see the killed host's connection close")
        with pytest.raises(BoardLocked, match="no connection presents its token: free in"):
            open_device(uri)
        _until(lambda: lock.state().token is None, "the killed host's lease to lapse")
        with pytest.warns(RuntimeWarning, match="update-7"), open_device(uri) as dev:
            assert dev.open_transaction == "update-7"
        # the trainer repairs it: every tile programmed again inside its own transaction
        from hil.config import load_config
        from hil.train_classifier import train_classifier

        cfg = load_config(
            None,
            ["train.epochs=1", "data.limit_train=32", "data.limit_test=16", "model.sizes=[64,8,10]",
             f"device={uri}"],
        )  # fmt: skip
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = train_classifier(cfg)
        result.model.close()
        assert any("update-7" in str(w.message) for w in caught)
        assert served.device.status().transaction is None


HIL = [sys.executable, "-c", "from hil.cli import main; main()"]


def test_the_cli_shows_an_open_transaction_as_one_warning_line() -> None:
    """What a lab user sees on the next session after a killed host: one ``warning:`` line
    naming the transaction and the repair, not Python's warning with its source line."""
    with faulty_board() as served:
        served.device.configure(Topology.layered([6, 5, 3]))
        served.device.begin("step-145")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(
            [*HIL, "demo", "--device", served.visa_uri], capture_output=True, text=True, env=env
        )
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "step-145" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: "), done.stderr
    assert "RuntimeWarning" not in done.stderr and "warnings.warn" not in done.stderr


def test_training_reports_an_open_transaction_once(tmp_path: Path) -> None:
    """The link and the trainer both notice a board left mid-transaction; the user reads it
    once, in the trainer's words (it programs every tile again before training)."""
    with faulty_board() as served:
        served.device.configure(Topology.layered([6, 5, 3]))
        served.device.begin("step-77")
        sets = ["train.epochs=1", "data.limit_train=32", "data.limit_test=16", "model.sizes=[64,8,10]"]
        cmd = [*HIL, "train", "classifier", "--out", str(tmp_path / "r.zarr"), "--no-progress"]
        cmd += [a for s in [f"device={served.visa_uri}", *sets] for a in ("--set", s)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "step-77" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: "), done.stderr
    assert "programmed again before training" in lines[0]


# Epochs of the runs the tests below stop or kill after their first epoch or step: enough that
# the run is still going when the signal lands (the tests read the first epoch's line, or poll
# for the first step's report every 10 ms, then signal at once; one epoch of this run takes
# 0.03-0.1 s on the shared 2-core machine, so 49 more are over a second of margin), and few
# enough that the resumed run, which trains all the rest, is short (200 took 17.8 s there)
STOPPED_EPOCHS = 50
STOPPED_RUN = [
    f"train.epochs={STOPPED_EPOCHS}",
    "data.limit_train=64",
    "data.limit_test=16",
    "model.sizes=[64,8,10]",
]


def _stop_training(run: Path, sig: signal.Signals) -> tuple[int, str]:
    """Start a long `hil train classifier`, send `sig` once its first epoch is done; (exit code,
    stderr)."""
    sets = STOPPED_RUN
    cmd = [*HIL, "train", "classifier", "--out", str(run), "--no-progress"]
    cmd += [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("epoch"), line  # training runs
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return proc.returncode, err


def test_ctrl_c_in_training_says_where_the_run_stopped_and_how_to_resume(tmp_path: Path) -> None:
    run = tmp_path / "run.zarr"
    code, err = _stop_training(run, signal.SIGINT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    assert code == 130, err  # 128 + SIGINT
    hint = [line for line in err.splitlines() if line.startswith("interrupted: ")]
    assert len(hint) == 1, err
    assert str(run) in hint[0] and f"hil train classifier --resume {run}" in hint[0]
    from hil.runlog import open_run

    assert open_run(run, validate=False).status == "failed"
    named = hint[0].split("`")[1].split()  # the command the hint names, as it is
    assert named[0] == "hil"
    resumed = subprocess.run([*HIL, *named[1:], "--no-progress"], capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr
    # all of them from the start, or the rest after the snapshot the interrupt left
    n = STOPPED_EPOCHS
    assert re.search(rf"trained ({n} epochs|epochs \d+-{n}) in", resumed.stdout), resumed.stdout


def test_sigterm_in_training_is_taken_as_ctrl_c(tmp_path: Path) -> None:
    """torchrun stops the other ranks of a failed job with SIGTERM, as schedulers do at a time
    limit: the default action ended the process at once, the run log still said "running" and
    nothing said how to resume (the distributed audit). Now it is Ctrl-C: the run log is closed
    as failed and the hint is printed. The exit code is 143 (128 + SIGTERM), what batch
    schedulers expect of a terminated job, where it was Ctrl-C's 130 (the CI audit)."""
    run = tmp_path / "run.zarr"
    code, err = _stop_training(run, signal.SIGTERM)
    assert code == 143, err
    hint = [line for line in err.splitlines() if line.startswith("interrupted: ")]
    assert len(hint) == 1 and f"hil train classifier --resume {run}" in hint[0], err
    from hil.runlog import open_run

    assert open_run(run, validate=False).status == "failed"


def test_a_run_killed_before_anything_was_flushed_is_inspected_and_resumed(tmp_path: Path) -> None:
    """SIGKILL after the run log's tables exist but before any flush or snapshot: `hil inspect`
    reads it (empty tables, no snapshot) and `--resume` says it starts over."""
    from typer.testing import CliRunner

    from hil.cli import app

    run = tmp_path / "run.zarr"
    sets = [*STOPPED_RUN, "log.flush_every_s=600", "log.snapshot_every_s=600"]
    cmd = [*HIL, "train", "classifier", "--out", str(run), "--no-progress"]
    cmd += [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 60
        while not (run / "program" / "W0").is_dir():  # the first step's programming report is appended
            assert proc.poll() is None and time.monotonic() < deadline, "no step before the run ended"
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # `hil inspect` runs in this process (the CLI's own app), not as an interpreter starting torch
    inspected = CliRunner().invoke(app, ["inspect", str(run)])
    assert inspected.exit_code == 0, (inspected.output, inspected.exception)
    assert "status       running" in inspected.output and "snapshots    none" in inspected.output
    resumed = subprocess.run(
        [*HIL, "train", "classifier", "--resume", str(run), "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "before its first snapshot: training starts again from its first step" in resumed.stderr
    again = CliRunner().invoke(app, ["inspect", str(run)])
    assert again.exit_code == 0, (again.output, again.exception)
    assert "from the start (no snapshot had been taken) (was running)" in again.output


# ---- training under faults ---------------------------------------------------------------


def _train(uri: str, log_path: Path | None = None):
    from hil.config import load_config
    from hil.runlog import RunLog
    from hil.train_classifier import train_classifier

    cfg = load_config(
        None,
        [f"device={uri}", "train.epochs=2", "data.limit_train=64", "data.limit_test=48",
         "model.sizes=[64,16,10]"],
    )  # fmt: skip
    if log_path is None:
        return train_classifier(cfg)
    with RunLog.create(log_path, cfg) as log:
        return train_classifier(cfg, log=log)


@pytest.fixture(scope="module")
def trained_fault_free():
    result = _train("emulator://?preset=ideal&seed=0")
    result.model.close()
    return result


class _CountingPlan(FaultPlan):
    """A FaultPlan that notes, for each request fault kind, the draw of its own generator at
    which it first struck, and counts the bytes it saw."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.draws: Counter[str] = Counter()
        self.first: dict[str, int] = {}
        self.bytes_seen = 0
        self._seen_lock = threading.Lock()

    def _draw(self, kind: str, p: float) -> bool:
        struck = super()._draw(kind, p)
        if p > 0 and kind not in self.first:  # before its first strike every call draws (room left)
            self.draws[kind] += 1
            if struck:
                self.first[kind] = self.draws[kind]
        return struck

    def mangle(self, data: bytes | memoryview) -> bytes | memoryview:
        with self._seen_lock:
            self.bytes_seen += len(data)
        return super().mangle(data)


def _first_strikes(seed: int, **rates: float) -> dict[str, int]:
    """Where each kind of a plan of these rates first strikes, from a twin plan of that rate
    alone: the request kinds at their n-th draw, the byte kinds at the n-th byte of the stream
    (each kind draws from its own generator: the others' rates do not move it)."""
    first: dict[str, int] = {}
    for name, kind in (("p_lose", "lose"), ("p_reset", "reset"), ("p_close", "close"), ("p_delay", "delay")):
        if not rates.get(name):
            continue
        twin = FaultPlan(**{name: rates[name]}, seed=seed)
        first[kind] = next(n for n in range(1, 10_000) if twin.request_fault(int(Op.SETTLE)) == kind)
    n = 1 << 20
    flipped = FaultPlan(ber=rates["ber"], seed=seed).mangle(bytes(n))
    first["corrupt"] = int(np.flatnonzero(np.frombuffer(flipped, np.uint8))[0]) + 1
    data = (np.arange(n) % 251).astype(np.uint8)  # a loss shifts what follows: the first mismatch
    kept = np.frombuffer(FaultPlan(drop_rate=rates["drop_rate"], seed=seed).mangle(data.tobytes()), np.uint8)
    first["drop"] = int(np.flatnonzero(kept != data[: len(kept)])[0]) + 1
    return first


def _spares_the_first_contact(first: dict[str, int]) -> bool:
    """Whether no close or delay strikes the first three requests and no byte fault the first
    1000 bytes: the SCPI host's first open before the board's INFO reply (see below)."""
    return (
        min(first.get("close", 4), first.get("delay", 4)) > 3 and min(first["corrupt"], first["drop"]) > 1000
    )


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_training_under_every_fault_kind_matches_the_fault_free_run(
    transport: str, trained_fault_free, tmp_path: Path
) -> None:
    """A short digits training (ideal preset) with faults of every kind ends with the test
    accuracies and weights of the fault-free in-process run, and its run log holds every
    step exactly once (benchmarks/faults.py runs the same with 130 to 250 of each kind).

    Every kind strikes by construction, not by luck: each draws from its own generator, so
    it first strikes at a draw (a byte) of its own stream that a twin plan tells, early, and
    the run makes many more: 44 settle or program requests and about 110 in all, 700 kB
    (fault-free; faults only add). With one generator shared by all kinds, the byte traffic
    (its cutting into reads is timing) moved the request faults: `lose` (p 0.1 over 44
    settles and programs) missed a run about one time in a hundred (seen in CI)."""
    from hil.runlog import open_run

    rates = dict(ber=2e-5, drop_rate=4e-5, p_delay=0.1, p_reset=0.2, p_close=0.1, p_lose=0.1)
    first = _first_strikes(11, **rates)
    # lose at the 9th settle or program, reset at its 1st draw, close at its 5th, delay at its
    # 7th; the first flip at byte 21032, the first loss at byte 21319: all early in the run ...
    assert max(first[k] for k in ("lose", "reset", "close", "delay")) <= 10, first
    assert max(first["corrupt"], first["drop"]) <= 100_000, first
    # ... but none before the board first answers INFO (SCPI: the first open's first three
    # requests, the checked-mode switch, *CLS;*OPC? and SYST:INFO?, about 850 bytes): a first
    # contact that gets no byte in twice the timeout is a wrong port, not retried (guarantee 1),
    # and a 0.3 s late reply races that window (seed 7, this test's seed before, delayed
    # SYST:INFO? and failed so over SCPI)
    assert _spares_the_first_contact(first), first
    plan = _CountingPlan(**rates, seed=11, delay_s=0.3, limit=2)
    with faulty_board("emulator://?preset=ideal&seed=0", plan, timeout=0.15, attempts=16) as served:
        result = _train(getattr(served, transport), tmp_path / "run.zarr")
        recovery = result.model.devices[0].recovery
        result.model.close()
        assert served.device.safety().violations == 0
    assert plan.first == {k: first[k] for k in ("delay", "reset", "close", "lose")}, (plan.first, first)
    assert plan.bytes_seen >= max(first["corrupt"], first["drop"]), plan.bytes_seen
    assert all(plan.summary()[k] >= 1 for k in KINDS), plan.summary()
    assert recovery.failures >= 3 and recovery.exhausted == 0  # each delay, reset and close fails one
    assert [h.test_acc for h in result.history] == [h.test_acc for h in trained_fault_free.history]
    for tile, p in result.model.block.weights.items():
        assert (
            p.detach().numpy().tobytes()
            == trained_fault_free.model.block.weights[tile].detach().numpy().tobytes()
        )
    steps = [int(s) for s in open_run(tmp_path / "run.zarr").table("metrics/train")["step"]]
    assert steps == list(range(1, 9))


@pytest.mark.parametrize("transport", ["serial_uri", "visa_uri"])
def test_a_board_that_loses_its_arrays_in_the_first_write_is_written_again(
    transport: str, trained_fault_free
) -> None:
    """The board rebooted with its arrays lost during the run's very first program (the model's
    first write, before the trainers' repair is in place): that raised ArraysLost and the run
    never started (seen under load in the every-fault-kind test above). Now the first write
    writes every tile again and goes on; the run ends as the fault-free one."""
    plan = FaultPlan(p_lose=1.0, limit=1, seed=0)  # the first program (or settle) request: lost arrays
    with faulty_board("emulator://?preset=ideal&seed=0", plan, timeout=2.0, attempts=4) as served:
        result = _train(getattr(served, transport))
        lost = result.model.devices[0].recovery.arrays_lost
        result.model.close()
    assert plan.summary()["lose"] == 1 and lost == 1
    assert [h.test_acc for h in result.history] == [h.test_acc for h in trained_fault_free.history]
    for tile, p in result.model.block.weights.items():
        want = trained_fault_free.model.block.weights[tile]
        assert p.detach().numpy().tobytes() == want.detach().numpy().tobytes()


@pytest.mark.parametrize(
    "seed",
    [
        # the `lose` kind's own draws (emulator.server.faults.kind_rng), one per program request
        9,  # draws 0.57, 0.47: lost in the second program request, the first block's tile written
        # again when the second block's network joins the board's topology
        3,  # draws 0.81, 0.90, 0.10: lost in the third, the second block's own first write
    ],
)
def test_blocks_written_before_a_shared_board_lost_its_arrays_are_written_again(seed: int) -> None:
    """Two EB blocks of an ff-EBM share one board, which loses its arrays while the model is
    first written: in the shared board's rewrite of the first block's tile when the second
    block's network joins (seed 9), or in the second block's own first write (seed 3). Either
    raised ArraysLost, and the run never started; had the second block only repaired itself,
    the first block's tile would have stayed lost with no word (the board's new arrays_id
    taken as seen). Now every tile on the board is written again; the run ends as the
    fault-free one."""
    from hil.config import load_config
    from hil.train_classifier import train_classifier

    def train(uri: str):
        sets = ["model.kind=ffebm", "model.block_layers=1", f'devices=["{uri}", "{uri}"]', "train.epochs=1",
                "data.limit_train=64", "data.limit_test=48", "model.sizes=[64,16,10]"]  # fmt: skip
        return train_classifier(load_config(None, sets))

    clean = train("emulator://?preset=ideal&seed=0")
    clean.model.close()
    plan = FaultPlan(p_lose=0.5, limit=1, seed=seed)  # one draw per program request, in order
    with faulty_board("emulator://?preset=ideal&seed=0", plan, timeout=2.0, attempts=4) as served:
        result = train(served.serial_uri)
        lost = result.model.devices[0].recovery.arrays_lost
        result.model.close()
    assert plan.summary()["lose"] == 1 and lost == 1
    assert [h.test_acc for h in result.history] == [h.test_acc for h in clean.history]
    got, want = result.model.ffebm.block_parameters(), clean.model.ffebm.block_parameters()
    for p, q in zip(got, want, strict=True):
        assert p.detach().numpy().tobytes() == q.detach().numpy().tobytes()


def test_servers_listen_on_loopback_by_default() -> None:
    from emulator.server import FramedServer, ScpiServer

    with open_device("emulator://?preset=ideal&seed=0") as dev:
        for server in (ScpiServer(dev), FramedServer(dev)):
            with server:
                assert server.listen_tcp()[0] == "127.0.0.1"


def test_cli_serves_a_faulty_board_and_reports_the_faults() -> None:
    cmd = [sys.executable, "-c", "from hil.cli import main; main()", "emulator", "serve", "--preset", "ideal"]
    # 15% of requests closed, 10% late: every reconnect sends three requests (INFO, the lock's
    # acquire, the request again), so at the 30% and 20% this test had, an attempt went through
    # one time in eight and the ten calls needed 34 reconnects, chains up to attempt 10 of 12 and
    # its 1 s backoff (5.4 s); at these rates (seed 4, each kind drawing from its own generator):
    # 7 failed attempts, 5 reconnects, 6 closes and 2 late replies, no chain past attempt 3, 0.2 s
    # (seed 1, whose draws these were before, now gives 19 reconnects and a chain to attempt 11)
    cmd += ["--scpi-port", "-1", "--serial-port", "0", "--close-rate", "0.15", "--late-rate", "0.1"]
    cmd += ["--late-ms", "300", "--fault-seed", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        uri = ""
        while not uri:
            line = proc.stdout.readline()
            assert line, "the server printed no URI"
            uri = next((w for w in line.split() if w.startswith("serial+socket://")), "")
        dev = open_device(uri + "?timeout=0.15&ack_timeout=0.05&attempts=12&backoff=0.01")
        try:
            for _ in range(10):
                assert dev.safety().violations == 0
            assert dev.recovery.failures >= 1
        finally:
            dev.close()  # one resend at most: it may give up on this board, and says nothing
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert "faults injected:" in err and "'close': 0" not in err and "'delay': 0" not in err


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_closing_a_server_ends_a_reply_held_back_by_a_slow_board(transport: str) -> None:
    """A reply held back by `reply_delay_s` (a slow board) is abandoned when the server closes:
    the connection's thread ends at once, not when the delay has run out."""
    errors: list[BaseException] = []
    before = set(threading.enumerate())
    with faulty_board(lock=False) as served:
        dev = open_device(getattr(served, transport).replace("attempts=8", "attempts=1"))
        dev.timeout = 60.0
        served.plan.reply_delay_s = 30.0
        arrived = threading.Event()  # the board ran the request: its reply is held back from then
        safety = served.device.safety
        served.device.safety = lambda: (arrived.set(), safety())[1]  # type: ignore[method-assign]

        def ask() -> None:
            try:
                dev.safety()
            except Exception as e:  # the server went away: expected
                errors.append(e)

        asker = threading.Thread(target=ask, daemon=True)
        asker.start()
        # waited for, not slept for (0.3 s): a request that had not arrived when the server
        # closed left nothing held back, and the test passed without testing anything
        assert arrived.wait(10.0), "the request never reached the server"
        conns = [t for t in threading.enumerate() if t not in before and t.name.endswith("-conn")]
        assert conns, "the request never reached the server"
    t0 = time.monotonic()
    for t in conns:
        t.join(timeout=5.0)
    assert not any(t.is_alive() for t in conns), "the connection's thread waited out the delay"
    assert time.monotonic() - t0 < 1.0
    asker.join(timeout=10.0)
    dev.close()
    assert errors, "a request answered after its server closed"


# ---- a board that lost its arrays ---------------------------------------------------------


TRANSPORT_PORTS = {"visa-tcp": "scpi_port", "serial-socket": "framed_port"}


def _port(uri: str) -> int:
    """The TCP port of a served board's URI (``TCPIP::host::port::SOCKET`` or ``host:port``)."""
    return int(uri.split("::")[2]) if "::" in uri else int(uri.rsplit(":", 1)[1])


@pytest.mark.parametrize("transport", ["visa-tcp", "serial-socket"])
def test_a_served_board_started_again_mid_run_is_reprogrammed_and_the_run_matches(
    transport: str, trained_fault_free
) -> None:
    """The board's server is stopped after the first epoch and a fresh one, whose devices were
    never programmed, bound to the same port (what `hil emulator serve` killed and started
    again does). The host sees the reconnect, configures the topology again, and from the
    new STATUS `arrays_id` learns the conductances are gone: the trainer programs every tile
    again and resends the operation, so the run ends with the weights and accuracies of the
    uninterrupted one (before, it went on with the fresh devices' conductances and diverged)."""
    from emulator.server.launch import serve
    from hil.config import load_config
    from hil.train_classifier import train_classifier

    board = "emulator://?preset=ideal&seed=0"
    served = [serve(board, scpi_pty=False, framed_pty=False)]
    port = _port(served[0].uris[transport])
    ports = {"scpi_port": None, "framed_port": None, TRANSPORT_PORTS[transport]: port}

    def start_again(stats: object) -> None:
        if len(served) == 1:  # after the first epoch: the server dies, a fresh one takes its port
            served[0].close()
            served.append(serve(board, scpi_pty=False, framed_pty=False, **ports))  # type: ignore[arg-type]

    params = {"timeout": "1", "attempts": "25", "backoff": "0.01"}
    if transport == "serial-socket":
        params["ack_timeout"] = "0.05"
    try:
        cfg = load_config(
            None,
            [f"device={served[0].uri(transport, **params)}", "train.epochs=2", "data.limit_train=64",
             "data.limit_test=48", "model.sizes=[64,16,10]"],
        )  # fmt: skip
        result = train_classifier(cfg, on_epoch=start_again)
        recovery = result.model.devices[0].recovery
        result.model.close()
        assert len(served) == 2 and served[1].device.safety().violations == 0
    finally:
        for s in served:
            s.close()
    for tile, p in result.model.block.weights.items():
        want = trained_fault_free.model.block.weights[tile].detach().numpy()
        assert p.detach().numpy().tobytes() == want.tobytes(), tile
    assert [h.test_acc for h in result.history] == [h.test_acc for h in trained_fault_free.history]
    assert (recovery.reconfigured, recovery.arrays_lost) == (1, 1)


@pytest.mark.parametrize("transport", ALL_TRANSPORTS)
def test_a_board_that_loses_its_arrays_mid_run_is_reprogrammed_and_the_run_matches(
    transport: str, trained_fault_free, tmp_path: Path
) -> None:
    """The fault plan's `lose` (a reboot whose devices come back as fabricated, under a new
    STATUS `arrays_id`: what a server started again on its port shows, but in one process and
    on a pty too, where a server started again would get another pty) strikes one settle or
    program in the middle of the run: the trainer programs every tile again and resends it, and
    the run ends with the weights, accuracies and run-log steps of the uninterrupted one."""
    from hil.runlog import open_run

    plan = FaultPlan(p_lose=0.1, seed=1, limit=1)
    with faulty_board("emulator://?preset=ideal&seed=0", plan, timeout=0.5, attempts=8) as served:
        arrays = served.device.status().arrays_id
        result = _train(getattr(served, transport), tmp_path / "run.zarr")
        recovery = result.model.devices[0].recovery
        result.model.close()
        assert served.device.status().arrays_id != arrays and served.device.safety().violations == 0
    assert plan.summary()["lose"] == 1
    assert recovery.arrays_lost == 1 and recovery.reconfigured >= 1 and recovery.exhausted == 0
    assert [h.test_acc for h in result.history] == [h.test_acc for h in trained_fault_free.history]
    for tile, p in result.model.block.weights.items():
        want = trained_fault_free.model.block.weights[tile].detach().numpy()
        assert p.detach().numpy().tobytes() == want.tobytes(), tile
    steps = [int(s) for s in open_run(tmp_path / "run.zarr").table("metrics/train")["step"]]
    assert steps == list(range(1, 9))


def test_a_board_that_keeps_its_arrays_across_a_reboot_is_configured_again_not_reprogrammed() -> None:
    """An injected reboot (the emulator's `reset` fault) keeps the conductances and so the
    STATUS `arrays_id`: the host configures the topology again and goes on, with no repair
    and no `ArraysLost`."""
    plan = FaultPlan(p_reset=1.0, seed=0, limit=1)
    board = "emulator://?preset=ideal&seed=0"
    with faulty_board(board, plan, timeout=0.5, attempts=4) as served, open_device(served.visa_uri) as dev:
        dev.configure(TOPO)
        before = dev.status().arrays_id
        assert before is not None
        calls: list[str] = []
        dev.arrays_repair = lambda: calls.append("repair")
        gp = np.full(TOPO.tile_shape("W1"), 8e-6, np.float32)
        gm = np.full(TOPO.tile_shape("W1"), 4e-6, np.float32)
        dev.program("W1", gp, gm)  # the board reboots instead of running it: resent
        assert dev.recovery.resets == 1 and dev.recovery.reconfigured == 1
        assert dev.recovery.arrays_lost == 0 and not calls
        assert dev.status().arrays_id == before
    assert plan.summary()["reset"] == 1


@pytest.mark.parametrize("shared", [False, True])
def test_the_board_of_one_ff_ebm_block_started_again_mid_run_is_reprogrammed(shared: bool) -> None:
    """A 2-block ff-EBM on two served boards, block 1's board started again (fresh devices)
    after the first epoch: only that board's tiles are programmed again, and the run ends with
    the weights and accuracies of the same run left alone. `shared`: both blocks on that one
    board (`drivers.shared.SharedBoard`): both blocks' tiles are programmed again."""
    import json

    from emulator.server.launch import ServedBoard, serve
    from hil.config import load_config
    from hil.train_classifier import TrainResult, train_classifier

    boards = ["emulator://?preset=ideal&seed=0", "emulator://?preset=ideal&seed=1"]
    params = {"timeout": "1", "attempts": "25", "backoff": "0.01", "ack_timeout": "0.05"}
    sets = ["model.kind=ffebm", "model.sizes=[64,24,16,10]", "model.block_layers=2", "model.between=linear",
            "train.epochs=2", "train.batch_size=16", "data.limit_train=48", "data.limit_test=32"]  # fmt: skip

    def run(restart: bool) -> tuple[TrainResult, list[int]]:
        served = [serve(b, scpi_pty=False, framed_pty=False) for b in boards]
        port = _port(served[1].uris["serial-socket"])
        again: list[ServedBoard] = []

        def start_again(stats: object) -> None:
            if restart and not again:
                served[1].close()
                ports = {"scpi_port": None, "framed_port": port}
                again.append(serve(boards[1], scpi_pty=False, framed_pty=False, **ports))  # type: ignore[arg-type]

        try:
            uris = [served[0].uri("visa-tcp", timeout="1"), served[1].uri("serial-socket", **params)]
            if shared:
                uris[0] = uris[1]
            cfg = load_config(None, [*sets, "devices=" + json.dumps(uris)])
            result = train_classifier(cfg, on_epoch=start_again)
            lost = [getattr(d.recovery, "arrays_lost", -1) for d in result.model.devices]
            result.model.close()
        finally:
            for s in (*served, *again):
                s.close()
        assert len(again) == restart
        return result, lost

    alone, lost_alone = run(restart=False)
    restarted, lost = run(restart=True)
    assert [h.test_acc for h in restarted.history] == [h.test_acc for h in alone.history]
    assert alone.model.ffebm is not None and restarted.model.ffebm is not None
    want = alone.model.ffebm.state_dict()
    for name, p in restarted.model.ffebm.state_dict().items():
        assert p.numpy().tobytes() == want[name].numpy().tobytes(), name
    assert (lost_alone, lost) == (([0], [1]) if shared else ([0, 0], [0, 1]))  # one repair, of that board


class _StartedAgain:
    """A served board whose servers are stopped, and a fresh board (devices never programmed)
    served on the same port, while it runs its `at`-th settle: from the server's own thread,
    so the host's settle is cut off unanswered, as a killed server's would be. `settles`
    counts the settles it ran (`at` None: never stopped)."""

    def __init__(self, board: str, transport: str, at: int | None) -> None:
        from emulator.server.launch import serve

        self.board, self.transport, self.at = board, transport, at
        self.settles = 0
        self.served = [serve(board, scpi_pty=False, framed_pty=False)]
        inner = self.served[0].device.settle

        def settle(*args: object, **kwargs: object) -> object:
            self.settles += 1
            if self.settles == self.at:
                self._start_again()
                raise DeviceError("the server was stopped")  # its connection is gone: never sent
            return inner(*args, **kwargs)  # type: ignore[arg-type]

        self.served[0].device.settle = settle  # type: ignore[method-assign]

    def _start_again(self) -> None:
        from emulator.server.launch import serve

        port = _port(self.served[0].uris[self.transport])
        self.served[0].close()
        ports = {"scpi_port": None, "framed_port": None, TRANSPORT_PORTS[self.transport]: port}
        self.served.append(serve(self.board, scpi_pty=False, framed_pty=False, **ports))  # type: ignore[arg-type]

    def uri(self, **params: str) -> str:
        return self.served[0].uri(self.transport, **params)

    def close(self) -> None:
        for s in self.served:
            s.close()


def test_a_vae_whose_served_board_is_started_again_mid_step_is_reprogrammed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`train_vae` (tdh-vae, one served board) with the board's server stopped in the middle
    of a settle half-way through the run and a fresh board served on its port: every tile is
    programmed again, the settle is resent, and the run ends with the metrics of the same run
    left alone (the code before `arrays_id` settled on the fresh devices and ended elsewhere)."""
    import logging

    from hil.config import load_into
    from hil.vae.config import VAERunConfig
    from hil.vae.train import VAEResult, train_vae

    sets = ["data.limit_train=48", "data.limit_test=32", "eval.samples=32", "eval.eps_draws=1",
            "model.hidden=16", "train.epochs=2", "train.batch_size=16"]  # fmt: skip
    params = {"timeout": "1", "attempts": "25", "backoff": "0.01", "ack_timeout": "0.05"}

    def run(at: int | None) -> tuple[VAEResult, _StartedAgain]:
        board = _StartedAgain("emulator://?preset=ideal&seed=0", "serial-socket", at)
        try:
            cfg = load_into(VAERunConfig(), None, [*sets, f"device={board.uri(**params)}"])
            return train_vae(cfg), board
        finally:
            board.close()

    alone, counted = run(at=None)
    with caplog.at_level(logging.WARNING, logger="drivers.wire"):
        restarted, board = run(at=counted.settles // 2)
    assert len(board.served) == 2
    assert restarted.history == alone.history
    assert (restarted.final.neg_elbo, restarted.final.frechet) == (alone.final.neg_elbo, alone.final.frechet)
    repairs = [r for r in caplog.records if "programming every tile again" in r.getMessage()]
    assert len(repairs) == 1, [r.getMessage() for r in caplog.records]


def test_a_status_without_arrays_id_is_sent_and_read_without_it() -> None:
    """Firmware that keeps no arrays' generation (the reference firmware, older boards) leaves
    the field out, and the host reads None (and trusts the conductances across resets); one
    that keeps it sends an integer in [0, 2^53), and anything else is a malformed reply."""
    from drivers.base import BoardStatus
    from drivers.errors import ProtocolError
    from drivers.wire import payload as pl
    from drivers.wire.payload import Message

    assert "arrays_id" not in pl.status_reply(BoardStatus(3, None, True)).meta
    assert pl.board_status(Message({"epoch": 3, "configured": True})).arrays_id is None
    assert pl.board_status(pl.status_reply(BoardStatus(3, "t", True, 2**53 - 1))).arrays_id == 2**53 - 1
    for bad in (-1, 2**53, 1.5, "7", True):
        with pytest.raises(ProtocolError, match="arrays_id"):
            pl.board_status(Message({"epoch": 3, "arrays_id": bad}))


def test_a_repair_that_fails_leaves_the_loss_to_be_found_again(
    emulated_board: Callable[..., BoardServers],
) -> None:
    """A repair that raises (the board lost again while it programs) propagates, and the
    host does not take the new arrays as repaired: the next recovery finds the loss again."""
    from drivers.errors import ArraysLost
    from emulator.server.launch import serve

    board = "emulator://?preset=ideal&seed=0"
    s = emulated_board(board)
    port = _port(s.uris["serial-socket"])
    ports = {"scpi_port": None, "framed_port": port}
    fresh = []
    try:
        with open_device(s.uri("serial-socket", timeout="1", ack_timeout="0.05", backoff="0.01")) as dev:
            dev.configure(TOPO)
            x = np.full((2, 7), 0.5, np.float32)

            def fail() -> None:
                raise RuntimeError("the repair failed")

            dev.arrays_repair = fail
            s.close()
            fresh.append(serve(board, scpi_pty=False, framed_pty=False, **ports))  # type: ignore[arg-type]
            with pytest.raises(RuntimeError, match="the repair failed"):
                dev.mvm("W0", x)
            dev.arrays_repair = None
            with pytest.raises(ArraysLost):
                dev.reconnect()  # the same fresh board: still not repaired
            assert dev.recovery.arrays_lost == 2
            assert dev.mvm("W0", x).shape == (2, 5)
    finally:
        for f in fresh:
            f.close()
