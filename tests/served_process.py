"""A board served by a process of its own (`emulator.server.launch.serve`, what `hil emulator
serve` calls), for the tests that kill that process (SIGKILL: no close, no safe state, the
kernel closes its sockets) and start another on the same port.

The server program waits for a line on stdin before it serves (a standby: torch is imported
and the board built while the host trains, so the fresh board binds the port the moment the
dead one's is free), prints its URIs as one JSON line, and, with `hang_at` N, prints
``settling`` and blocks inside its N-th settle, so a test kills it in the middle of a request.
It exits when its stdin reaches EOF, so a test process that is itself SIGKILLed leaves none behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

_SERVER = """
import json, os, sys, threading
import torch
torch.set_num_threads(1)
from emulator.server.launch import serve
board, scpi_port, framed_port, hang_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
if not sys.stdin.readline():  # 'go': serve now; EOF: the test process is gone
    sys.exit(0)
served = serve(board, scpi_port=scpi_port, framed_port=framed_port, scpi_pty=False, framed_pty=False)
inner = served.device.settle
settles = [0]
def settle(*args, **kwargs):
    settles[0] += 1
    if settles[0] == hang_at:
        print("settling", flush=True)
        threading.Event().wait()  # in the middle of a request until the test kills this process
    return inner(*args, **kwargs)
served.device.settle = settle
print(json.dumps(served.uris), flush=True)
sys.stdin.read()  # until EOF: the test closes stdin or is gone (SIGKILLed pytest leaves no server)
os._exit(0)
"""


def free_port() -> int:
    """A TCP port of 127.0.0.1 free at the moment (the servers bind it with SO_REUSEADDR)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    """One server process of `board` on (`scpi_port`, `framed_port`) of 127.0.0.1."""

    board: str
    scpi_port: int
    framed_port: int
    hang_at: int = 0  # block inside this settle (0: never)
    proc: subprocess.Popen[str] = field(init=False)
    uris: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        argv = [str(a) for a in (self.board, self.scpi_port, self.framed_port, self.hang_at)]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )

    def go(self) -> dict[str, str]:
        """Serve now; the URIs once the ports are bound."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(
                f"the server process of {self.board} exited ({self.proc.wait()}) before serving"
            )
        self.uris = json.loads(line)
        return self.uris

    def wait_for_hang(self) -> None:
        """Until the server is inside its `hang_at`-th settle."""
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "settling":
            raise RuntimeError(f"the server process said {line!r}, not 'settling' (exit {self.proc.poll()})")

    def kill(self) -> None:
        """SIGKILL, and wait until it is gone (its sockets closed by the kernel)."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait(timeout=10)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


@contextlib.contextmanager
def server_processes(board: str, n: int, hang_at: int) -> Iterator[list[ServerProcess]]:
    """`n` server processes of `board` for the same two free ports, started at once (the first
    hangs in its `hang_at`-th settle; the others are standbys, which serve when told `go`)."""
    scpi_port, framed_port = free_port(), free_port()
    procs = [ServerProcess(board, scpi_port, framed_port, hang_at if i == 0 else 0) for i in range(n)]
    try:
        yield procs
    finally:
        for p in procs:
            p.close()
