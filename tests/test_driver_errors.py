"""The remote drivers' errors, against the real servers: what a host sees when a name does
not resolve, a link is lost for good, a reply is late, a `with` block fails on a dead board,
the board refuses the connection, a closed device is opened again, or a serial port is
already in use."""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
from typer.testing import CliRunner

from drivers import (
    ConfigurationError,
    DeviceError,
    DeviceFault,
    DeviceTimeout,
    ProtocolError,
    RetriesExhausted,
    SafeStateWarning,
    open_device,
)
from drivers.wire import codes
from emulator.server.launch import serve
from hil.cli import app
from hil.testing import BoardServers
from tests.waiting import until

BOARD = "emulator://?preset=ideal&seed=0"

UNRESOLVABLE = "visa://TCPIP0::nosuchhost.invalid::5025::SOCKET"  # .invalid never resolves (RFC 6761)


# ---- a host name that does not resolve ----------------------------------------------


def test_an_unresolvable_host_name_is_a_device_error_naming_the_host() -> None:
    """No connection at all on a first open: a ConfigurationError at once, as serial+socket://
    says it (another try finds the same name), not the retry budget spent."""
    name = r"cannot resolve the host name 'nosuchhost\.invalid'"
    with pytest.raises(ConfigurationError, match=name) as info:
        open_device(f"{UNRESOLVABLE}?attempts=2&backoff=0")
    assert "IP address" in str(info.value) and "not retried" in str(info.value)


def test_conformance_on_an_unresolvable_host_is_one_error_line_and_exit_code_2() -> None:
    result = CliRunner().invoke(app, ["conformance", f"{UNRESOLVABLE}?attempts=1"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot open ") and "nosuchhost.invalid" in lines[0]
    assert "Traceback" not in result.output


# ---- a link lost for good -------------------------------------------------------------


_until = functools.partial(until, timeout=3.0)  # most waits here are this long


@pytest.mark.parametrize("transport", ["serial-pty", "serial-socket", "visa-tcp"])
def test_a_link_lost_for_good_spends_the_retry_budget(
    transport: str, emulated_board: Callable[..., BoardServers]
) -> None:
    """The board's server goes away: every transport retries, reconnecting, and ends in
    RetriesExhausted (the framed ones raised the first open's ConfigurationError from inside
    the first reconnect)."""
    s = emulated_board(BOARD)
    link = {"ack_timeout": "0.05", "retries": "1"} if transport.startswith("serial") else {}
    dev = open_device(s.uri(transport, timeout="0.5", attempts="3", backoff="0.01", **link))
    try:
        s.scpi.close()
        s.framed.close()
        assert _until(lambda: not s.framed.links)  # the TCP connections' threads have ended
        with pytest.raises(RetriesExhausted) as info:
            dev.safety()
        assert info.value.attempts == 3 and dev.recovery.reconnects == 2
        assert isinstance(info.value.last, ProtocolError)
        if transport.startswith("serial"):
            assert "reconnecting it failed: cannot open the link" in str(info.value)
    finally:
        dev.close()


def test_a_first_open_of_a_missing_port_is_still_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="cannot open the link"):
        open_device("serial:///dev/no-such-port-xbar?attempts=3")


# ---- a timeout set on an open device ----------------------------------------------------


@pytest.mark.parametrize(
    ("transport", "params"),
    [
        ("visa-tcp", {}),
        ("visa-tcp", {"fast": "0"}),  # pyvisa-py's own reads
        ("visa-asrl", {}),
        ("serial-pty", {}),
        ("serial-socket", {}),
    ],
)
def test_a_timeout_set_after_open_takes_effect(
    transport: str, params: dict[str, str], emulated_board: Callable[..., BoardServers]
) -> None:
    s = emulated_board(BOARD, ack_timeout=0.05)  # its unacknowledged late reply is given up soon
    dev = open_device(s.uri(transport, timeout="0.1", attempts="1", **params))
    try:
        s.plan.reply_delay_s = 0.25  # every reply from now on comes 0.25 s late
        dev.timeout = 2.0
        assert dev.timeout == 2.0
        assert dev.safety().violations == 0  # waited for it (VISA kept waiting 0.1 s)
        dev.timeout = 0.05
        with pytest.raises(RetriesExhausted) as info:
            dev.safety()
        assert isinstance(info.value.last, DeviceTimeout) and "0.05 s" in str(info.value)
        with pytest.raises(ConfigurationError, match="timeout must be"):
            dev.timeout = 0
    finally:
        dev.close()


# ---- leaving a with block on a board that is gone ----------------------------------------


def _lose_the_board(s: BoardServers) -> None:
    """Stop both servers and wait until their connections have ended."""
    s.scpi.close()
    s.framed.close()
    assert _until(lambda: not s.framed.links and s.scpi.gate.active == 0)


@pytest.mark.parametrize("transport", ["visa-tcp", "serial-socket"])
def test_a_with_block_keeps_its_exception_when_safe_state_fails(
    transport: str, emulated_board: Callable[..., BoardServers]
) -> None:
    s = emulated_board(BOARD)
    uri = s.uri(transport, timeout="0.5", attempts="2", backoff="0")
    warned = r"safe_state\(\) failed .*while the with block raised ValueError"
    with (
        pytest.warns(SafeStateWarning, match=warned),
        pytest.raises(ValueError, match="the block's own error") as info,
        open_device(uri),
    ):
        _lose_the_board(s)
        raise ValueError("the block's own error")
    notes = getattr(info.value, "__notes__", [])
    assert len(notes) == 1 and "safe_state() failed too (RetriesExhausted: safe_state failed" in notes[0]


def test_a_safe_state_failure_still_raises_when_the_block_did_not(
    emulated_board: Callable[..., BoardServers],
) -> None:
    s = emulated_board(BOARD)
    uri = s.uri("visa-tcp", timeout="0.5", attempts="2", backoff="0")
    with pytest.raises(RetriesExhausted, match="safe_state failed 2 time"), open_device(uri):
        _lose_the_board(s)


# ---- a board that refuses the connection ------------------------------------------------


@pytest.mark.parametrize("params", [{}, {"fast": "0"}, {"check": "1"}], ids=["fast", "pyvisa", "checked"])
def test_a_visa_connection_over_the_limit_is_one_error_quoting_the_board(params: dict[str, str]) -> None:
    """The SCPI server answers a connection over its cap with an error line, then closes it:
    the host says so at once (it used to read it as a malformed block, four times)."""
    with serve(BOARD, max_connections=1, scpi_pty=False, framed_pty=False) as s:
        with open_device(s.uris["visa-tcp"]):  # takes the one connection
            with pytest.raises(DeviceFault, match=r"too many connections \(1\); closing") as info:
                open_device(s.uri("visa-tcp", attempts="4", **params))
            assert info.value.code == codes.COMMUNICATION_ERROR and "--max-connections" in str(info.value)
            assert s.scpi.gate.refused == 1  # a refusal is not retried
        with open_device(s.uri("visa-tcp", **params)) as dev:  # the slot is free again
            assert dev.info.identity.model == "emulator-ideal"


def test_a_framed_connection_over_the_limit_says_what_a_closed_greeting_means() -> None:
    """The framed server closes a connection over its cap without a word (its protocol has no
    unprompted message), which the host cannot tell from a board that died: it retries, and
    says what a connection closed before the HELLO was answered may mean."""
    with (
        serve(BOARD, max_connections=1, scpi_pty=False, framed_pty=False) as s,
        open_device(s.uris["serial-socket"]),  # takes the one connection
        pytest.raises(RetriesExhausted, match="closed the connection before answering its HELLO"),
    ):
        open_device(s.uri("serial-socket", attempts="2", backoff="0"))


# ---- a closed device ---------------------------------------------------------------------


@pytest.mark.parametrize("call", ["open", "reconnect"])
@pytest.mark.parametrize("transport", ["visa-tcp", "serial-socket"])
def test_a_closed_device_opens_no_connection_again(
    transport: str, call: str, emulated_board: Callable[..., BoardServers]
) -> None:
    s = emulated_board(BOARD)
    gate = (s.scpi if transport == "visa-tcp" else s.framed).gate
    dev = open_device(s.uri(transport))
    dev.close()
    with pytest.raises(DeviceError, match="is closed; open a new device"):
        getattr(dev, call)()
    assert _until(lambda: gate.active == 0)  # a connection the call opened would hold its slot


# ---- a serial port in use ------------------------------------------------------------------


def test_a_serial_port_is_opened_exclusively(emulated_board: Callable[..., BoardServers]) -> None:
    s = emulated_board(BOARD)
    port = s.resources["serial-pty"]
    with open_device(s.uris["serial-pty"]) as first:
        with pytest.raises(ConfigurationError, match=f"the port {port} is in use: another process"):
            open_device(s.uris["serial-pty"])
        assert first.safety().violations == 0  # the first is served as before
    with open_device(s.uris["serial-pty"]) as again:  # closed, the port is free again
        assert again.safety().violations == 0
