"""Byte links a server answers on: TCP connections and pseudo-terminals.

A server supplies a handler ``handler(stream, stopping)``; each accepted TCP connection
and each pty gets its own thread running it. Threads are daemons and stop within
`POLL_S` of `close()`.

A server admits at most `max_connections` TCP connections at a time (all its listeners
together); one more is handed to the server's `refuse` (which may write a line to it) and
closed; refusals are paced (`REFUSAL_PACE_S`), so peers that retry in a loop wait in the
kernel's backlog rather than costing the server a refusal each. A peer that reads nothing
of a reply for `WRITE_TIMEOUT_S` is disconnected (a connection that never reads cannot hold
its slot for ever), and one that sends and receives nothing for `idle_timeout_s` is closed
(an idle peer cannot either). The accept loop survives any failure to set up one
connection (that socket is closed, the failure logged and counted in `failures`) and keeps
accepting. A peer that makes errors by the hundred is throttled by its server
(`emulator.server.throttle`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import threading
import time
import tty
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Protocol, Self

POLL_S = 0.05
READ_SIZE = 1 << 16
MAX_CONNECTIONS = 16  # concurrent TCP connections per server (a constructor argument)
WRITE_TIMEOUT_S = 30.0  # a peer that reads none of a reply for this long is disconnected
# a TCP connection with no byte in or out for this long is closed (a server argument; None:
# never). An hour: a notebook's VISA session left open over lunch survives, a peer that
# opened 16 connections and went quiet frees the slots the same afternoon
IDLE_TIMEOUT_S = 3600.0
# TCP keepalive on every accepted connection: a peer that vanished without a FIN (it lost
# power, its cable or its network) is found dead within about this many seconds (the board's
# lease for a server of a board with ownership), not only at the idle timeout
KEEPALIVE_S = 15.0
KEEPALIVE_PROBES = 3  # unanswered probes before the kernel drops the connection
# after refusing a connection over the cap the accept loop waits this long: peers retrying in
# a tight loop then wait in the kernel's listen backlog instead of costing a refusal each
REFUSAL_PACE_S = 0.05

log = logging.getLogger(__name__)


class Stream(Protocol):
    def read(self, timeout: float) -> bytes:
        """Bytes available within `timeout` (b"" if none); raises EOFError when the peer left."""
        ...

    def write(self, data: bytes | memoryview) -> None: ...

    def close(self) -> None: ...


Handler = Callable[[Stream, threading.Event], None]
Refuse = Callable[[socket.socket], None]


class Gate:
    """Counts a server's open TCP connections against its cap."""

    def __init__(self, limit: int = MAX_CONNECTIONS) -> None:
        if limit < 1:
            raise ValueError(f"max_connections must be at least 1, got {limit}")
        self.limit = limit
        self.active = 0
        self.refused = 0
        self._lock = threading.Lock()

    def enter(self) -> bool:
        with self._lock:
            if self.active >= self.limit:
                self.refused += 1
                return False
            self.active += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self.active -= 1


def _refuse_silently(conn: socket.socket) -> None:
    """The default refusal says nothing before the connection is closed: the framed protocol
    has no message a board may send unprompted (the SCPI server passes its own, an error line)."""


def _start_thread(target: Callable[..., None], args: tuple[object, ...], name: str) -> None:
    """Start one connection's thread (a seam: tests make it fail)."""
    threading.Thread(target=target, args=args, name=name, daemon=True).start()


class SocketStream:
    """A TCP connection; `read` ends it (EOFError) after `idle_timeout` seconds without a
    byte in or out, `write` after `write_timeout` seconds (default `WRITE_TIMEOUT_S`) in which
    the peer read nothing.

    The socket is non-blocking and every wait is one select of this class's own: a socket
    with a Python timeout polls before every recv and send, two system calls more per
    request. A read is a select and a recv, a write usually one send."""

    def __init__(
        self,
        conn: socket.socket,
        idle_timeout: float | None = IDLE_TIMEOUT_S,
        write_timeout: float | None = None,
    ) -> None:
        self.conn = conn
        self.idle_timeout = idle_timeout
        self.write_timeout = WRITE_TIMEOUT_S if write_timeout is None else write_timeout
        self.last_active = time.monotonic()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.setblocking(False)

    def read(self, timeout: float) -> bytes:
        ready, _, _ = select.select([self.conn], [], [], timeout)
        if not ready:
            idle = time.monotonic() - self.last_active
            if self.idle_timeout is not None and idle >= self.idle_timeout:
                raise EOFError(f"idle for {idle:.0f} s (the server's idle timeout)")
            return b""
        try:
            data = self.conn.recv(READ_SIZE)
        except BlockingIOError:
            return b""
        except OSError as exc:
            raise EOFError(str(exc)) from None
        if not data:
            raise EOFError("peer closed the connection")
        self.last_active = time.monotonic()
        return data

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        deadline = 0.0
        while view:
            try:
                view = view[self.conn.send(view) :]
                deadline = 0.0  # the peer reads: a new wait starts afresh
                continue
            except BlockingIOError:
                pass
            except OSError as exc:
                raise EOFError(str(exc)) from None
            now = time.monotonic()
            deadline = deadline or now + self.write_timeout
            if now >= deadline:
                raise EOFError(f"the peer read nothing for {self.write_timeout:g} s")
            try:
                select.select([], [self.conn], [], deadline - now)
            except (OSError, ValueError) as exc:
                raise EOFError(str(exc)) from None
        self.last_active = time.monotonic()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.shutdown(socket.SHUT_RDWR)
        self.conn.close()


class PtyStream:
    """The master side of a pty. The slave stays open here too, so a client may close and
    reopen it without the master seeing end-of-file; writes give up after `write_timeout`
    when nobody drains the slave."""

    def __init__(self, master: int, write_timeout: float = 2.0) -> None:
        self.master = master
        self.write_timeout = write_timeout
        os.set_blocking(master, False)

    def read(self, timeout: float) -> bytes:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return b""
        try:
            return os.read(self.master, READ_SIZE)
        except BlockingIOError:
            return b""
        except OSError as exc:
            if exc.errno == errno.EIO:  # no slave open at the moment
                return b""
            raise EOFError(str(exc)) from None

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.master, view) :]
                continue
            except BlockingIOError:
                pass
            _, ready, _ = select.select([], [self.master], [], self.write_timeout)
            if not ready:
                return  # nobody reads the slave: drop, as a serial line would

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.master)


def keepalive_within(lease_s: float | None) -> float:
    """How soon a server drops a TCP peer gone without a FIN: within the board's lease (None: a
    board without ownership, KEEPALIVE_S), at least a second (the options are whole seconds)."""
    return KEEPALIVE_S if lease_s is None else max(lease_s, 1.0)


def tcp_keepalive(conn: socket.socket, within_s: float) -> dict[str, int]:
    """Turn on TCP keepalive on `conn`, sized so that a peer gone without a FIN is dropped
    within about `within_s` seconds: the first probe after a third of it idle, then
    KEEPALIVE_PROBES probes two ninths of it apart (whole seconds, at least 1 each). Where the
    platform lacks an option (TCP_KEEPIDLE: Linux, Windows; TCP_KEEPALIVE: macOS) its
    default stays. The options set, by name."""
    idle = max(1, round(within_s / 3))
    interval = max(1, round(within_s * 2 / 9))
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    done = {"SO_KEEPALIVE": 1}
    idle_opt = "TCP_KEEPIDLE" if hasattr(socket, "TCP_KEEPIDLE") else "TCP_KEEPALIVE"
    for name, value in ((idle_opt, idle), ("TCP_KEEPINTVL", interval), ("TCP_KEEPCNT", KEEPALIVE_PROBES)):
        opt = getattr(socket, name, None)
        if opt is not None:
            conn.setsockopt(socket.IPPROTO_TCP, opt, value)
            done[name] = value
    return done


def _serve(handler: Handler, stream: Stream, stopping: threading.Event) -> None:
    try:
        handler(stream, stopping)
    except EOFError:
        pass
    finally:
        stream.close()


class TcpListener:
    """Accepts connections on (host, port); port 0 picks a free port (see `address`)."""

    def __init__(
        self,
        handler: Handler,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        gate: Gate | None = None,
        refuse: Refuse = _refuse_silently,
        idle_timeout: float | None = IDLE_TIMEOUT_S,
        keepalive_s: float = KEEPALIVE_S,
    ) -> None:
        self.handler = handler
        self.idle_timeout = idle_timeout
        self.keepalive_s = keepalive_s  # TCP keepalive on accepted connections (`tcp_keepalive`)
        self.gate = gate or Gate()
        self.refuse = refuse
        self.failures = 0  # connections that could not be set up (closed, not served)
        self._streams: set[SocketStream] = set()  # connections being served (`close` ends them)
        self._streams_lock = threading.Lock()
        self.sock = socket.create_server((host, port), reuse_port=False)
        self.address: tuple[str, int] = self.sock.getsockname()[:2]
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._accept, name=f"tcp-{self.address[1]}", daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                ready, _, _ = select.select([self.sock], [], [], POLL_S)
                if not ready:
                    continue
                conn, _ = self.sock.accept()
            except (OSError, ValueError):
                if self.stopping.wait(POLL_S):
                    return
                continue
            try:
                if not self._admit(conn) and self.stopping.wait(REFUSAL_PACE_S):
                    return  # refusals are paced: the rest wait in the kernel's backlog, at no cost here
            except Exception as exc:  # one connection failed to start: close it, keep accepting
                self.failures += 1
                log.warning("tcp %s: could not serve a connection: %r", self.address[1], exc)
                with contextlib.suppress(OSError):
                    conn.close()

    def _admit(self, conn: socket.socket) -> bool:
        """Serve `conn` on its own thread (True), or refuse it over the cap (False)."""
        if not self.gate.enter():
            try:
                conn.settimeout(0.5)
                with contextlib.suppress(OSError):
                    self.refuse(conn)
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            finally:
                conn.close()
            return False
        try:
            tcp_keepalive(conn, self.keepalive_s)
            stream = SocketStream(conn, self.idle_timeout)
            with self._streams_lock:
                self._streams.add(stream)
            _start_thread(self._serve, (stream,), f"tcp-{self.address[1]}-conn")
        except BaseException:
            with self._streams_lock:
                self._streams.discard(stream)
            self.gate.leave()
            raise
        return True

    def _serve(self, stream: SocketStream) -> None:
        try:
            _serve(self.handler, stream, self.stopping)
        finally:
            with self._streams_lock:
                self._streams.discard(stream)
            self.gate.leave()

    def close(self) -> None:
        """Stop accepting and end every connection being served: each is shut down here (its
        handler then reads end-of-file and closes it), so nothing is answered once `close`
        returns; a handler that only noticed `stopping` at its next poll still answered a
        request that came in meanwhile."""
        self.stopping.set()
        self.thread.join(timeout=2)
        self.sock.close()
        with self._streams_lock:
            streams = list(self._streams)
        for stream in streams:
            with contextlib.suppress(OSError):
                stream.conn.shutdown(socket.SHUT_RDWR)


class PtyEndpoint:
    """A pseudo-terminal in raw mode; clients open `path` as a serial port."""

    def __init__(self, handler: Handler) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        self.path = os.ttyname(self.slave)
        self.stopping = threading.Event()
        self.thread = threading.Thread(
            target=_serve,
            args=(handler, PtyStream(self.master), self.stopping),
            name=f"pty-{self.path}",
            daemon=True,
        )
        self.thread.start()

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=2)
        with contextlib.suppress(OSError):
            os.close(self.slave)


class EndpointServer(ABC):
    """What both servers share: TCP listeners and ptys that hand each connection's byte
    stream to the server's `_handler`, and closing them all. Use as a context manager."""

    def __init__(
        self,
        max_connections: int = MAX_CONNECTIONS,
        idle_timeout_s: float | None = IDLE_TIMEOUT_S,
        keepalive_s: float = KEEPALIVE_S,
    ) -> None:
        if idle_timeout_s is not None and not 0 < idle_timeout_s < float("inf"):
            raise ValueError(f"idle_timeout_s must be positive seconds or None (never), got {idle_timeout_s}")
        # a TCP peer gone without a FIN is dropped within about this (`tcp_keepalive`)
        self.keepalive_s = keepalive_s
        self.listeners: list[TcpListener] = []
        self.ptys: list[PtyEndpoint] = []
        self.gate = Gate(max_connections)
        self.idle_timeout_s = idle_timeout_s

    def _refuse(self, conn: socket.socket) -> None:
        """What a connection over the cap gets before it is closed (default: nothing)."""
        return None

    @abstractmethod
    def _handler(self, stream: Stream, stopping: threading.Event) -> None:
        """Serve one connection's byte stream until it closes or `stopping` is set."""

    def listen_tcp(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        listener = TcpListener(
            self._handler,
            host,
            port,
            gate=self.gate,
            refuse=self._refuse,
            idle_timeout=self.idle_timeout_s,
            keepalive_s=self.keepalive_s,
        )
        self.listeners.append(listener)
        return listener.address

    def open_pty(self) -> str:
        endpoint = PtyEndpoint(self._handler)
        self.ptys.append(endpoint)
        return endpoint.path

    def close(self) -> None:
        links = [*self.listeners, *self.ptys]
        for link in links:
            link.stopping.set()
        for link in links:
            link.close()
        self.listeners.clear()
        self.ptys.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
