"""Issue 10: the pytest plugin shipped with the distribution (hil.pytest_plugin, entry point
pytest11 ``xbar_hil``): its fixtures here, and in a user's own test suite run by pytest."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from drivers import Device, Topology, open_device
from hil.testing import DEFAULT_BOARD, REMOTE_TRANSPORTS, BoardServers, FaultPlan, Faults


def test_default_board_and_resource_strings(xbar_board: str, board_servers: BoardServers) -> None:
    import pyvisa

    assert xbar_board == DEFAULT_BOARD
    res = board_servers.resources
    assert sorted(res) == sorted(REMOTE_TRANSPORTS)
    assert res["visa-tcp"].startswith("TCPIP0::127.0.0.1::") and res["serial-pty"].startswith("/dev/")
    rm = pyvisa.ResourceManager("@py")  # a user's own script: plain pyvisa, no xbar-hil
    try:
        inst = rm.open_resource(res["visa-tcp"], read_termination="\n", write_termination="\n")
        assert inst.query("*IDN?").startswith("xbar-hil,emulator-rram")
        inst.close()
    finally:
        rm.close()


def test_board_factory_with_link_faults(emulated_board: Callable[..., BoardServers]) -> None:
    noisy = emulated_board(plan=FaultPlan(link=Faults(corrupt_rx=1)))
    other = emulated_board("emulator://?preset=pcm&seed=1")
    with open_device(noisy.uri("serial-socket")) as dev:
        assert dev.stats.nacks_received == 1 and dev.stats.retransmissions == 1  # type: ignore[attr-defined]
    with open_device(other.uri("visa-tcp")) as dev:
        assert dev.info.identity.model == "emulator-pcm"


def test_device_factory(device_on: Callable[..., Device]) -> None:
    with pytest.raises(ValueError, match=r"link parameters \['timeout'\] are for the remote transports"):
        device_on("emulator", timeout="1")  # it used to be dropped without a word
    a = device_on("visa-tcp", timeout="2")
    b = device_on("serial-pty", "emulator://?preset=ideal&seed=0")
    assert a.info.identity.model == "emulator-rram" and b.info.identity.model == "emulator-ideal"
    b.configure(Topology.layered([3, 2]))
    assert b.read_conductance("W0")[0].shape[1] == 2  # (inputs + bias row) x outputs


USER_TEST = """
from drivers import Topology


def test_my_firmware_tool_talks_to_the_board(board_servers):
    import pyvisa

    rm = pyvisa.ResourceManager("@py")
    inst = rm.open_resource(board_servers.resources["visa-tcp"], read_termination="\\n")
    assert inst.query("*IDN?").startswith("xbar-hil,emulator-pcm")
    inst.close()
    rm.close()


def test_my_script_on_every_transport(transport_device):
    transport_device.configure(Topology.layered([4, 3]))
    assert transport_device.info.identity.model == "emulator-pcm"
"""


def test_a_users_suite_gets_the_fixtures_from_the_installed_distribution(tmp_path: Path) -> None:
    """No conftest, no pytest_plugins: the entry point alone brings the fixtures, and
    --xbar-board picks the board."""
    (tmp_path / "test_user.py").write_text(USER_TEST)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_user.py"]
    cmd += ["--xbar-board", "emulator://?preset=pcm&seed=1"]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "6 passed" in run.stdout


def test_a_bad_board_uri_is_one_usage_error_for_the_session(tmp_path: Path) -> None:
    """A typo in --xbar-board stops the session once, naming the option and the fix, instead
    of failing every test that uses a fixture."""
    tests = "".join(f"def test_{k}(xbar_board):\n    pass\n\n\n" for k in range(3))
    (tmp_path / "test_user.py").write_text(tests)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_user.py"]
    cmd += ["--xbar-board", "emulator://?preset=nope"]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = run.stdout + run.stderr
    assert run.returncode == pytest.ExitCode.USAGE_ERROR, out
    assert out.count("unknown preset 'nope'") == 1, out
    assert "--xbar-board 'emulator://?preset=nope'" in out and "known presets" in out


def test_an_unreachable_lab_board_is_one_usage_error_for_the_session(tmp_path: Path) -> None:
    """A lab URI nothing answers at gave one ERROR per test (the instrument audit: 6 errors,
    each a RetriesExhausted); it stops the session once, naming the URI and what to check."""
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tests = "".join(f"def test_{k}(xbar_board):\n    pass\n\n\n" for k in range(3))
    (tmp_path / "test_user.py").write_text(tests)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    uri = f"visa://TCPIP0::127.0.0.1::{port}::SOCKET?attempts=1"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_user.py"]
    cmd += ["--xbar-board", uri]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = run.stdout + run.stderr
    assert run.returncode == pytest.ExitCode.USAGE_ERROR, out
    assert out.count("cannot open the board") == 1 and f"--xbar-board {uri!r}" in out, out
    assert "ERROR at setup" not in out and "passed" not in out, out


@pytest.mark.parametrize("transport", ["visa-asrl", "serial-socket"])
def test_transport_device_uris_open(board_servers: BoardServers, transport: str) -> None:
    with open_device(board_servers.uri(transport)) as dev:
        assert dev.safety().violations == 0


def test_loading_the_plugin_imports_no_drivers_emulator_or_torch() -> None:
    """Every pytest session in the environment loads the plugin: it must cost a session that
    uses no fixture nothing (torch alone took 1.2 s)."""
    code = (
        "import sys, hil.pytest_plugin\n"
        "print(sorted(m for m in ('torch', 'drivers', 'emulator') if m in sys.modules))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_a_users_repository_with_its_own_drivers_package_still_runs(tmp_path: Path) -> None:
    """The toolkit's top-level names are generic: a repository's own ``drivers`` package
    shadows ours. The plugin loads anyway; the repository's tests (which use no fixture) run."""
    (tmp_path / "drivers").mkdir()
    (tmp_path / "drivers" / "__init__.py").write_text("X = 1\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_mine.py").write_text(
        "from drivers import X\n\n\ndef test_x():\n    assert X == 1\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 passed" in run.stdout


def test_the_helpers_work_without_pytest() -> None:
    code = (
        "import sys; sys.modules['pytest'] = None\n"
        "from hil.testing import open_transport, serve_board\n"
        "with open_transport('serial-socket') as dev:\n"
        "    print(dev.info.identity.model)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "emulator-rram"


# ---- a lab board: `--xbar-board visa://...` at a served board that announces ``lock`` ----------
# The stand-in for a lab board is a real server in this process (what `hil emulator serve`
# starts); the user's suite runs in a subprocess, as a CI job would.


def _lab_board(emulated_board: Callable[..., BoardServers]) -> str:
    return emulated_board("emulator://?preset=ideal&seed=0").uri("visa-tcp")


def _pytest(tmp_path: Path, *args: str, name: str = "test_user.py") -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", name, *args]
    return subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


LAB_SUITE = """
from drivers import Topology


def test_a_configures_the_board(device_on):
    dev = device_on("visa-tcp")
    dev.configure(Topology.layered([4, 3]))
    assert dev.status().configured


def test_b_starts_from_the_reset_board(device_on):
    dev = device_on("serial-socket")
    assert dev.topology is None and not dev.status().configured


def test_two_devices_in_one_test_are_one_board(device_on):
    a = device_on("visa-tcp")
    b = device_on("serial-pty")
    a.configure(Topology.layered([3, 2]))
    assert b.status().configured


def test_a_device_and_servers_in_one_test(transport_device, board_servers):
    transport_device.configure(Topology.layered([2, 2]))
    assert board_servers.device.status().configured
"""


def test_a_lab_board_is_reset_for_each_test_and_shared_within_one(
    tmp_path: Path, emulated_board: Callable[..., BoardServers]
) -> None:
    """The CI audit against a served board: a test started with the topology the one before it
    configured (on emulator:// each gets a new board), and a second device in one test was
    refused by the board (owned by this very pytest process). Each test now starts from the
    board reset; its devices are one owner's; the session gives the board back when it ends."""
    lab = _lab_board(emulated_board)
    (tmp_path / "test_user.py").write_text(LAB_SUITE)
    code, out = _finish(_pytest(tmp_path, "-v", "--xbar-board", lab))
    assert code == 0, out
    assert "8 passed" in out, out  # 3 + transport_device on each of its 5 transports
    with open_device(lab) as dev:  # the session released it, unconfigured
        assert not dev.status().configured
        owner = dev.owner()
        assert owner is not None and owner.token == dev.lock_token  # type: ignore[attr-defined]


def test_transport_device_ids_name_the_link_the_board_is_reached_by(
    tmp_path: Path, emulated_board: Callable[..., BoardServers]
) -> None:
    """`transport_device[emulator]` talked VISA on a visa:// board: the id of the board's own
    URI, opened as it is, is its scheme (``emulator`` stays the id on emulator:// boards)."""
    (tmp_path / "test_user.py").write_text("def test_t(transport_device):\n    pass\n")
    code, out = _finish(_pytest(tmp_path, "--collect-only", "-q", "--xbar-board", _lab_board(emulated_board)))
    assert code == 0, out
    ids = sorted(line.split("[", 1)[1].rstrip("]") for line in out.splitlines() if "test_t[" in line)
    assert ids == sorted(["visa", *REMOTE_TRANSPORTS]), out
    code, out = _finish(_pytest(tmp_path, "--collect-only", "-q"))
    assert code == 0 and "test_t[emulator]" in out, out


HELD_SUITE = """
import pathlib
import time


def test_holds_the_board(xbar_board, device_on):
    device_on("emulator")
    pathlib.Path("started").write_text(str(time.time()))
    time.sleep(3)
    pathlib.Path("ended").write_text(str(time.time()))
"""

WAITING_SUITE = """
import pathlib
import time


def test_gets_the_board(device_on):
    device_on("emulator").safety()
    pathlib.Path("got").write_text(str(time.time()))
"""


def _wait_for(path: Path, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 120
    while not path.exists():
        assert proc.poll() is None, _finish(proc)[1]
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_two_suites_on_one_lab_board_take_turns_with_the_wait_option(
    tmp_path: Path, emulated_board: Callable[..., BoardServers]
) -> None:
    """Two pytest runs (or pytest-xdist workers) at one board failed with BoardLocked: one
    physical board runs one suite at a time, so the second waits for it (--xbar-board-wait),
    polling, and takes it once the first session gives it back."""
    lab = _lab_board(emulated_board)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "test_user.py").write_text(HELD_SUITE)
    (tmp_path / "b" / "test_user.py").write_text(WAITING_SUITE)
    (tmp_path / "b" / "pytest.ini").write_text("[pytest]\nxbar_board_wait = 120\n")  # the ini option
    first = _pytest(tmp_path / "a", "--xbar-board", lab)
    _wait_for(tmp_path / "a" / "started", first)
    second = _pytest(tmp_path / "b", "--xbar-board", lab)
    (code_a, out_a), (code_b, out_b) = _finish(first), _finish(second)
    assert code_a == 0, out_a
    assert code_b == 0, out_b
    ended = float((tmp_path / "a" / "ended").read_text())
    assert float((tmp_path / "b" / "got").read_text()) > ended  # it waited for the first session


BUSY_SUITE = """
import pathlib
import time


def _take(device_on, k):
    t0 = time.monotonic()
    try:
        device_on("emulator")
    finally:
        pathlib.Path(f"took{k}").write_text(str(time.monotonic() - t0))
""" + "".join(f"\n\ndef test_{k}(device_on):\n    _take(device_on, {k})\n" for k in range(3))


def test_a_busy_lab_board_fails_naming_its_owner_and_the_wait_option(
    tmp_path: Path, emulated_board: Callable[..., BoardServers]
) -> None:
    """Past --xbar-board-wait, each test that needs the board fails naming who holds it, the
    option and `hil lock break`; the session waits once, not once per test. By default
    (no option) it does not wait."""
    lab = _lab_board(emulated_board)
    (tmp_path / "test_user.py").write_text(BUSY_SUITE)
    with open_device(lab) as holder:  # another host's session
        token = holder.lock_token  # type: ignore[attr-defined]
        code, out = _finish(_pytest(tmp_path, "--xbar-board", lab, "--xbar-board-wait", "1.5", "-rN"))
        assert code == pytest.ExitCode.TESTS_FAILED, out
        # -rN: no short summary, which repeats each message (whole where CI is set, else cut)
        assert "3 failed" in out and out.count(f"is held by {token!r}") == 3, out
        assert (
            "waited 1.5 s" in out and "--xbar-board-wait SECONDS" in out and f"hil lock break {lab}" in out
        ), out
        took = [float((tmp_path / f"took{k}").read_text()) for k in range(3)]
        assert took[0] >= 1.5 and max(took[1:]) < 1.0, took
        code, out = _finish(_pytest(tmp_path, "--xbar-board", lab))
        assert code == pytest.ExitCode.TESTS_FAILED and "did not wait for it" in out, out
        assert float((tmp_path / "took0").read_text()) < 1.0


@pytest.mark.parametrize("value", ["-1", "3601", "nan", "soon", "ini 86400"])
def test_the_wait_option_is_bounded(tmp_path: Path, value: str) -> None:
    """A wait is bounded (a CI job must not hang on a board for a day): a value past the
    maximum, on the command line or in the ini file, is a usage error naming it."""
    (tmp_path / "test_user.py").write_text("def test_x():\n    pass\n")
    if value.startswith("ini "):
        (tmp_path / "pytest.ini").write_text(f"[pytest]\nxbar_board_wait = {value[4:]}\n")
        code, out = _finish(_pytest(tmp_path))
    else:
        code, out = _finish(_pytest(tmp_path, f"--xbar-board-wait={value}"))
    assert code == pytest.ExitCode.USAGE_ERROR, out
    assert "xbar_board_wait" in out.replace("-", "_") and "from 0 to 3600" in out, out


@pytest.mark.parametrize("form", [["--xbar-board", ""], ["--xbar-board=  "]])
def test_an_empty_board_option_is_a_usage_error(tmp_path: Path, form: list[str]) -> None:
    """CI's ``--xbar-board "$LAB_BOARD_URI"`` with the variable unset passed an empty URI and
    the session silently ran on the default emulator (an empty ini value was refused): an
    option given but empty is a usage error naming it and the fix, before any test runs."""
    (tmp_path / "test_user.py").write_text("def test_x(xbar_board):\n    pass\n")
    code, out = _finish(_pytest(tmp_path, *form))
    assert code == pytest.ExitCode.USAGE_ERROR, out
    assert "--xbar-board was given an empty URI" in out and "LAB_BOARD_URI" in out, out
    assert "leave the option out" in out and "passed" not in out, out


CASE_SUITE = """
from drivers import Topology


def test_each_call_is_a_board_of_its_own(device_on):
    a = device_on("emulator")
    b = device_on("emulator")
    a.configure(Topology.layered([3, 2]))
    assert not b.status().configured


def test_t(transport_device):
    assert transport_device.info.identity.model == "emulator-pcm"
"""


def test_an_emulator_uri_in_capitals_is_the_emulator_not_a_lab_board(tmp_path: Path) -> None:
    """`open_device` takes the scheme in any case; the plugin took ``EMULATOR://`` for a lab
    board (one lent device for every fixture, ids ``[EMULATOR]``)."""
    (tmp_path / "test_user.py").write_text(CASE_SUITE)
    code, out = _finish(_pytest(tmp_path, "-v", "--xbar-board", "EMULATOR://?preset=pcm&seed=1"))
    assert code == 0, out
    assert "6 passed" in out and "test_t[emulator]" in out, out


HOLD_SUITE = {
    "test_m1.py": """
import pathlib
import time

from drivers import Topology


def test_a_uses_the_board(device_on):
    device_on("visa-tcp").configure(Topology.layered([3, 2]))


def test_b_needs_no_board():
    pathlib.Path("free").write_text("")
    deadline = time.monotonic() + 60
    while not pathlib.Path("done").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
""",
    "test_m2.py": """
def test_c_takes_it_again(device_on):
    assert not device_on("emulator").status().configured
""",
}


@pytest.mark.parametrize("hold", ["test", "module", "ini test", "session"])
def test_the_hold_option_gives_a_lab_board_back_between_the_tests_that_use_it(
    tmp_path: Path, emulated_board: Callable[..., BoardServers], hold: str
) -> None:
    """A lab board was locked for the whole session, also while tests that do not use it ran,
    and colleagues were refused. With --xbar-board-hold test (or module) it is given back,
    reset, once the last test (of the module) that uses it is done, and taken again by the
    next one: another client takes the board while a board-free test runs."""
    from drivers.errors import BoardLocked

    lab = _lab_board(emulated_board)
    for name, text in HOLD_SUITE.items():
        (tmp_path / name).write_text(text)
    if hold.startswith("ini "):
        (tmp_path / "pytest.ini").write_text(f"[pytest]\nxbar_board_hold = {hold[4:]}\n")
        proc = _pytest(tmp_path, "test_m2.py", "--xbar-board", lab, name="test_m1.py")
    else:
        proc = _pytest(
            tmp_path, "test_m2.py", "--xbar-board", lab, "--xbar-board-hold", hold, name="test_m1.py"
        )
    try:
        _wait_for(tmp_path / "free", proc)
        if hold == "session":
            with pytest.raises(BoardLocked):
                open_device(lab)
        else:
            with open_device(lab) as colleague:  # taken at once: the board is free
                assert not colleague.status().configured  # and given back reset
    finally:
        (tmp_path / "done").write_text("")
    code, out = _finish(proc)
    assert code == 0 and "3 passed" in out, out


def test_the_hold_is_in_the_help_and_a_bad_ini_hold_is_a_usage_error(tmp_path: Path) -> None:
    code, out = _finish(_pytest(tmp_path, "--help"))
    assert code == 0 and "--xbar-board-hold" in out and "--xbar-board-hold says" in out, out
    (tmp_path / "test_user.py").write_text("def test_x():\n    pass\n")
    (tmp_path / "pytest.ini").write_text("[pytest]\nxbar_board_hold = forever\n")
    code, out = _finish(_pytest(tmp_path))
    assert code == pytest.ExitCode.USAGE_ERROR and "xbar_board_hold" in out and "'forever'" in out, out


SIGTERM_SUITE = """
import pathlib
import time

from drivers import Topology


def test_runs_long(device_on):
    device_on("visa-tcp").configure(Topology.layered([3, 2]))
    pathlib.Path("started").write_text("")
    time.sleep(60)
"""


def test_sigterm_gives_a_lab_board_back_as_ctrl_c_does(
    tmp_path: Path, emulated_board: Callable[..., BoardServers]
) -> None:
    """SIGTERM (a CI job cancelled, `timeout`) killed pytest with no teardown: the board stayed
    configured and locked until its lease lapsed. It is Ctrl-C now while a lab board is held:
    the teardown resets the board, its safe state is applied and the lock released at once,
    and the session exits with 143 as a terminated `hil` command does (pytest's own code was 2)."""
    import signal

    s = emulated_board("emulator://?preset=ideal&seed=0")
    lab = s.uri("visa-tcp")
    calls: list[float] = []
    inner = s.device.safe_state
    s.device.safe_state = lambda: (calls.append(time.monotonic()), inner())[1]  # type: ignore[method-assign]
    (tmp_path / "test_user.py").write_text(SIGTERM_SUITE)
    proc = _pytest(tmp_path, "--xbar-board", lab)
    _wait_for(tmp_path / "started", proc)
    n_before = len(calls)
    proc.send_signal(signal.SIGTERM)
    code, out = _finish(proc)
    assert code == 143 and "KeyboardInterrupt" in out, out  # 128 + SIGTERM; pytest's own code is 2
    assert len(calls) > n_before, "no SAFE_STATE reached the board"
    assert s.lock is not None and s.lock.owner_gone == 0, "the board found its owner gone"
    with open_device(lab) as dev:  # not locked: released at once, not at the lease's end
        assert not dev.status().configured


def test_a_board_whose_owner_is_gone_says_when_the_lock_lapses(
    tmp_path: Path, emulated_board: Callable[..., BoardServers]
) -> None:
    """The refusal named the owner but not that it was gone with its lock lapsing soon: it
    says so, in how many seconds, and the wait that would take the board then."""
    from tests.raw_scpi import RawScpi

    s = emulated_board("emulator://?preset=ideal&seed=0")
    lease = 120  # s: long enough to outlast the user's pytest starting on a loaded machine
    with RawScpi(s.uris["visa-tcp"]) as gone:  # a host that took the board and vanished
        gone.query(f'SYST:LOCK:ACQ? "gone-host",{lease}')
    t0 = time.monotonic()  # the lease runs from the gone host's close, just before this
    (tmp_path / "test_user.py").write_text("def test_x(device_on):\n    device_on('emulator')\n")
    code, out = _finish(_pytest(tmp_path, "--xbar-board", s.uri("visa-tcp"), "-rN"))
    elapsed = time.monotonic() - t0
    assert code == pytest.ExitCode.TESTS_FAILED, out
    assert "'gone-host'" in out and "the owner is gone" in out and "the lock lapses in ~" in out, out
    lapses = int(out.split("the lock lapses in ~", 1)[1].split(" ", 1)[0])
    # what was left of the lease when the user's session asked (rounded to whole seconds)
    assert lease - elapsed - 1 <= lapses <= lease, (lapses, elapsed, out)
    assert f"--xbar-board-wait {lapses + 1}" in out, out


def test_a_serial_lab_board_another_session_has_open_is_waited_for_as_a_locked_one(
    tmp_path: Path, emulated_board: Callable[..., BoardServers]
) -> None:
    """A serial:// lab board is opened exclusively (the port's lock): a second pytest run, or
    another pytest-xdist worker, found it in use and stopped the whole session as a board that
    cannot be opened (exit 4, "check that it is powered"; under xdist an INTERNALERROR), and
    --xbar-board-wait did not wait for it. Now a port in use is a busy board: waited for as
    one whose lock another session holds, and past the wait each test fails naming the port."""
    lab = emulated_board("emulator://?preset=ideal&seed=0").uri("serial-pty")
    (tmp_path / "test_user.py").write_text(WAITING_SUITE)
    with open_device(lab):  # another session has the port open
        code, out = _finish(_pytest(tmp_path, "--xbar-board", lab, "-rN"))
    assert code == pytest.ExitCode.TESTS_FAILED, out
    assert "is in use" in out and "--xbar-board-wait SECONDS" in out and "cannot open the board" not in out, (
        out
    )
    holder = open_device(lab)
    try:
        waiting = _pytest(tmp_path, "--xbar-board", lab, "--xbar-board-wait", "60")
        time.sleep(2.0)
        assert waiting.poll() is None, _finish(waiting)[1]  # still waiting for the port
        released = time.time()
    finally:
        holder.close()
    code, out = _finish(waiting)
    assert code == 0, out
    assert float((tmp_path / "got").read_text()) > released


@pytest.mark.parametrize("board", ["emulator://?preset=rrm", "visa://TCPIP0::127.0.0.1::1::SOCKET"])
def test_a_bad_board_uri_under_xdist_is_the_usage_error_not_an_internal_error(
    tmp_path: Path, board: str
) -> None:
    """Under pytest-xdist the URI check runs in a worker, whose pytest.exit the controller took
    for a crash: an INTERNALERROR traceback (exit 3), and the message naming the option and
    what is wrong was not printed at all. Now the worker stops the session with it: the
    message is shown and the exit code is the usage error's, 4, as without xdist."""
    pytest.importorskip("xdist")
    tests = "".join(f"def test_{k}(xbar_board):\n    pass\n\n\n" for k in range(4))
    (tmp_path / "test_user.py").write_text(tests)
    code, out = _finish(_pytest(tmp_path, "-n", "2", "--xbar-board", board))
    assert code == pytest.ExitCode.USAGE_ERROR, out
    assert "INTERNALERROR" not in out and f"--xbar-board {board!r}" in out, out
