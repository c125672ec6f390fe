"""Test helpers: an emulated board behind real servers, and a Device over each transport.

A pytest plugin shipped with the distribution (entry point ``pytest11: xbar_hil``): installing
xbar-hil makes its fixtures available to every test suite, no conftest needed (with plugin
autoloading off, ``pytest -p hil.testing``). Fixtures:

- ``xbar_board``: the board URI the fixtures start, from ``--xbar-board URI`` or the ini
  option ``xbar_board`` (default: rram, seed 0)
- ``board_servers``: that board behind its SCPI server (TCP and pty) and its framed server
  (TCP and pty): ``.uris`` (device URIs) and ``.resources`` (plain VISA resource strings,
  serial ports and host:port, for scripts and firmware tools that are not Python)
- ``emulated_board(board=..., faults=..., scpi_faults=..., ack_timeout=...)``: a factory
  for more boards, or boards with injected link faults
- ``transport_device``: a Device for the board over each transport in turn (parametrised)
- ``device_on(transport, board=..., **params)``: a factory for Devices over one transport

Everything is closed at the end of the test. Usable without pytest through `serve_board` and
`open_transport`::

    with open_transport("serial-pty", "emulator://?preset=rram&seed=0") as dev:
        dev.configure(...)

Servers bind 127.0.0.1 on free ports and ptys; each `open_transport` starts its own board
from the URI, so two transports opened with the same URI start from identical boards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
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

    @property
    def resources(self) -> dict[str, str]:
        """transport -> what a tool outside this package opens: a VISA resource string
        (``TCPIP0::127.0.0.1::PORT::SOCKET``, ``ASRL/dev/pts/N::INSTR``), a serial port
        (``/dev/pts/N``) or ``host:port`` for the framed protocol over TCP."""
        return {t: uri.split("://", 1)[1] for t, uri in self.uris.items()}

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


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("xbar-hil", "xbar-hil emulated boards")
    group.addoption(
        "--xbar-board",
        default=None,
        metavar="URI",
        help=f"board URI started by the xbar-hil fixtures (default: ini xbar_board, else {DEFAULT_BOARD})",
    )
    parser.addini("xbar_board", "board URI started by the xbar-hil fixtures", default=DEFAULT_BOARD)


@pytest.fixture
def xbar_board(request: pytest.FixtureRequest) -> str:
    """The emulated board's URI: ``--xbar-board``, else the ini option ``xbar_board``."""
    return request.config.getoption("--xbar-board") or request.config.getini("xbar_board")


@pytest.fixture
def emulated_board(xbar_board: str) -> Iterator[Callable[..., BoardServers]]:
    """Factory: ``emulated_board(board=URI or Device, faults=..., scpi_faults=...,
    ack_timeout=...)`` starts a board (default `xbar_board`) behind both servers; all are
    closed after the test."""
    with contextlib.ExitStack() as stack:

        def start(board: str | Device | None = None, **kw: Any) -> BoardServers:
            return stack.enter_context(served_board(board=board or xbar_board, **kw))

        yield start


@pytest.fixture
def board_servers(xbar_board: str) -> Iterator[BoardServers]:
    """A fresh board (`xbar_board`) behind both servers."""
    with served_board(board=xbar_board) as servers:
        yield servers


@pytest.fixture(params=TRANSPORTS)
def transport_device(request: pytest.FixtureRequest, xbar_board: str) -> Iterator[Device]:
    """A fresh board (`xbar_board`) over each transport in turn, in-process included."""
    with open_transport(request.param, xbar_board) as dev:
        yield dev


@pytest.fixture
def device_on(xbar_board: str) -> Iterator[Callable[..., Device]]:
    """Factory: ``device_on(transport, board=None, **params)`` is a Device for a fresh board
    (default `xbar_board`) over `transport` (one of TRANSPORTS), with URI query parameters
    such as ``timeout="1"``; closed, with its servers, after the test."""
    with contextlib.ExitStack() as stack:

        def open_(transport: str, board: str | None = None, **params: str) -> Device:
            return stack.enter_context(open_transport(transport, board or xbar_board, **params))

        yield open_
