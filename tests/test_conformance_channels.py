"""`hil conformance` on a board with fewer converter channels than its largest tile needs (an
emulator served with `--set channels=100`: a tile of R x C needs R + C of them) blamed the
firmware: the largest tile, the large blocks (or fragments) and the line-current limit each
FAILED ("the board checks with >= or counts the bias row twice"). The protocol declares no
channel count, so the host cannot size those networks to fit: a refusal as a configuration
error (100) of a network within every declared limit is now a SKIP with the board's words,
while a refusal as past a declared limit (-222) stays a FAIL (tests/fw_reference_board.py's
`tilege`, through its own TCP server)."""

from __future__ import annotations

import pytest

from drivers import open_device
from hil.conformance import Options, Report, run_conformance
from hil.testing import served_board
from tests.fw_reference_board import FirmwareBoard

FEW = "emulator://?preset=ideal&seed=0&channels=100"
NEED_CHANNELS = {"configure largest tile", "line current limit"}


def _report(uri: str) -> Report:
    with open_device(uri) as dev:  # with the probes past a limit (the line-current check is one)
        return run_conformance(dev, uri, Options(limit_probes=True))


@pytest.mark.parametrize(
    ("transport", "large"), [("visa-tcp", "scpi large blocks"), ("serial-socket", "fragmented messages")]
)
def test_too_few_channels_is_a_skip_naming_them_not_a_firmware_fail(transport: str, large: str) -> None:
    with served_board(board=FEW) as servers:
        report = _report(servers.uri(transport))
    failed = [c.line() for c in report.checks if c.status == "FAIL"]
    assert not failed, failed
    checks = {c.operation: c for c in report.checks}
    for op in (*NEED_CHANNELS, large):
        check = checks[op]
        assert check.status == "SKIP", check.line()
        assert "configuration error (100)" in check.got and "the board has 100 channels" in check.got
        assert ">=" not in check.got, check.line()
    # the checks whose networks fit the channels still run
    assert checks["configure max_tiles"].status == checks["configure"].status == "PASS"


def test_a_tile_check_off_by_one_still_fails_the_largest_tile() -> None:
    board = FirmwareBoard("tilege").start()
    try:
        with open_device(f"{board.uri}?attempts=2&timeout=5") as dev:
            report = run_conformance(dev, board.uri)
    finally:
        board.stop()
    check = next(c for c in report.checks if c.operation == "configure largest tile")
    assert check.status == "FAIL", check.line()
    assert "LimitViolation" in check.got and "counts the bias row twice" in check.got


def test_a_chain_of_max_tiles_over_the_channels_is_a_skip_too() -> None:
    """64 tiles of 2 x 1 in a chain are 65 nodes: over 50 channels (in process, no link)."""
    uri = "emulator://?preset=ideal&seed=0&channels=50"
    report = _report(uri)
    assert report.ok, [c.line() for c in report.checks if c.status == "FAIL"]
    check = next(c for c in report.checks if c.operation == "configure max_tiles")
    assert check.status == "SKIP" and "(65 nodes; 64 tiles)" in check.got, check.line()
