"""`hil emulator serve --exit-with-parent`: a server that a test fixture or a shell script
started in the background stops, as on SIGTERM (servers closed, board safe, exit 143), once
its parent is SIGKILLed. Without it the server outlived its parent, holding its port.

The test runs a grandparent process that is a child subreaper (Linux prctl), so the orphaned
server is reparented to it, which can then wait for it and read its exit status."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl subreaper: Linux")

_GRANDPARENT = textwrap.dedent(
    """
    import ctypes, json, os, signal, subprocess, sys, time
    assert ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    parent = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, text=True)
    server = int(parent.stdout.readline())
    served = json.loads(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    def give_up(*_):
        os.kill(server, signal.SIGKILL)
        print(json.dumps({"code": "still running 20 s after its parent was killed"}), flush=True)
        os._exit(1)
    signal.signal(signal.SIGALRM, give_up)
    signal.alarm(20)
    t0 = time.monotonic()
    _, status = os.waitpid(server, 0)
    print(json.dumps({"uris": served["uris"], "code": os.waitstatus_to_exitcode(status),
                      "after_s": time.monotonic() - t0}), flush=True)
    """
)
_SERVE = [sys.executable, "-m", "hil.cli", "emulator", "serve", "--preset", "ideal", "--json"]
_SERVE += ["--scpi-port", "0", "--serial-port", "0", "--exit-with-parent"]


@pytest.mark.parametrize("parent", ["python", "bash"])
def test_serve_exits_with_its_sigkilled_parent_as_on_sigterm(parent: str, tmp_path: Path) -> None:
    err = tmp_path / "serve.err"
    if parent == "python":  # a pytest fixture's Popen
        starter = "import os, subprocess, sys\n"
        starter += "p = subprocess.Popen(sys.argv[1:], stderr=open(os.environ['ERR'], 'w'))\n"
        starter += "print(p.pid, flush=True)\np.wait()"
        argv = [sys.executable, "-c", starter, *_SERVE]
    else:  # a CI shell script's `hil emulator serve ... &`
        argv = ["bash", "-c", '"$@" 2>"$ERR" & echo $!; wait', "bash", *_SERVE]
    done = subprocess.run(
        [sys.executable, "-c", _GRANDPARENT, *argv],
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, "ERR": str(err)},
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["code"] == 143, (result, err.read_text())  # as after SIGTERM: stopped cleanly
    assert result["after_s"] < 5, result
    assert "is gone: stopping the servers" in err.read_text()
    for uri in result["uris"].values():  # its ports are closed
        port = int(re.search(r"[:]+(\d+)", uri.split("127.0.0.1", 1)[1]).group(1))  # type: ignore[union-attr]
        with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=2):
            pass


def test_the_option_is_in_the_help() -> None:
    done = subprocess.run([*_SERVE[:5], "--help"], capture_output=True, text=True, timeout=60)
    assert "--exit-with-parent" in done.stdout


# pid 1 of a new PID namespace (a user namespace: no privilege needed) starts a shell that
# starts the server in the background and exits at once: the server, adopted by that pid 1
# before its interpreter is up, finds init as its parent from the start
_NS_INIT = textwrap.dedent(
    """
    import json, os, signal, subprocess, sys, time
    assert os.getpid() == 1
    sh = subprocess.run(["sh", "-c", '"$@" >/dev/null 2>"$ERR" & echo $!', "sh", *sys.argv[1:]],
                        stdout=subprocess.PIPE, text=True, check=True)
    server = int(sh.stdout)
    def give_up(*_):
        os.kill(server, signal.SIGKILL)
        print(json.dumps({"code": "still running 20 s after it started under init"}), flush=True)
        os._exit(0)
    signal.signal(signal.SIGALRM, give_up)
    signal.alarm(20)
    t0 = time.monotonic()
    _, status = os.waitpid(server, 0)
    print(json.dumps({"code": os.waitstatus_to_exitcode(status), "after_s": time.monotonic() - t0}),
          flush=True)
    """
)


def _pid_namespace() -> list[str] | None:
    """The command prefix that runs a program as pid 1 of a new PID namespace, or None."""
    prefix = ["unshare", "--user", "--map-root-user", "--pid", "--fork"]
    try:
        done = subprocess.run([*prefix, "true"], capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return prefix if done.returncode == 0 else None


def test_serve_with_init_as_its_parent_from_the_start_stops_at_once(tmp_path: Path) -> None:
    """The parent gone before the server could look (so init adopted it): waiting for the
    parent pid to change served for ever. It stops as on SIGTERM, nothing served."""
    prefix = _pid_namespace()
    if prefix is None:
        pytest.skip("no unprivileged PID namespace here (unshare --user --pid)")
    err = tmp_path / "serve.err"
    done = subprocess.run(
        [*prefix, sys.executable, "-c", _NS_INIT, *_SERVE],
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, "ERR": str(err)},
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["code"] == 143, (result, err.read_text())
    assert result["after_s"] < 10, result
    text = err.read_text()
    assert "the parent process is gone" in text and "device URI" not in text.lower(), text
