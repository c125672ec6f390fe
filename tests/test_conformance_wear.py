"""`hil conformance` checks the wear query (SYST:WEAR?, opcode 0x24) of a board that declares a
pulse endurance: the query answers within the host's checks, names the declared endurance and
the configured tiles, and a write and a pulse raise the reported wear as docs/protocol.md
("Pulse endurance") says, on a two-sided and a one-sided (PCM) board, in process and over both
links; a board without an endurance is SKIPPED with the reason; boards that report wear wrongly
fail the check named for it (all fail on the old code: the suite had no wear check)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import pytest
from typer.testing import CliRunner

from drivers import Device, DeviceInfo, NotSupported, Wear, open_device
from drivers.topology import Coupling, Topology
from drivers.wrapper import DeviceWrapper
from hil.cli import app
from hil.conformance import Report, run_conformance
from hil.testing import IN_PROCESS, BoardServers

RRAM = "emulator://?preset=rram&seed=0&pulse_endurance=1000"
PCM = "emulator://?preset=pcm&seed=0&pulse_endurance=1000"  # one-sided: a RESET is one pulse


def _checks(report: Report) -> dict[str, tuple[str, str, str, str]]:
    return {
        c.operation: (c.status, c.sent, c.got, c.spec)
        for c in report.checks
        if c.operation.startswith("wear")
    }


@pytest.mark.parametrize(
    ("transport", "board"),
    [(IN_PROCESS, RRAM), (IN_PROCESS, PCM), ("visa-tcp", RRAM), ("serial-socket", RRAM), ("visa-tcp", PCM)],
)
def test_the_wear_query_is_checked_on_a_board_with_an_endurance(
    transport: str, board: str, emulated_board: Callable[..., BoardServers]
) -> None:
    uri = board if transport == IN_PROCESS else emulated_board(board=board).uris[transport]
    result = CliRunner().invoke(app, ["conformance", uri, "--limit-probes"])
    assert result.exit_code == 0, result.stdout + result.stderr
    wear = [line for line in result.stdout.splitlines() if line[6:].startswith("wear")]
    assert [line[:28].rstrip() for line in wear] == ["PASS  wear", "PASS  wear counts"], wear
    one_sided = board == PCM
    assert "the configured tiles (W0, W1)" in wear[0] and "endurance 1000, near_from 900" in wear[0]
    counts = wear[1]
    assert "program E0" in counts and "pulse E0 +3" in counts and "pulse E0 -3" in counts
    # the check says what it spends: a write, +3 and -3 (one RESET pulse on a one-sided board)
    assert f"spends {5 if one_sided else 7} of each of its two devices' 1000 pulses" in counts
    assert f"one of -3 by {1 if one_sided else 3}" in counts
    got = counts.split(" | got: ")[1].split(" | spec: ")[0]
    steps = [s.split(": ")[1].split(" -> ") for s in got.removeprefix("max_wear of E0 ").split("; ")]
    assert [int(b) - int(a) for a, b in steps] == [1, 3, 1 if one_sided else 3]


def test_a_board_without_an_endurance_skips_the_wear_check_with_the_reason() -> None:
    report = run_conformance(open_device("emulator://?preset=rram&seed=0"))
    assert report.ok
    checks = _checks(report)
    assert list(checks) == ["wear"]
    status, sent, got, spec = checks["wear"]
    assert (status, sent, got) == ("SKIP", "-", "-")
    assert "pulse_endurance not declared" in spec and "counts no wear" in spec


class StaleWear(DeviceWrapper):
    """A firmware bug: the wear reply is the count taken when the tiles were configured (the
    board sums its counts only then)."""

    counted: Wear | None = None

    def configure(self, topology: Topology) -> None:
        self.inner.configure(topology)
        self.counted = self.inner.wear()

    def wear(self) -> Wear | None:
        return self.counted


class DeclaresOneSided(DeviceWrapper):
    """A firmware bug: a board that declares `one_sided` but counts a negative count as |n|."""

    @property
    def info(self) -> DeviceInfo:
        inner = self.inner.info
        limits = dataclasses.replace(inner.limits, one_sided=True)
        return DeviceInfo(inner.identity, limits, inner.capabilities, inner.preset, inner.extra)


class NoWearQuery(DeviceWrapper):
    """Firmware that declares an endurance but predates the wear query."""

    def wear(self) -> Wear | None:
        raise NotSupported("unknown opcode 0x24")


@pytest.mark.parametrize(
    ("double", "fails", "says"),
    [
        (StaleWear, "wear counts", "program: 3 -> 3, expected 3 -> 4"),
        (DeclaresOneSided, "wear counts", "pulse -3: 7 -> 10, expected 7 -> 8"),
        (NoWearQuery, "wear", "firmware that predates the query"),
    ],
)
def test_a_board_that_reports_wear_wrongly_fails_the_check(
    double: Callable[[Device], Device], fails: str, says: str
) -> None:
    # a new board each time, seed 0: E0 (physical tile 0) has taken 3 pulses of the earlier checks
    dev = double(open_device("emulator://?preset=ideal&seed=0&pulse_endurance=1000"))
    report = run_conformance(dev)
    failed = {c.operation: c for c in report.checks if c.status == "FAIL"}
    assert list(failed) == [fails], [c.line() for c in failed.values()]
    assert says in failed[fails].got
    assert "wear counts" not in _checks(report) or fails == "wear counts"


class WrongEndurance(DeviceWrapper):
    """A firmware bug: the wear reply names an endurance other than the declared one."""

    def wear(self) -> Wear | None:
        w = self.inner.wear()
        return None if w is None else dataclasses.replace(w, endurance=w.endurance + 1)


def test_a_reply_the_host_refuses_fails_the_query_check(emulated_board: Callable[..., BoardServers]) -> None:
    servers = emulated_board(board=WrongEndurance(open_device(RRAM)))
    dev = open_device(servers.uris["serial-socket"])
    try:
        report = run_conformance(dev, servers.uris["serial-socket"])
    finally:
        dev.close()
    failed = {c.operation: c for c in report.checks if c.status == "FAIL"}
    assert list(failed) == ["wear"], [c.line() for c in failed.values()]
    assert "ProtocolError" in failed["wear"].got
    assert "is not the board's declared pulse_endurance 1000" in failed["wear"].got


def test_a_board_too_worn_for_the_check_skips_it_saying_so() -> None:
    # wear_onset=1: the device keeps its window to the end (a narrowed one would make the
    # suite's own checks before this one spend more of what is left)
    dev = open_device("emulator://?preset=ideal&seed=0&pulse_endurance=1000&wear_onset=1")
    dev.configure(Topology({"e0": 1, "e1": 1}, (Coupling("E0", ("e0",), ("e1",)),)))
    c = np.full((1, 1), 996, np.int32)
    dev.pulse("E0", c, np.zeros((1, 1), np.int32))  # with the suite's own 3 before it: 1 left
    report = run_conformance(dev)
    status, _, _, spec = _checks(report)["wear counts"]
    assert (
        status == "SKIP" and spec == "E0's most worn device has 1 of its 1000 pulses left; the check spends 7"
    )
