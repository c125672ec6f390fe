"""One board behind both servers with a fault plan, and client URIs fit for the faults: the
helper the reliability tests and `benchmarks/faults.py` use (it calls the launcher,
`emulator.server.launch.serve`, as `hil emulator serve` and the pytest plugin do)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from drivers.base import Device
from emulator.server.faults import FaultPlan
from emulator.server.framed import FramedServer
from emulator.server.launch import ServedBoard, serve
from emulator.server.ownership import BoardLock
from emulator.server.scpi import ScpiServer


@dataclass
class FaultyBoard:
    served: ServedBoard
    visa_uri: str  # SCPI over TCP, checked mode
    serial_uri: str  # framed over TCP
    serial_pty_uri: str  # framed over a pty

    @property
    def device(self) -> Device:  # the board itself (in this process)
        return self.served.device

    @property
    def plan(self) -> FaultPlan:
        return self.served.plan

    @property
    def scpi(self) -> ScpiServer:
        return self.served.scpi

    @property
    def framed(self) -> FramedServer:
        return self.served.framed


@contextlib.contextmanager
def faulty_board(
    board: str = "emulator://?preset=ideal&seed=0",
    plan: FaultPlan | None = None,
    *,
    timeout: float = 0.3,
    ack_timeout: float = 0.05,
    attempts: int = 8,
    backoff: float = 0.02,
    lock: BoardLock | bool = True,
) -> Iterator[FaultyBoard]:
    """Serve `board` with `plan`; the URIs carry client settings fit for the faults (a
    `timeout` shorter than `plan.delay_s`, so a delayed reply is a timeout). `lock`: the
    board's ownership, as `serve` takes it."""
    common = f"timeout={timeout}&attempts={attempts}&backoff={backoff}"
    framed_q = f"{common}&ack_timeout={ack_timeout}"
    with serve(board, plan=plan, ack_timeout=ack_timeout, scpi_pty=False, lock=lock) as served:
        yield FaultyBoard(
            served,
            visa_uri=f"{served.uris['visa-tcp'].split('?', 1)[0]}?check=1&{common}",  # whatever the plan
            serial_uri=f"{served.uris['serial-socket']}?{framed_q}",
            serial_pty_uri=f"{served.uris['serial-pty']}?{framed_q}",
        )
