"""A bare framed-protocol host on a served board's serial pty, for the tests of a host that
dies on a serial line (a line that never closes: the board sees a dead host only by its
silence): a `Link` straight over the pty's file descriptor, no `drivers.wire` device in
between to retry, keep alive or release anything, which the test can make stop reading,
stop writing, or stop writing once its next frame is out. Also `count_safe_states`, the times
the served board applied its safe state."""

from __future__ import annotations

import os
import select
import time
from types import TracebackType

from drivers.wire import payload as pl
from drivers.wire.frames import LinkOp
from drivers.wire.link import Link
from drivers.wire.payload import Message, Op
from hil.testing import BoardServers


def count_safe_states(s: BoardServers) -> list[float]:
    """Wrap the served board's `safe_state` (what SAFE_STATE runs): the times it was called."""
    calls: list[float] = []
    inner = s.device.safe_state
    s.device.safe_state = lambda: (calls.append(time.monotonic()), inner())[1]  # type: ignore[method-assign]
    return calls


class PtyHost:
    """The framed link of a host on the board's pty (`s.uris["serial-pty"]`). `reads` and
    `writes` False: it reads, or writes, nothing any more (a dead host's line: the board's
    writes fill it and wait); `die_after_next_write`: its next frame goes out, then it writes
    nothing (the ACK of a reply never comes)."""

    def __init__(self, s: BoardServers, ack_timeout: float = 0.25) -> None:
        path = s.uris["serial-pty"].removeprefix("serial://")
        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        self.reads = self.writes = True
        self._last_write = False
        self.link = Link(self._read, self._write, ack_timeout=ack_timeout)

    def _read(self, timeout: float) -> bytes:
        if not self.reads:
            return b""
        ready, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        return os.read(self.fd, 1 << 16) if ready else b""

    def _write(self, data: bytes | memoryview) -> None:
        if not self.writes:
            return
        view = memoryview(data)
        while view:
            select.select([], [self.fd], [], 1.0)
            view = view[os.write(self.fd, view) :]
        if self._last_write:
            self.writes = False

    def die_after_next_write(self) -> None:
        self._last_write = True

    def call(self, opcode: int, body: bytes) -> bytes:
        """One request and its reply's body (within 2 s)."""
        link = self.link
        got = link.receive(2.0, response=True, ref=link.send(opcode, body), opcode=opcode)
        assert got is not None, f"no reply to {opcode:#x}"
        return got[1]

    def acquire(self, token: str, lease_s: float) -> None:
        """HELLO, then take the board with `token` for a lease of `lease_s`."""
        self.call(LinkOp.HELLO, pl.dumps({}))
        asked = pl.pack(Message({"token": token, "lease_s": lease_s}))
        owner = pl.board_owner(pl.unpack(self.call(Op.ACQUIRE, asked)))
        assert owner.token == token and owner.lease_s == lease_s

    def __enter__(self) -> PtyHost:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        os.close(self.fd)
