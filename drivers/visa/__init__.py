"""SCPI over VISA: ``visa://RESOURCE[?backend=@py&timeout=10]``.

RESOURCE is any VISA message-based resource, e.g. ``TCPIP0::127.0.0.1::5025::SOCKET`` or
``ASRL/dev/ttyUSB0::INSTR``. The VISA library is pyvisa-py (``@py``) unless `backend`
names another (``@ivi`` for NI-VISA/Keysight). Bulk data moves as IEEE 488.2 blocks of
little-endian float32 / int32 through pyvisa's binary-value calls; the command set is in
docs/protocol.md. After every command without a reply the error queue is read; a query
that fails replies with an empty block and its error is read from the queue.

``?check=1`` turns on checked mode (docs/protocol.md, section 2): every message and every
response carries a CRC-32, so bytes corrupted on a noisy serial line are detected (and the
transaction retried) instead of being taken for data. A serial (ASRL) resource is checked
unless the URI says ``check=0``: its line checks no byte, where TCP has its checksums.
Non-idempotent commands carry a request id after their block, so the messages are built
here rather than by pyvisa's ``write_binary_values`` (the bytes are the same: header,
block, terminator).

The raw I/O (the fast path on a pyvisa-py session's socket or serial port, and the
translation of VISA and socket errors) is in `drivers.visa.io`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import re
import select
import socket
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import numpy as np

from drivers.base import Meter, SafetyCounters
from drivers.errors import (
    ConfigurationError,
    Corrupted,
    DeviceError,
    DeviceFault,
    DeviceTimeout,
    ProtocolError,
    Unreachable,
)
from drivers.options import QueryOptions
from drivers.uri import Backend
from drivers.visa.io import IoErrors, SerialIO, SocketIO, serial_fd, unreachable
from drivers.wire import codes, frames, scpi
from drivers.wire import payload as pl
from drivers.wire.client import (
    DEFAULT_ATTEMPTS,
    DEFAULT_BACKOFF_S,
    MAX_ATTEMPTS,
    MAX_TIMEOUT_S,
    NOT_RETRIED,
    RemoteDevice,
    check_timeout,
    is_text,
    other_port,
    other_protocol,
    preview,
    probe_tcp,
)
from drivers.wire.payload import LEASE_MAX_S, LEASE_MIN_S, Message, Op

log = logging.getLogger("drivers.visa")  # DEBUG: every SCPI line sent and received (docs/bringup.md)

DEFAULT_TIMEOUT_S = 10.0
CHUNK = 1 << 20
FAST_MIN = 1 << 16  # blocks at least this long are received with `_read_direct`
MAX_ERRORS = 64
VISA_TIMEOUT_INFINITE_MS = 0xFFFFFFFF  # VI_TMO_INFINITE: a finite VISA timeout is below it (49.7 days)
LATE_REPLY_S = 2.0  # how long a first query that timed out waits on for a late reply (a slow board)
MAX_ERROR_LINE = 1024  # bytes of an error line read where a block belongs
_ERROR_START = re.compile(rb"-\d[\d,]")  # the first three bytes of an error string (-360,"...")


@functools.cache
def _short(spec: str) -> str:
    return scpi.short_form(spec)


def _is_frame(chunk: bytes) -> bool:
    """Whether `chunk` (bytes between two 0x00 delimiters) decodes as a frame of the framed protocol."""
    if not chunk:
        return False
    try:
        frames.decode(chunk)
    except ProtocolError:
        return False
    return True


class _NotABlock(ProtocolError):
    """Bytes read where a reply's block, or a checked response, belongs that are not one (`got`)."""

    def __init__(self, message: str, got: bytes) -> None:
        super().__init__(message)
        self.got = got


class VisaDevice(RemoteDevice):
    def __init__(
        self,
        resource: str,
        *,
        backend: str = "@py",
        timeout: float = DEFAULT_TIMEOUT_S,
        fast: bool = True,
        check: bool | None = None,
        attempts: int = DEFAULT_ATTEMPTS,
        backoff: float = DEFAULT_BACKOFF_S,
        baud: int | None = None,
        lock: bool = True,
        lease: float | None = None,
    ) -> None:
        super().__init__(f"visa://{resource}", attempts=attempts, backoff=backoff, lock=lock, lease=lease)
        if baud is not None and not resource.upper().startswith("ASRL"):
            raise ConfigurationError(
                f"visa://{resource}: baud= is the line rate of a serial (ASRL) resource; this one is "
                "not serial: leave baud out"
            )
        self.baud = baud  # None: the VISA library's default (9600 for pyvisa-py's ASRL sessions)
        self.fast = fast
        # checked mode; None: on for a serial (ASRL) resource, whose line checks no byte (TCP
        # has its own checksums), off for the others
        serial = resource.upper().startswith("ASRL")
        self.check = serial if check is None else check
        self._check_asked = check is not None
        self.resource_name = resource
        self.backend = backend
        self._rm: Any = None
        self._res: Any = None
        self._fast_io: SocketIO | None = None  # pyvisa-py TCP sessions with `fast`
        self.timeout = timeout

    @property
    def timeout(self) -> float:
        """Seconds to wait for a reply, or for the board to take the bytes of a request.
        Set it at any time: the open session (pyvisa's and the fast path's) takes it at once."""
        return self._timeout

    @timeout.setter
    def timeout(self, seconds: float) -> None:
        self._timeout = check_timeout(self.name, seconds)
        if self._fast_io is not None:
            self._fast_io.timeout = self._timeout
        if self._res is not None:  # whole ms, or infinite past what VISA can count
            ms = int(self._timeout * 1000)
            self._res.timeout = ms if ms < VISA_TIMEOUT_INFINITE_MS else math.inf

    # -- link
    def _connect(self) -> None:
        import pyvisa

        self._fast_io = None
        if self._rm is None:
            self._rm = self._resource_manager()
        try:
            with self._io("open"):
                self._res = self._rm.open_resource(
                    self.resource_name,
                    read_termination="\n",
                    write_termination="\n",
                    timeout=int(self.timeout * 1000),
                )
        except DeviceError as exc:
            # no connection at all (refused, a host that does not resolve or answer, no such
            # serial port): as serial:// and serial+socket:// say it, a ConfigurationError, which
            # a first open raises at once (another try finds the same address) and a reconnect
            # of a link that was up retries with the rest of its budget (`RemoteDevice._recover`)
            raise Unreachable(f"{exc} {NOT_RETRIED}") from exc
        session = getattr(self._rm.visalib, "sessions", {}).get(self._res.session)
        sock = getattr(session, "interface", None)
        if isinstance(sock, socket.socket) and (err := sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)):
            # pyvisa-py connects without blocking and opens the session once the socket is
            # ready, which a refused connect is too: its error would come at the first write
            self._disconnect()
            refused = OSError(err, os.strerror(err))
            raise Unreachable(f"{unreachable(self.name, 'open', refused)} {NOT_RETRIED}")
        with self._io("open"):
            self._res.chunk_size = CHUNK
            if self.baud is not None:
                self._res.baud_rate = self.baud
            if hasattr(session, "max_recv_size"):  # pyvisa-py TCP reads 4 KiB per recv otherwise
                session.max_recv_size = CHUNK
            if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
                # pyvisa-py leaves Nagle on: a message written in two pieces (a command and its
                # error query) then waits for the board's delayed ACK, ~40 ms
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self.fast and isinstance(getattr(session, "_pending_buffer", None), bytearray):
                    self._fast_io = SocketIO(session, sock, self.timeout, self.name)
            elif self.fast and self.resource_name.upper().startswith("ASRL"):
                fd = serial_fd(session)
                if fd is not None:
                    self._fast_io = SerialIO(fd, self.timeout, self.name)
            if self.resource_name.upper().startswith("ASRL"):  # drop what a previous session left
                with contextlib.suppress(pyvisa.errors.VisaIOError):
                    self._res.flush(pyvisa.constants.BufferOperation.discard_read_buffer)
            if self.check:  # checked mode first, then a checked *CLS (clears what garbage queued)
                self._res.write(f"{_short(scpi.CHECK_MODE)} ON")
                try:
                    self._read_checked_line("checked mode")
                except ProtocolError as exc:
                    if self._check_asked:
                        raise
                    raise ProtocolError(
                        f"{exc}; a serial resource runs in checked mode unless its URI says check=0 "
                        "(a board that does not speak it, docs/protocol.md section 2, is then unchecked)"
                    ) from None
                self._send(f"{scpi.CLS};{scpi.OPC_Q}")
                if self._read_checked_line(scpi.CLS) != b"1":
                    raise ProtocolError(f"{self.name}: the board did not confirm {scpi.CLS} in checked mode")
            else:
                if self.resource_name.upper().startswith("ASRL"):
                    # a serial line is one session for its whole life: a host before this one may
                    # have left it in checked mode, where an unsealed message is not run. Sealed,
                    # this one runs in either mode (outside it the trailer is ignored) and is
                    # answered in neither (checked mode is off once it has run)
                    self._res.write_raw(scpi.seal_request(f"{_short(scpi.CHECK_MODE)} OFF".encode("ascii")))
                self._res.write(scpi.CLS)

    def _resource_manager(self) -> Any:
        """pyvisa's resource manager of `backend`; a VISA library that cannot be loaded (NI-VISA
        not installed for ``@ivi``, a wrong path) or a backend pyvisa does not know is a
        ConfigurationError of this computer's set-up, said in one line and not retried: no
        board was asked anything."""
        import pyvisa

        try:
            return pyvisa.ResourceManager(self.backend)
        except (OSError, ValueError) as exc:
            why = " ".join(str(exc).split()).rstrip(":")  # pyvisa's "Could not open VISA library:\n"
            default = "or leave backend= out to use the default @py (pyvisa-py, installed with xbar-hil)"
            if isinstance(exc, ValueError):
                raise ConfigurationError(
                    f"{self.name}: backend={self.backend} names no VISA library pyvisa knows ({why}): "
                    "give @ivi (NI-VISA, Keysight) or the path of a VISA library, or leave backend= out "
                    "for the default @py (pyvisa-py, installed with xbar-hil)"
                ) from None
            if self.backend.startswith("@"):
                fix = "install NI-VISA (or Keysight IO Libraries)"
            else:
                fix = "check the path of the VISA library"
            raise ConfigurationError(
                f"{self.name}: the VISA library of backend={self.backend} cannot be loaded on this "
                f"computer ({why}); the board was not asked anything: {fix}, {default}"
            ) from None

    def _first_contact_failed(self, exc: DeviceTimeout | ProtocolError) -> DeviceError | None:
        """No reply at all to the first query, not even late (LATE_REPLY_S more), bytes that
        are not SCPI text (a framed board's frames), or text of another protocol (an HTTP
        reply: a board's web port), mean a wrong port: said at once, not after every attempt's
        timeout. So does any other text read in place of the reply on a TCP connection, which
        is new, so holds no stale reply. A late reply (a slow board: text after a timeout) and
        text on a serial line (a stale reply of a session before) are retried as before."""
        if self.backend != "@py":
            return None  # another VISA library's buffers are not to be seen here
        if isinstance(exc, _NotABlock):
            got = exc.got + self._unread(0.0)
        elif isinstance(exc, DeviceTimeout):
            got = self._unread(late := min(self.timeout, LATE_REPLY_S))  # a slow board's late reply
        else:
            return None
        question = other_port("SCPI", "framed")
        if not got and self._unread_seen():
            named = self._named_peer(self.timeout + late)
            if named is not None:
                return named
            return DeviceTimeout(
                f"{self.name}: no reply at all to the first query, not a byte in {self.timeout + late:g} s: "
                f"{question} (a framed board ignores SCPI text). If it is the SCPI port: is the board "
                "on and running, and does its firmware answer a query that fails (IEEE 488.2 lets it "
                "stay silent; this protocol needs an empty reply, docs/protocol.md section 2)?"
            )
        if not got:
            return None
        protocol = other_protocol(got)
        if protocol is not None:
            return ProtocolError(
                f"{self.name}: this port answers {protocol}, not SCPI (the first reply: {preview(got)}): "
                "point the URI at the board's SCPI port (5025 by default; `hil emulator serve` prints "
                "the URIs of an emulated board)"
            )
        if is_text(got):
            if self._serial_line() or not isinstance(exc, _NotABlock):
                return None  # a stale reply, or a slow board's late one (after a timeout)
            return ProtocolError(
                f"{self.name}: the first reply is not SCPI's (a block, #<digits><length><bytes>): "
                f"{preview(got)}; is this the board's SCPI port (5025 by default)? `hil emulator serve` "
                "prints the URIs of an emulated board (docs/bringup.md)"
            )
        framed = ", 0x00-delimited frames as the framed binary protocol sends" if b"\x00" in got else ""
        return ProtocolError(
            f"{self.name}: the first reply is not SCPI text: {len(got)} bytes {preview(got)}{framed}; "
            f"{question}"
        )

    def _named_peer(self, waited: float) -> ProtocolError | None:
        """A TCPIP SOCKET port silent to the first query, sent a framed HELLO on a connection of
        its own: a framed board's answer names what is there and the URI to use; None where it
        stays silent too (or answers something else: the timeout's question stands)."""
        parts = self.resource_name.split("::")
        if len(parts) != 4 or not parts[0].upper().startswith("TCPIP") or parts[3].upper() != "SOCKET":
            return None
        host, port = parts[1], parts[2]
        if not port.isdigit():
            return None
        self._disconnect()  # first: a board may serve one connection at a time
        hello = pl.dumps({"version": frames.VERSION})
        got = probe_tcp(host, int(port), frames.encode(frames.Frame(int(frames.LinkOp.HELLO), 1, 0, hello)))
        if not any(_is_frame(chunk) for chunk in got.split(b"\x00")):
            return None
        return ProtocolError(
            f"{self.name}: no reply at all to the first query in {waited:g} s: this is a framed port "
            f"(a HELLO frame was answered with frames); open it as serial+socket://{host}:{port}, or "
            "point the visa:// URI at the board's SCPI port (5025 by default; `hil emulator serve` "
            "prints both URIs)"
        )

    def _unread_seen(self) -> bool:
        """Whether `_unread` sees the link's bytes (pyvisa-py's TCP sessions, and its serial
        ones through the fast path); pyvisa-py's own serial reads keep theirs."""
        return isinstance(self._fast_io, SerialIO) or not self.resource_name.upper().startswith("ASRL")

    def _unread(self, wait: float) -> bytes:
        """The bytes received and not read, after waiting up to `wait` seconds for a first one."""
        if isinstance(self._fast_io, SerialIO):
            io = self._fast_io
            if not io.buf and wait > 0:
                with contextlib.suppress(OSError, ValueError):
                    if select.select([io.fd], [], [], wait)[0]:
                        io._fill(io.buf)
            return bytes(io.buf)
        if not self._unread_seen() or self._rm is None or self._res is None:
            return b""
        session = getattr(self._rm.visalib, "sessions", {}).get(self._res.session)
        sock = getattr(session, "interface", None)
        if wait > 0 and not getattr(session, "_pending_buffer", None) and isinstance(sock, socket.socket):
            with contextlib.suppress(OSError, ValueError):
                select.select([sock], [], [], wait)
        return self._said_before_closing()

    def _disconnect(self) -> None:
        self._fast_io = None
        if self._res is not None:
            with contextlib.suppress(Exception):
                self._res.close()
            self._res = None

    def _io(self, what: str) -> IoErrors:
        """A context manager turning VISA, socket and parse errors during `what` into
        DeviceTimeout / ProtocolError (a class, not a generator: it wraps every transaction,
        each of which writes: the keep-alive's clock starts again here)."""
        self._sent_at = time.monotonic()
        return IoErrors(self, what)

    def _serial_line(self) -> bool:
        return self.resource_name.upper().startswith("ASRL")

    def _send_keepalive(self) -> None:
        """``*OPC?``: a query that only reads (`scpi.RAW_ALLOWED`), answered ``1`` at once."""
        reply = self._query_text(scpi.OPC_Q)
        if reply.strip() != "1":
            raise ProtocolError(f"{self.name}: keep-alive {scpi.OPC_Q} answered {reply[:40]!r}, expected '1'")

    # -- SCPI plumbing
    def _send(self, text: str, values: np.ndarray | None = None, tail: str = "") -> None:
        """One program message: `text`, then `values` as a block, then `tail`; sealed with
        its checksum in checked mode."""
        msg = text.encode("ascii")
        if values is not None:
            msg += scpi.block(np.ascontiguousarray(values).view(np.uint8).data)
        msg += tail.encode("ascii")
        if log.isEnabledFor(logging.DEBUG):
            block = "" if values is None else f"<block of {np.asarray(values).nbytes} bytes>"
            log.debug("%s >> %s%s%s", self.name, text, block, tail)
        data = scpi.seal_request(msg) if self.check else msg + scpi.TERMINATOR
        if self._fast_io is not None:
            self._fast_io.write(data)
        else:
            self._res.write_raw(data)

    def _read_line(self, what: str) -> bytes:
        """The next reply line, terminator included."""
        line = self._fast_io.read_line(what) if self._fast_io is not None else bytes(self._res.read_raw())
        log.debug("%s << %.200r", self.name, line)
        return line

    def _read_checked_line(self, what: str) -> bytes:
        raw = self._read_line(what)
        try:
            return scpi.open_response(raw.removesuffix(b"\n"))
        except ValueError as exc:
            self._raise_error_line(what, raw)
            if "mismatch" in str(exc):
                raise Corrupted(f"{self.name}: reply to {what}: {exc}") from None
            raise _NotABlock(f"{self.name}: reply to {what}: {exc}", raw) from None

    def _rest_of_line(self, what: str, io: SocketIO | None) -> bytes:
        """The bytes up to and including the next terminator (at most MAX_ERROR_LINE)."""
        out = bytearray()
        while len(out) < MAX_ERROR_LINE and not out.endswith(b"\n"):
            out += io.read_exact(1, what) if io is not None else self._res.read_bytes(1)
        return bytes(out)

    def _said_before_closing(self) -> bytes:
        """What the board sent that nobody has read, taken without waiting (pyvisa-py TCPIP
        sessions; b"" for others). A board that refuses a connection writes its reason and
        closes it, so a write of ours can fail before the reason is read."""
        if self._rm is None or self._res is None:
            return b""
        session = getattr(self._rm.visalib, "sessions", {}).get(self._res.session)
        pending = getattr(session, "_pending_buffer", None)
        got = bytearray(pending) if isinstance(pending, bytearray) else bytearray()
        sock = getattr(session, "interface", None)
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError, ValueError):
                while len(got) < MAX_ERROR_LINE and select.select([sock], [], [], 0)[0]:
                    chunk = sock.recv(MAX_ERROR_LINE)
                    if not chunk:
                        break
                    got += chunk
        return bytes(got)

    def _raise_error_line(self, what: str, line: bytes) -> None:
        """If `line`, read where the response to `what` belongs (a block, or a sealed line in
        checked mode), is an error string (``-360,"..."``), raise it as the board's refusal: a
        DeviceFault quoting it, which no retry gets past (sending again gets the same answer).
        A board writes one there when it will not serve the connection (the emulator's server
        over its `--max-connections`, before it closes the connection)."""
        found = scpi.error_line(line)
        if found is None:
            return
        code = found[0]
        text = line.strip().decode("ascii", "replace")
        hint = (
            "; a board refuses a connection so, e.g. one over its connection limit: close another "
            "session to it, or raise its limit (`hil emulator serve --max-connections N`)"
            if code == codes.COMMUNICATION_ERROR
            else ""
        )
        raise DeviceFault(
            code, f"{self.name}: in place of the reply to {what} the board sent the error {text}{hint}"
        )

    def _query_text(self, text: str) -> str:
        what = text.split(" ", 1)[0]
        with self._io(what):
            if self.check:
                self._send(text)
                return self._read_checked_line(what).decode("ascii", "replace")
            if self._fast_io is None:
                log.debug("%s >> %s", self.name, text)
                reply = str(self._res.query(text))
                log.debug("%s << %.200r", self.name, reply)
                return reply
            self._send(text)
            return self._read_line(what)[:-1].decode("ascii")  # as pyvisa's query decodes

    def _errors(self) -> list[tuple[int, str]]:
        found: list[tuple[int, str]] = []
        for _ in range(MAX_ERRORS):
            code, message = scpi.parse_error(self._query_text(_short(scpi.ERROR_Q)))
            if code == codes.NO_ERROR:
                break
            found.append((code, message))
        return found

    def _raise_queued(self, what: str, *, expected: bool, first: tuple[int, str] | None = None) -> None:
        errors = ([first] if first else []) + self._errors()
        if not errors:
            if expected:
                raise ProtocolError(f"{self.name}: empty reply to {what}, but the error queue is empty")
            return
        code, message = errors[0]
        exc = codes.error_for(code, message)
        if code == codes.COMMUNICATION_ERROR:  # the board saw a corrupted message: a link failure
            exc = Corrupted(
                f"{self.name}: the board received {what} corrupted ({message}); it did not run", not_run=True
            )
        for extra_code, extra in errors[1:]:
            exc.add_note(f"also queued: {extra_code} {extra}")
        raise exc

    def _command(self, text: str, tail: str = "") -> None:
        """A command without reply, then its error check (one round trip in checked mode)."""
        what = text.split(" ", 1)[0]
        with self._io(what):
            if not self.check:
                self._send(text, tail=tail)
                self._raise_queued(what, expected=False)
                return
            self._send(text, tail=f"{tail};{_short(scpi.ERROR_Q)}")
            body = self._read_checked_line(what)
            if not body:  # no response to its SYST:ERR?: the message was not run
                raise self._not_run(what)
            code, message = scpi.parse_error(body.decode("ascii", "replace"))
            if code != codes.NO_ERROR:
                self._raise_queued(what, expected=False, first=(code, message))

    @contextlib.contextmanager
    def _binary_input(self) -> Iterator[None]:
        """Stop reads ending at a newline, which binary data contains (~1 byte in 256)."""
        import pyvisa

        res = self._res
        serial_end = getattr(res, "end_input", None)
        with res.read_termination_context(None):
            if serial_end is not None:
                res.end_input = pyvisa.constants.SerialTermination.none
            try:
                yield
            finally:
                if serial_end is not None:
                    res.end_input = serial_end

    def _read_block(self, what: str, limit: int) -> bytearray:
        """The IEEE 488.2 block answering the query just written (data only, writable); raises
        the queued error if it is empty. Reads the header, then exactly the announced bytes
        (refusing more than `limit`, which only a corrupted header would announce); in
        checked mode, then the response check."""
        res, io = self._res, self._fast_io
        if io is not None:
            head = bytes(io.read_exact(2, what))
            digits, n, data = self._block_body(head, what, limit, io)
        else:
            with self._binary_input():
                head = bytes(res.read_bytes(2))
                digits, n, data = self._block_body(head, what, limit, None)
        if self.check:
            rest = data[-1:] + self._read_line(what)  # the check unit ';<crc>' and the terminator
            del data[-1:]
            crc = zlib.crc32(data, zlib.crc32(digits, zlib.crc32(head)))
            if rest[:1] != b";" or rest[-1:] != b"\n" or not rest[1:-1].isdigit() or int(rest[1:-1]) != crc:
                raise Corrupted(f"{self.name}: the reply to {what} failed its check (corrupted)")
        else:
            if data[-1:] != b"\n":
                raise ProtocolError(f"{self.name}: the block from {what} does not end with a newline")
            del data[-1:]
        log.debug("%s << block of %d bytes (%s)", self.name, n, what)
        if n == 0:
            self._raise_queued(what, expected=True)
        return data

    def _block_body(
        self, head: bytes, what: str, limit: int, io: SocketIO | None
    ) -> tuple[bytes, int, bytearray]:
        """After a block's first two bytes: its length digits, length and data (with the
        byte after it), read through `io` or (None) pyvisa-py in binary mode."""
        res = self._res

        def read(k: int) -> bytes | bytearray:
            return io.read_exact(k, what) if io is not None else res.read_bytes(k)

        if head[:1] != b"#" or not head[1:2].isdigit() or head[1:2] == b"0":
            if head.endswith(b"\n"):
                rest = b""
            else:
                rest = io.read_exact(1, what) if io is not None else res.read_bytes(1, break_on_termchar=True)
            got = head + bytes(rest)
            if _ERROR_START.fullmatch(got):  # the start of an error line: read it to its end
                got += self._rest_of_line(what, io)
                self._raise_error_line(what, got)
            if self.check and got == b"0\n":
                raise self._not_run(what)
            raise _NotABlock(f"{self.name}: expected a block from {what}, got {got!r}", got)
        digits = bytes(read(int(head[1:2])))
        if not digits.isdigit():
            raise ProtocolError(f"{self.name}: bad block length {digits!r} from {what}")
        n = int(digits)
        if n > limit:
            raise ProtocolError(f"{self.name}: {what} announced a block of {n} bytes, at most {limit}")
        data = self._read_direct(n + 1) if n >= FAST_MIN else None
        if data is None and io is not None:
            data = io.read_exact(n + 1, what)
        elif data is None:
            data = bytearray(res.read_bytes(n + 1, chunk_size=max(n + 1, CHUNK)))
        return digits, n, data

    def _not_run(self, what: str) -> Corrupted:
        """A checked-mode request answered ``0``, the sealed empty response: the board did not
        run it, as its checksum failed (it queued -360; docs/protocol.md, section 2)."""
        return Corrupted(
            f"{self.name}: the board did not run {what}: the request reached it corrupted (its "
            "checksum failed, so the board answered the empty checked response 0 and queued -360)",
            not_run=True,
        )

    def _read_direct(self, n: int) -> bytearray | None:
        """pyvisa-py TCPIP SOCKET only: receive `n` bytes straight into one buffer.

        pyvisa-py copies a bulk read about six times in Python (its pending buffer, slices,
        `read_bytes`), which caps a 2 MiB read at a tenth of the socket's speed. This reads
        the same socket after taking what pyvisa-py already buffered, so the two never
        disagree about the stream. None when the session is not of that kind (NI-VISA,
        serial) or `fast=0` was given: the caller then uses `read_bytes`."""
        session = getattr(self._rm.visalib, "sessions", {}).get(self._res.session) if self.fast else None
        sock = getattr(session, "interface", None)
        pending = getattr(session, "_pending_buffer", None)
        if not isinstance(sock, socket.socket) or not isinstance(pending, bytearray):
            return None
        out = bytearray(n)
        got = min(len(pending), n)
        out[:got] = pending[:got]
        del pending[:got]
        view = memoryview(out)
        deadline = time.monotonic() + self.timeout
        while got < n:
            ready, _, _ = select.select([sock], [], [], max(deadline - time.monotonic(), 0))
            if not ready:
                raise DeviceTimeout(f"{self.name}: block stalled after {got} of {n} bytes")
            k = sock.recv_into(view[got:])
            if not k:
                raise ProtocolError(f"{self.name}: connection closed after {got} of {n} bytes")
            got += k
        return out

    def _query_json(self, text: str, *, values: np.ndarray | None = None, tail: str = "") -> Any:
        what = text.split(" ", 1)[0]
        with self._io(what):
            self._send(text, values, tail)
            return pl.loads(self._read_block(what, pl.MAX_JSON))

    def _fetch(self, meta: Any, op: str, limit: int) -> Message:
        """The arrays a report JSON announces, fetched with FETC:DATA?; the layout is checked
        (pl.layout_size) and its size bounded by `limit`, the most the request can return,
        before a byte is read."""
        if not isinstance(meta, dict):
            raise ProtocolError(f"{self.name}: malformed {op} reply: expected a JSON object")
        if not meta.get("arrays"):
            return pl.from_parts(meta)
        what = _short(scpi.FETCH_DATA_Q)
        size = pl.layout_size(meta["arrays"])
        if size > limit:
            raise ProtocolError(
                f"{self.name}: malformed {op} reply: its arrays announce {size} bytes, "
                f"the request can return at most {limit}"
            )
        with self._io(what):
            self._send(what)
            return pl.from_parts(meta, self._read_block(what, size))

    def _query_array(self, text: str, size: int, values: np.ndarray | None = None) -> np.ndarray:
        what = text.split(" ", 1)[0]
        with self._io(what):
            self._send(text, values)
            return np.frombuffer(self._read_block(what, 4 * size), "<f4")

    def _settle_reply_bound(self, request: Message) -> int:
        """Bytes a settle reply can hold for `request`: states and energies of its batch, and
        a trace of at most max_steps // every + 2 records (capped at `pl.MAX_REPLY`)."""
        topo = self.topology
        clamp = next((x for k, x in request.arrays.items() if k.startswith("clamp/")), None)
        if topo is None or clamp is None:
            return pl.MAX_REPLY
        per_record = 4 * clamp.shape[0] * (sum(topo.groups.values()) + 1)
        trace = request.meta.get("trace", False)
        every = int(trace)
        records = topo.budget.max_steps // every + 2 if every else 0
        return min(per_record + records * (per_record + 8), pl.MAX_REPLY)

    def _shape(self, tile: str) -> tuple[int, int]:
        if self.topology is None:
            raise ConfigurationError("the device has no topology yet; call configure(topology) first")
        return self.topology.tile_shape(tile)

    # -- one SCPI command per operation
    def _call(self, op: Op, request: Message) -> Message:
        """The operation's own method (`_CALLS`: a dict, not a chain of comparisons; an enum
        member's look-up costs 0.1 us, a dozen of them more than the rest of a safety())."""
        fn = _CALLS.get(op)
        if fn is None:
            raise ProtocolError(f"operation {op!r} has no SCPI command")
        m = request.meta
        return fn(self, request, m, request.arrays, f",{m['rid']}" if "rid" in m else "")

    def _op_info(self, request: Message, m: dict[str, Any], a: dict[str, np.ndarray], rid: str) -> Message:
        return Message(self._query_json(_short(scpi.INFO_Q)))

    def _op_topology(
        self, request: Message, m: dict[str, Any], a: dict[str, np.ndarray], rid: str
    ) -> Message:
        return Message(self._query_json(_short(scpi.TOPOLOGY_Q)))

    def _op_status(self, request: Message, m: dict[str, Any], a: dict[str, np.ndarray], rid: str) -> Message:
        return Message(self._query_json(_short(scpi.STATE_Q)))

    def _op_begin(self, request: Message, m: dict[str, Any], a: dict[str, np.ndarray], rid: str) -> Message:
        self._command(f"{_short(scpi.BEGIN)} {scpi.quote(m['tag'])}")
        return Message()

    def _op_commit(self, request: Message, m: dict[str, Any], a: dict[str, np.ndarray], rid: str) -> Message:
        self._command(f"{_short(scpi.COMMIT)} {scpi.quote(m['tag'])}")
        return Message()

    def _op_configure(
        self, request: Message, m: dict[str, Any], a: dict[str, np.ndarray], rid: str
    ) -> Message:
        self._command(f"{_short(scpi.TOPOLOGY)} {scpi.block(pl.dumps(m)).decode('ascii')}")
        return Message()

    def _op_program(self, request: Message, m: dict[str, Any], a: dict[str, np.ndarray], rid: str) -> Message:
        tol = "DEF" if m["tol"] is None else scpi.number(m["tol"])
        head = f"{_short(scpi.PROGRAM_Q)} {scpi.quote(m['tile'])},{int(m['verify'])},{tol},{m['max_iters']},"
        values = np.concatenate([a["g_plus"].ravel(), a["g_minus"].ravel()]).astype("<f4", copy=False)
        return self._fetch(self._query_json(head, values=values, tail=rid), "program", 4 * values.size)

    def _op_pulse(self, request: Message, m: dict[str, Any], a: dict[str, np.ndarray], rid: str) -> Message:
        head = f"{_short(scpi.PULSE_Q)} {scpi.quote(m['tile'])},"
        values = np.concatenate([a["counts_plus"].ravel(), a["counts_minus"].ravel()]).astype("<i4")
        return Message(self._query_json(head, values=values, tail=rid))

    def _op_read_conductance(
        self, request: Message, m: dict[str, Any], a: dict[str, np.ndarray], rid: str
    ) -> Message:
        rows, cols = self._shape(m["tile"])
        g = self._query_array(f"{_short(scpi.CONDUCTANCE_Q)} {scpi.quote(m['tile'])}", 2 * rows * cols)
        if g.size != 2 * rows * cols:
            raise ProtocolError(
                f"{self.name}: conductance block of {g.size} values, expected {2 * rows * cols}"
            )
        g = g.reshape(2, rows, cols)
        return pl.conductance_reply(g[0], g[1])

    def _op_mvm(self, request: Message, m: dict[str, Any], a: dict[str, np.ndarray], rid: str) -> Message:
        x = a["x"]
        rows, cols = self._shape(m["tile"])
        head = f"{_short(scpi.MVM_Q)} {scpi.quote(m['tile'])},{int(m['transpose'])},"
        width = rows if m["transpose"] else cols
        y = self._query_array(head, x.shape[0] * width, x.ravel().astype("<f4", copy=False))
        if y.size != x.shape[0] * width:
            raise ProtocolError(f"{self.name}: mvm block of {y.size} values, expected {x.shape[0] * width}")
        return Message({}, {"y": y.reshape(x.shape[0], width)})

    def _op_settle(self, request: Message, m: dict[str, Any], a: dict[str, np.ndarray], rid: str) -> Message:
        spec = pl.meta_json(request).decode("ascii")
        head = f"{_short(scpi.SETTLE_Q)} {scpi.block(spec.encode()).decode('ascii')},"
        values = pl.pack_arrays(a) if a else b""
        reply = self._query_json(head, values=np.frombuffer(values, np.uint8))
        return self._fetch(reply, "settle", self._settle_reply_bound(request))

    def _op_wait(self, request: Message, m: dict[str, Any], a: dict[str, np.ndarray], rid: str) -> Message:
        self._command(f"{_short(scpi.WAIT)} {scpi.number(m['seconds'])}", tail=rid)
        return Message()

    def _op_safety(self, request: Message, m: dict[str, Any], a: dict[str, np.ndarray], rid: str) -> Message:
        with self._io("SYST:SAF?"):
            text = self._query_text(_short(scpi.SAFETY_Q))
            if not text.strip():
                self._raise_queued("SYST:SAF?", expected=True)
        try:
            refused, violations = (int(v) for v in text.split(","))
        except ValueError:
            raise ProtocolError(f"{self.name}: malformed safety reply {text!r}") from None
        return pl.safety_reply(SafetyCounters(refused, violations))

    def _op_meter(self, request: Message, m: dict[str, Any], a: dict[str, np.ndarray], rid: str) -> Message:
        what = _short(scpi.METER_Q)
        with self._io(what):
            text = self._query_text(what)
            if not text.strip():
                self._raise_queued(what, expected=True)
        try:
            clock, energy, calls = text.split(",")
            return pl.meter_reply(Meter(float(clock), float(energy), int(calls)))
        except ValueError:
            raise ProtocolError(f"{self.name}: malformed meter reply {text!r}") from None

    def _op_wear(self, request: Message, m: dict[str, Any], a: dict[str, np.ndarray], rid: str) -> Message:
        """The wear JSON block, read as one line (JSON holds no raw newline): firmware that
        predates the query answers it with an empty line (-113 queued), which a block read would
        wait on for a second byte until its timeout, and then retry."""
        what = _short(scpi.WEAR_Q)
        with self._io(what):
            text = self._query_text(what)
            if not text.strip() or text == "#10":
                self._raise_queued(what, expected=True)
        digits = text[1:2]
        if text[:1] != "#" or not digits.isdigit() or digits == "0":
            raise ProtocolError(f"{self.name}: expected a block from {what}, got {text[:40]!r}")
        length, body = text[2 : 2 + int(digits)], text[2 + int(digits) :]
        if not length.isdigit() or int(length) != len(body):
            raise ProtocolError(
                f"{self.name}: the block from {what} announces {length!r} bytes, holds {len(body)}"
            )
        return Message(pl.loads(body.encode("ascii")))

    def _op_acquire(self, request: Message, m: dict[str, Any], a: dict[str, np.ndarray], rid: str) -> Message:
        lease = f",{scpi.number(m['lease_s'])}" if "lease_s" in m else ""  # only when asked: older firmware
        return Message(self._query_json(f"{_short(scpi.LOCK_ACQUIRE_Q)} {scpi.quote(m['token'])}{lease}"))

    def _op_owner(self, request: Message, m: dict[str, Any], a: dict[str, np.ndarray], rid: str) -> Message:
        return Message(self._query_json(_short(scpi.LOCK_OWNER_Q)))

    def _op_release(self, request: Message, m: dict[str, Any], a: dict[str, np.ndarray], rid: str) -> Message:
        self._command(f"{_short(scpi.LOCK_RELEASE)} {scpi.quote(m['token'])}")
        return Message()

    def _op_break(self, request: Message, m: dict[str, Any], a: dict[str, np.ndarray], rid: str) -> Message:
        self._command(_short(scpi.LOCK_BREAK))
        return Message()

    def _op_reset(self, request: Message, m: dict[str, Any], a: dict[str, np.ndarray], rid: str) -> Message:
        self._command(scpi.RST)
        return Message()

    def _op_safe_state(
        self, request: Message, m: dict[str, Any], a: dict[str, np.ndarray], rid: str
    ) -> Message:
        self._command(_short(scpi.SAFE))
        return Message()

    # -- extras for lab use
    def _check_raw(self, method: str, text: str) -> None:
        """Raw text reaches the board with none of the host's limit checks, so only what reads
        (`scpi.RAW_ALLOWED`) is sent; anything that drives or changes the board is refused,
        naming the typed operation that checks it (`scpi.raw_refusal`)."""
        why = scpi.raw_refusal(text)
        if why is not None:
            raise ConfigurationError(f"{self.name}: {method}({text[:80]!r}) refused, nothing sent: {why}")

    def query(self, text: str) -> str:
        """Send a SCPI query that only reads (``*IDN?``, ``SYST:ERR?``, ``SYST:INFO?``,
        ``SYST:SAF?``, ``SYST:STAT?``, ``SYST:WEAR?`` ...: `scpi.RAW_ALLOWED`) under the device
        lock and return its reply. A message that drives or changes the board (program, pulse,
        mvm, settle, a read of the arrays, configure, wait, reset, safe state, ownership,
        checked mode) is refused with `ConfigurationError` naming the typed method to call:
        raw text would skip the host's limit checks."""
        self._check_raw("query", text)
        with self.lock:
            return self._query_text(text)

    def query_unchecked(self, text: str) -> str:
        """Send one raw SCPI query exactly as given, without the host's limit checks, and return
        its reply. For conformance suites (`hil conformance`, as `RemoteDevice.send_unchecked` on
        the framed link): the host refuses a bad request before sending it, so only an unchecked
        one shows whether the board refuses it too. Not for normal use: `query` reads, the typed
        operations drive."""
        with self.lock:
            return self._query_text(text)

    def write(self, text: str) -> None:
        """Send a SCPI command that changes nothing on the arrays (``*CLS``, ``*ESE n``,
        ``*SRE n``, ``*OPC``, ``*WAI``, or reading queries: `scpi.RAW_ALLOWED`) under the device
        lock; no error check (in checked mode its empty response is read). Anything else is
        refused as `query` refuses it."""
        self._check_raw("write", text)
        with self.lock, self._io(text):
            self._send(text)
            if self.check:
                self._read_checked_line(text)


_CALLS: dict[Op, Callable[..., Message]] = {
    Op.INFO: VisaDevice._op_info,
    Op.TOPOLOGY: VisaDevice._op_topology,
    Op.STATUS: VisaDevice._op_status,
    Op.BEGIN: VisaDevice._op_begin,
    Op.COMMIT: VisaDevice._op_commit,
    Op.CONFIGURE: VisaDevice._op_configure,
    Op.PROGRAM: VisaDevice._op_program,
    Op.PULSE: VisaDevice._op_pulse,
    Op.READ_CONDUCTANCE: VisaDevice._op_read_conductance,
    Op.MVM: VisaDevice._op_mvm,
    Op.SETTLE: VisaDevice._op_settle,
    Op.WAIT: VisaDevice._op_wait,
    Op.SAFETY: VisaDevice._op_safety,
    Op.METER: VisaDevice._op_meter,
    Op.WEAR: VisaDevice._op_wear,
    Op.RESET: VisaDevice._op_reset,
    Op.SAFE_STATE: VisaDevice._op_safe_state,
    Op.ACQUIRE: VisaDevice._op_acquire,
    Op.OWNER: VisaDevice._op_owner,
    Op.RELEASE: VisaDevice._op_release,
    Op.BREAK: VisaDevice._op_break,
}


@dataclasses.dataclass(frozen=True)
class VisaOptions(QueryOptions):
    """``visa://RESOURCE?backend=@py&timeout=10&fast=1&check=0&attempts=4&backoff=0.05[&baud=N]&lock=1[&lease=S]``"""

    LABEL: ClassVar[str] = "visa"

    backend: str = "@py"  # the VISA library: @py (pyvisa-py), @ivi (NI-VISA, Keysight), a path
    timeout: float = dataclasses.field(
        default=DEFAULT_TIMEOUT_S, metadata={"gt": 0, "le": MAX_TIMEOUT_S}
    )  # seconds
    fast: bool = True  # receive large blocks straight from pyvisa-py's TCP socket
    # checked mode: CRC-32 on every message and response; None: on for a serial (ASRL) resource
    check: bool | None = None
    attempts: int = dataclasses.field(default=DEFAULT_ATTEMPTS, metadata={"ge": 1, "le": MAX_ATTEMPTS})
    backoff: float = dataclasses.field(default=DEFAULT_BACKOFF_S, metadata={"ge": 0})  # seconds
    # line rate of an ASRL (serial) resource, bits per second; None: the VISA library's default
    baud: int | None = dataclasses.field(default=None, metadata={"gt": 0, "le": 10_000_000})
    lock: bool = True  # take the board while open, if it announces ownership (docs/protocol.md)
    # seconds the board keeps this host's lock while no connection of it is open; None: the board's
    lease: float | None = dataclasses.field(default=None, metadata={"ge": LEASE_MIN_S, "le": LEASE_MAX_S})

    @classmethod
    def check_target(cls, target: str) -> None:
        if not target:
            raise ConfigurationError(
                "visa:// needs a VISA resource, e.g. visa://TCPIP0::127.0.0.1::5025::SOCKET "
                "or visa://ASRL/dev/ttyUSB0::INSTR"
            )


def open_visa(target: str, options: VisaOptions) -> VisaDevice:
    if options.backend == "@py":  # pyvisa-py knows no aliases: a name it cannot parse is a typo
        from pyvisa.rname import InvalidResourceName, parse_resource_name

        try:
            parse_resource_name(target)
        except InvalidResourceName as exc:
            raise ConfigurationError(
                f"visa://{target}: not a VISA resource string ({exc}); e.g. "
                "visa://TCPIP0::192.168.1.20::5025::SOCKET or visa://ASRL/dev/ttyUSB0::INSTR"
            ) from None
    return VisaDevice(target, **dataclasses.asdict(options)).open()


BACKEND = Backend("visa", open_visa, VisaOptions)
