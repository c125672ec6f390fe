"""Framed binary server over any Device, on a pty (a serial port) and on TCP.

One thread per link runs the responder side of `drivers.wire.link.Link`: receive a
request, acknowledge it, run it, send the reply (or an ERROR reply with the code).
"""

from __future__ import annotations

import dataclasses
import threading
import time

from drivers.base import Device
from drivers.errors import ProtocolError
from drivers.wire import codes, frames
from drivers.wire import payload as pl
from drivers.wire.frames import Flag, LinkOp
from drivers.wire.link import Abandoned, Faults, Link
from drivers.wire.payload import Op
from emulator.server.dispatch import execute
from emulator.server.links import POLL_S, EndpointServer, Stream

_OPS = {int(op) for op in Op}


def _error(code: int, message: str) -> bytes:
    return pl.dumps({"code": code, "message": message})


class FramedServer(EndpointServer):
    """Serves one Device over the framed protocol on any number of ptys and TCP ports.

    `faults` is copied for each link, so every link sees the same injected faults."""

    def __init__(
        self,
        device: Device,
        faults: Faults | None = None,
        *,
        ack_timeout: float = 0.25,
        retries: int = 5,
    ) -> None:
        self.device = device
        self.faults = faults or Faults()
        self.ack_timeout = ack_timeout
        self.retries = retries
        super().__init__()
        self.links: list[Link] = []

    def _handler(self, stream: Stream, stopping: threading.Event) -> None:
        link = Link(
            stream.read,
            stream.write,
            ack_timeout=self.ack_timeout,
            retries=self.retries,
            faults=dataclasses.replace(self.faults),
        )
        self.links.append(link)
        while not stopping.is_set():
            got = link.receive(POLL_S, response=False)
            if got is None:
                continue
            first, body = got
            flags, reply = self._answer(link, first.opcode, body)
            try:
                link.send(first.opcode, reply, flags=Flag.RESPONSE | flags, ref=first.seq)
            except Abandoned:
                continue
            except Exception:  # the client went away mid-reply: wait for its next request
                link.drain()

    def _answer(self, link: Link, opcode: int, body: bytes) -> tuple[int, bytes]:
        try:
            if opcode == LinkOp.PING:
                return 0, body
            if opcode == LinkOp.HELLO:
                info = {"version": frames.VERSION, "max_fragment": frames.MAX_FRAGMENT, "time": time.time()}
                return 0, pl.dumps(info)
            if opcode == LinkOp.STATS:
                return 0, pl.dumps(link.stats.as_dict())
            if opcode not in _OPS:
                return Flag.ERROR, _error(codes.FRAME_ERROR, f"unknown opcode {opcode:#x}")
            try:
                request = pl.unpack(body)
            except ProtocolError as exc:
                return Flag.ERROR, _error(codes.FRAME_ERROR, str(exc))
            return 0, pl.pack(execute(self.device, Op(opcode), request))
        except Exception as exc:  # every device error becomes an ERROR reply; the link lives on
            return Flag.ERROR, _error(*codes.code_for(exc))
