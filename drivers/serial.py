"""Framed binary protocol over a serial port or TCP:

    serial:///dev/ttyACM0?baud=921600[&timeout=10&ack_timeout=0.25&retries=5]
    serial+socket://127.0.0.1:7000[?timeout=...]

pyserial opens the port (``serial_for_url("socket://HOST:PORT")`` for the socket form).
Every request and reply is a message of COBS/CRC-32 frames with sequence numbers, each
acknowledged, retransmitted on NACK or timeout up to `retries` times (docs/protocol.md).
A transaction that still fails is retried after a reconnect, `attempts` times in all
(`drivers.wire.client`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import select
import socket
import time
import urllib.parse
from typing import Any, ClassVar

import serial as pyserial

from drivers.errors import (
    ConfigurationError,
    DeviceError,
    DeviceTimeout,
    PortInUse,
    ProtocolError,
    Unreachable,
)
from drivers.options import QueryOptions
from drivers.uri import Backend
from drivers.wire import codes, frames
from drivers.wire import payload as pl
from drivers.wire.client import (
    DEFAULT_ATTEMPTS,
    DEFAULT_BACKOFF_S,
    MAX_ACK_TIMEOUT_S,
    MAX_ATTEMPTS,
    MAX_TIMEOUT_S,
    NOT_RETRIED,
    RemoteDevice,
    check_timeout,
    describe_request,
    is_text,
    message_too_large,
    other_port,
    other_protocol,
    preview,
    probe_tcp,
)
from drivers.wire.frames import Flag, LinkOp, LinkStats
from drivers.wire.link import Link, MessageTooLarge, ack_hold, smaller_timeout
from drivers.wire.payload import LEASE_MAX_S, LEASE_MIN_S, Message, Op

log = logging.getLogger("drivers.serial")  # DEBUG: each message's operation and size (docs/bringup.md)

DEFAULT_BAUD = 115200
DEFAULT_TIMEOUT_S = 10.0
POLL_S = 0.05
READ_SIZE = 1 << 16
_ERROR = int(Flag.ERROR)  # a plain int: IntFlag arithmetic costs a microsecond per reply


class _Closed(ProtocolError):
    """The board closed the link (end of stream, or a reset connection)."""


class SerialDevice(RemoteDevice):
    def __init__(
        self,
        url: str,
        *,
        name: str,
        baud: int = DEFAULT_BAUD,
        timeout: float = DEFAULT_TIMEOUT_S,
        ack_timeout: float = 0.25,
        retries: int = 5,
        fragment: int = frames.MAX_FRAGMENT,
        attempts: int = DEFAULT_ATTEMPTS,
        backoff: float = DEFAULT_BACKOFF_S,
        lock: bool = True,
        lease: float | None = None,
    ) -> None:
        super().__init__(name, attempts=attempts, backoff=backoff, lock=lock, lease=lease)
        self.url = url
        self.baud = baud
        self.ack_timeout = ack_timeout
        self.retries = retries
        self.fragment = fragment
        self._port: Any = None
        self._fd: int | None = None
        self._sock: socket.socket | None = None
        self.timeout = timeout
        self._link: Link | None = None
        self.board_hello: dict[str, Any] = {}  # the board's HELLO reply
        self.board_max_message: int | None = None  # the HELLO's max_message (None: not declared)
        self.stats = LinkStats()  # this end's counters, kept across reconnects
        self._heard = bytearray()  # the first bytes received on this connection (a wrong port's)
        self._frames0 = 0  # stats.frames_received and crc_errors when this connection opened
        self._crc0 = 0

    @property
    def timeout(self) -> float:
        """Seconds to wait for a reply once its request was acknowledged, or for the port to
        take a write. Set it at any time: the next wait uses it."""
        return self._timeout

    @timeout.setter
    def timeout(self, seconds: float) -> None:
        self._timeout = check_timeout(self.name, seconds)
        if self._port is not None and self._sock is None and self._fd is None:
            self._port.write_timeout = self._timeout  # only pyserial's own writes use it (see _write)

    # -- link
    def _connect(self) -> None:
        # a local port is opened exclusively (pyserial's flock on POSIX): two hosts sharing one
        # line would each read parts of the other's replies. URL handlers (socket://) take no lock
        exclusive = {"exclusive": True} if os.name == "posix" and "://" not in self.url else {}
        try:
            port = pyserial.serial_for_url(
                self.url, baudrate=self.baud, timeout=POLL_S, write_timeout=self.timeout, **exclusive
            )
        except pyserial.SerialException as exc:
            if exclusive and exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                raise PortInUse(
                    f"{self.name}: the port {self.url} is in use: another process (or another device "
                    "in this one) holds its exclusive lock, e.g. another host session on this board; "
                    f"close that first (`fuser {self.url}` names the processes that have it open)"
                ) from exc
            raise self._cannot_open(exc) from exc
        except ValueError as exc:
            raise self._cannot_open(exc) from exc
        self._sock = getattr(port, "_socket", None)  # socket:// ports: the TCP socket itself
        self._fd = None
        if self._sock is not None:
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no Nagle delay on frames
        else:
            port.reset_input_buffer()
            try:
                self._fd = port.fileno()
                port.timeout = 0  # reads return what is there; `_read` waits with select
            except (AttributeError, NotImplementedError, pyserial.SerialException):
                self._fd = None
        self._port = port
        self._heard.clear()
        self._frames0, self._crc0 = self.stats.frames_received, self.stats.crc_errors
        seq0 = int.from_bytes(os.urandom(2), "little")  # so a fresh session never looks like a retransmission
        self._link = Link(
            self._read,
            self._write,
            ack_timeout=self.ack_timeout,
            retries=self.retries,
            fragment=self.fragment,
            seq0=seq0,
            max_message=pl.MAX_REPLY,  # a board cannot make the host buffer more of one reply
        )
        self._link.stats = self.stats
        hello = {"version": frames.VERSION, "piggyback": True, "ack_timeout": self.ack_timeout}
        try:
            self.board_hello = pl.loads(self._exchange(LinkOp.HELLO, pl.dumps(hello)))
        except _Closed as exc:
            # the framed protocol has no message a board may send unprompted, so a board that
            # will not serve this connection (over its connection limit) closes it without a word
            raise ProtocolError(
                f"{self.name}: the board closed the connection before answering its HELLO "
                f"({str(exc).removeprefix(self.name + ': ')}); "
                "a board that will not serve a connection closes it so, e.g. one over its "
                "connection limit: is another session holding it (`hil emulator serve "
                "--max-connections N` admits N)?"
            ) from exc
        self._link.ack_delay = self._response_ack_delay(self.board_hello)
        self._link.holds_responses = True
        self._apply_hello(self._link, self.board_hello)

    def _serial_line(self) -> bool:
        return self._sock is None  # serial:// (serial+socket:// is a TCP connection)

    def _send_keepalive(self) -> None:
        if self._link is not None:
            self._exchange(LinkOp.PING, b"")

    def _apply_hello(self, link: Link, board: Any) -> None:
        """What the board's HELLO reply binds this session to: a response is taken as the
        ACK of its request only if it said ``"piggyback": true``; requests go in fragments of
        at most its ``max_fragment`` payload bytes, and none is larger than its optional
        ``max_message`` (docs/protocol.md, section 3)."""
        board = board if isinstance(board, dict) else {}
        link.reply_acks = board.get("piggyback") is True
        link.fragment = self.fragment
        self.board_max_message = None
        for key in ("max_fragment", "max_message"):
            value = board.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 16:
                raise ProtocolError(
                    f"{self.name}: malformed HELLO reply: {key} must be an integer >= 16 (bytes), "
                    f"got {str(value)[:40]}"
                )
            if key == "max_fragment":
                link.fragment = min(self.fragment, value)
            else:
                self.board_max_message = value

    def _first_contact_failed(self, exc: DeviceTimeout | ProtocolError) -> DeviceError | None:
        """No byte at all in answer to the HELLO, or only bytes that hold no frame (an SCPI
        board's text), mean a wrong port: said at once, not after every attempt's
        retransmissions. Frames that arrived (bad ones too) are a board of this protocol, retried."""
        frames_in = self.stats.frames_received - self._frames0
        if not isinstance(exc, DeviceTimeout) or frames_in or self.stats.crc_errors - self._crc0:
            return None
        question = other_port("framed", "SCPI")
        tries = f"{self.retries + 1} tries of the HELLO, {self.ack_timeout:g} s each"
        got = bytes(self._heard)
        if not got:
            named = self._named_peer(tries)
            if named is not None:
                return named
            return DeviceTimeout(
                f"{self.name}: no reply at all to the HELLO ({tries}), not a byte: {question} (an "
                "SCPI board ignores frames). If it is the framed port: is the board connected and running?"
            )
        scpi = "; lines of text, as an SCPI board sends" if is_text(got) else ""
        return ProtocolError(
            f"{self.name}: the board answered the HELLO with bytes that hold no frame ({tries}): "
            f"{preview(got)}{scpi}; {question}"
        )

    def _named_peer(self, tries: str) -> ProtocolError | None:
        """A TCP port silent to the HELLO, asked ``*IDN?`` on a connection of its own: an SCPI
        board's answer (or a web server's page) names what is there and the URI to use; None
        where it stays silent too (a board that is not running, a serial line)."""
        where = urllib.parse.urlsplit(self.url)
        if where.scheme != "socket" or where.hostname is None or where.port is None:
            return None
        self._disconnect()  # first: a board or web server may serve one connection at a time
        got = probe_tcp(where.hostname, where.port, b"*IDN?\n")
        if not got:
            return None
        silent = f"{self.name}: no reply at all to the HELLO ({tries})"
        protocol = other_protocol(got)
        if protocol is not None:
            return ProtocolError(
                f"{silent}, and this port answers {protocol} (its reply to *IDN?: {preview(got)}): "
                "point the URI at the board's framed port (`hil emulator serve --serial-port N` "
                "prints the serial+socket:// URI of an emulated board)"
            )
        if is_text(got):
            host = f"[{where.hostname}]" if ":" in where.hostname else where.hostname
            return ProtocolError(
                f"{silent}: this is an SCPI port (*IDN? answered {preview(got.strip())}); open it "
                f"as visa://TCPIP0::{host}::{where.port}::SOCKET, or point serial+socket:// at the "
                "board's framed port (`hil emulator serve --serial-port N` prints both URIs)"
            )
        return None

    def _cannot_open(self, exc: Exception) -> Unreachable:
        tcp = self.url.startswith("socket://")
        return Unreachable(
            f"{self.name}: cannot open the link ({exc}). Is the board on and this the right "
            f"{'address' if tcp else 'port'}? (`hil emulator serve "
            f"{'--serial-port N' if tcp else '--serial-pty'}` prints the URI of an emulated board). "
            f"{NOT_RETRIED}"
        )

    def _response_ack_delay(self, board: Any) -> float:
        """How long the ACK of a response may wait for the next request to carry it: a
        quarter of the smaller ACK timeout of the two ends, when the board said that it takes
        a new request as that ACK (``"request_acks": true`` and its ``"ack_timeout"`` in its
        HELLO reply); 0 otherwise (every response is acknowledged at once)."""
        if not isinstance(board, dict) or board.get("request_acks") is not True:
            return 0.0
        limit = smaller_timeout(self.ack_timeout, board.get("ack_timeout"))
        return 0.0 if limit is None else ack_hold(limit)

    def _disconnect(self) -> None:
        if self._link is not None:  # stops its ACK timer; a held-back ACK goes out if it still can
            with contextlib.suppress(Exception):
                self._link.close()
        if self._port is not None:
            if self._sock is not None:  # pyserial's socket close sleeps 0.3 s; the board needs no pause
                with contextlib.suppress(OSError):
                    self._sock.close()
                self._port.is_open = False
            with contextlib.suppress(Exception):
                self._port.close()
        self._port = None
        self._sock = None
        self._link = None

    def _read(self, timeout: float) -> bytes:
        """What arrives within `timeout`: one select on the socket or descriptor, then one
        read of all that is there (both are non-blocking). Ports with neither fall back to
        pyserial's blocking read."""
        try:
            if self._sock is not None:
                ready, _, _ = select.select([self._sock], [], [], max(timeout, 0.0))
                if not ready:
                    return b""
                data = self._sock.recv(READ_SIZE)
            elif self._fd is not None:
                ready, _, _ = select.select([self._fd], [], [], max(timeout, 0.0))
                if not ready:
                    return b""
                data = os.read(self._fd, READ_SIZE)
            else:
                port = self._port
                first = port.read(1)
                if not first:
                    return b""
                data = bytes(first) + bytes(port.read(port.in_waiting))
        except BlockingIOError:
            return b""
        except ConnectionResetError as exc:
            raise _Closed(f"{self.name}: the connection was reset by the board") from exc
        except (pyserial.SerialException, OSError) as exc:
            raise ProtocolError(f"{self.name}: serial read failed: {exc}") from exc
        if not data:
            raise _Closed(f"{self.name}: the connection was closed by the board")
        if len(self._heard) < 64:
            self._heard += data[:64]
        return data

    def _write(self, data: bytes) -> None:
        """Write all of `data`: straight to the socket or descriptor when there is one
        (pyserial's write adds a select per call, a fifth of a round trip on a pty)."""
        self._sent_at = time.monotonic()
        try:
            if self._sock is None and self._fd is None:
                self._port.write(data)
                return
            view = memoryview(data)
            while view:
                try:
                    n = self._sock.send(view) if self._sock is not None else os.write(self._fd, view)  # type: ignore[arg-type]
                    view = view[n:]
                except BlockingIOError:
                    waitable = self._sock if self._sock is not None else self._fd
                    _, ready, _ = select.select([], [waitable], [], self.timeout)
                    if not ready:
                        raise DeviceTimeout(f"{self.name}: write blocked for {self.timeout:g} s") from None
        except pyserial.SerialTimeoutException as exc:
            raise DeviceTimeout(f"{self.name}: write blocked for {self.timeout:g} s") from exc
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise _Closed(f"{self.name}: the board closed the connection ({exc})") from exc
        except (pyserial.SerialException, OSError) as exc:
            raise ProtocolError(f"{self.name}: serial write failed: {exc}") from exc

    def _exchange(self, opcode: int, body: bytes, what: str = "") -> bytes:
        link = self._link
        if link is None:
            raise ProtocolError(f"{self.name}: the link is not open")
        label = f"request {opcode:#x}" + (f" ({what})" if what else "")
        limit = self.board_max_message
        if limit is not None and len(body) > limit:
            self._refused += 1
            raise message_too_large(self.name, what or f"request {opcode:#x}", len(body), limit)
        stale0, crc0 = self.stats.stale, self.stats.crc_errors
        seq = link.send(opcode, body)
        log.debug("%s >> request %#x, seq %d, %d bytes", self.name, opcode, seq, len(body))
        try:
            got = link.receive(self.timeout, response=True, ref=seq, opcode=opcode)
        except MessageTooLarge as exc:
            raise ProtocolError(f"{self.name}: reply to request {opcode:#x}: {exc}") from None
        if got is None:
            self.stats.timeouts += 1
            stale, crc = self.stats.stale - stale0, self.stats.crc_errors - crc0
            if stale:
                why = (
                    f"{stale} frames from the board were dropped as stale (a response needs the START "
                    "flag, and `ref` = the low byte of the request's first seq; docs/protocol.md, section 3)"
                )
            elif crc:
                why = (
                    f"received {crc} frames from the board that failed their CRC (the CRC covers "
                    "header + payload: zlib.crc32; docs/protocol.md, section 3)"
                )
            else:
                why = "raise timeout= for long operations"
            raise DeviceTimeout(
                f"{self.name}: {label} was acknowledged but no reply came within {self.timeout:g} s; {why}"
            )
        frame, reply = got
        failed = frame.flags & _ERROR
        log.debug("%s << reply %#x, %d bytes%s", self.name, opcode, len(reply), " (error)" if failed else "")
        if frame.flags & _ERROR:
            err = pl.loads(reply)
            code = err.get("code", codes.EXECUTION_ERROR) if isinstance(err, dict) else None
            if isinstance(code, bool) or not isinstance(code, int) or not -(2**31) <= code < 2**31:
                raise ProtocolError(
                    f"{self.name}: malformed error reply to request {opcode:#x}: {str(err)[:80]}"
                )
            raise codes.error_for(code, str(err.get("message", ""))[:1024])
        return reply

    def _call(self, op: Op, request: Message) -> Message:
        return pl.unpack(self._exchange(op, pl.pack(request), describe_request(op, request)))

    # -- link diagnostics
    def ping(self, data: bytes = b"") -> float:
        """Round-trip time (seconds) of an echo request through the board's link layer."""
        with self.lock:
            t0 = time.perf_counter()
            reply = self._link_call(LinkOp.PING, data)
            dt = time.perf_counter() - t0
        if reply != data:
            raise ProtocolError(f"{self.name}: ping echoed {len(reply)} bytes, sent {len(data)}")
        return dt

    def board_link_stats(self) -> dict[str, int]:
        """The board's end of the link: its counters as it reports them."""
        with self.lock:
            stats = pl.loads(self._link_call(LinkOp.STATS, b""))
            if not isinstance(stats, dict):
                raise ProtocolError(f"{self.name}: malformed link statistics {str(stats)[:80]}")
            return dict(stats)

    def _link_call(self, opcode: int, data: bytes) -> bytes:
        self._refuse_if_closed()
        if self._broken:
            self.reconnect()
        try:
            return self._exchange(opcode, data)
        except (DeviceTimeout, ProtocolError):
            self._broken = True
            raise


@dataclasses.dataclass(frozen=True)
class SerialOptions(QueryOptions):
    """``serial://PORT`` and ``serial+socket://HOST:PORT`` with
    ``?baud=115200&timeout=10&ack_timeout=0.25&retries=5&fragment=32768&attempts=4&backoff=0.05&lock=1[&lease=S]``"""

    LABEL: ClassVar[str] = "serial"

    baud: int = dataclasses.field(default=DEFAULT_BAUD, metadata={"gt": 0})
    timeout: float = dataclasses.field(
        default=DEFAULT_TIMEOUT_S, metadata={"gt": 0, "le": MAX_TIMEOUT_S}
    )  # reply deadline, s
    ack_timeout: float = dataclasses.field(
        default=0.25, metadata={"gt": 0, "le": MAX_ACK_TIMEOUT_S}
    )  # seconds
    retries: int = dataclasses.field(
        default=5, metadata={"ge": 0, "le": MAX_ATTEMPTS}
    )  # frame retransmissions
    fragment: int = dataclasses.field(
        default=frames.MAX_FRAGMENT, metadata={"ge": 16, "le": frames.MAX_FRAGMENT}
    )
    attempts: int = dataclasses.field(default=DEFAULT_ATTEMPTS, metadata={"ge": 1, "le": MAX_ATTEMPTS})
    backoff: float = dataclasses.field(default=DEFAULT_BACKOFF_S, metadata={"ge": 0})  # seconds
    lock: bool = True  # take the board while open, if it announces ownership (docs/protocol.md)
    # seconds the board keeps this host's lock while no connection of it is open; None: the board's
    lease: float | None = dataclasses.field(default=None, metadata={"ge": LEASE_MIN_S, "le": LEASE_MAX_S})


def open_serial(target: str, options: SerialOptions) -> SerialDevice:
    """``serial://PORT``: `target` is a device path (/dev/ttyACM0) or a port name (COM3)."""
    if not target:
        raise ConfigurationError("serial URIs need a port: serial:///dev/ttyACM0 or serial://COM3")
    return SerialDevice(target, name=f"serial://{target}", **dataclasses.asdict(options)).open()


def open_socket(target: str, options: SerialOptions) -> SerialDevice:
    """``serial+socket://HOST:PORT``: the framed protocol over TCP."""
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigurationError(f"serial+socket URIs need HOST:PORT, got {target!r} (e.g. 127.0.0.1:7000)")
    url = f"socket://{target}"
    return SerialDevice(url, name=f"serial+socket://{target}", **dataclasses.asdict(options)).open()


SERIAL_BACKEND = Backend("serial", open_serial, SerialOptions)
SOCKET_BACKEND = Backend("serial+socket", open_socket, SerialOptions)
