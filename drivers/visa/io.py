"""The raw I/O of `drivers.visa.VisaDevice`: the fast path that reads and writes a pyvisa-py
session's socket or serial port directly (`SocketIO`, `SerialIO`, `serial_fd`), and the
translation of VISA, socket and parse errors into the driver's exceptions (`IoErrors`) with
the messages it builds (`no_reply`, `unreachable`, `unresolved`)."""

from __future__ import annotations

import os
import select
import socket
import time
from typing import TYPE_CHECKING, Any

from drivers.errors import DeviceTimeout, ProtocolError
from drivers.wire.scpi import MAX_LINE

if TYPE_CHECKING:
    from drivers.visa import VisaDevice

READ_SIZE = 1 << 16  # bytes per recv of the fast path (larger blocks: `VisaDevice._read_direct`)
_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)


def no_reply(name: str, what: str, timeout: float) -> str:
    """The timeout message of a query: the cable first, then the one firmware habit that
    looks the same (a failed query left unanswered, as IEEE 488.2 allows)."""
    return (
        f"{name}: no reply to {what} within {timeout:g} s (a board that leaves a failed query "
        "unanswered, as IEEE 488.2 allows, breaks this protocol: a failed query answers an empty "
        "line, #10 for a block, and queues its error; docs/protocol.md section 2); is the "
        "instrument on, and the resource string right?"
    )


# how pyvisa-py's TCPIP sessions word the plain Exception they raise when they cannot connect
_PYVISA_PY_CONNECT_FAILED = ("could not connect", "error creating link")


def unreachable(name: str, what: str, exc: BaseException) -> str:
    """The message of a board that cannot be reached (refused, reset, unreachable, no answer
    to the connect)."""
    return (
        f"{name}: cannot reach the board during {what} ({exc}); `hil emulator serve` prints the "
        "resource strings of an emulated board. Is the board on and serving at this address?"
    )


def unresolved(name: str, what: str, resource: str, exc: BaseException) -> str:
    """The message of a resource whose host name does not resolve."""
    from pyvisa.rname import parse_resource_name

    try:
        host = getattr(parse_resource_name(resource), "host_address", None)
    except Exception:  # not a resource string pyvisa parses: the resource names the host
        host = None
    where = f"the host name {host!r}" if host else f"the host of {resource}"
    return (
        f"{name}: cannot resolve {where} during {what} ({exc}); give the board's IP address, or check "
        "the name: is it spelt right, and known to this computer's DNS or hosts file?"
    )


class SocketIO:
    """Reads and writes of a pyvisa-py TCPIP SOCKET session done on its socket directly.

    pyvisa-py spends about as long in Python per small message as the whole round trip of a
    raw socket echo (attribute look-ups, a select and a 4 KiB-chunk loop per read, a select
    per 4 KiB written, status codes through three layers). These do the same with one
    select and one recv per read and one send per write. Bytes that pyvisa-py buffered
    past a terminator are taken first, and bytes read here past one are left in its
    buffer, so pyvisa-py calls and these can follow each other on the same stream. The
    device's `timeout` bounds every wait."""

    def __init__(self, session: Any, sock: socket.socket, timeout: float, name: str) -> None:
        self.session = session
        self.sock = sock
        self._waitable: socket.socket | int = sock
        self.timeout = timeout
        self.name = name
        # reads land here first: `recv(n)` allocates n bytes each call, and at 1 MiB that is
        # an mmap, an mremap and a munmap per reply
        self._scratch = bytearray(READ_SIZE)
        self._view = memoryview(self._scratch)

    def _pending(self) -> bytearray:
        """Bytes received and not yet taken."""
        return self.session._pending_buffer  # type: ignore[no-any-return]

    def _fill(self, pending: bytearray) -> int | None:
        """Append what is there to `pending`: bytes appended, 0 at end of stream, None if none."""
        n = self.sock.recv_into(self._scratch)
        pending += self._view[:n]
        return n

    def _send_some(self, view: memoryview) -> int:
        return self.sock.send(view, _DONTWAIT) if _DONTWAIT else self.sock.send(view)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        deadline = 0.0
        while view:
            try:
                view = view[self._send_some(view) :]
                continue
            except BlockingIOError:
                pass
            deadline = deadline or time.monotonic() + self.timeout
            _, ready, _ = select.select([], [self._waitable], [], max(deadline - time.monotonic(), 0.0))
            if not ready:
                raise DeviceTimeout(f"{self.name}: the board accepted no bytes for {self.timeout:g} s")

    def _more(self, pending: bytearray, deadline: float, what: str) -> None:
        """Append what arrives (within the deadline) to the pending bytes."""
        while True:
            ready, _, _ = select.select([self._waitable], [], [], max(deadline - time.monotonic(), 0.0))
            if not ready:
                raise DeviceTimeout(no_reply(self.name, what, self.timeout))
            n = self._fill(pending)
            if n == 0:
                raise ProtocolError(f"{self.name}: the board closed the connection during {what}")
            if n is not None:
                return

    def read_line(self, what: str) -> bytes:
        """Up to and including the next newline."""
        pending = self._pending()
        deadline = time.monotonic() + self.timeout
        searched = 0
        while (end := pending.find(b"\n", searched)) < 0:
            searched = len(pending)
            if searched > MAX_LINE:
                raise ProtocolError(f"{self.name}: reply to {what} has no terminator in {MAX_LINE} bytes")
            self._more(pending, deadline, what)
        line = bytes(pending[: end + 1])
        del pending[: end + 1]
        return line

    def read_exact(self, n: int, what: str) -> bytearray:
        pending = self._pending()
        deadline = time.monotonic() + self.timeout
        while len(pending) < n:
            self._more(pending, deadline, what)
        out = pending[:n]
        del pending[:n]
        return out


class SerialIO(SocketIO):
    """The same on a pyvisa-py ASRL session's serial port, through its file descriptor.

    pyvisa-py reads a serial reply one byte per call (a select and a read per byte: a
    kilobyte of JSON is two thousand system calls). pyserial keeps no buffer of its own on
    POSIX, so bytes read here past a reply wait here (`buf`); once this is in use, every
    read of the session goes through it."""

    def __init__(self, fd: int, timeout: float, name: str) -> None:
        self.fd = fd
        self._waitable = fd
        self.timeout = timeout
        self.name = name
        self.buf = bytearray()

    def _pending(self) -> bytearray:
        return self.buf

    def _fill(self, pending: bytearray) -> int | None:
        try:
            data = os.read(self.fd, READ_SIZE)
        except BlockingIOError:  # select said ready, the read found nothing: wait again
            return None
        pending += data
        return len(data)

    def _send_some(self, view: memoryview) -> int:
        return os.write(self.fd, view)


def serial_fd(session: Any) -> int | None:
    """The file descriptor of a pyvisa-py serial session's port (None: it has none)."""
    try:
        fd = session.interface.fileno()
    except Exception:  # no port, or one without a descriptor (Windows, a URL handler)
        return None
    return fd if isinstance(fd, int) and fd >= 0 else None


class IoErrors:
    """`VisaDevice._io`: VISA, socket and parse errors as the driver's exceptions."""

    __slots__ = ("device", "what")

    def __init__(self, device: VisaDevice, what: str) -> None:
        self.device = device
        self.what = what

    def __enter__(self) -> None:
        pass

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc is None:
            return
        import pyvisa

        name, what = self.device.name, self.what
        if isinstance(exc, pyvisa.errors.VisaIOError):
            if exc.error_code == pyvisa.constants.StatusCode.error_timeout:
                raise DeviceTimeout(no_reply(name, what, self.device.timeout)) from exc
            raise ProtocolError(f"{name}: VISA I/O error during {what}: {exc}") from exc
        if isinstance(exc, ValueError | pyvisa.errors.InvalidBinaryFormat):
            raise ProtocolError(f"{name}: malformed reply to {what}: {exc}") from exc
        if type(exc) is Exception and str(exc).startswith(_PYVISA_PY_CONNECT_FAILED):
            # pyvisa-py raises a plain Exception when it cannot open a TCPIP session (a host name
            # that does not resolve, a connect that times out); the socket error, if any, is its
            # context
            cause = exc.__context__
            if isinstance(cause, socket.gaierror):
                raise ProtocolError(unresolved(name, what, self.device.resource_name, cause)) from exc
            if isinstance(cause, OSError):
                raise ProtocolError(unreachable(name, what, cause)) from exc
            raise ProtocolError(unreachable(name, what, exc)) from exc
        if isinstance(exc, ConnectionResetError | BrokenPipeError):  # did it say why, before it closed?
            said = self.device._said_before_closing()
            if said:
                self.device._raise_error_line(what, said.split(b"\n", 1)[0] + b"\n")
        if isinstance(exc, socket.gaierror):
            raise ProtocolError(unresolved(name, what, self.device.resource_name, exc)) from exc
        if isinstance(exc, OSError):  # pyvisa-py lets socket errors through (refused, reset, unreachable)
            raise ProtocolError(unreachable(name, what, exc)) from exc
