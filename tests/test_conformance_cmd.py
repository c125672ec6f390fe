"""`hil conformance URI`: passes on the emulator over every transport, with every capability
and as an MVM-only board; fails, naming the operation, against boards whose replies break the
spec; leaves the board safe; refuses a bad URI with one line and exit code 2."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from drivers import (
    BoardStatus,
    Device,
    DeviceInfo,
    DeviceTimeout,
    Equilibrium,
    Nudge,
    ProgramReport,
    RetriesExhausted,
    SafetyCounters,
    open_device,
)
from drivers.errors import LimitViolation
from drivers.wrapper import DeviceWrapper
from hil.cli import app
from hil.conformance import Options, run_conformance
from hil.testing import IN_PROCESS, TRANSPORTS, BoardServers, FaultPlan

FULL = "emulator://?preset=rram&seed=0"
MVM_ONLY = "emulator://?preset=rram&seed=0&capabilities=mvm,pulse,program_verify"


def _invoke(*args: str) -> tuple[int, str, str]:
    """`hil conformance` with the past-limit probes, as CI runs it on the emulator's served boards
    (off by default for any board but an emulator:// URI), unless `args` say otherwise."""
    probes = [] if {"--limit-probes", "--no-limit-probes"} & set(args) else ["--limit-probes"]
    result = CliRunner().invoke(app, ["conformance", *args, *probes])
    return result.exit_code, result.stdout, result.stderr


def _failed(stdout: str) -> set[str]:
    """Operations on FAIL lines."""
    return {line[6:].split(" sent: ")[0].strip() for line in stdout.splitlines() if line.startswith("FAIL")}


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("board", [FULL, MVM_ONLY], ids=["full", "mvm-only"])
def test_passes_on_every_transport(
    transport: str, board: str, emulated_board: Callable[..., BoardServers], tmp_path: Path
) -> None:
    servers = None if transport == IN_PROCESS else emulated_board(board=board)
    uri = board if servers is None else servers.uris[transport]
    out = tmp_path / "conformance.json"
    code, stdout, stderr = _invoke(uri, "--json", str(out))
    assert code == 0, stdout + stderr
    assert not _failed(stdout)
    lines = stdout.splitlines()
    assert lines[0].startswith("board  xbar-hil,emulator-rram,"), lines[0]
    summary = lines[-2]
    data = json.loads(out.read_text())
    assert data["ok"] and data["failed"] == 0 and data["passed"] == len(lines) - 3 - data["skipped"]
    assert summary.startswith(f"{data['passed']} passed, 0 failed, {data['skipped']} skipped")
    ops = {c["operation"]: c["status"] for c in data["checks"]}
    for op in ("identity", "limits", "configure", "program W0", "program verify W0", "mvm", "mvm transpose",
               "pulse +", "pulse -", "unknown tile", "limit conductance", "reset", "safe_state"):  # fmt: skip
        assert ops[op] == "PASS", op
    # the gone owner's lease needs a board with ownership (served ones) over TCP: in-process
    # (no lock) and on a serial line (no connection of its own closes) it is SKIPPED
    tcp = transport in ("visa-tcp", "serial-socket")
    assert ops["owner gone"] == ("PASS" if tcp else "SKIP")
    gone_skipped = 0 if tcp else 1
    if board == MVM_ONLY:
        assert data["skipped"] == 2 + gone_skipped
        assert ops["settle"] == "SKIP" and ops["settle refused"] == "PASS"
        assert "settle free" not in ops
    else:
        assert data["skipped"] == 1 + gone_skipped
        for op in ("settle free", "settle nudged", "settle trace", "settle init", "limit clamp"):
            assert ops[op] == "PASS", op
    assert ops["wear"] == "SKIP"  # no pulse endurance declared (tests/test_conformance_wear.py)
    if transport.startswith("visa"):  # the board's own error queue and limit checks, by raw SCPI
        assert ops["scpi error queue"] == "PASS"
        assert ops["scpi board limit"] == "PASS"
        assert ops["scpi board conductance limit"] == "PASS"
        assert ops["scpi wait limit"] == "PASS"  # NaN and one float64 step past max_wait_s refused
        assert ops.get("scpi undeclared settle") == ("PASS" if board == MVM_ONLY else None)
        # blocks of five length digits; a program resent with its id after another program
        assert ops["scpi large blocks"] == ops["scpi program request id"] == "PASS"
    else:
        assert not any(op.startswith("scpi") for op in ops)
    if servers is not None and not transport.startswith("visa"):  # the framed link: unchecked requests
        assert ops["unchecked board limit"] == "PASS"
        assert ops["unchecked board conductance limit"] == "PASS"
        assert ops["unchecked wait limit"] == "PASS"  # NaN and one float64 step past max_wait_s refused
        assert ops.get("unchecked undeclared settle") == ("PASS" if board == MVM_ONLY else None)
        assert ops["unchecked program without id"] == ops["unchecked program request id"] == "PASS"
        assert ops["fragmented messages"] == ops["link COBS runs"] == "PASS"
    else:
        assert not any(op.startswith("unchecked") for op in ops)
        assert "fragmented messages" not in ops and "link COBS runs" not in ops  # no frames
    if servers is not None:
        # the over-limit requests through the Device API were refused on the host; only the
        # raw SCPI ones, or the unchecked framed ones (an mvm input, program targets), reached
        # the board, which refused them
        assert ops["line current limit"] == "PASS"
        # ... and the two mvms over the line-current limit (at clamp_max and 1 % over it) and the
        # topologies with w_max and gain past their limits, sent unchecked on either link; on the
        # framed link the mvm of max_batch + 1 samples too
        # (now over SCPI too), and the wait one float64 step past max_wait_s on either link
        framed = not transport.startswith("visa")
        assert servers.device.safety() == SafetyCounters(refused=8, violations=0)
        assert ops[f"{'unchecked' if framed else 'scpi'} configure limits"] == "PASS"
        prefix = "unchecked" if framed else "scpi"
        assert ops[f"{prefix} mvm at clamp_max"] == ops[f"{prefix} batch limit"] == "PASS"
        assert ops[f"{prefix} request id after reset"] == ops["configure largest tile"] == "PASS"
        # the owner the check left gone was made safe by the board (not visible on the wire), at
        # its close and again after its reconnect's close
        assert servers.lock is not None and servers.lock.owner_gone == (2 if tcp else 0)


class Recording(DeviceWrapper):
    """Records the name of every Device operation looked up on it (a call looks its method up
    once; the wrapper forwards to the board through `inner`, which is not recorded)."""

    def __init__(self, inner: Device) -> None:
        super().__init__(inner)
        self.calls: list[str] = []

    def __getattribute__(self, name: str) -> object:
        attr = super().__getattribute__(name)
        if name in ("configure", "program", "pulse", "read_conductance", "mvm", "settle", "reset",
                    "safe_state", "status", "begin", "commit", "wait"):  # fmt: skip
            super().__getattribute__("calls").append(name)
        return attr


def test_leaves_the_board_in_its_safe_state() -> None:
    dev = Recording(open_device(FULL))
    report = run_conformance(dev, FULL)
    assert report.ok
    assert dev.calls[-1] == "safe_state"
    assert "settle" in dev.calls and "pulse" in dev.calls
    assert dev.safety().violations == 0


def test_the_command_leaves_a_served_board_unconfigured_for_the_next_host(
    emulated_board: Callable[..., BoardServers],
) -> None:
    """The command left its test network configured on a shared lab board: the next host found
    a topology it had not set (safe, but not the power-on state)."""
    servers = emulated_board(board=FULL)
    code, stdout, stderr = _invoke(servers.uris["visa-tcp"])
    assert code == 0, stdout + stderr
    assert "could not reset" not in stdout + stderr
    with open_device(servers.uris["serial-socket"]) as dev:
        assert not dev.status().configured and dev.topology is None
    assert servers.device.safety().violations == 0


class LinkDropsAtMvm(Recording):
    """The board stops answering at the first mvm."""

    def mvm(self, tile: str, x: np.ndarray, *, transpose: bool = False) -> np.ndarray:
        raise RetriesExhausted("mvm", 4, 1.5, DeviceTimeout("no answer within 1 s"))


def test_a_lost_link_stops_the_run_and_the_board_is_made_safe() -> None:
    dev = LinkDropsAtMvm(open_device(FULL))
    report = run_conformance(dev, FULL)
    ops = [c.operation for c in report.checks]
    assert ops[-2:] == ["mvm", "link"] and "settle free" not in ops and "reset" not in ops
    assert "RetriesExhausted" in report.checks[-2].got
    assert "remaining checks were not run" in report.checks[-1].got and not report.ok
    assert dev.calls[-1] == "safe_state"


class ScaledMvm(DeviceWrapper):
    """A firmware bug: the mvm result is 1.5 times too large."""

    def mvm(self, tile: str, x: np.ndarray, *, transpose: bool = False) -> np.ndarray:
        return (1.5 * self.inner.mvm(tile, x, transpose=transpose)).astype(np.float32)


class SwappedColumns(DeviceWrapper):
    """A firmware bug: the output channels of the mvm come back in reverse order."""

    def mvm(self, tile: str, x: np.ndarray, *, transpose: bool = False) -> np.ndarray:
        return np.ascontiguousarray(self.inner.mvm(tile, x, transpose=transpose)[:, ::-1])


@pytest.mark.parametrize("double", [ScaledMvm, SwappedColumns])
def test_fails_naming_mvm_behind_the_scpi_server(
    double: type[DeviceWrapper], emulated_board: Callable[..., BoardServers]
) -> None:
    servers = emulated_board(board=double(open_device(FULL)))
    code, stdout, stderr = _invoke(servers.uris["visa-tcp"])
    assert code == 1, stdout + stderr
    failed = _failed(stdout)
    # the large-blocks check's mvm (a 129 x 65 input) is compared with x @ W as well
    assert "mvm" in failed and failed <= {"mvm", "mvm transpose", "mvm 1-D", "scpi large blocks"}, failed
    line = next(x for x in stdout.splitlines() if x.startswith("FAIL  mvm "))
    assert "x @ W" in line and "tol" in line  # what came back, against what the spec says
    assert stdout.splitlines()[-1].split(", ")[1].endswith("failed") and " 0 failed" not in stdout


class IgnoresWMax(DeviceWrapper):
    """A firmware bug: the multiply leaves out the coupling's w_max (as if it were 1)."""

    def mvm(self, tile: str, x: np.ndarray, *, transpose: bool = False) -> np.ndarray:
        assert self.topology is not None
        y = self.inner.mvm(tile, x, transpose=transpose)
        return (y / self.topology.coupling(tile).w_max).astype(np.float32)


def test_fails_when_the_multiply_ignores_w_max(emulated_board: Callable[..., BoardServers]) -> None:
    """The test network runs at w_max 1, where this bug gives the right numbers: the same
    conductances configured at twice the w_max must give twice the outputs."""
    servers = emulated_board(board=IgnoresWMax(open_device(FULL)))
    code, stdout, _ = _invoke(servers.uris["visa-tcp"])
    assert code == 1
    assert _failed(stdout) == {"mvm w_max"}, stdout
    line = next(x for x in stdout.splitlines() if x.startswith("FAIL"))
    assert "a = 1: w_max is left out of the product" in line, line
    a = float(re.search(r"fit y\(2 w_max\) = ([-\d.]+) y", line).group(1))  # type: ignore[union-attr]
    assert abs(a - 1) < 0.1, line


class MoreTilesDeclared(DeviceWrapper):
    """A firmware bug: it declares 64 tiles and has 2 (the test network needs two)."""

    @property
    def info(self) -> DeviceInfo:
        inner = self.inner.info
        limits = dataclasses.replace(inner.limits, max_tiles=64)
        return DeviceInfo(inner.identity, limits, inner.capabilities, inner.preset, inner.extra)


def test_fails_when_the_board_has_fewer_tiles_than_it_declares() -> None:
    report = run_conformance(MoreTilesDeclared(open_device(FULL + "&max_tiles=2")))
    failed = {c.operation: c for c in report.checks if c.status == "FAIL"}
    assert set(failed) == {"configure max_tiles"}, failed
    assert "64" in failed["configure max_tiles"].sent and not report.ok


class UncheckedMvm(DeviceWrapper):
    """A firmware bug: the board does not check mvm inputs against its limits (it clips them)."""

    def mvm(self, tile: str, x: np.ndarray, *, transpose: bool = False) -> np.ndarray:
        peak = self.info.limits.clamp_max
        return self.inner.mvm(tile, np.clip(x, -peak, peak), transpose=transpose)


def test_fails_when_the_board_does_not_check_its_limits(emulated_board: Callable[..., BoardServers]) -> None:
    # the host refuses every over-limit request, so only the raw SCPI check can see this bug
    servers = emulated_board(board=UncheckedMvm(open_device(FULL)))
    code, stdout, _ = _invoke(servers.uris["visa-tcp"])
    assert code == 1
    assert _failed(stdout) == {"scpi board limit"}
    line = next(x for x in stdout.splitlines() if x.startswith("FAIL"))
    assert "the board ran the request; expected #10 and error -222" in line, line
    assert "PASS  limit mvm input" in stdout  # the host's own check


class StrictMvmEdges(DeviceWrapper):
    """Two firmware bugs at the mvm's edges, each refusing what the host sends in every full
    chunk or at the rail: the batch checked with >= max_batch, the input with >= clamp_max."""

    def mvm(self, tile: str, x: np.ndarray, *, transpose: bool = False) -> np.ndarray:
        lim = self.info.limits
        if np.shape(x)[0] >= lim.max_batch:
            raise LimitViolation("batch size of mvm input", np.shape(x)[0], lim.max_batch, "split it")
        if float(np.max(np.abs(x))) >= lim.clamp_max:
            raise LimitViolation(
                "read-voltage limit on mvm input", float(np.max(np.abs(x))), lim.clamp_max, "-"
            )
        return self.inner.mvm(tile, x, transpose=transpose)


def test_fails_when_an_scpi_board_refuses_clamp_max_or_a_full_batch(
    emulated_board: Callable[..., BoardServers],
) -> None:
    """The probes of an mvm input exactly at clamp_max and of exactly max_batch samples ran over
    the framed link only; an SCPI board with >= where > belongs passed. Its text queries carry
    only printable bytes, so they go as unchecked typed requests (`send_unchecked`), which the
    VisaDevice sends as SCPI blocks."""
    servers = emulated_board(board=StrictMvmEdges(open_device(FULL)))
    code, stdout, _ = _invoke(servers.uris["visa-tcp"])
    assert code == 1
    assert {"scpi mvm at clamp_max", "scpi batch limit"} <= _failed(stdout)
    lines = [x for x in stdout.splitlines() if x.startswith("FAIL")]
    assert any("the board checks with >=" in x for x in lines), lines
    assert any("max_batch = 1024 samples was refused" in x for x in lines), lines


class ClippedProgram(DeviceWrapper):
    """A firmware bug: program targets past the window are clipped into it and written, not
    refused (the devices would take whatever a buggy host sends next)."""

    def program(self, tile: str, g_plus: np.ndarray, g_minus: np.ndarray, **kw: object) -> ProgramReport:
        lim = self.info.limits
        gp, gm = (np.clip(g, lim.g_min, lim.g_max).astype(np.float32) for g in (g_plus, g_minus))
        return self.inner.program(tile, gp, gm, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("transport", "check"), [("visa-tcp", "scpi"), ("serial-socket", "unchecked")])
def test_fails_when_the_board_does_not_refuse_program_targets_past_its_window(
    emulated_board: Callable[..., BoardServers], transport: str, check: str
) -> None:
    """The limit that destroys devices: the host refuses such targets itself, so only a raw
    program (SCPI) or an unchecked one (framed) shows that the board would write them."""
    servers = emulated_board(board=ClippedProgram(open_device(FULL)))
    code, stdout, _ = _invoke(servers.uris[transport])
    assert code == 1
    assert _failed(stdout) == {f"{check} board conductance limit"}, stdout
    line = next(x for x in stdout.splitlines() if x.startswith("FAIL"))
    assert "g_max" in line or "-222" in line, line
    assert "PASS  limit conductance" in stdout  # the host's own check


class WritesPastItsWindow(ClippedProgram):
    """ClippedProgram that keeps the largest target asked of it (what reached its devices'
    write circuit on a real chip)."""

    def __init__(self, inner: Device) -> None:
        super().__init__(inner)
        self.largest = 0.0

    def program(self, tile: str, g_plus: np.ndarray, g_minus: np.ndarray, **kw: object) -> ProgramReport:
        self.largest = max(self.largest, float(np.max(g_plus)), float(np.max(g_minus)))
        return super().program(tile, g_plus, g_minus, **kw)


def test_no_limit_probes_sends_nothing_past_a_limit_and_says_what_went_unverified(
    emulated_board: Callable[..., BoardServers],
) -> None:
    """A chip in use may not take a probe: with --no-limit-probes, a board that would write
    targets past its window gets none, passes, and the report SKIPs what was not verified.
    Without it the same board gets a target past g_max (and fails, test above)."""
    board = WritesPastItsWindow(open_device(FULL))
    servers = emulated_board(board=board)
    code, stdout, _ = _invoke(servers.uris["serial-socket"], "--no-limit-probes")
    assert code == 0, stdout
    assert board.largest <= board.info.limits.g_max
    skipped = {x[6:].split(" sent: ")[0].strip() for x in stdout.splitlines() if x.startswith("SKIP")}
    assert {"unchecked board conductance limit", "unchecked board limit", "line current limit"} <= skipped
    assert "not sent (limit probes off; --limit-probes sends them)" in stdout
    code, stdout, _ = _invoke(servers.uris["serial-socket"])
    assert code == 1 and board.largest > board.info.limits.g_max


def test_only_an_emulator_uri_gets_the_limit_probes_unasked(
    emulated_board: Callable[..., BoardServers],
) -> None:
    """`hil conformance` sent its past-limit probes (g one float32 step past g_max, a line 20 %
    over its current limit, ...) to every board by default: on a chip whose firmware check is
    missing or wrong, its devices took them. Now a board other than an emulator:// URI gets none
    unless --limit-probes says so (a served board's identity is its own claim), and is told so."""
    board = WritesPastItsWindow(open_device(FULL))
    servers = emulated_board(board=board)
    result = CliRunner().invoke(app, ["conformance", servers.uris["serial-socket"]])
    assert result.exit_code == 0, result.stdout
    assert board.largest <= board.info.limits.g_max  # nothing past the window reached the devices
    assert "note   limit probes off (not an emulator:// URI)" in result.stdout, result.stdout
    lines = result.stdout.splitlines()
    skipped = {x[6:].split(" sent: ")[0].strip() for x in lines if x.startswith("SKIP")}
    assert {"unchecked board conductance limit", "unchecked board limit", "line current limit"} <= skipped
    assert "not sent (limit probes off; --limit-probes sends them)" in result.stdout
    result = CliRunner().invoke(app, ["conformance", FULL])  # the in-process emulator: probes on
    assert result.exit_code == 0, result.stdout
    assert "limit probes off" not in result.stdout, result.stdout


def test_the_python_api_sends_no_limit_probes_to_a_board_it_does_not_know_to_be_the_emulator(
    emulated_board: Callable[..., BoardServers],
) -> None:
    """`run_conformance(dev)` sent the past-limit probes to any board (`Options.limit_probes`
    was True by default) while `hil conformance` sent them only to an emulator:// URI: a lab
    calling the Python API on a chip whose firmware lacks a check had its devices take a target
    past g_max. Now the Python default is the CLI's, and the report names what went unverified."""
    board = WritesPastItsWindow(open_device(FULL))
    uri = emulated_board(board=board).uris["serial-socket"]
    with open_device(uri) as dev:
        report = run_conformance(dev, uri)
    assert board.largest <= board.info.limits.g_max, board.largest  # nothing past the window
    assert report.ok, [c.line() for c in report.checks if c.status == "FAIL"]
    assert {"unchecked board conductance limit", "unchecked board limit", "line current limit"} <= set(
        report.unverified
    )
    assert "UNVERIFIED (limit probes off" in report.summary() and "line current limit" in report.summary()
    assert json.loads(report.to_json())["unverified"] == report.unverified
    with open_device(uri) as dev:  # asked: the probes go out, and this board fails them
        report = run_conformance(dev, uri, Options(limit_probes=True))
    assert board.largest > board.info.limits.g_max and not report.ok and not report.unverified
    in_process = run_conformance(open_device(FULL), FULL)  # the in-process emulator: on unasked
    assert in_process.ok and not in_process.unverified


class LowReadout(DeviceWrapper):
    """A firmware bug: settled states come back 10 % low (a wrong ADC gain)."""

    def settle(
        self,
        clamp: dict[str, np.ndarray],
        nudge: dict[str, Nudge] | None = None,
        init: dict[str, np.ndarray] | None = None,
        trace: bool | int = False,
    ) -> Equilibrium:
        eq = self.inner.settle(clamp, nudge, init, trace)
        low = {g: s if g in clamp else (0.9 * s).astype(np.float32) for g, s in eq.states.items()}
        return dataclasses.replace(eq, states=low)


def test_fails_naming_settle_behind_the_framed_server(emulated_board: Callable[..., BoardServers]) -> None:
    servers = emulated_board(board=LowReadout(open_device(FULL)))
    code, stdout, _ = _invoke(servers.uris["serial-socket"])
    assert code == 1
    failed = _failed(stdout)
    assert "settle free" in failed and failed <= {"settle free", "settle nudged", "settle init"}, failed
    line = next(x for x in stdout.splitlines() if x.startswith("FAIL  settle free"))
    assert "not a fixed point" in line and "rho(gain * drive)" in line


class UndeclaredSettle(DeviceWrapper):
    """Declares an MVM-only board but settles anyway: it must refuse what it does not declare."""

    @property
    def info(self) -> DeviceInfo:
        inner = self.inner.info
        return DeviceInfo(inner.identity, inner.limits, frozenset({"mvm"}), inner.preset, inner.extra)


def test_fails_when_an_undeclared_capability_runs() -> None:
    # in-process: the remote drivers refuse an undeclared capability on the host already
    report = run_conformance(UndeclaredSettle(open_device(FULL)))
    failed = {c.operation for c in report.checks if c.status == "FAIL"}
    assert failed == {"settle refused", "program verify refused", "pulse refused"}
    refused = next(c for c in report.checks if c.operation == "settle refused")
    assert "although it does not declare 'settle'" in refused.got
    # and the wear query (no endurance) and the gone owner (no lock in process)
    assert report.count("SKIP") == 5 and not report.ok


@pytest.mark.parametrize(("transport", "check"), [("visa-tcp", "scpi"), ("serial-socket", "unchecked")])
def test_a_board_that_settles_undeclared_fails_over_a_request_the_host_did_not_check(
    emulated_board: Callable[..., BoardServers], transport: str, check: str
) -> None:
    """The host driver refuses an undeclared settle before sending it, so only a raw SCPI
    settle, or an unchecked framed one, shows whether the board refuses it too."""
    served = emulated_board(board=UndeclaredSettle(open_device(FULL)))
    uri = served.uris[transport]
    with open_device(uri) as dev:
        report = run_conformance(dev, uri)
    raw = next(c for c in report.checks if c.operation == f"{check} undeclared settle")
    assert raw.status == "FAIL" and not report.ok, raw


class FrozenEpoch(DeviceWrapper):
    """A firmware bug: the board keeps STATUS (and transactions) but its epoch never changes."""

    def status(self) -> BoardStatus:
        s = self.inner.status()
        return BoardStatus(0, s.transaction, s.configured)


class NoStatus(DeviceWrapper):
    """A board without STATUS (allowed): no epoch, no transactions."""

    def status(self) -> BoardStatus:
        return BoardStatus(configured=self.topology is not None)

    def begin(self, tag: str) -> None:
        return None

    def commit(self, tag: str) -> None:
        return None


def test_reset_must_change_the_epoch_of_a_board_with_status() -> None:
    frozen = run_conformance(FrozenEpoch(open_device(FULL)))
    assert {c.operation for c in frozen.checks if c.status == "FAIL"} == {"reset"}
    without = run_conformance(NoStatus(open_device(FULL)))
    assert without.ok
    reset = next(c for c in without.checks if c.operation == "reset")
    assert "no STATUS" in reset.got


class ArraysRedrawnOnReset(DeviceWrapper):
    """A firmware bug: the conductances survive RESET, but STATUS `arrays_id` changes with it
    (every host would program every tile again after each reset)."""

    def status(self) -> BoardStatus:
        s = self.inner.status()
        return dataclasses.replace(s, arrays_id=s.epoch)


def test_reset_must_keep_the_arrays_id_of_a_board_that_sends_one() -> None:
    redrawn = run_conformance(ArraysRedrawnOnReset(open_device(FULL)))
    failed = [c for c in redrawn.checks if c.status == "FAIL"]
    assert [c.operation for c in failed] == ["reset"] and "must keep arrays_id" in failed[0].got, failed
    assert run_conformance(open_device(FULL)).ok  # the emulator keeps its arrays_id across RESET


@pytest.mark.parametrize(
    "uri",
    ["nope://board", "emulator://?preset=unobtainium", "serial+socket://127.0.0.1:1?attempts=1"],
    ids=["scheme", "preset", "unreachable"],
)
def test_bad_uri_is_one_line_and_exit_2(uri: str) -> None:
    code, stdout, stderr = _invoke(uri)
    assert code == 2
    assert stdout == ""
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("error: cannot open"), stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["emulator://?preset=ideal&tile_rows_max=4", "--sizes", "5,4,3"], "choose smaller sizes"),
        ([FULL, "--sizes", "5,x"], "--sizes takes comma-separated integers"),
        ([FULL, "--sizes", "5"], "--sizes needs two or more"),
    ],
    ids=["beyond-limits", "not-integers", "one-layer"],
)
def test_bad_network_is_one_line_and_exit_2(args: list[str], says: str) -> None:
    code, stdout, stderr = _invoke(*args)
    assert code == 2 and stdout == ""
    assert says in stderr and len(stderr.strip().splitlines()) == 1, stderr


def test_options_reach_the_checks() -> None:
    with open_device("emulator://?preset=ecram&seed=1") as dev:
        report = run_conformance(dev, options=Options(sizes=(3, 2), batch=2, reads=3, repeats=2, seed=5))
    assert report.ok, "\n".join(c.line() for c in report.checks if c.status == "FAIL")
    ops = [c.operation for c in report.checks]
    assert "program W0" in ops and "program W1" not in ops
    sent = {c.operation: c.sent for c in report.checks}
    assert "x (16, 4) float32" in sent["mvm"]  # at least 16 samples for the fit over all outputs
    assert "clamp s0 (2, 3) float32" in sent["settle free"]


def test_unwritable_json_is_one_line_and_exit_2(tmp_path: Path) -> None:
    code, _, stderr = _invoke(FULL, "--json", str(tmp_path / "missing" / "out.json"))
    assert code == 2
    assert stderr.startswith("error: cannot write --json") and len(stderr.strip().splitlines()) == 1


def _bringup_example() -> str:
    text = (Path(__file__).resolve().parent.parent / "docs" / "bringup.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 1, "docs/bringup.md has one complete Python example"
    return blocks[0]


@pytest.mark.parametrize("board", [FULL, MVM_ONLY], ids=["settles", "mvm-only"])
def test_bringup_example_runs(board: str, capsys: pytest.CaptureFixture[str]) -> None:
    if board == MVM_ONLY:
        pytest.importorskip("hil.host_settle")
    code = _bringup_example()
    line = 'URI = "emulator://?preset=rram&seed=0"'
    assert line in code
    ns: dict[str, object] = {}
    exec(compile(code.replace(line, f"URI = {board!r}"), "docs/bringup.md", "exec"), ns)
    free, nudged, target = ns["free"], ns["nudged"], ns["target"]
    assert isinstance(free, Equilibrium) and isinstance(nudged, Equilibrium)
    assert free.converged and nudged.converged
    assert np.abs(nudged.states["s2"] - target).mean() < np.abs(free.states["s2"] - target).mean()
    out = capsys.readouterr().out
    assert "violations=0" in out and "board        xbar-hil,emulator-rram" in out
    assert ("settle" in out.split("capabilities")[1].splitlines()[0]) == (board == FULL)


@pytest.mark.parametrize(("transport", "check"), [("visa-tcp", "scpi"), ("serial-socket", "unchecked")])
def test_fails_when_a_resent_pulse_runs_again(
    emulated_board: Callable[..., BoardServers], transport: str, check: str
) -> None:
    """A firmware without the at-most-once record applies a resent pulse twice (a host resends
    after a lost reply); every other check passes on it, and so did the whole suite."""
    servers = emulated_board(board=FULL, plan=FaultPlan(rerun_ids=True))
    code, stdout, _ = _invoke(servers.uris[transport])
    assert code == 1
    # the pulse resent with its id, and a program resent with its id after another program
    assert _failed(stdout) == {f"{check} request id", f"{check} program request id"}, stdout
    line = next(x for x in stdout.splitlines() if x.startswith("FAIL"))
    assert "the resend ran again (its pulses were applied twice)" in line, line
    good = emulated_board(board=FULL)
    code, stdout, _ = _invoke(good.uris[transport])
    assert code == 0 and f"PASS  {check} request id" in stdout, stdout
    assert f"PASS  {check} program request id" in stdout, stdout


class UnenforcedLineCurrent(DeviceWrapper):
    """A firmware bug: the board declares a line-current limit (the rram preset's 2.048 mA) and
    does not enforce it (its own check runs against 1 A)."""

    @property
    def info(self) -> DeviceInfo:
        inner = self.inner.info
        limits = dataclasses.replace(inner.limits, max_line_current_a=2.048e-3)
        return DeviceInfo(inner.identity, limits, inner.capabilities, inner.preset, inner.extra)


@pytest.mark.parametrize("transport", ["visa-tcp", "serial-socket"])
def test_fails_when_the_board_does_not_enforce_its_line_current_limit(
    emulated_board: Callable[..., BoardServers], transport: str
) -> None:
    servers = emulated_board(board=UnenforcedLineCurrent(open_device(FULL + "&max_line_current_a=1")))
    code, stdout, _ = _invoke(servers.uris[transport])
    assert code == 1
    assert _failed(stdout) == {"line current limit"}, stdout
    line = next(x for x in stdout.splitlines() if x.startswith("FAIL"))
    assert "the board ran the mvm" in line and "does not enforce the limit it declares" in line, line
    assert 'docs/protocol.md section 1, "Limits", Line currents' in line, line


def test_line_current_check_skips_without_a_limit_and_where_no_tile_can_exceed_it() -> None:
    from hil.conformance.lines import line_tile

    lim = open_device(FULL).info.limits
    tile = line_tile(lim)
    assert not isinstance(tile, str) and tile.cols == 1 and not tile.transpose
    assert tile.rows * lim.g_max * float(np.float32(lim.clamp_max)) * lim.v_read > lim.max_line_current_a
    wide = line_tile(dataclasses.replace(lim, tile_rows_max=8))  # only a long row: read transposed
    assert not isinstance(wide, str) and wide.rows == 1 and wide.transpose
    assert wide.cols * wide.g * lim.v_read <= lim.max_line_current_a  # its reads stay within the limit
    small = line_tile(dataclasses.replace(lim, tile_rows_max=8, tile_cols_max=8))
    assert isinstance(small, str) and "no tile within the limits can exceed" in small

    class Undeclared(DeviceWrapper):
        @property
        def info(self) -> DeviceInfo:
            inner = self.inner.info
            limits = dataclasses.replace(inner.limits, max_line_current_a=float("inf"))
            return DeviceInfo(inner.identity, limits, inner.capabilities, inner.preset, inner.extra)

        def send_unchecked(self, op: object, request: object) -> object:
            raise AssertionError("nothing is sent to a board without a limit")

    report = run_conformance(Undeclared(open_device(FULL)))
    check = next(c for c in report.checks if c.operation == "line current limit")
    assert check.status == "SKIP" and "not declared" in check.spec


def test_readme_lists_the_json_keys_of_hil_conformance() -> None:
    """README "Scripts and CI" lists each --json's stable keys; conformance's were missing."""
    from hil.conformance.report import Check, Report

    report = Report("emulator://", "x", [Check("idn", "PASS", "*IDN?", "x", "4 fields")], 1.0)
    data = json.loads(report.to_json())
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    listed = readme.split("`hil conformance` (", 1)[1].split("), `hil gradcheck`", 1)[0]
    names = set(re.findall(r"`(\w+)`", listed)) - {"PASS", "FAIL", "SKIP"}
    assert names == set(data) | set(data["checks"][0]), listed


def _declaring(**bounds: object) -> Device:
    """The full emulated board, declaring (host's and board's limits) lower work bounds."""
    dev = open_device(FULL)
    board = dev.board  # type: ignore[attr-defined]
    lim = dataclasses.replace(board.limits, **bounds)
    board._limits = (board.preset, lim)
    dev._info = dataclasses.replace(dev.info, limits=lim)  # type: ignore[attr-defined]
    return dev


@pytest.mark.parametrize("transport", ["serial-socket", "visa-tcp"])
def test_a_board_that_declares_lower_work_bounds_passes_within_them(
    emulated_board: Callable[..., BoardServers], transport: str
) -> None:
    """The suite sent mvms of at least 16 samples and a 0.01 s wait whatever the board declared:
    a conforming board with max_batch 8 and max_wait_s 0.001 failed mvm, mvm transpose, mvm
    w_max and meter (refused on the host, each a false FAIL). Now the mvm checks take at most
    max_batch samples and the meter's wait at most max_wait_s; a --batch past max_batch is one
    line naming the bound (exit 2) before anything is sent."""
    servers = emulated_board(board=_declaring(max_batch=8, max_wait_s=0.001))
    code, stdout, _ = _invoke(servers.uris[transport])
    assert code == 0 and not _failed(stdout), stdout
    assert servers.device.safety().violations == 0
    code, _, stderr = _invoke(servers.uris[transport], "--batch", "9")
    assert code == 2 and "max_batch 8" in stderr and "--batch 8 or fewer" in stderr, stderr


def test_a_board_whose_weights_are_normalised_to_one_is_checked_at_half_the_w_max(
    emulated_board: Callable[..., BoardServers],
) -> None:
    """The mvm w_max check configured the tile at twice the test network's w_max of 1: a board
    that declares max_w_max 1 (weights normalised to +-1) failed it, refused on the host. Now it
    halves the w_max there instead; a firmware that leaves w_max out of the product still
    fails (a = 1 where 0.5 is expected)."""
    servers = emulated_board(board=_declaring(max_w_max=1.0))
    code, stdout, _ = _invoke(servers.uris["serial-socket"])
    assert code == 0 and not _failed(stdout), stdout
    assert "PASS  mvm w_max" in stdout and "fit y(0.5 w_max)" in stdout
    bug = IgnoresWMax(_declaring(max_w_max=1.0))
    report = run_conformance(bug)
    failed = {c.operation: c for c in report.checks if c.status == "FAIL"}
    assert set(failed) == {"mvm w_max"} and "a = 1: w_max is left out" in failed["mvm w_max"].got


def test_the_summary_does_not_blame_every_skip_on_undeclared_capabilities() -> None:
    """docs/bringup.md: a check is SKIPPED for a capability the board does not declare, and also
    under --no-limit-probes, for a limit it does not declare (`pulse_endurance`) or on a serial
    line (`owner gone`), each line saying why. The summary said "N skipped (capabilities the
    board does not declare)" whatever the reasons; it points at the lines instead."""
    from hil.conformance.report import Check, Report

    report = Report(uri="emulator://", identity="x,y,z,1")
    report.checks.append(Check("mvm", "PASS", "-", "-", "-"))
    off = "not sent (limit probes off; --limit-probes sends them): ..."
    report.checks.append(Check("line current limit", "SKIP", "-", "-", off))
    summary = report.summary()
    assert summary.startswith("1 passed, 0 failed, 1 skipped"), summary
    assert "capabilities the board does not declare" not in summary, summary
    assert "each SKIP line says why" in summary, summary
