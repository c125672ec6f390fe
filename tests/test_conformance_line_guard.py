"""`hil conformance` with its limit probes off sends nothing over the line-current limit a board
declares: the checks whose own requests go out unchecked (past the host driver's checks, to test
fragments, request ids or the voltage limit's edge) are checked against the limit first, as the
checked path would, and SKIPPED naming it when over."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from drivers import DeviceInfo, LimitViolation, ProgramReport, open_device
from drivers.wrapper import DeviceWrapper
from hil.cli import app
from hil.conformance import Options, run_conformance
from hil.testing import BoardServers

# over the host's bound of the test network's own mvms and settles (12 uA: 6 rows at g_max 10 uS
# read at 0.2 V), under the reads of a 65 x 64 fragments tile at mid-window (~70 uA a row)
RATED_A = 13e-6


class NoLineCheck(DeviceWrapper):
    """A firmware that declares a line-current limit (`RATED_A`) but never checks it (the
    emulator behind it declares its design point, 2 mA): it runs whatever reaches it, and keeps
    the largest current any line carried (what a chip's line would have taken)."""

    def __init__(self, rated: float = RATED_A) -> None:
        super().__init__(open_device("emulator://?preset=rram&seed=0"))
        self.rated = rated
        self.worst = 0.0
        self.worst_what = ""

    @property
    def info(self) -> DeviceInfo:
        inner = self.inner.info
        return dataclasses.replace(
            inner, limits=dataclasses.replace(inner.limits, max_line_current_a=self.rated)
        )

    def _carried(self, current: float, what: str) -> None:
        if current > self.worst:
            self.worst, self.worst_what = current, what

    def program(self, tile: str, g_plus: np.ndarray, g_minus: np.ndarray, **kw: object) -> ProgramReport:
        rows = max(float(g.astype(np.float64).sum(axis=1).max()) for g in (g_plus, g_minus))
        self._carried(rows * self.info.limits.v_read, f"program {tile} read-back")
        return self.inner.program(tile, g_plus, g_minus, **kw)  # type: ignore[arg-type]

    def mvm(self, tile: str, x: np.ndarray, *, transpose: bool = False) -> np.ndarray:
        volts = torch.from_numpy(np.abs(x).max(axis=0).astype(np.float64) * self.info.limits.v_read)
        driven, sensed = self.inner.board.line_currents(tile, volts, transpose)  # type: ignore[attr-defined]
        self._carried(max(float(driven.max()), float(sensed.max())), f"mvm {tile}")
        return self.inner.mvm(tile, x, transpose=transpose)


@pytest.mark.parametrize("transport", ["serial-socket", "visa-tcp"])
def test_no_unchecked_request_of_a_run_without_probes_is_over_the_declared_line_current(
    emulated_board: Callable[..., BoardServers], transport: str
) -> None:
    """The fragments check programmed (unchecked) a 65 x 64 tile around mid-window, whose
    read-back rows carry ~70 uA, on a board declaring 13 uA: with the limit probes off, a
    firmware without the line-current check drove its lines 5 times past their rating. Now
    that check is SKIPPED, naming the limit, and nothing sent is over it."""
    board = NoLineCheck()
    uri = emulated_board(board=board).uris[transport]
    with open_device(uri) as dev:
        report = run_conformance(dev, uri, Options(limit_probes=False))
    assert board.worst <= RATED_A, (board.worst, board.worst_what)
    skipped = {c.operation: c.got for c in report.checks if c.status == "SKIP"}
    large = "fragmented messages" if transport == "serial-socket" else "scpi large blocks"
    assert large in skipped, sorted(skipped)
    assert skipped[large].startswith("not sent: line current (A) of row"), skipped[large]
    assert "limit 1.3e-05" in skipped[large], skipped[large]
    assert report.ok, [c.line() for c in report.checks if c.status == "FAIL"]


@pytest.mark.parametrize("transport", ["serial-socket", "visa-tcp"])
def test_the_request_id_checks_send_no_level_over_a_tighter_limit(
    emulated_board: Callable[..., BoardServers], transport: str
) -> None:
    """At 4 uA the test network's own programs are refused on the host (FAILs, nothing sent),
    but the request-id checks programmed a whole tile at three quarters of the window unchecked
    (4.65 uA on a read-back row of W1): now SKIPPED, naming the limit."""
    board = NoLineCheck(4e-6)
    uri = emulated_board(board=board).uris[transport]
    with open_device(uri) as dev:
        report = run_conformance(dev, uri, Options(limit_probes=False))
    assert board.worst <= 4e-6, (board.worst, board.worst_what)
    prefix = "unchecked" if transport == "serial-socket" else "scpi"
    check = next(c for c in report.checks if c.operation == f"{prefix} program request id")
    assert check.status == "SKIP" and check.got.startswith("not sent: line current (A) of row"), check.line()


@pytest.mark.parametrize("transport", ["serial-socket", "visa-tcp"])
def test_a_declared_limit_below_the_test_networks_bound_skips_its_mvm_and_settle_checks(
    emulated_board: Callable[..., BoardServers], transport: str
) -> None:
    """A board declaring 10 uA, under the host's bound of the test network's own mvms and settles
    (12 uA: 6 rows at g_max 10 uS read at 0.2 V): those requests are refused on the host, nothing
    sent. They were FAILs ("raised LimitViolation"), which blamed the board; now SKIPPED, naming the
    limit and the --sizes that fit it, and with those sizes they run and pass."""
    uri = emulated_board(board="emulator://?preset=rram&seed=0&max_line_current_a=1e-5").uris[transport]
    with open_device(uri) as dev:
        report = run_conformance(dev, uri, Options(limit_probes=False))
    status = {c.operation: c for c in report.checks}
    for op in ("mvm", "mvm transpose", "settle free", "settle nudged", "settle trace", "settle init"):
        check = status[op]
        assert check.status == "SKIP", check.line()
        assert "max_line_current_a 1e-05 A" in check.got, check.line()
        assert "--sizes 4,4,3" in check.got, check.line()
    assert report.ok, [c.line() for c in report.checks if c.status == "FAIL"]
    with open_device(uri) as dev:
        fits = run_conformance(dev, uri, Options(limit_probes=False, sizes=(4, 4, 3)))
    passed = {c.operation for c in fits.checks if c.status == "PASS"}
    assert {"mvm", "mvm transpose", "settle free", "settle nudged"} <= passed, [c.line() for c in fits.checks]
    assert fits.ok, [c.line() for c in fits.checks if c.status == "FAIL"]


@pytest.mark.parametrize("transport", ["serial-socket", "visa-tcp"])
def test_a_declared_limit_below_the_test_networks_programs_skips_them_and_what_needs_them(
    emulated_board: Callable[..., BoardServers], transport: str, tmp_path: Path
) -> None:
    """A board declaring 5 uA, under the reads of the test network's own programs (6.2 uA: a row
    of W0's targets at v_read 0.2 V): the host refuses them, nothing sent. They were FAILs
    ("raised LimitViolation"), and so was mvm w_max; now SKIPPED naming the limit and the fix, the
    checks that need the programmed tile SKIP naming it, and `hil conformance` exits 0 (SKIPs are
    not failures)."""
    served = emulated_board(board="emulator://?preset=rram&seed=0&max_line_current_a=5e-6")
    out = tmp_path / "report.json"
    res = CliRunner().invoke(app, ["conformance", served.uris[transport], "--json", str(out)])
    checks = {c["operation"]: c for c in json.loads(out.read_text())["checks"]}
    for op in ("program W0", "program verify W0", "mvm w_max"):
        assert checks[op]["status"] == "SKIP", checks[op]
        assert "a program of W0" in checks[op]["got"], checks[op]
        assert "max_line_current_a 5e-06 A" in checks[op]["got"] and "--sizes 1,1,1" in checks[op]["got"]
    for op in ("mvm", "mvm transpose", "mvm 1-D"):
        assert checks[op]["status"] == "SKIP" and checks[op]["got"].startswith("needs program W0,"), checks[
            op
        ]
    assert checks["program W1"]["status"] == "PASS", checks["program W1"]
    # the meter check's meter() goes out before its first mvm, which the host refuses: its "sent"
    # column counts that one request, not the check's plan (nor "nothing sent")
    meter = checks["meter"]
    assert meter["status"] == "SKIP", meter
    assert meter["sent"].startswith(
        "1 request sent first: an mvm through W0 was refused by the host's check"
    ), meter
    assert "(planned: meter(), " in meter["sent"], meter
    assert res.exit_code == 0, res.output
    assert served.device.safety().violations == 0


class RefusesPrograms(DeviceWrapper):
    """A firmware that refuses every program as over the line current, however low its targets."""

    def program(self, tile: str, g_plus: np.ndarray, g_minus: np.ndarray, **kw: object) -> ProgramReport:
        raise LimitViolation(
            f"line current (A) of row 0 of {tile!r}", 1.0, self.info.limits.max_line_current_a
        )


def test_a_program_refused_within_the_hosts_check_is_still_a_fail() -> None:
    """The SKIP is for the test network over the declared limit by the host's check; a board
    that refuses a program the host's check passes is the board's fault: FAIL."""
    with RefusesPrograms(open_device("emulator://?preset=rram&seed=0")) as dev:
        report = run_conformance(dev, "", Options(limit_probes=False))
    check = next(c for c in report.checks if c.operation == "program W0")
    assert check.status == "FAIL" and check.got.startswith("raised LimitViolation"), check.line()


@pytest.mark.parametrize("transport", ["serial-socket", "visa-tcp"])
def test_the_sent_column_of_a_check_over_the_limit_says_nothing_was_sent(
    emulated_board: Callable[..., BoardServers], transport: str, tmp_path: Path
) -> None:
    """The mvm checks SKIPPED over a declared 10 uA said "sent: W0 x (16, 6) ..., 4 times", which
    the host never sent; the report (text and JSON) now says what went out."""
    served = emulated_board(board="emulator://?preset=rram&seed=0&max_line_current_a=1e-5")
    out = tmp_path / "report.json"
    res = CliRunner().invoke(app, ["conformance", served.uris[transport], "--json", str(out)])
    checks = {c["operation"]: c for c in json.loads(out.read_text())["checks"]}
    for op, what in (
        ("mvm", "an mvm through W0"),
        ("mvm transpose", "an mvm through W0"),
        ("settle free", "a settle"),
    ):
        assert checks[op]["status"] == "SKIP", checks[op]
        assert checks[op]["sent"].startswith(f"nothing sent: {what} was refused by the host's check"), checks[
            op
        ]
    line = next(s for s in res.output.splitlines() if s.startswith("SKIP  mvm "))
    assert "sent: nothing sent: " in line, line


@pytest.mark.parametrize("where", ["in-process", "serial-socket"])
def test_the_sent_column_names_whose_check_refused_the_request(
    emulated_board: Callable[..., BoardServers], where: str, tmp_path: Path
) -> None:
    """Over a declared 5 uA, program W0 and the settles are refused: served, by the host driver's
    check, nothing sent; in-process, by the emulator's own check (the board), which the report
    said was "refused on the host" too."""
    board = "emulator://?preset=rram&seed=0&max_line_current_a=5e-6"
    uri = board if where == "in-process" else emulated_board(board=board).uris[where]
    out = tmp_path / "report.json"
    res = CliRunner().invoke(app, ["conformance", uri, "--json", str(out)])
    assert res.exit_code == 0, res.output
    checks = {c["operation"]: c for c in json.loads(out.read_text())["checks"]}
    for op, what in (("program W0", "a program of W0"), ("settle free", "a settle")):
        sent = checks[op]["sent"]
        assert checks[op]["status"] == "SKIP" and "on the host" not in sent, checks[op]
        if where == "in-process":
            assert sent.startswith(f"nothing run: {what} was refused by the board's own check"), sent
            assert "host" not in sent.split(" (planned")[0], sent
        else:
            assert sent.startswith(f"nothing sent: {what} was refused by the host's check"), sent
            assert sent.split(" (planned")[0].endswith("and not sent"), sent
