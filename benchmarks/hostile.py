"""Hostile-peer benchmark of the emulated board's servers (issue 16).

Per server (SCPI over TCP; the framed protocol over TCP), with the board and both servers
in a child process (as a board's firmware would be), and raw sockets playing the attacker:

1. Inputs tried per class of issue 16 (integer width, unbounded work, non-finite floats,
   resource exhaustion, protocol edge), each a request that a correct board must refuse
   (or, for the resource and edge classes, survive); how many were answered without an
   error although out of limit (`out_of_limit_accepted`, must be 0); then the board's
   safety counters (`violations` must stay 0) and its true conductances read back inside
   every device's own range.
2. Crashes: the server process died, or a probe connection was not served, after any
   phase (0 expected).
3. Peak RSS of the server process while as many connections as the server admits flood it
   with large blocks (SCPI: a block of just under `MAX_BLOCK_IN` each, never finished) or
   large fragmented messages (framed: fragments up to `max_message`, never finished), vs
   the declared cap (connections x per-connection buffer cap, from the constants in
   `emulator/server`).
4. Round-trip time of a well-behaved client (SCPI `*OPC?` through pyvisa-py; a framed
   PING through `serial+socket://`), connected first, while 50 hostile clients run in
   another process (they connect and flood; the server admits up to its cap, the others are
   refused and keep retrying), as a ratio to the same client's RTT on the idle server
   (target <= 2). Idle and loaded blocks alternate (ABBA order), so load from other work on
   the machine hits both alike; an idle block starts only once the server holds no hostile
   connection (it has worked off what they left buffered); medians and p90s are reported.
   The hostile process floods as fast as it can and shares the machine's cores with the
   server and the client, so on a small machine part of the slowdown is plain CPU contention.

`overlong_line_tail_ran` (SCPI) is 1 if the server runs the tail of a line just over
`MAX_LINE` sent in one piece (the bug this benchmark found; fixed, and kept as
tests/test_fuzz_servers.py::test_scpi_line_just_over_max_line_is_dropped_whole).

Ends by printing one JSON object per line.

    .venv/bin/python benchmarks/hostile.py [--quick] [--per-class 40] [--rounds 6] [--hostile 50]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import re
import select
import socket
import statistics
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from drivers import open_device
from drivers.topology import Topology
from drivers.wire import frames
from drivers.wire.frames import Flag, Frame, LinkOp
from drivers.wire.link import Link
from drivers.wire.payload import Op
from hil.testing import socket_link

BOARD = "emulator://?preset=rram&seed=0"
TOPO = Topology.layered([3, 2])  # W0: 4 x 2
ROWS, COLS = 4, 2
ERROR_LINE = re.compile(rb'-?[0-9]+,"')
CLASSES = ("integer_width", "unbounded_work", "non_finite", "resource_exhaustion", "protocol_edge")


# ---- the child: board and servers ----------------------------------------------------


def _status(pid: int | str = "self") -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _serve(conn: Any) -> None:
    from emulator.server import FramedServer, ScpiServer

    device = open_device(BOARD)
    device.configure(TOPO)
    scpi, framed = ScpiServer(device), FramedServer(device)
    ports = {"scpi": scpi.listen_tcp()[1], "framed": framed.listen_tcp()[1]}
    conn.send(ports)
    while True:
        cmd = conn.recv()
        if cmd == "stop":
            break
        if cmd == "reset_peak":  # VmHWM restarts from the current RSS
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            conn.send(_status())
        elif cmd == "check":
            if device.topology != TOPO:
                device.configure(TOPO)
            tile = device.board.tile("W0")  # type: ignore[attr-defined]  # the emulator's true state
            truth = tile.truth()
            g = tile.conductances(device.board.clock)  # type: ignore[attr-defined]
            outside = sum(
                int((~np.isfinite(gk.numpy())).sum())
                + int((gk > truth["g_max"][k] * (1 + 1e-6)).sum())
                + int((gk < 0).sum())
                for k, gk in enumerate(g)
            )
            s = device.safety()
            conn.send(
                {
                    "refused": s.refused,
                    "violations": s.violations,
                    "conductances_outside_range": outside,
                    "scpi_refused_connections": scpi.gate.refused,
                    "framed_refused_connections": framed.gate.refused,
                    "accept_failures": sum(x.failures for x in (*scpi.listeners, *framed.listeners)),
                    "threads": threading.active_count(),
                    **_status(),
                }
            )
        elif cmd == "active":
            conn.send({"scpi": scpi.gate.active, "framed": framed.gate.active})
        elif cmd == "configure":
            device.configure(TOPO)
            conn.send(True)
    scpi.close()
    framed.close()


# ---- raw clients ---------------------------------------------------------------------


def _connect(port: int, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class RawScpi:
    """A raw SCPI peer that reads one response message (text or a definite-length block)."""

    def __init__(self, port: int) -> None:
        self.sock = _connect(port)
        self.buf = bytearray()

    def _fill(self) -> None:
        got = self.sock.recv(1 << 16)
        if not got:
            raise EOFError("server closed the connection")
        self.buf += got

    def response(self) -> bytes:
        while True:
            if self.buf[:1] == b"#" and len(self.buf) >= 2:
                nd = self.buf[1] - 0x30
                while len(self.buf) < 2 + nd:
                    self._fill()
                end = 2 + nd + int(self.buf[2 : 2 + nd] or b"0")
                while len(self.buf) < end + 1:
                    self._fill()
                out = bytes(self.buf[:end])
                del self.buf[: end + 1]
                return out
            i = self.buf.find(b"\n")
            if i >= 0 and self.buf[:1] != b"#":
                out = bytes(self.buf[:i])
                del self.buf[: i + 1]
                return out
            self._fill()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def error(self) -> int:
        self.send(b"SYST:ERR?\n")
        return int(self.response().split(b",")[0])

    def close(self) -> None:
        self.sock.close()


def _block(data: bytes) -> bytes:
    n = str(len(data)).encode()
    return b"#" + str(len(n)).encode() + n + data


def _f4(values: list[float], n: int) -> bytes:
    return np.resize(np.array(values, np.float32), n).astype("<f4").tobytes()


def _i4(values: list[int], n: int) -> bytes:
    return np.resize(np.array(values, np.int64), n).astype("<i4").tobytes()


def _topo_json(
    gain: str | bytes = "1.0", w_max: str | bytes = "1.0", budget: str | bytes = "{}", size: str | bytes = "2"
) -> bytes:
    return (
        b'{"groups":{"s0":3,"s1":%s},"couplings":[{"tile":"W0","rows":["s0","bias"],"cols":["s1"],'
        b'"kind":"bipartite","w_max":%s}],"gain":%s,"mode":"analog","budget":%s}'
    ) % tuple(x if isinstance(x, bytes) else x.encode() for x in (size, w_max, gain, budget))


HUGE_INTS = ["2147483648", "-2147483649", "9223372036854775808", "18446744073709551616", "1" + "0" * 40]
BAD_RIDS = ["9007199254740992", "9223372036854775808", "-1", "1" + "0" * 40, "1.5"]  # not in [0, 2^53)
NONFINITE = ["nan", "inf", "-inf", "1e309", "-1e309"]
NONFINITE_JSON = ["NaN", "Infinity", "-Infinity", "1e309", "-1e309"]


def _scpi_cases(rng: random.Random, n: int) -> dict[str, list[tuple[bytes, str]]]:
    """Per class: (line, expect) with expect 'error' (must be refused) or 'survive'."""
    g = _f4([5e-6], 2 * ROWS * COLS)
    cases: dict[str, list[tuple[bytes, str]]] = {c: [] for c in CLASSES}
    for _ in range(n):
        big = rng.choice(HUGE_INTS)
        cases["integer_width"].append(
            rng.choice(
                [
                    b'TILE:PULS? "W0",' + _block(_i4([rng.choice([2**31 - 1, -(2**31), 1001, -1001])], 16)),
                    b'TILE:PROG? "W0",ON,DEF,' + big.encode() + b"," + _block(g),
                    b"*ESE " + big.encode(),
                    b"SYST:WAIT 0," + rng.choice(BAD_RIDS).encode(),
                    b"CONF:TOP " + _block(_topo_json(size=big)),
                    b"CONF:TOP " + _block(_topo_json(budget=f'{{"max_steps":{big}}}')),
                ]
            ),
        )
        nf, nfj = rng.choice(NONFINITE), rng.choice(NONFINITE_JSON)
        cases["unbounded_work"].append(
            rng.choice(
                [
                    b'TILE:PROG? "W0",ON,DEF,1001,' + _block(g),
                    b'TILE:PROG? "W0",ON,' + nf.encode() + b",20," + _block(g),
                    b"SYST:WAIT " + rng.choice(["1e10", "1e300", "inf", "nan"]).encode(),
                    b"CONF:TOP " + _block(_topo_json(budget='{"max_steps":100000000}')),
                    b"CONF:TOP " + _block(_topo_json(budget=f'{{"tol":{nfj}}}')),
                    b"CONF:TOP " + _block(_topo_json(budget='{"check_every":1000000}')),
                ]
            ),
        )
        cases["non_finite"].append(
            rng.choice(
                [
                    b"CONF:TOP " + _block(_topo_json(gain=nfj)),
                    b"CONF:TOP " + _block(_topo_json(w_max=nfj)),
                    b"CONF:TOP " + _block(_topo_json(gain="1e3")),
                    b'TILE:MVM? "W0",0,' + _block(_f4([float(nf)], ROWS)),
                    b'TILE:PROG? "W0",OFF,DEF,1,' + _block(_f4([float(nf), 5e-6], 2 * ROWS * COLS)),
                    b"NET:SETT? "
                    + _block(
                        b'{"trace":false,"beta":{"s1":%s},"arrays":[["clamp/s0","f4",[1,3]],'
                        b'["target/s1","f4",[1,2]]]}' % nfj.encode()
                    )
                    + b","
                    + _block(_f4([0.5], 5)),
                ]
            ),
        )
    for _ in range(max(2, n // 8)):  # each is large: fewer
        cases["resource_exhaustion"].append(
            rng.choice(
                [
                    b'TILE:PULS? "W0",#9' + b"%09d" % (20 << 20) + b"\x01" * (20 << 20),  # over MAX_BLOCK_IN
                    b"A" * ((1 << 20) + 100),  # over MAX_LINE
                    b"SYST:TRAN:BEG " + b'"' + b"t" * 300 + b'"',
                ]
            )
        )
    for _ in range(n):
        cases["protocol_edge"].append(
            rng.choice(
                [
                    b"*ESE " + rng.choice(["300", "-1", "1.5", "abc", "0x10"]).encode(),
                    b'TILE:PULS? "W0",#0' + b"x" * 8,
                    b"CONF:TOP #3abc",
                    b"FOO:BAR" + bytes(rng.randrange(256) for _ in range(10)).replace(b"\n", b" "),
                    b'TILE:COND? "' + b"W" * 3000 + b'"',
                    b"SYST:WAIT 0.001,-1",
                ]
            )
        )
    return {c: [(line, "error") for line in lines] for c, lines in cases.items()}  # type: ignore[misc]


def _framed_link(sock: socket.socket) -> Link:
    return socket_link(sock, ack_timeout=1.0, retries=4, seq0=random.randrange(1 << 16))


def _msg(meta: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<I", len(meta)) + meta + data


def _framed_cases(rng: random.Random, n: int) -> dict[str, list[tuple[int, bytes]]]:
    def rid() -> bytes:
        return b',"rid":%d' % rng.randrange(1 << 53)

    def counts(code: str, value: int | float) -> bytes:
        arr = np.full((2, ROWS, COLS), value, dtype={"i4": "<i4", "i8": "<i8", "f8": "<f8"}[code]).tobytes()
        meta = b'{"tile":"W0"%s,"arrays":[["counts_plus","%s",[4,2]],["counts_minus","%s",[4,2]]]}' % (
            rid(),
            code.encode(),
            code.encode(),
        )
        return _msg(meta, arr)

    def program(iters: bytes, tol: bytes = b"null", g: float = 5e-6, verify: bytes = b"true") -> bytes:
        meta = (
            b'{"tile":"W0","verify":%s,"tol":%s,"max_iters":%s%s,'
            b'"arrays":[["g_plus","f4",[4,2]],["g_minus","f4",[4,2]]]}'
        )
        return _msg(meta % (verify, tol, iters, rid()), _f4([g, 5e-6], 2 * ROWS * COLS))

    cases: dict[str, list[tuple[int, bytes]]] = {c: [] for c in CLASSES}
    for _ in range(n):
        big = rng.choice(HUGE_INTS).encode()
        nfj = rng.choice(NONFINITE_JSON).encode()
        cases["integer_width"].append(
            rng.choice(
                [
                    (Op.PULSE, counts("i4", rng.choice([2**31 - 1, -(2**31), 1001]))),
                    (Op.PULSE, counts("i8", rng.choice([2**31, 2**32 + 1, -(2**40), 2**63 - 1]))),
                    (Op.PULSE, counts("f8", rng.choice([2.0**31, 1e300, 1.5]))),
                    (Op.PROGRAM, program(big)),
                    (Op.PROGRAM, program(b"20.0")),
                    (Op.WAIT, _msg(b'{"seconds":0,"rid":%s}' % rng.choice(BAD_RIDS).encode())),
                    (Op.CONFIGURE, _msg(_topo_json(size=big))),
                    (Op.MVM, _msg(b'{"tile":"W0","transpose":false,"arrays":[["x","f4",[2147483647,4]]]}')),
                ]
            )
        )
        cases["unbounded_work"].append(
            rng.choice(
                [
                    (Op.PROGRAM, program(b"1001")),
                    (Op.PROGRAM, program(b"20", tol=nfj)),
                    (
                        Op.WAIT,
                        _msg(
                            b'{"seconds":%s%s}'
                            % (rng.choice([b"1e10", b"1e300", b"Infinity", b"NaN"]), rid())
                        ),
                    ),
                    (Op.CONFIGURE, _msg(_topo_json(budget='{"max_steps":100000000}'))),
                    (Op.CONFIGURE, _msg(_topo_json(budget=f'{{"tol":{nfj.decode()}}}'))),
                    (
                        Op.SETTLE,
                        _msg(
                            b'{"trace":100000000,"beta":{},"arrays":[["clamp/s0","f4",[1,3]]]}', _f4([0.5], 3)
                        ),
                    ),
                ]
            )
        )
        cases["non_finite"].append(
            rng.choice(
                [
                    (Op.CONFIGURE, _msg(_topo_json(gain=nfj.decode()))),
                    (Op.CONFIGURE, _msg(_topo_json(w_max=nfj.decode()))),
                    (
                        Op.MVM,
                        _msg(
                            b'{"tile":"W0","transpose":false,"arrays":[["x","f4",[1,4]]]}',
                            _f4([float(nfj)], 4),
                        ),
                    ),
                    (Op.PROGRAM, program(b"1", g=float(nfj), verify=b"false")),
                    (
                        Op.SETTLE,
                        _msg(
                            b'{"trace":false,"beta":{"s1":%s},"arrays":[["clamp/s0","f4",[1,3]],["grad/s1","f4",[1,2]]]}'
                            % rng.choice([nfj, b"1e3"]),
                            _f4([0.5, 0.5, 0.5, 3e38, 3e38], 5),
                        ),
                    ),
                ]
            )
        )
        cases["protocol_edge"].append(
            rng.choice(
                [
                    (Op.PULSE, _msg(b'{"tile":"W0","arrays":[["counts_plus","i4",[4,2]],'
                                    b'["counts_minus","i4",[4,2]]]}', bytes(64))),
                    (Op.WAIT, _msg(b'{"seconds":0}')),
                    (0x7F, b"whatever"),
                    (Op.INFO, b"\xff\xff\xff\x7f{}"),
                    (Op.MVM, _msg(b'{"tile":"W0","transpose":false,'
                                  b'"arrays":[["x","f4",[1,1,1,1,1,1,1,1,1]]]}', bytes(4))),
                ]
            )
        )  # fmt: skip
    for _ in range(max(2, n // 8)):  # over max_message (8 MiB): dropped as it arrives, -223
        cases["resource_exhaustion"].append((LinkOp.PING, b"x" * (frames.MAX_MESSAGE + 1)))
    return cases


# ---- phases --------------------------------------------------------------------------


def _scpi_classes(port: int, per_class: int, rng: random.Random) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    peer = RawScpi(port)
    for cls, items in _scpi_cases(rng, per_class).items():
        tried = accepted = 0
        for line, _ in items:
            # a query's response (if the line parsed at all) comes first, then the error line
            peer.send(line + b"\nSYST:ERR?\n")
            while not ERROR_LINE.match(got := peer.response()):
                pass
            code = int(got.split(b",")[0])
            while peer.error() != 0:  # drain the rest of the queue
                pass
            tried += 1
            accepted += code == 0
        out[cls] = {"tried": tried, "out_of_limit_accepted": accepted}
    # the edge the tests name: the tail of an overlong line must not run
    peer.send(b"A" * ((1 << 20) + 10) + b";*ESE 4\n")
    peer.error()
    peer.send(b"*ESE?\n")
    ran = peer.response() != b"0"
    out["protocol_edge"]["tried"] += 1
    out["protocol_edge"]["out_of_limit_accepted"] += ran
    out["protocol_edge"]["overlong_line_tail_ran"] = int(ran)
    peer.close()
    return out


def _framed_exchange(link: Link, opcode: int, body: bytes) -> tuple[Frame, bytes]:
    seq = link.send(opcode, body)
    deadline = time.monotonic() + 30
    while True:
        got = link.receive(max(0.0, deadline - time.monotonic()), response=True, ref=seq)
        if got is None:
            raise TimeoutError(f"no reply to {opcode:#x}")
        if got[0].opcode == opcode:
            return got


def _framed_classes(port: int, per_class: int, rng: random.Random) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    with _connect(port) as sock:
        link = _framed_link(sock)
        _framed_exchange(link, LinkOp.HELLO, b"")
        for cls, items in _framed_cases(rng, per_class).items():
            tried = accepted = 0
            for opcode, body in items:
                first, _ = _framed_exchange(link, int(opcode), body)
                tried += 1
                accepted += not first.flags & Flag.ERROR
            out[cls] = {"tried": tried, "out_of_limit_accepted": accepted}
    return out


def _probe(kind: str, port: int) -> bool:
    try:
        if kind == "scpi":
            peer = RawScpi(port)
            peer.send(b"*OPC?\n")
            ok = peer.response() == b"1"
            peer.close()
            return ok
        with _connect(port) as sock:
            return _framed_exchange(_framed_link(sock), LinkOp.PING, b"probe")[1] == b"probe"
    except (OSError, EOFError, TimeoutError, AssertionError):
        return False


# ---- floods --------------------------------------------------------------------------


def _flood_scpi(sock: socket.socket, stop: threading.Event, big: bool) -> None:
    """Send a never-finished block just under MAX_BLOCK_IN (big), or garbage and queries."""
    from emulator.server.scpi import MAX_BLOCK_IN

    chunk = b"\x01" * (1 << 16)
    if big:
        n = MAX_BLOCK_IN - 1
        sock.sendall(b'TILE:PULS? "W0",#8%08d' % n)
        sent = 0
        while sent < n - len(chunk) and not stop.is_set():
            sock.sendall(chunk)
            sent += len(chunk)
        stop.wait()
        return
    junk = b"*IDN?;FOO:BAR 1e309;*ESE 2147483648\n" * 50 + b"\xff\x00garbage\n" * 50
    while not stop.is_set():
        sock.sendall(junk)
        while select.select([sock], [], [], 0)[0]:
            if not sock.recv(1 << 16):
                return


def _flood_framed(sock: socket.socket, stop: threading.Event, big: bool, max_message: int) -> None:
    """Fragments of a message that never ends (big: up to max_message), read and discard."""
    part = b"\x02" * frames.MAX_FRAGMENT
    seq = random.randrange(1 << 16)
    sent = 0
    limit = max_message - 2 * frames.MAX_FRAGMENT if big else 1 << 62
    while not stop.is_set() and sent < limit:
        flags = Flag.START | Flag.MORE if sent == 0 else Flag.MORE
        sock.sendall(frames.encode(Frame(LinkOp.PING, seq, int(flags), part)))
        seq += 1
        sent += len(part)
        while select.select([sock], [], [], 0)[0]:
            if not sock.recv(1 << 16):
                return
        if not big and sent > 4 * max_message:  # start over: a new START resets reassembly
            sent = 0
    while not stop.is_set():
        if select.select([sock], [], [], 0.05)[0] and not sock.recv(1 << 16):
            return


def _hostile_client(kind: str, port: int, go: Any, quit_: Any, big: bool, retry_s: float) -> None:
    """One hostile peer (a thread of the hostile process): while `go` is set, connect (again
    after a refusal, every `retry_s`) and flood; when it clears, hang up."""
    while not quit_.is_set():
        if not go.wait(0.1):
            continue
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        except OSError:
            time.sleep(retry_s)
            continue
        stop = threading.Event()
        watcher = threading.Thread(target=_watch, args=(go, quit_, stop))
        watcher.start()
        try:
            sock.settimeout(5)
            if kind == "scpi":
                _flood_scpi(sock, stop, big)
            else:
                _flood_framed(sock, stop, big, frames.MAX_MESSAGE)
        except OSError:
            pass
        finally:
            stop.set()
            sock.close()
            watcher.join()
        if go.is_set():
            time.sleep(retry_s)  # refused (closed by the server) or hung up on: retry


def _watch(go: Any, quit_: Any, stop: threading.Event) -> None:
    """Set `stop` once the flood is called off (or the connection ended by itself)."""
    while go.is_set() and not quit_.is_set() and not stop.is_set():
        time.sleep(0.02)
    stop.set()


def _hostile_process(
    kind: str, port: int, clients: int, go: Any, quit_: Any, big: bool, retry_s: float
) -> None:
    threads = [
        threading.Thread(target=_hostile_client, args=(kind, port, go, quit_, big, retry_s), daemon=True)
        for _ in range(clients)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# ---- main ----------------------------------------------------------------------------


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _quiet(conn: Any, kind: str, keep: int, timeout: float = 30.0) -> float:
    """Wait until the server holds at most `keep` connections (the hostile ones are gone and
    it has worked off what they left in its buffers); the seconds it took."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        conn.send("active")
        if conn.recv()[kind] <= keep:
            break
        time.sleep(0.05)
    time.sleep(0.2)
    return time.monotonic() - t0


def _rtt(
    kind: str, port: int, ctx: Any, conn: Any, clients: int, rounds: int, calls: int, retry_s: float
) -> dict[str, Any]:
    go, quit_ = ctx.Event(), ctx.Event()
    proc = ctx.Process(
        target=_hostile_process, args=(kind, port, clients, go, quit_, False, retry_s), daemon=True
    )
    proc.start()
    idle: list[float] = []
    loaded: list[float] = []
    failures = 0
    drain: list[float] = []
    uri = (
        f"visa://TCPIP0::127.0.0.1::{port}::SOCKET"
        if kind == "scpi"
        else f"serial+socket://127.0.0.1:{port}?timeout=30"
    )
    with open_device(uri) as dev:  # connected first: it holds a slot before the flood
        call: Callable[[], object] = (
            (lambda: dev.query("*OPC?")) if kind == "scpi" else (lambda: dev.ping(b"x"))
        )
        for _ in range(5):
            call()

        def block(out: list[float]) -> None:
            nonlocal failures
            for _ in range(calls):
                t0 = time.perf_counter()
                try:
                    call()
                except Exception:
                    failures += 1
                    continue
                out.append(time.perf_counter() - t0)

        def loaded_block() -> None:
            go.set()
            time.sleep(1.0)  # the hostile clients connect and start flooding
            block(loaded)
            go.clear()
            drain.append(_quiet(conn, kind, keep=1))  # idle means idle: only the good client left

        for r in range(rounds):  # ABBA: idle, loaded, loaded, idle, ...
            order = (lambda: block(idle), loaded_block) if r % 2 == 0 else (loaded_block, lambda: block(idle))
            for step in order:
                step()
    quit_.set()
    go.set()
    proc.join(timeout=10)
    if proc.is_alive():
        proc.terminate()
    return {
        "idle_median_s": statistics.median(idle),
        "idle_p90_s": _pct(idle, 0.9),
        "loaded_median_s": statistics.median(loaded),
        "loaded_p90_s": _pct(loaded, 0.9),
        "rtt_ratio_median": statistics.median(loaded) / statistics.median(idle),
        "rtt_ratio_p90": _pct(loaded, 0.9) / _pct(idle, 0.9),
        "calls_each": len(idle),
        "client_failures": failures,
        "server_drain_after_flood_s_max": round(max(drain), 2),
    }


def _flood_rss(kind: str, port: int, ctx: Any, conn: Any, connections: int, seconds: float) -> dict[str, Any]:
    """Peak RSS of the server process while `connections` peers each push one large
    never-finished block / message; the peak counter is reset just before."""
    conn.send("reset_peak")
    before = conn.recv()
    go, quit_ = ctx.Event(), ctx.Event()
    proc = ctx.Process(
        target=_hostile_process, args=(kind, port, connections, go, quit_, True, 0.05), daemon=True
    )
    proc.start()
    go.set()
    time.sleep(seconds)
    conn.send("check")
    during = conn.recv()
    go.clear()
    quit_.set()
    proc.join(timeout=20)
    if proc.is_alive():
        proc.terminate()
    _quiet(conn, kind, keep=0)
    return {"rss_before": before["VmRSS"], "peak": during["VmHWM"], "rss_during": during["VmRSS"]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a short run: fewer inputs, rounds and calls")
    parser.add_argument("--per-class", type=int, default=40, help="inputs per class (resource class: 1/8)")
    parser.add_argument("--rounds", type=int, default=6, help="idle/loaded RTT block pairs (ABBA)")
    parser.add_argument("--calls", type=int, default=30, help="RTT calls per block")
    parser.add_argument("--hostile", type=int, default=50, help="hostile clients during the RTT phase")
    parser.add_argument("--retry-ms", type=float, default=20.0, help="a refused hostile client's retry delay")
    parser.add_argument("--flood-s", type=float, default=4.0, help="seconds of the RSS flood")
    args = parser.parse_args()
    if args.quick:
        args.per_class, args.rounds, args.calls, args.flood_s = 10, 2, 15, 2.5

    from emulator.server import framed as framed_mod
    from emulator.server import links as links_mod
    from emulator.server import scpi as scpi_mod

    t_start = time.perf_counter()
    rng = random.Random(0)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    server = ctx.Process(target=_serve, args=(child,), daemon=True)
    server.start()
    ports = parent.recv()
    results: list[dict[str, Any]] = []
    try:
        for kind in ("scpi", "framed"):
            t0 = time.perf_counter()
            port = ports[kind]
            crashes = 0
            parent.send("check")
            start = parent.recv()
            classes = (_scpi_classes if kind == "scpi" else _framed_classes)(port, args.per_class, rng)
            crashes += not (server.is_alive() and _probe(kind, port))
            parent.send("check")
            after = parent.recv()
            cap_conn = links_mod.MAX_CONNECTIONS
            if kind == "scpi":
                per_conn = scpi_mod.MAX_LINE + scpi_mod.MAX_BLOCK_IN
            else:
                per_conn = framed_mod.frames.MAX_MESSAGE + 8 * frames.MAX_ENCODED  # message + a bounded inbox
            flood = _flood_rss(kind, port, ctx, parent, cap_conn + 4, args.flood_s)
            crashes += not (server.is_alive() and _probe(kind, port))
            rtt = _rtt(kind, port, ctx, parent, args.hostile, args.rounds, args.calls, args.retry_ms / 1000)
            crashes += not (server.is_alive() and _probe(kind, port))
            parent.send("configure")
            parent.recv()
            parent.send("check")
            end = parent.recv()
            accepted = sum(c["out_of_limit_accepted"] for c in classes.values())
            results.append(
                {
                    "benchmark": "hostile_inputs",
                    "server": kind,
                    "inputs_tried": {c: v["tried"] for c, v in classes.items()},
                    "out_of_limit_accepted_by_class": {
                        c: v["out_of_limit_accepted"] for c, v in classes.items()
                    },
                    "out_of_limit_accepted": accepted,
                    **(
                        {"overlong_line_tail_ran": classes["protocol_edge"]["overlong_line_tail_ran"]}
                        if kind == "scpi"
                        else {}
                    ),
                    "board_refused": after["refused"] - start["refused"],
                    "board_violations": end["violations"],
                    "conductances_outside_range": end["conductances_outside_range"],
                    "crashes": crashes,
                    "accept_failures": end["accept_failures"],
                    "target": "out_of_limit_accepted == 0, violations == 0, crashes == 0",
                }
            )
            cap = cap_conn * per_conn
            results.append(
                {
                    "benchmark": "flood_rss",
                    "server": kind,
                    "flood": "never-finished blocks of MAX_BLOCK_IN - 1 bytes"
                    if kind == "scpi"
                    else "never-finished fragmented messages up to max_message",
                    "connections_tried": cap_conn + 4,
                    "connections_admitted_cap": cap_conn,
                    "rss_before_mib": round(flood["rss_before"] / 2**20, 1),
                    "peak_rss_mib": round(flood["peak"] / 2**20, 1),
                    "peak_growth_mib": round((flood["peak"] - flood["rss_before"]) / 2**20, 1),
                    "declared_cap_mib": round(cap / 2**20, 1),
                    "growth_over_cap": round((flood["peak"] - flood["rss_before"]) / cap, 3),
                    "target": "peak_growth <= declared_cap",
                }
            )
            results.append(
                {
                    "benchmark": "rtt_under_hostile_load",
                    "server": kind,
                    "client": "pyvisa-py *OPC?" if kind == "scpi" else "serial+socket PING",
                    "hostile_clients": args.hostile,
                    "retry_ms": args.retry_ms,
                    **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in rtt.items()},
                    "target": "rtt_ratio_median <= 2",
                    "seconds": round(time.perf_counter() - t0, 1),
                }
            )
    finally:
        parent.send("stop")
        server.join(timeout=10)
        if server.is_alive():
            server.terminate()
    results.append(
        {
            "benchmark": "hostile_run",
            "wall_seconds": round(time.perf_counter() - t_start, 1),
            "cpus": os.cpu_count(),
            "quick": args.quick,
        }
    )
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
