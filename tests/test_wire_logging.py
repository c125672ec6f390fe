"""The wire is loggable (the instrument audit: `logging` at DEBUG showed nothing of a session
but pyvisa's open and close, and a run through 8 injected hang-ups said nothing at all):
DEBUG lines for every transaction and every SCPI line or framed message, a WARNING for every
retried failure and every reconnect, over the real servers."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

from drivers import Topology, open_device
from hil.testing import BoardServers, FaultPlan


@pytest.mark.parametrize(
    ("transport", "raw_logger"), [("visa-tcp", "drivers.visa"), ("serial-socket", "drivers.serial")]
)
def test_a_session_logs_its_transactions_and_raw_traffic_at_debug(
    board_servers: BoardServers, transport: str, raw_logger: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="drivers"), open_device(board_servers.uri(transport)) as dev:
        dev.configure(Topology.layered([4, 3]))
        dev.safety()
    wire = [r.getMessage() for r in caplog.records if r.name == "drivers.wire"]
    raw = [r.getMessage() for r in caplog.records if r.name == raw_logger]
    assert any(" -> configure " in m and "groups=" in m for m in wire), wire
    assert any(" <- safety in " in m and m.endswith(" ms") for m in wire), wire
    if transport == "visa-tcp":
        assert any(">> SYST:SAF?" in m or ">> SYSTem:SAFety?" in m for m in raw), raw
        assert any(m.split(" << ", 1)[-1].startswith(("b'0,0", "'0,0")) for m in raw), raw
    else:
        assert any(" >> request " in m for m in raw) and any(" << reply " in m for m in raw), raw


def test_a_retried_failure_and_the_reconnect_are_warnings(
    emulated_board: Callable[..., BoardServers], caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing is configured: the warnings reach Python's last-resort handler (stderr) too."""
    servers = emulated_board(plan=FaultPlan(hang_up_after=12))
    with caplog.at_level(logging.INFO, logger="drivers"), open_device(servers.uri("visa-tcp")) as dev:
        for _ in range(14):
            dev.safety()
        assert dev.recovery.reconnects >= 1
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("failed (" in m and "reconnecting, attempt 2 of 4" in m for m in warned), warned
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("reconnected (1 reconnects in this session)" in m for m in infos), infos
