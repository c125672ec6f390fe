"""One board behind both servers with a fault plan: the helper the reliability tests and
`benchmarks/faults.py` use (`hil emulator serve` builds the same from its options)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from drivers import open_device
from drivers.base import Device
from emulator.server.dispatch import ReplayCache
from emulator.server.faults import FaultPlan
from emulator.server.framed import FramedServer
from emulator.server.scpi import ScpiServer


@dataclass
class FaultyBoard:
    device: Device  # the board itself (in this process)
    plan: FaultPlan
    scpi: ScpiServer
    framed: FramedServer
    visa_uri: str  # SCPI over TCP, checked mode
    serial_uri: str  # framed over TCP
    serial_pty_uri: str  # framed over a pty

    def close(self) -> None:
        self.scpi.close()
        self.framed.close()
        self.device.close()


@contextlib.contextmanager
def faulty_board(
    board: str = "emulator://?preset=ideal&seed=0",
    plan: FaultPlan | None = None,
    *,
    timeout: float = 0.3,
    ack_timeout: float = 0.05,
    attempts: int = 8,
    backoff: float = 0.02,
) -> Iterator[FaultyBoard]:
    """Serve `board` with `plan`; the URIs carry client settings fit for the faults (a
    `timeout` shorter than `plan.delay_s`, so a delayed reply is a timeout)."""
    device = open_device(board)
    plan = plan or FaultPlan()
    cache = ReplayCache()
    scpi = ScpiServer(device, plan=plan, cache=cache)
    framed = FramedServer(device, plan=plan, cache=cache, ack_timeout=ack_timeout)
    try:
        scpi_port = scpi.listen_tcp()[1]
        framed_port = framed.listen_tcp()[1]
        pty = framed.open_pty()
        common = f"timeout={timeout}&attempts={attempts}&backoff={backoff}"
        framed_q = f"{common}&ack_timeout={ack_timeout}"
        served = FaultyBoard(
            device,
            plan,
            scpi,
            framed,
            visa_uri=f"visa://TCPIP0::127.0.0.1::{scpi_port}::SOCKET?check=1&{common}",
            serial_uri=f"serial+socket://127.0.0.1:{framed_port}?{framed_q}",
            serial_pty_uri=f"serial://{pty}?{framed_q}",
        )
    except BaseException:
        scpi.close()
        framed.close()
        device.close()
        raise
    try:
        yield served
    finally:
        served.close()
