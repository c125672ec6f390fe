"""Transport benchmark: what the wire costs compared with a raw loopback socket.

1. Bulk read: a 512 x 512 tile's conductances (G+ and G-, float32, 2 MiB) read with
   `read_conductance` over SCPI/TCP (pyvisa-py), as a ratio of throughput to a raw
   loopback socket moving the same bytes (target >= 0.5). The board serves fixed arrays,
   so the ratio measures the transport, not the emulator; the emulated board's own read
   time is reported beside it.
2. Round trip: one small command per transport (SCPI ``*OPC?`` over TCP and over a pty,
   a framed PING over a pty and over TCP) and one Device operation (``safety()``) per
   protocol, as a ratio to a raw socket echo of the same bytes (target <= 2). Rows over a
   pty also give the ratio to a raw echo over a pty (the protocol's own share), and a row
   gives the raw pty echo against the socket echo (what the pty costs by itself, a floor
   under the pty rows' first ratio). Framed rows count the frames per round trip: 2 when
   both ends hold ACKs back (the response carries the ACK of the request, the next request
   that of the response), 3 when only the board does, 4 when neither does.
3. Layers ("benchmark": "layer"): what each layer of a round trip adds, timed the same
   way: an echo through the servers' stream classes (select/recv/send of
   `emulator.server.links`), pyvisa-py's write/read of a line that such an echo returns
   (the VISA library alone, no SCPI server; the host's default `fast=1` reads and writes
   small messages on pyvisa-py's socket itself, so this row is what that avoids), the SCPI
   server answering a raw socket client (no VISA library), and in-process costs without
   any I/O: the SCPI server's parse and dispatch of one message, the framed server's
   answer to a request, the frame codec for the frames of one round trip, the emulated
   board's own `safety()`, and the host's encode/check/decode around one operation.
   Every timed row (round trips and layers) also gives the CPU time per call of the
   client thread (`client_cpu_seconds`) and of the server process, all its threads
   (`server_cpu_seconds`, from /proc/PID/task/*/schedstat; absent elsewhere), and rows
   over sockets `cpu_ratio`: client and server CPU per call over those of the raw echo
   in the same blocks. On a shared machine the wall-clock ratios move with the load (a
   round trip waits for both processes to be scheduled); the CPU times much less.

The servers run in a child process, as a board's firmware would, so client and server do
not share one interpreter lock. Ends by printing one JSON object per line (each with the
placement and the CPUs used).

Placement (`--placement`, default `separate`): the client is pinned to one core and the
server process (all its threads) to another; `shared` pins both to one core, `free` leaves
them to the scheduler. On a 2-vCPU virtual machine a raw echo takes 16-20 us when both ends
share a core and 45-65 us when they do not (each wake-up of an idle vCPU goes through the
hypervisor). Unpinned, the scheduler often put the echo thread and a protocol server's
thread on different sides of the client, so one row's echo was 16 us and the next row's
round trip paid the cross-core wake-ups: ratios of 5 to 9 that measured the placement.
With both placements pinned:
- `shared`: the echo costs little besides two wake-ups, so a ratio is close to the CPU
  both ends spend per round trip over the echo's 13 + 13 us; a ratio of 2 leaves the host
  and the server 16-20 us together for everything they do beyond an echo.
- `separate`: the echo is dominated by the two cross-core wake-ups; Python code that runs
  right after such a wake-up runs with cold caches (CPU per call 3 to 5 times the
  in-process figures below), so the ratio still grows with the code per round trip.

Measured for issue 17 (2 vCPUs, AMD EPYC, Python 3.11.7, pyvisa-py 0.8.1, shared with other
agents' jobs; `--repeats 20`). Quiet machine (load average 0.4), pinned, before this work
(commit 2fb6d32), x the raw echo, `shared` / `separate`: SCPI server answering a raw client
`*OPC?` 1.6 / 1.3, `SYST:SAF?` 1.9 / 1.5; host `query("*OPC?")` over SCPI/TCP 2.1-2.3 /
1.5-1.6; Device `safety()` over SCPI/TCP 3.3-3.6 / 1.9-2.0; framed PING over TCP 3.6-3.8 /
1.9-2.1; `safety()` over framed/TCP 6.1-6.5 / 2.6-2.8 (echo 16 us / 52-55 us). Loaded
machine (load average 2.4 to 5.8), medians of 6 interleaved runs of the code before
(2fb6d32) and after (d2a1fc6), x the echo, before -> after: `shared` (echo 20 us) SCPI/TCP
`*OPC?` 2.62 -> 2.32, SCPI/pty 2.89 -> 2.81, framed/TCP PING 4.79 -> 4.53, framed/pty 4.91 ->
4.63, `safety()` over SCPI/TCP 4.86 -> 4.36, over framed/TCP 8.73 -> 6.87; layers: SCPI server
answering a raw client `*OPC?` 2.00 -> 1.68, `SYST:SAF?` 2.55 -> 2.07, framed server PING
4.03 -> 3.39, host link 3.31 -> 2.77. `separate` (echo 50-59 us): 1.82 -> 1.81, 1.69 -> 1.68,
2.70 -> 2.55, 2.30 -> 2.36, 2.42 -> 2.52, 3.76 -> 3.38 (at that load a run's ratios move by
+-30 %: the in-process rows are what separates the code).

CPU per call without I/O (fake streams handing back pre-built bytes; best of 5 chunks of
4000 calls; before at load 0.5, after at load 2.5, the after figures with an encoder shortcut since
removed that saved about 1 us of each message's encoding), before -> after: host framed
`safety()` 16.7 -> 14.6 us, framed `ping()` 9.4 -> 8.6 us, host SCPI `safety()` 5.9 -> 5.9 us,
host SCPI `query("*OPC?")` 1.0 -> 1.0 us; SCPI server `*OPC?` 4.5 -> 3.4 us, `SYST:SAF?` 7.0
-> 5.7 us; framed server PING 9.4 -> 8.5 us, SAFETY 15.1 -> 13.0 us. Where it went: a
reply's JSON decoded by json's public raw decoder alone (1.6 against json.loads' 2.5 us for a
70-byte reply), short parameterless SCPI
messages parsed once, the error throttle's clock read only when there is something to
charge, fault draws only from an active fault plan. System calls were already at the floor
(one send, one select and one recv per round trip on each end; a framed round trip is 2
frames) and both ends set TCP_NODELAY.

What is left, per layer, and why 2 is not reached everywhere: on one core the budget of
16-20 us beyond an echo is smaller than the Python that a protocol needs per round trip,
before any cache effect: the SCPI server's parse and dispatch (3.4 us for `*OPC?`, 5.7 us
for `SYST:SAF?`) and its stream class (select, recv, send: 1.2 x the echo), the host's device
layers (lock, the SIGINT guard's two handler swaps, request ids, reply checks: 5 us of the
host's 5.9 us `safety()`), and for the framed link the link engine on each end (8.5-8.6 us per
PING: COBS and CRC-32 framing, sequence numbers, the held-back ACK and its timer's lock) plus
the device layers (4-6 us per end). Two interpreters taking turns on one core also evict
each other's caches, so the measured CPU per call is 1.5 to 2 times these figures (a raw
client that reads 2 MiB between its `SYST:SAF?` requests on the same core raises the
server's CPU for the same request from 22 to 40 us). Every
check stays (host limit checks, reply validation, request ids, the board's replay cache).
Across two cores the protocols are within 2 of the echo on a quiet machine, except
`safety()` over the framed link (2.6-2.8), whose two link engines and device layers add
about 45 us of CPU per round trip there.

    .venv/bin/python benchmarks/transport.py [--repeats 20] [--placement separate|shared|free]
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import multiprocessing as mp
import os
import select
import socket
import statistics
import threading
import time
import tty
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from drivers import open_device
from drivers.base import (
    Device,
)
from drivers.topology import Topology
from drivers.wrapper import DeviceWrapper

SIZE = 512
TOPOLOGY = Topology.layered([SIZE - 1, SIZE])  # W0 is 512 x 512 (bias row included)


class FixedReadDevice(DeviceWrapper):
    """Wraps a Device; `read_conductance` returns fixed arrays, so only the transport is timed."""

    def __init__(self, inner: Device) -> None:
        super().__init__(inner)
        rng = np.random.default_rng(0)
        lim = inner.info.limits
        self.g = rng.uniform(lim.g_min, lim.g_max, (2, SIZE, SIZE)).astype(np.float32)

    def read_conductance(self, tile: str) -> tuple[np.ndarray, np.ndarray]:
        return self.g[0], self.g[1]


def _raw_bulk_server(sock: socket.socket, payload: bytes) -> None:
    """Per request byte, send `payload` (the baseline for bulk reads)."""
    while True:
        conn, _ = sock.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while conn.recv(1):
                conn.sendall(payload)


def _raw_echo_server(sock: socket.socket) -> None:
    while True:
        conn, _ = sock.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)


def _raw_pty_echo() -> str:
    """A pty whose far end echoes every byte back: the raw-channel baseline of the pty
    transports (a pty costs more per round trip than loopback TCP, whatever runs on it)."""
    master, slave = os.openpty()
    tty.setraw(slave)
    path = os.ttyname(slave)

    def echo() -> None:
        while data := os.read(master, 65536):
            os.write(master, data)

    threading.Thread(target=echo, daemon=True).start()
    return path


def _frames_in(sock: socket.socket, buf: bytearray) -> list[bytes]:
    """Complete COBS chunks received on `sock` (at least one; what follows stays in `buf`)."""
    while True:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("peer closed the connection")
        buf += data
        end = buf.rfind(b"\x00")
        if end > 0:
            chunks = [bytes(c) for c in bytes(buf[:end]).split(b"\x00") if c]
            del buf[: end + 1]
            if chunks:
                return chunks


def _minimal_responder(sock: socket.socket) -> None:
    """A framed peer without the link engine: each request frame is answered at once by one
    response frame echoing its payload (which carries the request's ACK); ACKs are ignored,
    nothing is retransmitted. The floor under the host link's share of a framed round trip."""
    from drivers.wire import frames
    from drivers.wire.frames import Flag, Frame, LinkOp

    response = int(Flag.RESPONSE | Flag.START)
    while True:
        conn, _ = sock.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        seq, buf = 0, bytearray()
        with conn:
            try:
                while True:
                    out = []
                    for chunk in _frames_in(conn, buf):
                        f = frames.decode(chunk)
                        if f.opcode in (LinkOp.ACK, LinkOp.NACK):
                            continue
                        seq = (seq + 1) % frames.SEQ_MOD
                        body = f.payload
                        if f.opcode == LinkOp.HELLO:
                            body = b'{"version":1,"piggyback":true,"request_acks":true,"ack_timeout":0.25}'
                        out.append(frames.encode(Frame(f.opcode, seq, response, body, f.seq & 0xFF)))
                    if out:
                        conn.sendall(b"".join(out))
            except (ConnectionError, OSError):
                continue


def _placement(kind: str) -> tuple[set[int] | None, set[int] | None]:
    """(client CPUs, server CPUs) for `--placement`: `separate` pins the client to one core
    and the server process (all its threads) to another, `shared` both to one core, `free`
    leaves placement to the scheduler (None: not pinned). Unpinned, the scheduler may put
    the echo thread and a protocol server's thread on different sides of the client, and a
    round trip between two cores of a virtual machine costs about 35 us more than one on a
    single core (an idle vCPU is woken through the hypervisor): the ratios then measure the
    placement, not the protocol."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if kind == "free" or not cpus:
        return None, None
    if kind == "shared" or len(cpus) < 2:
        return {cpus[0]}, {cpus[0]}
    return {cpus[0]}, {cpus[1]}


def _serve(conn: Any, board: str, cpus: set[int] | None = None) -> None:
    """Child process: the board, its servers and the raw baselines (pinned to `cpus`
    before any thread starts, so that every server thread and the echo share them)."""
    if cpus is not None:
        os.sched_setaffinity(0, cpus)
    from emulator.server import FramedServer, ScpiServer
    from emulator.server.links import POLL_S, EndpointServer, Stream

    class StreamEcho(EndpointServer):
        """Echoes every byte through the servers' stream classes (their read/write path)."""

        def _handler(self, stream: Stream, stopping: threading.Event) -> None:
            while not stopping.is_set():
                if data := stream.read(POLL_S):
                    stream.write(data)

    device = FixedReadDevice(open_device(board))
    device.configure(TOPOLOGY)
    scpi, framed = ScpiServer(device), FramedServer(device)
    stream_echo = StreamEcho()
    bulk = socket.create_server(("127.0.0.1", 0))
    echo = socket.create_server(("127.0.0.1", 0))
    responder = socket.create_server(("127.0.0.1", 0))
    payload = device.g.tobytes()
    threading.Thread(target=_raw_bulk_server, args=(bulk, payload), daemon=True).start()
    threading.Thread(target=_raw_echo_server, args=(echo,), daemon=True).start()
    threading.Thread(target=_minimal_responder, args=(responder,), daemon=True).start()
    conn.send(
        {
            "scpi_tcp": scpi.listen_tcp()[1],
            "scpi_pty": scpi.open_pty(),
            "framed_tcp": framed.listen_tcp()[1],
            "framed_pty": framed.open_pty(),
            "bulk": bulk.getsockname()[1],
            "echo": echo.getsockname()[1],
            "stream_echo": stream_echo.listen_tcp()[1],
            "framed_responder": responder.getsockname()[1],
            "pty_echo": _raw_pty_echo(),
        }
    )
    conn.recv()  # parent says stop


@dataclass
class Timing:
    median: float  # seconds per call
    best: float  # fastest call: the cost without interference from other processes
    client_cpu: float = 0.0  # CPU seconds per call of the calling thread
    server_cpu: float | None = None  # CPU seconds per call of the server process (all threads)


class ServerClock:
    """CPU time of a process, all its threads (Linux: /proc/PID/task/*/schedstat, in ns)."""

    def __init__(self, pid: int | None) -> None:
        self.pattern = f"/proc/{pid}/task/*/schedstat" if pid is not None else ""
        self.works = bool(self.pattern) and self.read() is not None

    def read(self) -> int | None:
        total = 0
        for path in glob.glob(self.pattern) if self.pattern else ():
            try:
                with open(path) as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):  # a thread ended meanwhile
                continue
        return total if self.pattern else None


NO_SERVER = ServerClock(None)


def _paired(
    fn: Callable[[], object],
    baseline: Callable[[], object],
    repeats: int,
    block: int = 10,
    server: ServerClock = NO_SERVER,
) -> tuple[Timing, Timing]:
    """Seconds per call of `fn` and of `baseline`, timed in alternating blocks of `block`
    calls (after warm-up) so that load from other processes on a shared machine hits both
    alike, while the tail of one (a trailing ACK) does not land in the other. Also the CPU
    time per call of this thread and (with `server`) of the server process."""
    fn()
    baseline()
    a: list[float] = []
    b: list[float] = []
    cpu = [0, 0]
    srv = [0, 0]
    for _ in range(max(1, repeats // block)):
        for k, (f, out) in enumerate(((fn, a), (baseline, b))):
            s0 = server.read() if server.works else 0
            c0 = time.thread_time_ns()
            for _ in range(block):
                t0 = time.perf_counter()
                f()
                out.append(time.perf_counter() - t0)
            cpu[k] += time.thread_time_ns() - c0
            srv[k] += (server.read() or 0) - s0 if server.works else 0
    timings = []
    for k, out in enumerate((a, b)):
        per = 1e-9 / len(out)
        timings.append(
            Timing(statistics.median(out), min(out), cpu[k] * per, srv[k] * per if server.works else None)
        )
    return timings[0], timings[1]


def _cpu_fields(t: Timing, echo: Timing | None = None) -> dict[str, float]:
    """CPU per call; with the paired echo's timing, also the ratio of their CPU (both ends)."""
    out = {"client_cpu_seconds": t.client_cpu}
    if t.server_cpu is not None:
        out["server_cpu_seconds"] = t.server_cpu
        if echo is not None and echo.server_cpu:
            out["cpu_ratio"] = (t.client_cpu + t.server_cpu) / (echo.client_cpu + echo.server_cpu)
    return out


def _recv_exactly(sock: socket.socket, n: int, buf: bytearray) -> None:
    view = memoryview(buf)
    got = 0
    while got < n:
        got += sock.recv_into(view[got:], n - got)


def _line_reader(sock: socket.socket) -> Callable[[bytes], bytes]:
    """A raw socket client: send a message, return the reply line (what a minimal host does)."""

    def ask(msg: bytes) -> bytes:
        sock.sendall(msg)
        data = sock.recv(65536)
        while not data.endswith(b"\n"):
            more = sock.recv(65536)
            if not more:
                raise ConnectionError("server closed the connection")
            data += more
        return data

    return ask


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _framed_layers(ports: dict[str, Any]) -> list[tuple[str, Callable[[], object], Callable[[], None]]]:
    """The two halves of a framed round trip, each against a minimal other half: the
    board's server answering a raw socket host (frames built and read by hand, the next
    request acknowledging the last response, as a host that holds ACKs back does), and the
    host's link (`drivers.wire.link.Link`, as `SerialDevice` sets it up) against a
    responder without the link engine. Each: (row name, one round trip, close)."""
    from drivers.wire import frames
    from drivers.wire import payload as pl
    from drivers.wire.frames import Flag, Frame, LinkOp
    from drivers.wire.link import Link

    start = int(Flag.START)
    board = _connect(ports["framed_tcp"])
    buf = bytearray()
    seq = [1000, 0]  # this end's last request, the board's last response

    def ask(opcode: int, body: bytes) -> bytes:
        seq[0] += 1
        board.sendall(frames.encode(Frame(opcode, seq[0], start, body)))
        while True:  # the response (its START acknowledges the request); ACKs are skipped
            for chunk in _frames_in(board, buf):
                f = frames.decode(chunk)
                if f.flags & Flag.RESPONSE and f.ref == seq[0] & 0xFF:
                    seq[1] = f.seq
                    return f.payload

    # a new request ends the wait for the last response's ACK (rule 6 of docs/protocol.md,
    # section 3), whether or not the board says `request_acks`
    hello = pl.loads(ask(LinkOp.HELLO, pl.dumps({"version": 1, "piggyback": True, "ack_timeout": 0.25})))
    assert hello.get("piggyback") is True and ask(LinkOp.PING, b"*OPC?\n") == b"*OPC?\n"

    def board_ping() -> None:
        ask(LinkOp.PING, b"*OPC?\n")

    def close_board() -> None:
        with contextlib.suppress(OSError):  # the last response's ACK, so the board stops waiting
            board.sendall(frames.encode(frames.ack(seq[1])))
        board.close()

    host_sock = _connect(ports["framed_responder"])

    def read(timeout: float) -> bytes:
        ready, _, _ = select.select([host_sock], [], [], max(timeout, 0.0))
        return host_sock.recv(65536) if ready else b""

    link = Link(read, host_sock.sendall, ack_timeout=0.25, seq0=7)
    link.ack_delay = 0.0625
    link.holds_responses = True

    def host_ping() -> None:
        ref = link.send(LinkOp.PING, b"*OPC?\n")
        got = link.receive(10.0, response=True, ref=ref)
        assert got is not None

    def close_host() -> None:
        link.close()
        host_sock.close()

    return [
        ("framed server answering PING to a raw socket host (no host link)", board_ping, close_board),
        ("framed host link (Link) against a minimal responder (no server link)", host_ping, close_host),
    ]


def _in_process_layers(board: str) -> dict[str, Callable[[], object]]:
    """Costs without any I/O: the servers' work per request, the frame codec, the board,
    and the host's work around one operation."""
    from drivers.base import SafetyCounters
    from drivers.wire import frames
    from drivers.wire import payload as pl
    from drivers.wire.client import RemoteDevice
    from drivers.wire.frames import Flag, Frame
    from drivers.wire.payload import Message, Op
    from emulator.server import FramedServer
    from emulator.server.scpi import Connection

    local = open_device(board)
    local.configure(TOPOLOGY)
    conn = Connection(local)

    def scpi(msg: bytes) -> Callable[[], object]:
        def run() -> None:
            for answer in conn.respond(msg):
                assert answer.reply is not None

        return run

    framed = FramedServer(local)
    empty = pl.pack(Message())

    def framed_answer() -> None:
        flags, _ = framed._answer(None, int(Op.SAFETY), empty)  # type: ignore[arg-type]
        assert not flags

    deframer = frames.Deframer()
    request = Frame(int(Op.SAFETY), 7, int(Flag.START), empty)
    response = Frame(int(Op.SAFETY), 9, int(Flag.RESPONSE | Flag.START), b"x" * 40, 7)

    def codec() -> None:
        for frame in (request, response):
            for chunk in deframer.feed(frames.encode(frame)):
                frames.decode(chunk)

    class Canned(RemoteDevice):
        """A host whose transaction returns a canned reply: its own work, no link."""

        reply = pl.safety_reply(SafetyCounters(0, 0))

        def _connect(self) -> None:
            pass

        def _disconnect(self) -> None:
            pass

        def _call(self, op: Op, request: Message) -> Message:
            if op is Op.INFO:
                return Message(pl.info_to_dict(local.info))
            if op is Op.TOPOLOGY:
                return Message({"topology": None})
            if op is Op.STATUS:
                return pl.status_reply(local.status())
            return Message(dict(self.reply.meta))

    canned = Canned("canned").open()
    return {
        "scpi server: parse + dispatch of *OPC? (in-process)": scpi(b"*OPC?\n"),
        "scpi server: parse + dispatch of SYST:SAF? (in-process)": scpi(b"SYST:SAF?\n"),
        "framed server: answer to a SAFETY request (in-process)": framed_answer,
        "frame codec: the frames of a round trip (request, response), encoded and decoded": codec,
        "board: safety() of the emulated board (in-process)": local.safety,
        "host: RemoteDevice.safety() around a canned reply (no link)": canned.safety,
    }


def _round_trips(
    ports: dict[str, Any], args: argparse.Namespace, server: ServerClock
) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    echo = _connect(ports["echo"])
    msg = b"*OPC?\n"
    small = bytearray(len(msg))

    def raw_echo() -> None:
        echo.sendall(msg)
        _recv_exactly(echo, len(msg), small)

    pty_fd = os.open(ports["pty_echo"], os.O_RDWR | os.O_NOCTTY)
    tty.setraw(pty_fd)

    def raw_pty_echo() -> None:
        os.write(pty_fd, msg)
        got = 0
        while got < len(msg):
            got += len(os.read(pty_fd, len(msg) - got))

    n = args.repeats * 10
    pty_base, pty_socket = _paired(raw_pty_echo, raw_echo, n, server=server)
    rtts: dict[str, tuple[Timing, Timing]] = {}
    layers: dict[str, tuple[Timing, Timing]] = {}

    # the layers under the SCPI round trip, each alone
    stream = _connect(ports["stream_echo"])
    stream_echo = _line_reader(stream)
    layers["echo through the servers' stream classes (select/recv/send)"] = _paired(
        lambda: stream_echo(msg), raw_echo, n, server=server
    )
    import pyvisa

    rm = pyvisa.ResourceManager("@py")
    res = rm.open_resource(
        f"TCPIP0::127.0.0.1::{ports['stream_echo']}::SOCKET", read_termination="\n", write_termination="\n"
    )
    session = rm.visalib.sessions[res.session]
    session.interface.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    assert res.query("*OPC?") == "*OPC?"
    layers["pyvisa-py write + read of a line (echoed by the stream classes, no SCPI)"] = _paired(
        lambda: res.query("*OPC?"), raw_echo, n, server=server
    )
    res.close()
    scpi_sock = _connect(ports["scpi_tcp"])
    scpi_ask = _line_reader(scpi_sock)
    assert scpi_ask(b"*OPC?\n") == b"1\n"
    layers["scpi server answering *OPC? to a raw socket client (no VISA library)"] = _paired(
        lambda: scpi_ask(b"*OPC?\n"), raw_echo, n, server=server
    )
    layers["scpi server answering SYST:SAF? to a raw socket client (no VISA library)"] = _paired(
        lambda: scpi_ask(b"SYST:SAF?\n"), raw_echo, n, server=server
    )
    scpi_sock.close()
    stream.close()
    for name, fn, done in _framed_layers(ports):
        layers[name] = _paired(fn, raw_echo, n, server=server)
        done()
    for name, fn in _in_process_layers(args.board).items():
        layers[name] = _paired(fn, raw_echo, n)

    for name, uri in (
        ("scpi/tcp (pyvisa-py)", f"visa://TCPIP0::127.0.0.1::{ports['scpi_tcp']}::SOCKET"),
        ("scpi/pty (pyvisa-py ASRL)", f"visa://ASRL{ports['scpi_pty']}::INSTR"),
    ):
        with open_device(uri) as dev:
            rtts[name] = _paired(lambda d=dev: d.query("*OPC?"), raw_echo, n, server=server)
    frames_per_call: dict[str, float] = {}
    for name, uri in (
        ("framed/pty (pyserial)", f"serial://{ports['framed_pty']}"),
        ("framed/tcp (pyserial socket://)", f"serial+socket://127.0.0.1:{ports['framed_tcp']}"),
    ):
        with open_device(uri) as dev:
            before = dev.stats.frames_sent + dev.stats.frames_received
            rtts[name] = _paired(lambda d=dev: d.ping(b"*OPC?\n"), raw_echo, n, server=server)
            calls = 1 + max(1, n // 10) * 10  # the warm-up call and the timed blocks (`_paired`)
            frames_per_call[name] = (dev.stats.frames_sent + dev.stats.frames_received - before) / calls
    with open_device(f"visa://TCPIP0::127.0.0.1::{ports['scpi_tcp']}::SOCKET") as dev:
        rtts["device op safety() over scpi/tcp"] = _paired(dev.safety, raw_echo, n, server=server)
    with open_device(f"serial+socket://127.0.0.1:{ports['framed_tcp']}") as dev:
        rtts["device op safety() over framed/tcp"] = _paired(dev.safety, raw_echo, n, server=server)
    echo.close()
    os.close(pty_fd)

    base_row = {
        "benchmark": "layer",
        "layer": "raw socket echo (the baseline of every ratio)",
        "seconds": pty_socket.median,
        "raw_socket_echo_seconds": pty_socket.median,
        "rtt_ratio": 1.0,
        **_cpu_fields(pty_socket),
    }
    results.append(base_row)
    for name, (t, echo_t) in layers.items():
        results.append(
            {
                "benchmark": "layer",
                "layer": name,
                "seconds": t.median,
                "raw_socket_echo_seconds": echo_t.median,
                "rtt_ratio": t.median / echo_t.median,
                "rtt_ratio_best": t.best / echo_t.best,
                **_cpu_fields(t, echo_t),
            }
        )
    for name, (rtt, echo_t) in rtts.items():
        row = {
            "benchmark": "round_trip",
            "transport": name,
            "seconds": rtt.median,
            "raw_socket_echo_seconds": echo_t.median,
            "rtt_ratio": rtt.median / echo_t.median,
            "rtt_ratio_best": rtt.best / echo_t.best,
            "target": "<= 2",
            **_cpu_fields(rtt, echo_t),
            "raw_socket_echo_client_cpu_seconds": echo_t.client_cpu,
        }
        if "/pty" in name:  # also against a raw echo over a pty: the protocol's own overhead
            row["raw_pty_echo_seconds"] = pty_base.median
            row["rtt_ratio_vs_raw_pty"] = rtt.median / pty_base.median
        if name in frames_per_call:  # 2 when both ends hold ACKs back (see the module docstring)
            row["frames_per_round_trip"] = round(frames_per_call[name], 2)
        results.append(row)
    # what a pty costs by itself: the floor under the ratios of the /pty rows
    results.append(
        {
            "benchmark": "round_trip",
            "transport": "raw pty echo (no protocol)",
            "seconds": pty_base.median,
            "raw_socket_echo_seconds": pty_socket.median,
            "rtt_ratio": pty_base.median / pty_socket.median,
            "note": "floor of the /pty rows' rtt_ratio; rtt_ratio_vs_raw_pty is the protocol's share",
        }
    )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--board", default="emulator://?preset=rram&seed=0")
    parser.add_argument(
        "--placement",
        choices=("separate", "shared", "free"),
        default="separate",
        help="client and server on two cores (default), on one core, or wherever the scheduler puts them",
    )
    args = parser.parse_args()

    client_cpus, server_cpus = _placement(args.placement)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve, args=(child, args.board, server_cpus), daemon=True)
    proc.start()
    if client_cpus is not None:
        os.sched_setaffinity(0, client_cpus)
    ports = parent.recv()
    results: list[dict[str, Any]] = []
    try:
        nbytes = 2 * SIZE * SIZE * 4
        # raw baseline: one request byte, 2 MiB back
        raw = socket.create_connection(("127.0.0.1", ports["bulk"]))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray(nbytes)

        def raw_read() -> None:
            raw.sendall(b"x")
            _recv_exactly(raw, nbytes, buf)

        with open_device(f"visa://TCPIP0::127.0.0.1::{ports['scpi_tcp']}::SOCKET") as dev:
            g = dev.read_conductance("W0")
            raw_read()
            assert g[0].shape == (SIZE, SIZE) and g[0].tobytes() + g[1].tobytes() == bytes(buf)
            scpi, base = _paired(lambda: dev.read_conductance("W0"), raw_read, args.repeats)
        few = max(10, args.repeats // 2)
        with open_device(f"visa://TCPIP0::127.0.0.1::{ports['scpi_tcp']}::SOCKET?fast=0") as dev:
            plain, plain_base = _paired(lambda: dev.read_conductance("W0"), raw_read, few)
        raw.close()
        with open_device(args.board) as local:
            local.configure(TOPOLOGY)
            emu, _ = _paired(lambda: local.read_conductance("W0"), lambda: None, few)
        results.append(
            {
                "benchmark": "read_conductance_512x512",
                "transport": "scpi/tcp (pyvisa-py)",
                "bytes": nbytes,
                "seconds": scpi.median,
                "raw_socket_seconds": base.median,
                "mb_per_s": nbytes / scpi.median / 1e6,
                "raw_mb_per_s": nbytes / base.median / 1e6,
                "throughput_ratio": base.median / scpi.median,
                "throughput_ratio_best": base.best / scpi.best,
                "target": ">= 0.5",
                "throughput_ratio_pyvisa_read_bytes": plain_base.median / plain.median,
                "emulator_read_seconds_in_process": emu.median,
            }
        )

        results += _round_trips(ports, args, ServerClock(proc.pid))
    finally:
        parent.send("stop")
        proc.join(timeout=5)
        if proc.is_alive():
            proc.terminate()
    placement = {
        "placement": args.placement,
        "client_cpus": sorted(client_cpus) if client_cpus is not None else None,
        "server_cpus": sorted(server_cpus) if server_cpus is not None else None,
    }
    for r in results:
        print(json.dumps({**r, **placement}))


if __name__ == "__main__":
    main()
