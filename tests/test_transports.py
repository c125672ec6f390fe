"""The servers and remote backends under abuse: malformed SCPI, corrupted and dropped frames,
dropped connections, Ctrl-C in the middle of a transaction, the CLI, and a short training."""

from __future__ import annotations

import ast
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch

from drivers import ArraysLost, Device, DeviceError, SettleBudget, Topology, open_device
from drivers.serial import SerialDevice
from drivers.wire import codes, scpi
from hil.testing import IN_PROCESS, REMOTE_TRANSPORTS, BoardServers, FaultPlan, Faults, open_transport
from tests.main_thread import skip_unless_main_thread
from tests.raw_scpi import RawScpi

BOARD = "emulator://?preset=ideal&seed=0"


@pytest.fixture
def servers(emulated_board: Callable[..., BoardServers]) -> BoardServers:
    """The board behind both servers, from the distribution's pytest plugin (`hil.testing`)."""
    return emulated_board(BOARD)


@pytest.fixture
def raw(servers: BoardServers) -> Iterator[RawScpi]:
    with RawScpi(servers.uris["visa-tcp"]) as client:
        yield client


# ---- SCPI: malformed input ----------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "code"),
    [
        (b"FOO:BAR 1", codes.UNDEFINED_HEADER),
        (b"\xff\xfe\x00garbage", codes.INVALID_CHARACTER),
        (b"SYST:WAIT", codes.MISSING_PARAMETER),
        (b"SYST:WAIT 1,2,3", codes.PARAMETER_NOT_ALLOWED),
        (b"SYST:WAIT 1,-2", codes.ILLEGAL_PARAMETER_VALUE),
        (b"SYST:WAIT abc", codes.NUMERIC_DATA_ERROR),
        (b"SYST:WAIT -1", codes.CONFIGURATION),
        (b'TILE:COND? "W0"', codes.CONFIGURATION),
        (b"CONF:TOP #15{oops", codes.ILLEGAL_PARAMETER_VALUE),
        (b'CONF:TOP #218{"groups":{"a":0}}', codes.ILLEGAL_PARAMETER_VALUE),
        (b"CONF:TOP 12", codes.DATA_TYPE_ERROR),
        (b"FETC:DATA?", codes.DATA_STALE),
        (b"SYST:WAIT #9999999999", codes.TOO_MUCH_DATA),
        (b'SYST:WAIT "unterminated', codes.INVALID_STRING_DATA),
    ],
)
def test_malformed_scpi_is_reported_and_the_server_keeps_serving(
    raw: RawScpi, message: bytes, code: int
) -> None:
    raw.send(message + b"\n")
    if message.split(b" ")[0].endswith(b"?"):
        raw.line()  # a failing query still answers (empty), so clients never hang
    assert raw.error()[0] == code
    assert raw.error()[0] == codes.NO_ERROR
    assert raw.ask("*IDN?").startswith("xbar-hil,emulator-ideal")


def test_status_registers_and_queue_overflow(raw: RawScpi) -> None:
    raw.send(b"*ESE 255\nNOPE\n")
    assert int(raw.ask("*STB?")) & (scpi.STATUS_EAV | scpi.STATUS_ESB) == scpi.STATUS_EAV | scpi.STATUS_ESB
    assert int(raw.ask("*ESR?")) & scpi.ESR_CME
    assert raw.ask("*ESR?") == "0"
    raw.send(b"NOPE\n" * 40)
    assert int(raw.ask("SYST:ERR:COUN?")) == 32
    errors = [raw.error()[0] for _ in range(32)]
    assert errors[-1] == codes.QUEUE_OVERFLOW and set(errors[:-1]) == {codes.UNDEFINED_HEADER}
    raw.send(b"NOPE\n*CLS\n")
    assert raw.ask("SYST:ERR?") == '0,"No error"'
    assert raw.ask("*OPC?;*TST?;*ESE?") == "1;0;255"


def test_garbage_bytes_then_a_valid_command(raw: RawScpi) -> None:
    rng = np.random.default_rng(1)
    raw.send(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes() + b"\n")
    raw.send(b"*CLS\n")
    assert raw.ask("*IDN?").startswith("xbar-hil")


def test_failing_query_raises_the_mapped_error_over_visa(servers: BoardServers) -> None:
    with open_device(servers.uri("visa-tcp")) as dev:
        dev.configure(Topology.layered([3, 2]))
        with pytest.raises(DeviceError, match="unknown tile"):
            dev.read_conductance("nope")
        assert dev.query("SYST:ERR?") == '0,"No error"'  # the client drained the queue


# ---- framed: corrupted, dropped, garbage ---------------------------------------------


@pytest.mark.parametrize("transport", ["serial-pty", "serial-socket"])
def test_corrupted_request_frame_is_nacked_and_retransmitted(
    transport: str, emulated_board: Callable[..., BoardServers]
) -> None:
    s = emulated_board(BOARD, plan=FaultPlan(link=Faults(corrupt_rx=1)))
    with open_device(s.uri(transport)) as dev:
        assert isinstance(dev, SerialDevice)
        assert dev.stats.nacks_received == 1 and dev.stats.retransmissions == 1
        board = dev.board_link_stats()
        assert board["nacks_sent"] == 1 and board["bad_frames"] == 1
        assert dev.safety().violations == 0


@pytest.mark.parametrize("transport", ["serial-pty", "serial-socket"])
def test_corrupted_and_dropped_reply_frames_are_recovered(
    transport: str, emulated_board: Callable[..., BoardServers]
) -> None:
    plan = FaultPlan(link=Faults(corrupt_tx=1, drop_tx=1, garbage_tx=2))
    s = emulated_board(BOARD, plan=plan, ack_timeout=0.05)
    with open_device(s.uri(transport)) as dev:
        assert isinstance(dev, SerialDevice)
        dev.configure(Topology.layered([4, 3]))
        g = np.full((5, 3), 5e-6, np.float32)
        before = dev.read_conductance("W0")[0]
        dev.pulse("W0", np.ones((5, 3), np.int32), np.zeros((5, 3), np.int32))
        after = dev.read_conductance("W0")[0]
        assert (after > before).all()  # pulsed exactly once
        dev.program("W0", g, g)
        assert dev.stats.nacks_sent >= 1 and dev.stats.bad_frames >= 1
        assert dev.board_link_stats()["retransmissions"] >= 2


def test_noisy_link_still_gives_the_in_process_results(
    emulated_board: Callable[..., BoardServers], device_on: Callable[..., Device]
) -> None:
    faults = Faults(p_corrupt=0.08, p_drop=0.08, seed=5)
    topo = Topology.layered([6, 5, 3], budget=SettleBudget(max_steps=30))
    x = np.linspace(0, 1, 12, dtype=np.float32).reshape(2, 6)

    def run(dev: Device) -> list[np.ndarray]:
        dev.configure(topo)
        out = [dev.settle({"s0": x}).states["s2"] for _ in range(6)]
        for _ in range(3):
            dev.pulse("W1", np.ones((6, 3), np.int32), np.zeros((6, 3), np.int32))
        return [*out, *dev.read_conductance("W1")]

    want = run(device_on(IN_PROCESS, "emulator://?preset=rram&seed=2"))
    s = emulated_board("emulator://?preset=rram&seed=2", plan=FaultPlan(link=faults), ack_timeout=0.05)
    with open_device(s.uri("serial-socket", ack_timeout="0.05", retries="8")) as dev:
        got = run(dev)
        assert dev.stats.retransmissions + dev.board_link_stats()["retransmissions"] > 0
    for a, b in zip(want, got, strict=True):
        assert a.tobytes() == b.tobytes()


# ---- reconnect, Ctrl-C, close --------------------------------------------------------


def test_visa_recovers_when_the_connection_drops(emulated_board: Callable[..., BoardServers]) -> None:
    s = emulated_board(BOARD, plan=FaultPlan(hang_up_after=6))
    # 4 messages (lock=0: no ACQUIRE on open and reconnect, no RELEASE on close, which would move
    # the hang-ups; test_ownership.py loses the owner's connection the same way)
    dev = open_device(s.uri("visa-tcp", timeout="1", lock="0"))
    assert dev.safety().violations == 0
    assert dev.safety().violations == 0  # the 6th message: answered, then the server hangs up
    assert dev.safety().violations == 0  # fails on the link: reconnected and sent again
    assert (dev.recovery.reconnects, dev.recovery.retries, dev.recovery.resets) == (1, 1, 0)
    dev.close()
    assert dev._broken is False


def test_serial_reconnects_after_the_board_restarts(emulated_board: Callable[..., BoardServers]) -> None:
    s = emulated_board(BOARD)
    port = int(s.uris["serial-socket"].rsplit(":", 1)[1])
    with open_device(s.uri("serial-socket", ack_timeout="0.05", retries="2", timeout="1")) as dev:
        s.framed.close()  # the server goes away: connections end
        time.sleep(0.3)
        with pytest.raises(DeviceError):
            dev.safety()
        s.framed.listen_tcp("127.0.0.1", port)
        assert dev.safety().violations == 0


@pytest.mark.parametrize("transport", ["visa-tcp", "serial-socket"])
def test_a_board_powered_up_again_is_configured_again(
    transport: str, emulated_board: Callable[..., BoardServers]
) -> None:
    """A board that powers up again at the same address may start at the epoch it had (here
    0, as a fresh emulator does): the host finds it without a topology and configures it
    again, where it used to fail with "the device has no topology yet". A fresh emulator's
    devices were never programmed, and its STATUS `arrays_id` says so: the operation raises
    `ArraysLost` (it used to go on with the devices' own conductances); the next one runs."""
    from emulator.server.launch import serve

    s = emulated_board(BOARD)
    uri = s.uri(transport, timeout="1", **({"ack_timeout": "0.05"} if transport == "serial-socket" else {}))
    port = (
        int(s.uris["serial-socket"].rsplit(":", 1)[1])
        if transport == "serial-socket"
        else int(s.uris["visa-tcp"].split("::")[2])
    )
    fresh = None
    try:
        with open_device(uri) as dev:
            dev.configure(Topology.layered([4, 3]))
            before = dev.status().epoch
            s.close()  # the board and its servers go away
            time.sleep(0.3)
            ports = (
                {"framed_port": port, "scpi_port": None}
                if transport == "serial-socket"
                else {"scpi_port": port, "framed_port": None}
            )
            fresh = serve(BOARD, scpi_pty=False, framed_pty=False, **ports)  # type: ignore[arg-type]
            x = np.full((2, 5), 0.5, np.float32)
            with pytest.raises(
                ArraysLost, match=r"arrays no longer hold what was programmed.*Program every tile"
            ):
                dev.mvm("W0", x)
            assert fresh.device.status().epoch == before  # the same epoch: only the topology tells
            assert fresh.device.topology == dev.topology
            assert dev.recovery.reconfigured == 1 and dev.recovery.arrays_lost == 1
            assert dev.mvm("W0", x).shape == (2, 3)  # the host knows now: the next operation runs
            assert dev.status().arrays_id == fresh.device.status().arrays_id
    finally:
        if fresh is not None:  # after the host closed (its close makes the board safe)
            fresh.close()


@pytest.mark.parametrize("transport", ["visa-tcp", "serial-socket"])
def test_ctrl_c_waits_for_the_transaction_then_makes_the_board_safe(
    transport: str, emulated_board: Callable[..., BoardServers]
) -> None:
    skip_unless_main_thread()
    handler = signal.getsignal(signal.SIGINT)
    plan = FaultPlan(reply_delay_s=0.15) if transport == "visa-tcp" else None
    s = emulated_board(BOARD, plan=plan)
    calls: list[str] = []
    inner = s.device.safe_state
    s.device.safe_state = lambda: (calls.append("safe"), inner())[1]  # type: ignore[method-assign]
    board_wait = s.device.wait

    def interrupted_wait(seconds: float) -> None:
        # the Ctrl-C lands once the request has reached the board, and its reply is delayed:
        # the host is inside the transaction whatever the machine's load
        os.kill(os.getpid(), signal.SIGINT)
        board_wait(seconds)

    with open_device(s.uri(transport)) as dev:
        if transport != "visa-tcp":
            s.framed.links[-1].faults.delay_s = 0.1  # each frame from the board waits 0.1 s
        s.device.wait = interrupted_wait  # type: ignore[method-assign]
        t0 = time.perf_counter()
        with pytest.raises(KeyboardInterrupt):
            dev.wait(1.0)
        assert time.perf_counter() - t0 >= 0.09  # the interrupt waited for the reply
        assert calls == ["safe"]
        assert dev.safety().violations == 0  # the link is intact: no half transaction
    assert calls == ["safe", "safe"]  # and again on close
    assert signal.getsignal(signal.SIGINT) is handler


def test_a_serial_scpi_line_opens_plain_after_a_checked_session(servers: BoardServers) -> None:
    """A pty (a serial line) is one SCPI session for its whole life: the checked mode a host
    turned on outlives it. A plain open (``check=0``) after it must still work, and a checked
    one after that (a serial resource is checked unless its URI says ``check=0``)."""
    uri = servers.uris["visa-asrl"]
    for query in ("check=1", "check=0", "", "check=0"):
        with open_device(f"{uri}?{query}" if query else uri) as dev:
            assert dev.info.identity.model == "emulator-ideal"
            assert dev.safety().violations == 0
            checked = query != "check=0"
            assert dev.query("SYST:COMM:CHEC?") == ("1" if checked else "0")  # type: ignore[attr-defined]


# ---- the CLI -------------------------------------------------------------------------


def test_cli_serves_on_every_transport() -> None:
    cmd = [sys.executable, "-c", "from hil.cli import main; main()", "emulator", "serve"]
    cmd += ["--preset", "ideal", "--scpi-port", "0", "--serial-pty", "--serial-port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        uris = []
        deadline = time.monotonic() + 60
        while len(uris) < 4 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            uris += [w for w in line.split() if "://" in w]
        assert [u.split("://")[0] for u in uris] == ["visa", "visa", "serial", "serial+socket"]
        assert "127.0.0.1" in uris[0] and "ASRL/dev/" in uris[1]
        for uri in uris:
            with open_device(uri) as dev:
                assert dev.info.identity.model == "emulator-ideal"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    assert proc.returncode == 143  # README: 128 + SIGTERM, after a clean stop (it was 0)


def test_cli_serve_stops_on_sigint_even_when_started_with_it_ignored_and_counts_frame_faults() -> None:
    """The CI audit: `hil emulator serve &` from a non-interactive shell inherits SIGINT
    ignored, and `kill -INT` did not stop it; and the frame faults of --corrupt-rate were
    never reported on exit."""
    cmd = [sys.executable, "-c", "from hil.cli import main; main()", "emulator", "serve", "--preset", "ideal"]
    cmd += ["--scpi-port", "-1", "--serial-port", "0", "--corrupt-rate", "0.3", "--fault-seed", "1"]
    ignored = lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)  # noqa: E731  (as bash does for `&`)
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    proc = subprocess.Popen(cmd, preexec_fn=ignored, **pipes)  # type: ignore[call-overload]
    try:
        assert proc.stdout is not None
        uri = ""
        deadline = time.monotonic() + 60
        while not uri and time.monotonic() < deadline:
            uri = next((w for w in proc.stdout.readline().split() if w.startswith("serial+socket://")), "")
        with open_device(uri + "?ack_timeout=0.05&retries=8") as dev:
            for _ in range(10):
                assert dev.safety().violations == 0
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 130, err  # README: 128 + SIGINT, after a clean stop (it was 0)
    line = next(x for x in err.splitlines() if x.startswith("frame faults injected (framed links): "))
    counts = ast.literal_eval(line.split(": ", 1)[1])  # the printed dict
    assert counts["corrupt"] > 0 and counts["drop"] == 0, line


# ---- a short digits training: identical metrics over every transport ----------------


def _train(transport: str) -> list[tuple[float, float]]:
    from hil.data import load_digits
    from hil.ep import EBBlock

    data = load_digits()
    x_test, y_test = data.x_test[:48], data.y_test[:48]
    metrics = []
    with open_transport(transport, "emulator://?preset=rram&seed=1") as dev:
        block = EBBlock.layered(dev, [64, 12, 10], budget=SettleBudget(max_steps=25, tol=1e-3), seed=0)
        opt = torch.optim.SGD(block.parameters(), lr=0.2)
        for step in range(3):
            x = data.x_train[step * 24 : (step + 1) * 24]
            y = torch.eye(10)[data.y_train[step * 24 : (step + 1) * 24]]
            result = block.ep(x, target=y, beta=0.3)
            opt.zero_grad()
            for tile, g in result.grads.items():
                block.weights[tile].grad = g
            opt.step()
            out = block.predict(x_test)
            loss = block.loss({"s2": out.numpy()}, torch.eye(10)[y_test])
            acc = float((out.argmax(1) == y_test).float().mean())
            metrics.append((loss, acc))
    return metrics


@pytest.fixture(scope="module")
def trained_in_process() -> list[tuple[float, float]]:
    return _train(IN_PROCESS)


@pytest.mark.parametrize("transport", REMOTE_TRANSPORTS)
def test_short_training_matches_in_process(
    transport: str, trained_in_process: list[tuple[float, float]]
) -> None:
    assert _train(transport) == trained_in_process


def test_plugin_fixture_gives_a_working_board_on_every_transport(transport_device) -> None:
    """`transport_device` comes from the distribution's pytest plugin (hil.testing, entry
    point pytest11), not from this file: what users get in their own test suites."""
    transport_device.configure(Topology.layered([4, 3]))
    eq = transport_device.settle({"s0": np.full((2, 4), 0.5, np.float32)})
    assert eq.states["s1"].shape == (2, 3) and eq.steps >= 1
    assert transport_device.info.identity.model == "emulator-rram"


@pytest.mark.parametrize("scheme", ["visa", "serial+socket"])
def test_unreachable_board_gives_a_device_error_naming_it(scheme: str) -> None:
    """No server at the address: a DeviceError that names the address, on both transports."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now: connections are refused
    uri = (
        f"visa://TCPIP0::127.0.0.1::{port}::SOCKET?attempts=2&backoff=0"
        if scheme == "visa"
        else f"serial+socket://127.0.0.1:{port}"
    )
    with pytest.raises(DeviceError, match=str(port)):
        open_device(uri)


def test_cli_serve_json_prints_one_object_with_its_uris() -> None:
    """`hil emulator serve --json`: one JSON line a CI script reads (URIs by transport)."""
    import json

    cmd = [sys.executable, "-c", "from hil.cli import main; main()", "emulator", "serve", "--json"]
    cmd += ["--preset", "ideal", "--seed", "3", "--scpi-port", "0", "--serial-port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        served = json.loads(proc.stdout.readline())
        assert sorted(served["uris"]) == ["serial-socket", "visa-tcp"], served
        assert served["preset"] == "ideal" and served["seed"] == 3 and "lock" in served["capabilities"]
        for uri in served["uris"].values():
            with open_device(uri) as dev:
                assert dev.info.identity.idn() == served["identity"]
                assert sorted(dev.info.capabilities) == sorted(served["capabilities"])
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    assert proc.returncode == 143 and proc.stdout.read() == ""  # one line, nothing else
