"""A bare SCPI client for the tests that speak to an SCPI server over TCP byte by byte: exactly
the bytes a test chooses reach the server, and its replies come back line by line, unparsed
(no `drivers.visa` in between to check, retry or drain anything)."""

from __future__ import annotations

import socket
from types import TracebackType

from drivers.wire import scpi


class RawScpi:
    """A bare socket to an SCPI server. `where`: its TCP port on this host, or a VISA resource
    or URI of the server, ``TCPIP0::127.0.0.1::<port>::SOCKET``. Every send goes out at once
    (no Nagle delay); a reply that does not come within `timeout` seconds raises."""

    def __init__(self, where: int | str, timeout: float = 5.0) -> None:
        host, port = ("127.0.0.1", where) if isinstance(where, int) else where.split("::")[1:3]
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""  # what was received past the last line read

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        """The next line the server sent, without its newline."""
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            assert chunk, "the server closed the connection"
            self.buf += chunk
        out, _, self.buf = self.buf.partition(b"\n")
        return out

    def at_end(self) -> bool:
        """Whether the server closed the connection with nothing more to read."""
        return not self.buf and self.sock.recv(1) == b""

    def query(self, text: str) -> bytes:
        """Send the line `text` and read one reply line."""
        self.send(text.encode() + b"\n")
        return self.line()

    def ask(self, text: str) -> str:
        """`query`, decoded."""
        return self.query(text).decode()

    def error(self) -> tuple[int, str]:
        """The next entry of the error queue (``SYST:ERR?``): code and message."""
        return scpi.parse_error(self.ask("SYST:ERR?"))

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawScpi:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
