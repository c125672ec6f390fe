"""The remote drivers' errors, against the real servers: what a host sees when a name does
not resolve, a link is lost for good, a reply is late, a `with` block fails on a dead board,
the board refuses the connection, a closed device is opened again, or a serial port is
already in use."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from drivers import ProtocolError, RetriesExhausted, open_device
from hil.cli import app

UNRESOLVABLE = "visa://TCPIP0::nosuchhost.invalid::5025::SOCKET"  # .invalid never resolves (RFC 6761)


# ---- a host name that does not resolve ----------------------------------------------


def test_an_unresolvable_host_name_is_a_device_error_naming_the_host() -> None:
    with pytest.raises(RetriesExhausted, match=r"cannot resolve the host name 'nosuchhost\.invalid'") as info:
        open_device(f"{UNRESOLVABLE}?attempts=2&backoff=0")
    assert info.value.attempts == 2  # as a refused connection ends: the same class, the budget spent
    assert isinstance(info.value.last, ProtocolError)
    assert "IP address" in str(info.value)


def test_conformance_on_an_unresolvable_host_is_one_error_line_and_exit_code_2() -> None:
    result = CliRunner().invoke(app, ["conformance", f"{UNRESOLVABLE}?attempts=1"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot open ") and "nosuchhost.invalid" in lines[0]
    assert "Traceback" not in result.output
