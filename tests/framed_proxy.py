"""A TCP proxy between a host and a board's framed server that rewrites frames on the way:
the emulated board behind it then behaves like firmware with one link-layer bug (no ACK
frames, replies without START, a CRC over the payload only) or with other HELLO fields
(`max_fragment`, `max_message`, `piggyback`). Tests of the host's framed link use it; the
board's operations stay the emulator's.

A rule takes one decoded frame and returns the bytes to forward (`frames.encode` of the
same or another frame, or anything else) or None to drop it. Chunks that do not decode are
forwarded as they came.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
import zlib
from collections.abc import Callable

from cobs import cobs

from drivers.wire import frames
from drivers.wire.frames import Flag, Frame, FrameError, LinkOp

Rule = Callable[[Frame], bytes | None]


def forward(frame: Frame) -> bytes:
    return frames.encode(frame)


def payload_crc(frame: Frame) -> bytes:
    """`frame` with its CRC over the payload only (a common firmware mistake)."""
    body = frames.HEADER.pack(
        frames.VERSION, frame.flags, frame.opcode, frame.ref, frame.seq, len(frame.payload)
    )
    body += frame.payload
    return b"\x00" + cobs.encode(body + struct.pack("<I", zlib.crc32(frame.payload))) + b"\x00"


def is_hello_reply(frame: Frame) -> bool:
    return frame.opcode == LinkOp.HELLO and bool(frame.flags & Flag.RESPONSE)


def with_json(frame: Frame, **fields: object) -> Frame:
    """A HELLO frame whose JSON has `fields` set (None: removed)."""
    data = json.loads(frame.payload or b"{}")
    for key, value in fields.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return frame._replace(payload=json.dumps(data).encode())


class FrameProxy:
    """Listens on 127.0.0.1 (`port`) and relays each connection to `target_port`, frames
    board -> host through `to_host` and host -> board through `to_board`."""

    def __init__(self, target_port: int, *, to_host: Rule = forward, to_board: Rule = forward) -> None:
        self.target_port = target_port
        self.to_host = to_host
        self.to_board = to_board
        self.host_frames: list[Frame] = []  # every frame the host sent, as decoded
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def uri(self) -> str:
        return f"serial+socket://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                host, _ = self._server.accept()
            except OSError:
                return
            board = socket.create_connection(("127.0.0.1", self.target_port))
            for s in (host, board):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sockets += [host, board]
            threading.Thread(target=self._pump, args=(host, board, self.to_board, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(board, host, self.to_host, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, rule: Rule, from_host: bool) -> None:
        deframer = frames.Deframer()
        with contextlib.suppress(OSError):
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                for chunk in deframer.feed(data):
                    try:
                        frame = frames.decode(chunk)
                    except FrameError:
                        dst.sendall(b"\x00" + chunk + b"\x00")
                        continue
                    if from_host:
                        self.host_frames.append(frame)
                    out = rule(frame)
                    if out is not None:
                        dst.sendall(out)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._stop.set()
        self._server.close()
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.close()

    def __enter__(self) -> FrameProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
