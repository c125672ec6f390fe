"""Test helpers: an emulated board behind real servers, and a Device over each transport.

Its pytest fixtures live in `hil.pytest_plugin`, shipped with the distribution (entry point
``pytest11: xbar_hil``): installing xbar-hil makes them available to every test suite, no
conftest needed (with plugin autoloading off, ``pytest -p hil.pytest_plugin``). This module
imports neither pytest nor, until a helper is called, the drivers, the emulator or torch:
loading the plugin costs a test session nothing, and a session's own packages named like
this toolkit's (``drivers``, ``emulator``) do not stop it. Fixtures:

- ``xbar_board``: the board URI the fixtures start, from ``--xbar-board URI`` or the ini
  option ``xbar_board`` (default: rram, seed 0)
- ``board_servers``: that board behind its SCPI server (TCP and pty) and its framed server
  (TCP and pty): ``.uris`` (device URIs) and ``.resources`` (plain VISA resource strings,
  serial ports and host:port, for scripts and firmware tools that are not Python)
- ``emulated_board(board=..., plan=FaultPlan(...), ack_timeout=...)``: a factory for more
  boards, or boards with injected faults (``hil.testing.FaultPlan`` and ``hil.testing.Faults``
  are the fault types; ``FaultPlan(link=Faults(corrupt_rx=1))`` corrupts a received frame)
- ``transport_device``: a Device for the board over each transport in turn (parametrised)
- ``device_on(transport, board=..., **params)``: a factory for Devices over one transport

Everything is closed at the end of the test; on a lab board (``--xbar-board visa://...``) the
fixtures lend the one board the session holds, reset before and after each test (docs/sweep.md
section 4). Usable without pytest through `serve_board` and `open_transport`::

    with open_transport("serial-pty", "emulator://?preset=rram&seed=0") as dev:
        dev.configure(...)

Servers bind 127.0.0.1 on free ports and ptys; each `open_transport` of a URI starts its own
board from it, so two transports opened with the same emulator:// URI start from identical
boards. `open_transport` of an open Device serves (or hands over) that one board and leaves
it open.
"""

from __future__ import annotations

import contextlib
import select
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from drivers import Device
    from drivers.wire.link import Link
    from emulator.server.launch import BoardLock, FaultPlan
    from emulator.server.launch import ServedBoard as BoardServers

IN_PROCESS = "emulator"
REMOTE_TRANSPORTS = ("visa-tcp", "visa-asrl", "serial-pty", "serial-socket")
TRANSPORTS = (IN_PROCESS, *REMOTE_TRANSPORTS)
DEFAULT_BOARD = "emulator://?preset=rram&seed=0"


_LAUNCHER_NAMES = ("BoardLock", "FaultPlan", "Faults", "BoardServers")


def __getattr__(name: str) -> Any:
    """The fault types and the served-board type, imported from the launcher on first use
    (loading the plugin must not import the emulator and torch into every test session)."""
    if name in _LAUNCHER_NAMES:
        from emulator.server import launch

        return getattr(launch, "ServedBoard" if name == "BoardServers" else name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def socket_link(sock: socket.socket, **link_options: Any) -> Link:
    """A framed-protocol `Link` over a connected socket, for tests that play a host (or a
    hostile peer) frame by frame: reads are one select and one recv; a closed peer raises
    EOFError. `link_options` go to `Link` (ack_timeout, retries, seq0, ...)."""
    from drivers.wire.link import Link

    def read(timeout: float) -> bytes:
        ready, _, _ = select.select([sock], [], [], max(0.0, timeout))
        if not ready:
            return b""
        got = sock.recv(1 << 16)
        if not got:
            raise EOFError("the peer closed the connection")
        return got

    return Link(read, sock.sendall, **link_options)


def serve_board(
    board: str | Device = DEFAULT_BOARD,
    *,
    plan: FaultPlan | None = None,
    ack_timeout: float = 0.25,
    lock: BoardLock | bool = True,
) -> BoardServers:
    """Start both servers over `board` (a Device, or a URI opened here) on every link, with
    the faults of `plan` (`FaultPlan`, re-exported here: byte, frame and request faults).
    `lock`: the board's ownership (True: served with the default lease; a `BoardLock`: with
    its lease; False: a board without the capability ``lock``, as older firmware)."""
    from emulator.server.launch import serve

    return serve(board, plan=plan, ack_timeout=ack_timeout, lock=lock)


@contextlib.contextmanager
def open_transport(transport: str, board: str | Device = DEFAULT_BOARD, **params: str) -> Iterator[Device]:
    """A Device for `board` reached over `transport` (one of TRANSPORTS). `board`: a URI,
    whose board is opened here and lives as long as the context with its servers; or an open
    Device, lent (`hil.lent.LentDevice`): served, or given as it is for IN_PROCESS, and left
    open at the end (it is the caller's)."""
    from drivers import open_device

    if transport not in TRANSPORTS:
        raise ValueError(f"unknown transport {transport!r}; known: {TRANSPORTS}")
    if transport == IN_PROCESS and params:
        raise ValueError(
            f"link parameters {sorted(params)} are for the remote transports {REMOTE_TRANSPORTS}; "
            "the board's own URI takes its settings in its query (emulator://?preset=...&FIELD=VALUE)"
        )
    if isinstance(board, str):
        if transport == IN_PROCESS:
            with open_device(board) as dev:
                yield dev
            return
        servers = serve_board(board)
    else:
        if transport == IN_PROCESS:
            yield lend(board)
            return
        servers = serve_board(lend(board))
    try:
        with open_device(servers.uri(transport, **params)) as dev:
            yield dev
    finally:
        servers.close()


def lend(device: Device) -> Device:
    """`device` behind a `hil.lent.LentDevice`: closing what is returned (or the servers
    serving it) leaves `device` open."""
    from hil.lent import LentDevice

    return device if isinstance(device, LentDevice) else LentDevice(device)


@contextlib.contextmanager
def served_board(**kw: Any) -> Iterator[BoardServers]:
    servers = serve_board(**kw)
    try:
        yield servers
    finally:
        servers.close()
