"""The pytest plugin of xbar-hil (entry point ``pytest11: xbar_hil``): emulated boards behind
real servers as fixtures, for any test suite in the environment (`hil.testing` lists them).

Loading it imports pytest and `hil.testing` only, which imports nothing of the drivers, the
emulator or torch until a fixture is used: a session that uses none pays nothing, and a
repository with packages named like this toolkit's (``drivers``, ``emulator``) still runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from hil.testing import DEFAULT_BOARD, TRANSPORTS, open_transport, served_board

if TYPE_CHECKING:
    from drivers import Device
    from hil.testing import BoardServers


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("xbar-hil", "xbar-hil emulated boards")
    group.addoption(
        "--xbar-board",
        default=None,
        metavar="URI",
        help=f"board URI started by the xbar-hil fixtures (default: ini xbar_board, else {DEFAULT_BOARD})",
    )
    parser.addini("xbar_board", "board URI started by the xbar-hil fixtures", default=DEFAULT_BOARD)


@pytest.fixture(scope="session")
def _xbar_board_checked(pytestconfig: pytest.Config) -> str:
    """The board URI, checked once per session: a URI no board can be opened from stops the
    session with one usage error (where every test using a fixture would fail with the same).
    A lab board's URI (not ``emulator://``) is opened once to check it answers, and closed
    without the safe state (it may be another host's board)."""
    from drivers.uri import looking_uri, parse_options

    uri = pytestconfig.getoption("--xbar-board")
    where = "--xbar-board"
    if not uri:
        uri, where = pytestconfig.getini("xbar_board"), "the ini option xbar_board"
    try:
        parse_options(uri)
    except Exception as exc:  # a ConfigurationError, or a third-party backend's own error
        pytest.exit(f"{where} {uri!r}: {exc}", returncode=pytest.ExitCode.USAGE_ERROR)
    if not uri.startswith("emulator://"):
        from drivers import open_device

        try:
            dev = open_device(looking_uri(uri))  # not taking a board another host may own
        except Exception as exc:  # unreachable, refused, or no board answering there
            pytest.exit(
                f"{where} {uri!r}: cannot open the board ({type(exc).__name__}: {exc}); check that it is "
                "powered, connected and served at that address, or pass an emulator:// URI",
                returncode=pytest.ExitCode.USAGE_ERROR,
            )
        dev.close_link()
    return uri


@pytest.fixture
def xbar_board(_xbar_board_checked: str) -> str:
    """The emulated board's URI: ``--xbar-board``, else the ini option ``xbar_board``."""
    return _xbar_board_checked


@pytest.fixture
def emulated_board(xbar_board: str) -> Iterator[Callable[..., BoardServers]]:
    """Factory: ``emulated_board(board=URI or Device, plan=FaultPlan(...), ack_timeout=...)``
    starts a board (default `xbar_board`) behind both servers; all are closed after the test."""
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
