"""`hil emulator serve` on a TCP port that is taken said only "[Errno 98] Address already in
use": now it names the option and the port, and that port 0 picks a free one (with --json
printing the ports chosen)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    ("option", "other"), [("--scpi-port", "--serial-port"), ("--serial-port", "--scpi-port")]
)
def test_a_taken_port_names_the_option_the_port_and_port_0(option: str, other: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cmd = [sys.executable, "-m", "hil.cli", "emulator", "serve", "--preset", "ideal"]
        cmd += [option, str(port), other, "-1"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    line = lines[0]
    assert line.startswith(f"error: cannot serve: {option} {port}: 127.0.0.1:{port} is already in use"), line
    assert f"{option} 0 to pick a free one" in line and "--json prints the ports chosen" in line, line
    assert "Traceback" not in done.stderr


def test_the_launcher_says_which_server_s_port_is_taken() -> None:
    from emulator.server.launch import ListenPortTaken, serve

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ListenPortTaken) as info:
            serve(
                "emulator://?preset=ideal", scpi_port=None, framed_port=port, scpi_pty=False, framed_pty=False
            )
    assert (info.value.server, info.value.port) == ("framed", port)
    assert str(port) in str(info.value)
