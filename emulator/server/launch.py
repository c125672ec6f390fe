"""One board behind its servers: the launcher that `hil emulator serve`, the pytest plugin
(`hil.testing`) and the fault harness (`emulator.server.harness`) all call, so a server
option or a fault reaches all three the same way.

`serve(board, ...)` opens the board (a URI, or a Device already open), puts it behind an
SCPI server and a framed server on the endpoints asked for (TCP ports and ptys), with one
fault plan and one record of request ids shared by both, and returns a `ServedBoard` whose
`uris` are the device URIs a host opens. The CLI and the plugin import this module and
nothing else of the emulator (an import-linter contract in pyproject.toml keeps it so);
what they need of the fault types is re-exported here.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Self
from urllib.parse import parse_qsl

from drivers import open_device
from drivers.base import Device
from drivers.wire.link import Faults
from emulator.server.dispatch import ReplayCache, emulated_board
from emulator.server.faults import FaultPlan
from emulator.server.framed import FramedServer
from emulator.server.links import IDLE_TIMEOUT_S, MAX_CONNECTIONS
from emulator.server.ownership import BoardLock
from emulator.server.scpi import ScpiServer

__all__ = ["TRANSPORTS", "BoardLock", "FaultPlan", "Faults", "ListenPortTaken", "ServedBoard", "serve"]

# the remote transports a served board is reached by, as the device URIs name them
TRANSPORTS = ("visa-tcp", "visa-asrl", "serial-pty", "serial-socket")
LOOPBACK = "127.0.0.1"


class ListenPortTaken(OSError):
    """A TCP port a server was asked to bind is taken: `server` ("scpi" or "framed") and
    `host`:`port` say which (the OSError's errno is EADDRINUSE)."""

    def __init__(self, server: str, host: str, port: int) -> None:
        super().__init__(errno.EADDRINUSE, f"the {server} server's port {host}:{port} is already in use")
        self.server, self.host, self.port = server, host, port


def _listen(server: str, listen: Callable[[str, int], tuple[str, int]], host: str, port: int) -> int:
    try:
        return listen(host, port)[1]
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ListenPortTaken(server, host, port) from exc
        raise


@dataclass
class ServedBoard:
    """A board behind both servers. `uris`: transport (one of TRANSPORTS) -> device URI,
    for the endpoints that are served (the SCPI ones with ``?check=1`` where the plan corrupts
    or drops bytes: docs/protocol.md, "Checked mode"). Closing stops the servers, puts the board in its
    safe state and closes it."""

    device: Device
    plan: FaultPlan
    scpi: ScpiServer
    framed: FramedServer
    lock: BoardLock | None = None  # the board's owner, shared by both servers (None: no ownership)
    uris: dict[str, str] = field(default_factory=dict)

    @property
    def resources(self) -> dict[str, str]:
        """transport -> what a tool outside this package opens: a VISA resource string
        (``TCPIP0::127.0.0.1::PORT::SOCKET``, ``ASRL/dev/pts/N::INSTR``), a serial port
        (``/dev/pts/N``) or ``host:port`` for the framed protocol over TCP."""
        return {t: uri.split("://", 1)[1].split("?", 1)[0] for t, uri in self.uris.items()}

    def uri(self, transport: str, **params: str) -> str:
        """The device URI of `transport` with query parameters (``timeout="1"``) added; one the
        URI has already (``check=1`` of a board with byte faults) is replaced, not repeated (a
        device URI refuses a key given twice)."""
        base = self.uris[transport]
        if not params:
            return base
        target, _, query = base.partition("?")
        merged = {**dict(parse_qsl(query, keep_blank_values=True)), **params}
        return target + "?" + "&".join(f"{k}={v}" for k, v in merged.items())

    def close(self) -> None:
        try:
            self.scpi.close()
            self.framed.close()
            if self.lock is not None:
                self.lock.close()  # no safe state of its own after this: the board closes
            with contextlib.suppress(Exception):  # a board that is already gone has no safe state to reach
                self.device.safe_state()
        finally:
            self.device.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve(
    board: str | Device,
    *,
    plan: FaultPlan | None = None,
    host: str = LOOPBACK,
    scpi_port: int | None = 0,
    framed_port: int | None = 0,
    scpi_pty: bool = True,
    framed_pty: bool = True,
    ack_timeout: float = 0.25,
    max_connections: int = MAX_CONNECTIONS,
    idle_timeout_s: float | None = IDLE_TIMEOUT_S,
    lock: BoardLock | bool = True,
) -> ServedBoard:
    """Serve `board` (a device URI opened here, or an open Device, which the result then
    owns) on SCPI over TCP (`scpi_port`; 0: a free port, None: not served) and over a pty
    (`scpi_pty`), and on the framed protocol over TCP (`framed_port`) and over a pty
    (`framed_pty`). `host` is the address the TCP servers bind (loopback unless you mean
    otherwise). `lock`: the board's ownership (capability ``lock``, docs/protocol.md), one
    owner for both servers: True a `BoardLock` with the default lease, a `BoardLock` of your
    own (another lease), False a board without ownership (firmware that lacks it). On any
    failure everything started is closed again and the error raised."""
    device = open_device(board) if isinstance(board, str) else board
    plan = plan or FaultPlan()
    if plan.p_lose:
        try:
            emulated_board(device)  # only an emulator can give fresh devices: refused before serving
        except ValueError:
            device.close()
            raise
    # one board: one record of requests, whichever server they came by
    cache = ReplayCache(keep=not plan.rerun_ids)
    owner = BoardLock() if lock is True else (lock or None)
    caps = {"max_connections": max_connections, "idle_timeout_s": idle_timeout_s, "lock": owner}
    try:
        scpi = ScpiServer(device, plan=plan, cache=cache, **caps)  # type: ignore[arg-type]
        framed = FramedServer(device, plan=plan, cache=cache, ack_timeout=ack_timeout, **caps)  # type: ignore[arg-type]
    except BaseException:
        device.close()
        raise
    served = ServedBoard(device, plan, scpi, framed, owner)
    shown = LOOPBACK if host in ("", "0.0.0.0", "::") else host  # all interfaces: loopback works here
    # bytes corrupted or lost on the wire (TCP too): plain SCPI has no check of its own and would
    # take them for data, so its URIs ask for checked mode (the framed protocol checks every frame)
    checked = "?check=1" if plan.ber or plan.drop_rate else ""
    try:
        if scpi_port is not None:
            port = _listen("scpi", scpi.listen_tcp, host, scpi_port)
            served.uris["visa-tcp"] = f"visa://TCPIP0::{shown}::{port}::SOCKET{checked}"
        if scpi_pty:
            served.uris["visa-asrl"] = f"visa://ASRL{scpi.open_pty()}::INSTR{checked}"
        if framed_pty:
            served.uris["serial-pty"] = f"serial://{framed.open_pty()}"
        if framed_port is not None:
            port = _listen("framed", framed.listen_tcp, host, framed_port)
            served.uris["serial-socket"] = f"serial+socket://{shown}:{port}"
    except BaseException:
        served.close()
        raise
    return served
