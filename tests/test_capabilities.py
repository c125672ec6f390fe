"""Boards that declare a subset of the capabilities (an MVM-only board for CI), and the board
meter: in process, over real transports, and from `hil emulator serve`."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from drivers import ConfigurationError, Device, Meter, NotSupported, Topology, open_device
from drivers.base import CAPABILITIES
from drivers.wire import payload as pl
from drivers.wire.client import RemoteDevice
from drivers.wire.payload import Message, Op
from drivers.wrapper import DeviceWrapper
from hil.cli.emulator_cmd import banner, board_uri
from hil.testing import BoardServers

MVM_ONLY = "emulator://?preset=rram&seed=0&capabilities=mvm,program_verify"
TOPO = Topology.layered([4, 3, 2])
X = np.full((2, 4), 0.5, np.float32)


def _board(caps: set[str] | frozenset[str]) -> str:
    return f"emulator://?preset=rram&seed=0&capabilities={','.join(sorted(caps))}"


def _program(dev: Device, verify: bool = False) -> None:
    lim = dev.info.limits
    for tile in ("W0", "W1"):
        rows, cols = TOPO.tile_shape(tile)
        g = np.random.default_rng(0).uniform(lim.g_min, lim.g_max, (2, rows, cols)).astype(np.float32)
        dev.program(tile, g[0], g[1], verify=verify, max_iters=3)


# what each capability refuses, what the hint says, and the way round it that still works
CALLS: dict[str, tuple[Callable[[Device], object], str, Callable[[Device], object]]] = {
    "settle": (lambda d: d.settle({"s0": X}), "settle='host'", lambda d: d.mvm("W0", np.full((2, 5), 0.5))),
    "mvm": (lambda d: d.mvm("W0", np.full((2, 5), 0.5)), "use settle", lambda d: d.settle({"s0": X})),
    "pulse": (
        lambda d: d.pulse("W0", np.ones((5, 3)), np.zeros((5, 3))),
        "programming scheme `verify`",
        lambda d: _program(d, verify=True),
    ),
    "program_verify": (lambda d: _program(d, verify=True), "verify=False", lambda d: _program(d)),
    "trace": (lambda d: d.settle({"s0": X}, trace=True), "trace=False", lambda d: d.settle({"s0": X})),
    "preset_state": (
        lambda d: d.settle({"s0": X}, init={"s1": np.zeros((2, 3), np.float32)}),
        "without init=",
        lambda d: d.settle({"s0": X}),
    ),
}


@pytest.mark.parametrize("missing", CAPABILITIES)
def test_a_missing_capability_is_refused_with_what_to_use_instead(missing: str) -> None:
    declared = set(CAPABILITIES) - {missing}
    with open_device(_board(declared)) as dev:
        assert dev.info.capabilities == declared
        dev.configure(TOPO)
        _program(dev)  # plain writes: every board can be written
        refused, hint, other_way = CALLS[missing]
        with pytest.raises(NotSupported) as info:
            refused(dev)
        text = str(info.value)
        assert f"(capability {missing!r} not declared)" in text and hint in text
        other_way(dev)
        assert dev.safety().refused == 0  # a missing capability is not a limit refusal


def test_the_settle_refusal_reads_as_specified() -> None:
    with open_device(MVM_ONLY) as dev:
        dev.configure(TOPO)
        with pytest.raises(NotSupported) as info:
            dev.settle({"s0": X})
    assert str(info.value).startswith(
        "this board cannot settle (capability 'settle' not declared); iterate the fixed point on the "
        "host: EBBlock(..., settle='host') or `--set ep.settle=host`, which use `mvm`"
    )
    assert "declares: mvm, program_verify" in str(info.value)


def test_require_takes_a_caller_hint() -> None:
    with (
        open_device(MVM_ONLY) as dev,
        pytest.raises(NotSupported, match=r"cannot apply programming pulses .*; tune the weights"),
    ):
        dev.require("pulse", instead="tune the weights with program(verify=True)")


def test_every_capability_subset_is_accepted_and_unknown_names_are_not() -> None:
    with open_device("emulator://?preset=ideal&capabilities=") as dev:
        assert dev.info.capabilities == frozenset()
    with pytest.raises(ConfigurationError, match=r"unknown capability 'relax'; known: settle, mvm, pulse"):
        open_device("emulator://?preset=ideal&capabilities=mvm,relax")


@pytest.mark.parametrize("transport", ["visa-tcp", "serial-socket"])
def test_an_mvm_only_board_over_a_transport(transport: str, device_on: Callable[..., Device]) -> None:
    dev = device_on(transport, board=MVM_ONLY)
    assert dev.info.capabilities == {"mvm", "program_verify", "lock"}  # lock: the server's ownership
    dev.configure(TOPO)
    _program(dev, verify=True)
    assert dev.mvm("W0", np.full((2, 5), 0.5)).shape == (2, 3)
    with pytest.raises(
        NotSupported, match=r"cannot settle \(capability 'settle' not declared\).*settle='host'"
    ):
        dev.settle({"s0": X})
    with pytest.raises(NotSupported, match="programming scheme `verify`"):
        dev.pulse("W0", np.ones((5, 3)), np.zeros((5, 3)))
    # past the host's own check, the board refuses too: error 101 comes back as NotSupported
    assert isinstance(dev, RemoteDevice)
    request = pl.settle_request({"s0": X}, {}, {}, False)
    with pytest.raises(NotSupported, match=r"capability 'settle' not declared.*settle='host'"):
        dev._transact(Op.SETTLE, request)
    assert dev.mvm("W1", np.full((1, 4), 0.5)).shape == (1, 2)


@pytest.mark.parametrize("transport", ["emulator", "visa-tcp", "serial-socket"])
def test_without_trace_a_settle_runs_untraced_only(transport: str, device_on: Callable[..., Device]) -> None:
    dev = device_on(transport, board=_board({"settle", "mvm", "program_verify", "preset_state"}))
    dev.configure(TOPO)
    _program(dev)
    with pytest.raises(NotSupported, match=r"cannot record a settle trace.*settle with trace=False"):
        dev.settle({"s0": X}, trace=True)
    with pytest.raises(NotSupported, match="capability 'trace'"):
        dev.settle({"s0": X}, trace=5)
    eq = dev.settle({"s0": X}, trace=False)
    assert eq.trace is None and eq.states["s2"].shape == (2, 2)


# ---- the meter -----------------------------------------------------------------------


def test_the_meter_counts_what_the_board_does() -> None:
    with open_device("emulator://?preset=rram&seed=1") as dev:
        m0 = dev.meter()
        assert m0 == Meter(0.0, 0.0, 0)
        dev.configure(TOPO)
        _program(dev)
        m1 = dev.meter()
        assert m1.clock_s > 0 and m1.energy_j > 0 and m1.mvm_calls == 0  # programming costs time
        dev.mvm("W0", np.full((16, 5), 0.5))
        m2 = dev.meter()
        per = dev.board.preset.periphery
        assert m2.mvm_calls == 1  # one call, whatever the batch
        assert m2.clock_s - m1.clock_s == pytest.approx(16 * per.mvm_time_s, rel=1e-9)
        assert m2.energy_j > m1.energy_j
        eq = dev.settle({"s0": X})
        m3 = dev.meter()
        assert m3.clock_s - m2.clock_s == pytest.approx(eq.settle_time_s, rel=1e-9)
        assert m3.energy_j - m2.energy_j == pytest.approx(eq.energy_j, rel=1e-9)
        assert m3.mvm_calls == 1  # a settle is not an mvm call
        dev.wait(10.0)
        assert dev.meter().clock_s == pytest.approx(m3.clock_s + 10.0)
        dev.reset()
        assert dev.meter().mvm_calls == 1  # cumulative since power-on, not since a reset


class NoMeter(DeviceWrapper):
    """A board whose firmware keeps no counters."""

    def meter(self) -> Meter | None:
        return None


def test_a_wrapper_forwards_the_meter() -> None:
    with open_device("emulator://?preset=ideal") as inner:
        assert DeviceWrapper(inner).meter() == inner.meter() == Meter(0.0, 0.0, 0)


@pytest.mark.parametrize("transport", ["visa-tcp", "serial-socket"])
def test_a_board_without_a_meter_reports_none_over_the_wire(
    transport: str, emulated_board: Callable[..., BoardServers]
) -> None:
    servers = emulated_board(board=NoMeter(open_device("emulator://?preset=ideal")))
    with open_device(servers.uri(transport)) as dev:
        assert dev.meter() is None
        assert dev.info.preset == "ideal"  # and the session goes on
    if transport == "visa-tcp":
        with open_device(servers.uri(transport)) as dev:
            assert isinstance(dev, RemoteDevice)
            with pytest.raises(NotSupported, match="keeps no meter"):
                dev._transact(Op.METER, Message())


def test_the_meter_over_scpi_is_three_exact_numbers(device_on: Callable[..., Device]) -> None:
    dev = device_on("visa-tcp", board="emulator://?preset=rram&seed=2")
    dev.configure(TOPO)
    _program(dev)
    dev.mvm("W0", np.full((3, 5), 0.25))
    text = dev.query("SYSTem:METer?")  # type: ignore[attr-defined]
    clock, energy, calls = text.split(",")
    assert Meter(float(clock), float(energy), int(calls)) == dev.meter()
    assert int(calls) == 1


# ---- hil emulator serve --capabilities ---------------------------------------------


def test_board_uri_takes_capabilities_and_settings() -> None:
    uri = board_uri("rram", 2, "mvm,pulse", ["adc_bits=6"])
    assert uri == "emulator://?preset=rram&seed=2&capabilities=mvm,pulse&adc_bits=6"
    assert board_uri("pcm", 0) == "emulator://?preset=pcm&seed=0"
    with pytest.raises(ConfigurationError, match="unknown capability 'relax'"):
        board_uri("rram", 0, "relax")
    with open_device(uri) as dev:
        assert banner(dev.info).endswith("(preset rram, seed 2, capabilities mvm,pulse)")
        assert banner(dev.info, lock=True).endswith("(preset rram, seed 2, capabilities mvm,pulse,lock)")


@contextlib.contextmanager
def _served(*args: str) -> Iterator[tuple[list[str], str]]:
    """`hil emulator serve --scpi-port 0 ARGS` as a user runs it, a process of its own: (the
    lines it printed up to its SCPI/TCP URI, that URI); stopped by SIGTERM on exit."""
    cmd = [sys.executable, "-m", "hil.cli", "emulator", "serve", *args, "--scpi-port", "0"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(line.startswith("SCPI over TCP") for line in lines):
            line = proc.stdout.readline()  # type: ignore[union-attr]
            if not line:
                break
            lines.append(line.strip())
        uri = next((line.split()[-1] for line in lines if line.startswith("SCPI over TCP")), "")
        assert uri, (lines, proc.stderr.read() if proc.poll() is not None else "")  # type: ignore[union-attr]
        yield lines, uri
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_serve_declares_the_capabilities_it_was_given() -> None:
    """`hil emulator serve --capabilities mvm,program_verify` as a user runs it: a process whose
    printed VISA resource opens a board that declares exactly those."""
    with _served("--preset", "rram", "--seed", "0", "--capabilities", "mvm,program_verify") as (lines, uri):
        # the banner lists what a client sees: lock (the server's) was left out
        assert lines[0].endswith("capabilities mvm,program_verify,lock)"), lines
        with open_device(uri) as dev:
            assert dev.info.capabilities == {"mvm", "program_verify", "lock"}  # lock: the server's


def test_serve_help_names_every_capability_the_served_board_declares_by_default() -> None:
    """`hil emulator serve --help` gave the --capabilities default as the array's six, where the
    served board also declares lock (its servers keep an owner): the help says what a client of
    a default `hil emulator serve` sees, every capability of it."""
    import re

    import typer.main

    from hil.cli import app

    serve_cmd = typer.main.get_command(app).commands["emulator"].commands["serve"]  # type: ignore[attr-defined]
    helptext = next(p.help for p in serve_cmd.params if p.name == "capabilities")
    with _served("--preset", "ideal") as (_lines, uri), open_device(uri) as dev:
        served = set(dev.info.capabilities)
    assert "lock" in served
    named = set(re.findall(r"[a-z_]+", helptext or ""))
    assert served <= named, (served - named, helptext)
    shown = re.search(r"sees ([a-z_,]+)", helptext or "")
    assert shown and set(shown.group(1).split(",")) == served, helptext
