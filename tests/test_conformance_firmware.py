"""`hil conformance` against a second, independent firmware (tests/fw_reference_board.py,
over real TCP sockets): the correct board passes every check, and each deliberately broken
variant fails the check named for its bug, with a line that says what the board did wrong. Its
variant with ownership (`lock=True`) passes them too, the ownership and owner-gone checks
included, in process and through `hil conformance URI` (tests/test_fw_reference_ownership.py tests
the lock itself); its `nolease` variant, which drops an owner whose connection closed at once,
fails the owner-gone check alone."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from drivers import NotSupported, open_device
from drivers.errors import RetriesExhausted
from drivers.wire.payload import Message, Op
from hil.conformance import Options, Report, run_conformance
from hil.conformance.fragments import FRAGMENT, tile_shape
from tests.fw_reference_board import FirmwareBoard

FRAGMENTED = "fragmented messages"
# the checks added for the firmware-reading mistakes below (each catches one the suite passed)
ADDED = (
    "link COBS runs",
    "configure largest tile",
    "unchecked mvm at clamp_max",
    "unchecked batch limit",
    "line current limit",
    "meter",
    "unchecked request id after reset",
    "unchecked configure limits",
)
NO_ID = "unchecked program without id"
RESENT = "unchecked program request id"


def _conformance(bug: str | None, lock: bool = False, timeout: float = 5.0) -> Report:
    board = FirmwareBoard(bug, lock=lock).start()
    try:
        dev = open_device(f"{board.uri}?attempts=2&timeout={timeout:g}")
        try:
            assert dev.owns is lock  # the host takes a board that announces lock, and only such
            # the probes past its limits too: each firmware bug of a limit check is one to catch
            report = run_conformance(dev, board.uri, Options(limit_probes=True))
        finally:
            dev.close()
        own = board.board.ownership
        # released at the end; the owner-gone check's own gone owner was made safe by the board
        # (what the wire cannot show) at both its closes, unless the bug dropped it without
        # (nolease) or refused the reconnect that makes the second (noreturn)
        gone = {"nolease": 0, "noreturn": 1}.get(bug or "", 2)
        assert own is None or (own.token is None and own.owner_gone == gone)
        return report
    finally:
        board.stop()


@pytest.fixture(scope="module")
def correct() -> Iterator[Report]:
    yield _conformance(None)


def test_the_reference_firmware_passes_every_check(correct: Report) -> None:
    failed = [c.line() for c in correct.checks if c.status == "FAIL"]
    assert not failed, failed
    ops = {c.operation: c.status for c in correct.checks}
    for op in (FRAGMENTED, NO_ID, RESENT, "unchecked board limit", "reset", *ADDED):
        assert ops[op] == "PASS", op
    assert ops["wear"] == "SKIP"  # no pulse endurance declared
    assert "ownership" not in ops  # no lock announced: nothing to check
    assert ops["owner gone"] == "SKIP"
    fragmented = next(c for c in correct.checks if c.operation == FRAGMENTED)
    assert "2 fragments" in fragmented.sent and "mvm x (129, 65)" in fragmented.sent


def test_the_reference_firmware_with_ownership_passes_every_check_and_the_ownership_one() -> None:
    report = _conformance(None, lock=True)
    failed = [c.line() for c in report.checks if c.status == "FAIL"]
    assert not failed, failed
    ownership = [c for c in report.checks if c.operation == "ownership"]
    assert len(ownership) == 1 and ownership[0].status == "PASS", ownership
    assert "refused wait, safe_state and the take (120)" in ownership[0].got
    gone = next(c for c in report.checks if c.operation == "owner gone")
    assert gone.status == "PASS" and "kept: 0 connections, lapses in" in gone.got, gone.line()
    assert "taken back by this connection's token" in gone.got
    assert 1.0 <= gone.seconds < 3.0  # the lease of 1 s, and the check is not much longer


def test_a_firmware_that_drops_a_gone_owner_at_once_fails_the_owner_gone_check() -> None:
    """`nolease`: the lock goes with its connection, so a killed host's board is free at once
    (and left as the host drove it). Every other check passes, the ownership one included (the
    owner is still there then); the suite takes its board back and goes on."""
    report = _conformance("nolease", lock=True)
    failed = {c.operation: c for c in report.checks if c.status == "FAIL"}
    assert set(failed) == {"owner gone"}, [c.line() for c in failed.values()]
    assert "dropped the gone owner at once instead of keeping it for its lease" in failed["owner gone"].got
    ops = {c.operation: c.status for c in report.checks}
    assert ops["ownership"] == ops["reset"] == ops["safe_state"] == "PASS"  # the suite owns it again


def test_a_firmware_that_takes_an_ordinary_reconnect_for_a_lost_owner_fails_the_owner_gone_check() -> None:
    """`noreturn`: the lock is kept for the lease and made safe, but the owner's own token,
    presented again within the lease on a new connection (the host drivers' reconnect after a
    dropped link), is refused: a host whose cable hiccuped loses its board. The check passed it
    before (it never presented the gone owner's token again); every other check passes."""
    report = _conformance("noreturn", lock=True)
    failed = {c.operation: c for c in report.checks if c.status == "FAIL"}
    assert set(failed) == {"owner gone"}, [c.line() for c in failed.values()]
    assert "took an ordinary reconnect" in failed["owner gone"].got, failed["owner gone"].got


def test_hil_conformance_cli_passes_the_reference_firmware_with_ownership() -> None:
    board = FirmwareBoard(lock=True).start()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "hil.cli", "conformance", f"{board.uri}?timeout=5", "--limit-probes"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert any(line.startswith("PASS  ownership") for line in done.stdout.splitlines()), done.stdout
        assert any(line.startswith("PASS  owner gone") for line in done.stdout.splitlines()), done.stdout
        own = board.board.ownership
        # released at close; the check's gone owner was made safe by the board (at both its closes)
        assert own is not None and own.token is None and own.owner_gone == 2
        assert {"wait", "safe_state"} <= set(own.refusals)  # the suite's second connection was refused
    finally:
        board.stop()


@pytest.mark.parametrize(
    ("bug", "fails", "says"),
    [
        ("nofrag", {FRAGMENTED}, "decoded one fragment as a whole message"),
        ("noack", {FRAGMENTED}, "no acknowledgement of its first fragment"),
        ("norid", {NO_ID, RESENT}, "ran a program without a request id"),
    ],
)
def test_a_broken_firmware_fails_the_check_of_its_bug(bug: str, fails: set[str], says: str) -> None:
    report = _conformance(bug)
    failed = {c.operation: c for c in report.checks if c.status == "FAIL"}
    assert set(failed) == fails, [c.line() for c in failed.values()]
    lines = " ".join(c.got for c in failed.values())
    assert says in lines
    assert "docs/protocol.md section" in lines  # the rule it broke
    if bug == "norid":
        assert "ran again after B" in failed[RESENT].got
    else:
        assert "rule 4" in failed[FRAGMENTED].got


def test_the_large_tile_is_over_one_fragment_within_the_limits_or_none() -> None:
    lim = open_device("emulator://?preset=ideal").info.limits
    assert tile_shape(lim) == (65, 64)
    narrow = tile_shape(dataclasses.replace(lim, tile_rows_max=40, tile_cols_max=200))
    assert narrow is not None and narrow[0] <= 40 and narrow[1] <= 200
    assert 8 * narrow[0] * narrow[1] > FRAGMENT
    assert tile_shape(dataclasses.replace(lim, tile_rows_max=64, tile_cols_max=64)) is None  # 32768 exactly


def test_the_reference_firmware_refuses_the_wear_query_at_once() -> None:
    """It declares no pulse endurance and counts no wear: the host does not ask it (wear() is
    None), and a WEAR request (opcode 0x24) sent anyway gets what docs/protocol.md asks of such
    a board, error 101 with its text, at once (it answered 110, unknown opcode, before)."""
    board = FirmwareBoard().start()
    try:
        dev = open_device(f"{board.uri}?attempts=1&timeout=5")
        try:
            assert dev.info.limits.pulse_endurance is None
            assert dev.wear() is None
            t0 = time.perf_counter()
            # NotSupported is error 101 (drivers.wire.codes); 110 would be a DeviceFault
            with pytest.raises(NotSupported, match="declares no pulse endurance and counts no wear"):
                dev.send_unchecked(Op.WEAR, Message())
            assert time.perf_counter() - t0 < 1.0  # an answer, not the link's 5 s timeout
            assert dev.status().configured is False  # the link goes on
        finally:
            dev.close()
    finally:
        board.stop()


def test_a_lease_that_never_lapses_fails_the_owner_gone_check_and_the_suite_takes_its_board_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A firmware that keeps a gone owner's lock past its lease (its lapse never comes without a
    break) fails after the lease + 2 s; the check releases its own token and the suite's
    connection takes the board back, so the checks that follow drive it."""
    board = FirmwareBoard(lock=True).start()
    try:
        own = board.board.ownership
        assert own is not None
        monkeypatch.setattr(own, "tick", lambda: None)  # no lapse
        dev = open_device(f"{board.uri}?attempts=2&timeout=5")
        try:
            report = run_conformance(dev, board.uri)
            assert dev.owner() is not None and dev.owner().token == dev.lock_token  # type: ignore[union-attr]
        finally:
            dev.close()
        failed = {c.operation: c for c in report.checks if c.status == "FAIL"}
        assert set(failed) == {"owner gone"}, [c.line() for c in failed.values()]
        assert "the board is still owned" in failed["owner gone"].got
        assert "it must free a lease of 1 s when it lapses, with no request" in failed["owner gone"].got
        assert 3.0 <= failed["owner gone"].seconds < 5.0
        assert own.token is None and own.owner_gone == 2  # applied at both closes; released at the end
    finally:
        board.stop()


MVM = {"mvm", "mvm transpose", "mvm 1-D"}
PRODUCTS = {*MVM, FRAGMENTED}  # each compares products with x @ W; a wrong product fails one or more
G_UNREADABLE = {
    "program W0", "program W1", "read_conductance W0", "read_conductance W1", *MVM, "error queue",
    "mvm w_max", "unchecked board conductance limit", NO_ID, RESENT, FRAGMENTED, "line current limit",
    "reset", "unchecked request id after reset",
}  # fmt: skip
LIMIT_CHECKS = {
    "unchecked board conductance limit", "unchecked board limit", "unchecked batch limit",
    "unchecked wait limit",
}  # fmt: skip


@pytest.mark.parametrize(
    ("bug", "fails", "check", "says"),
    [
        # caught before this suite grew (with a line that names the mistake, or now does)
        ("bigendian", G_UNREADABLE, "program W0", "the board sends big-endian numbers"),
        ("gscale", PRODUCTS, "mvm", "the board divides by g_max, not by g_max - g_min"),
        ("colmajor", PRODUCTS, "mvm", "stores a tile's arrays in Fortran order"),
        ("coarseadc", PRODUCTS, "mvm", "coarser than the adc_bits 8"),
        ("rid1", {RESENT}, RESENT, "holds the outcome of fewer than the last 2 ids"),
        (
            "code100",
            {*LIMIT_CHECKS, "line current limit", "unchecked configure limits"},
            "unchecked board limit",
            "refused as ConfigurationError",
        ),
        ("lastref", {FRAGMENTED}, FRAGMENTED, "its reply was dropped as stale"),
        ("noepoch", {"reset"}, "reset", "a reset must change the epoch"),
        ("keeptopo", {"reset"}, "reset", "after reset: topology Topology("),
        ("microsiemens", G_UNREADABLE, "program W0", "the board sends micro-units"),
        # passed by the suite before: each fails the check added for it
        (
            "cobsff",
            {"link COBS runs", "configure max_tiles", "link"},
            "link COBS runs",
            "a run of 254 non-zero",
        ),
        (
            "batchge",
            {"unchecked batch limit"},
            "unchecked batch limit",
            "max_batch = 1024 samples was refused",
        ),
        ("batchover", {"unchecked batch limit"}, "unchecked batch limit", "batch check is off by one"),
        (
            "clampstrict",
            {"unchecked mvm at clamp_max"},
            "unchecked mvm at clamp_max",
            "the board checks with >=",
        ),
        ("lineslack", {"line current limit"}, "line current limit", "enforces the limit with a slack"),
        ("meterrows", {"meter"}, "meter", "it counts samples, not requests"),
        ("nowait", {"meter"}, "meter", "the wait's seconds did not pass on the board"),
        ("nowaitlimit", {"unchecked wait limit"}, "unchecked wait limit", "the board ran WAIT"),
        ("tilege", {"configure largest tile"}, "configure largest tile", "counts the bias row twice"),
        (
            "noconfcheck",
            {"unchecked configure limits"},
            "unchecked configure limits",
            "the board configured it",
        ),
        ("adcrefuse", {"line current limit"}, "line current limit", "saturates at its rail, never an error"),
        (
            "ridreset",
            {"unchecked request id after reset"},
            "unchecked request id after reset",
            "across the reset",
        ),
    ],
)
def test_a_firmware_that_misreads_the_docs_fails_the_check_that_names_its_mistake(
    bug: str, fails: set[str], check: str, says: str
) -> None:
    """Mutation testing of the suite (tests/fw_reference_board.py's switches): each is a mistake a
    firmware author makes reading docs/protocol.md and docs/bringup.md. It fails `check`, with a line
    that names the mistake, and no check outside `fails` (a wrong product fails the product checks
    whose inputs show it: all of them, or all but one). `lastref` costs the link's reply timeout,
    so its link is opened with one of 1 s."""
    report = _conformance(bug, timeout=1.0 if bug == "lastref" else 5.0)
    failed = {c.operation: c for c in report.checks if c.status == "FAIL"}
    assert check in failed and set(failed) <= fails, [c.line() for c in failed.values()]
    assert fails is PRODUCTS or set(failed) == fails, [c.line() for c in failed.values()]
    assert says in failed[check].got, failed[check].line()


def test_a_firmware_whose_frame_crc_skips_the_header_is_not_opened_and_the_error_says_why() -> None:
    """`crcpayload`: the CRC-32 over the payload alone. No frame of it passes, so `hil conformance`
    cannot open it (exit 2); the host's error names the CRC's span."""
    board = FirmwareBoard("crcpayload").start()
    try:
        with pytest.raises(RetriesExhausted, match=r"failed their CRC \(the CRC covers header \+ payload"):
            open_device(f"{board.uri}?attempts=1&timeout=1")
    finally:
        board.stop()
