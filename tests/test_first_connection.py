"""A refused first connection fails at once on every TCP transport, with a ConfigurationError
naming the address and what to check (another try finds the same address: retrying it was
22 s of waiting on visa:// at attempts=30, while serial+socket:// raised at once); a reconnect
of a link that was up keeps retrying, through refused connections, while the board's server
restarts."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from drivers import ConfigurationError, open_device
from drivers.errors import Unreachable
from hil.testing import BoardServers

BOARD = "emulator://?preset=ideal&seed=0"
TRANSPORTS = ["visa-tcp", "serial-socket"]


def _port(s: BoardServers, transport: str) -> int:
    uri = s.uris[transport]
    return int(uri.rsplit(":", 1)[1]) if transport == "serial-socket" else int(uri.split("::")[2])


def _server(s: BoardServers, transport: str):  # type: ignore[no-untyped-def]
    return s.framed if transport == "serial-socket" else s.scpi


def _params(transport: str) -> dict[str, str]:
    link = {"ack_timeout": "0.05", "retries": "1"} if transport == "serial-socket" else {}
    return {"timeout": "1", "attempts": "30", "backoff": "0.05", **link}


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_refused_first_connection_fails_at_once_naming_the_address(
    transport: str, emulated_board: Callable[..., BoardServers]
) -> None:
    s = emulated_board(BOARD)
    port = _port(s, transport)
    uri = s.uri(transport, **_params(transport))
    _server(s, transport).close()  # nothing listens there now: connections are refused
    t0 = time.monotonic()
    with pytest.raises(ConfigurationError) as info:
        open_device(uri)
    took = time.monotonic() - t0
    text = str(info.value)
    # its own type, so a command can tell a board that may come back from a wrong URI's other errors
    assert isinstance(info.value, Unreachable), repr(info.value)
    assert took < 3.0, f"{took:.1f} s: the refused first connection was retried ({text})"
    assert str(port) in text and "refused" in text.lower(), text
    assert "Is the board on" in text and "not retried" in text, text


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_reconnect_keeps_retrying_while_the_server_restarts(
    transport: str, emulated_board: Callable[..., BoardServers]
) -> None:
    s = emulated_board(BOARD)
    port = _port(s, transport)
    server = _server(s, transport)
    with open_device(s.uri(transport, **_params(transport))) as dev:
        server.close()  # the server goes away; its connections end
        time.sleep(0.2)
        restart = threading.Timer(0.8, server.listen_tcp, ("127.0.0.1", port))
        restart.start()
        try:
            assert dev.safety().violations == 0  # refused reconnects, retried until it serves
        finally:
            restart.join()
        assert dev.recovery.reconnects >= 2, dev.recovery
