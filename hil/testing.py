"""Test helpers: an emulated board behind real servers, and a Device over each transport.

Written as a pytest plugin (``pytest_plugins = ["hil.testing"]`` registers the fixtures
below), and usable without pytest through `serve_board` and `open_transport`:

    with open_transport("serial-pty", "emulator://?preset=rram&seed=0") as dev:
        dev.configure(...)

Servers bind 127.0.0.1 on free ports and ptys; each `open_transport` starts its own board
from the URI, so two transports opened with the same URI start from identical boards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest

from drivers import Device, open_device

if TYPE_CHECKING:
    from emulator.server import Faults, FramedServer, ScpiFaults, ScpiServer

IN_PROCESS = "emulator"
REMOTE_TRANSPORTS = ("visa-tcp", "visa-asrl", "serial-pty", "serial-socket")
TRANSPORTS = (IN_PROCESS, *REMOTE_TRANSPORTS)
DEFAULT_BOARD = "emulator://?preset=rram&seed=0"


@dataclass
class BoardServers:
    """One board behind an SCPI server and a framed server (TCP port and pty each)."""

    device: Device
    scpi: ScpiServer
    framed: FramedServer
    uris: dict[str, str] = field(default_factory=dict)  # transport -> device URI

    def uri(self, transport: str, **params: str) -> str:
        base = self.uris[transport]
        if not params:
            return base
        return base + "?" + "&".join(f"{k}={v}" for k, v in params.items())

    def close(self) -> None:
        self.scpi.close()
        self.framed.close()
        self.device.close()


def serve_board(
    board: str | Device = DEFAULT_BOARD,
    *,
    faults: Faults | None = None,
    scpi_faults: ScpiFaults | None = None,
    ack_timeout: float = 0.25,
) -> BoardServers:
    """Start both servers over `board` (a Device, or a URI opened here) on every link."""
    from emulator.server import FramedServer, ScpiServer

    device = open_device(board) if isinstance(board, str) else board
    scpi = ScpiServer(device, scpi_faults)
    framed = FramedServer(device, faults, ack_timeout=ack_timeout)
    servers = BoardServers(device, scpi, framed)
    try:
        _, scpi_port = scpi.listen_tcp()
        _, framed_port = framed.listen_tcp()
        servers.uris = {
            "visa-tcp": f"visa://TCPIP0::127.0.0.1::{scpi_port}::SOCKET",
            "visa-asrl": f"visa://ASRL{scpi.open_pty()}::INSTR",
            "serial-pty": f"serial://{framed.open_pty()}",
            "serial-socket": f"serial+socket://127.0.0.1:{framed_port}",
        }
    except BaseException:
        servers.close()
        raise
    return servers


@contextlib.contextmanager
def open_transport(transport: str, board: str = DEFAULT_BOARD, **params: str) -> Iterator[Device]:
    """A Device for `board` reached over `transport` (one of TRANSPORTS); the board and its
    servers live as long as the context."""
    if transport == IN_PROCESS:
        with open_device(board) as dev:
            yield dev
        return
    if transport not in REMOTE_TRANSPORTS:
        raise ValueError(f"unknown transport {transport!r}; known: {TRANSPORTS}")
    servers = serve_board(board)
    try:
        with open_device(servers.uri(transport, **params)) as dev:
            yield dev
    finally:
        servers.close()


@contextlib.contextmanager
def served_board(**kw: Any) -> Iterator[BoardServers]:
    servers = serve_board(**kw)
    try:
        yield servers
    finally:
        servers.close()


# ---- pytest fixtures (active when this module is registered as a plugin) -------------


@pytest.fixture
def board_servers() -> Iterator[BoardServers]:
    """A fresh rram board (seed 0) behind both servers."""
    with served_board() as servers:
        yield servers


@pytest.fixture(params=TRANSPORTS)
def transport_device(request: pytest.FixtureRequest) -> Iterator[Device]:
    """A fresh rram board (seed 0) over each transport in turn, in-process included."""
    with open_transport(request.param) as dev:
        yield dev
