"""VISA serial (ASRL) resources take their line settings from the URI (the instrument audit:
``?baud=`` was an unknown parameter and the session stayed at pyvisa-py's 9600)."""

from __future__ import annotations

import pytest

from drivers import open_device
from hil.testing import BoardServers


def test_a_visa_serial_resource_takes_its_line_rate(board_servers: BoardServers) -> None:
    """``visa://ASRL...?baud=N`` sets the session's line rate; on a TCP resource it is refused."""
    from drivers.errors import ConfigurationError

    with open_device(board_servers.uri("visa-asrl", baud="115200")) as dev:
        assert dev._res.baud_rate == 115200  # type: ignore[attr-defined]
        dev.safety()
    with pytest.raises(ConfigurationError, match="baud= is the line rate of a serial"):
        open_device(board_servers.uri("visa-tcp", baud="115200"))
    with pytest.raises(ConfigurationError, match="baud"):
        open_device(board_servers.uri("visa-asrl", baud="0"))
