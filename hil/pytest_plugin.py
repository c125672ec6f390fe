"""The pytest plugin of xbar-hil (entry point ``pytest11: xbar_hil``): emulated boards behind
real servers as fixtures, for any test suite in the environment (`hil.testing` lists them).

``--xbar-board URI`` with a lab board's URI (not emulator://) points them at that board: the
session takes it (its lock, docs/protocol.md "Ownership") when a test first needs it, lends it
to every fixture, resets it before and after each test, and gives it back at the end (or once
the tests of a module, or each test, that use it are done: ``--xbar-board-hold``); a board
another session holds (its lock, or a ``serial://`` port another process has open) is waited
for up to ``--xbar-board-wait SECONDS`` (docs/sweep.md 4).

Loading it imports pytest and `hil.testing` only, which imports nothing of the drivers, the
emulator or torch until a fixture is used: a session that uses none pays nothing, and a
repository with packages named like this toolkit's (``drivers``, ``emulator``) still runs.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from hil.testing import DEFAULT_BOARD, IN_PROCESS, TRANSPORTS, lend, open_transport, served_board

if TYPE_CHECKING:
    from drivers import Device
    from hil.testing import BoardServers

MAX_BOARD_WAIT_S = 3600.0  # --xbar-board-wait: at most an hour for another suite to give a lab board back
WAIT_POLL_S = (0.1, 2.0)  # first and longest pause between two tries to take a busy lab board
HOLDS = ("session", "module", "test")  # --xbar-board-hold: how long a lab board is held once taken
SIGTERM_EXIT = 143  # 128 + SIGTERM: the exit code of a session stopped by SIGTERM while it held a board
_TERMINATED = pytest.StashKey[bool]()  # the session was stopped by SIGTERM taken as Ctrl-C
_USAGE = pytest.StashKey[str]()  # the board URI check's usage error, from a pytest-xdist worker
USAGE_KEY = "xbar_hil_usage_error"  # where a pytest-xdist worker hands it to the controller


def _wait_seconds(text: str) -> float:
    """--xbar-board-wait's value: seconds from 0 to MAX_BOARD_WAIT_S."""
    import argparse

    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 <= seconds <= MAX_BOARD_WAIT_S:  # nan included
        raise argparse.ArgumentTypeError(
            f"{text!r}: seconds to wait for a lab board another session holds, from 0 to {MAX_BOARD_WAIT_S:g}"
        )
    return seconds


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("xbar-hil", "xbar-hil boards: emulated, or a lab board")
    group.addoption(
        "--xbar-board",
        default=None,
        metavar="URI",
        help=f"board URI started by the xbar-hil fixtures (default: ini xbar_board, else {DEFAULT_BOARD}). "
        "A lab board (not emulator://) is taken (its lock) when a test first needs it and held as "
        "--xbar-board-hold says (default: the whole session)",
    )
    group.addoption(
        "--xbar-board-hold",
        default=None,
        choices=HOLDS,
        help="how long a lab board is held once a test takes it: 'session' (default: until the session "
        "ends), 'module' (until the module's last test that uses it is done) or 'test' (until that test "
        "is done); released reset and safe, taken again (waiting as --xbar-board-wait says) by the next "
        "test that needs it, so that others can use it meanwhile "
        "(default: ini xbar_board_hold, else session)",
    )
    group.addoption(
        "--xbar-board-wait",
        default=None,
        type=_wait_seconds,
        metavar="SECONDS",
        help="a lab board another session (another pytest run, another xdist worker, another host) "
        "holds: wait up to SECONDS for it, at most "
        f"{MAX_BOARD_WAIT_S:g} (default: ini xbar_board_wait, else 0: fail at once)",
    )
    parser.addini("xbar_board", "board URI started by the xbar-hil fixtures", default=DEFAULT_BOARD)
    parser.addini("xbar_board_wait", "seconds to wait for a busy lab board (--xbar-board-wait)", default="0")
    parser.addini("xbar_board_hold", "how long a lab board is held: session, module, test", default="session")


def pytest_configure(config: pytest.Config) -> None:
    """Check the ini option xbar_board_wait as the command line's is checked, and refuse an
    empty --xbar-board (``--xbar-board "$LAB_BOARD_URI"`` with the variable unset), which ran
    on the default emulator without a word."""
    given = config.getoption("--xbar-board", None)
    if given is not None and not given.strip():
        raise pytest.UsageError(
            f"--xbar-board was given an empty URI ({given!r}; an unset variable in "
            '--xbar-board "$LAB_BOARD_URI"?): pass a board URI (visa://..., serial://..., emulator://...), '
            f"or leave the option out for the ini option xbar_board (else {DEFAULT_BOARD})"
        )
    if config.getoption("--xbar-board-wait", None) is None:
        import argparse

        try:
            _wait_seconds(str(config.getini("xbar_board_wait")))
        except argparse.ArgumentTypeError as exc:
            raise pytest.UsageError(f"ini option xbar_board_wait (--xbar-board-wait): {exc}") from None
    _hold(config)


def _hold(config: pytest.Config) -> str:
    """--xbar-board-hold, else the ini option xbar_board_hold (checked: UsageError)."""
    hold = config.getoption("--xbar-board-hold", None)
    if hold is None:
        hold = str(config.getini("xbar_board_hold")).strip()
        if hold not in HOLDS:
            raise pytest.UsageError(
                f"ini option xbar_board_hold (--xbar-board-hold): {hold!r}: one of {', '.join(HOLDS)}"
            )
    return hold


def pytest_make_parametrize_id(config: pytest.Config, val: object, argname: str) -> str | None:
    """`transport_device`'s ids name the link truthfully: IN_PROCESS is the board's URI opened
    as it is, so its id is the URI's scheme (``emulator``, in process, on emulator:// boards;
    ``visa``, ``serial``, ... on a lab board). Any other parameter keeps pytest's id."""
    if argname != "transport_device" or val != IN_PROCESS:
        return None
    uri = _board_uri(config)[0]
    return uri.split("://", 1)[0].lower() if "://" in uri else IN_PROCESS


def _board_uri(config: pytest.Config) -> tuple[str, str]:
    """(the board URI, where it was given): --xbar-board if given (empty is refused by
    pytest_configure), else the ini option xbar_board."""
    uri = config.getoption("--xbar-board", None)
    if uri is not None:
        return uri, "--xbar-board"
    return str(config.getini("xbar_board")), "the ini option xbar_board"


def _is_lab(uri: str) -> bool:
    """A board the fixtures do not start but open: anything but an emulator:// URI (its scheme
    compared as `open_device` does, whatever its case: ``EMULATOR://`` is the emulator)."""
    from drivers.uri import parse_uri

    return parse_uri(uri)[0] != "emulator"


def _usage_error(request: pytest.FixtureRequest, message: str) -> None:
    """Stop the session with `message` as a usage error (exit code 4). In a pytest-xdist
    worker, whose pytest.exit the controller takes for a crash (an INTERNALERROR, the message
    lost), the worker fails this test with it and stops; the controller prints it and exits
    with the usage error's code (`pytest_testnodedown`, `pytest_sessionfinish`)."""
    config = request.config
    if not hasattr(config, "workerinput"):
        pytest.exit(message, returncode=pytest.ExitCode.USAGE_ERROR)
    config.workeroutput[USAGE_KEY] = message  # type: ignore[attr-defined]
    request.session.shouldstop = message
    pytest.fail(message, pytrace=False)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """pytest-xdist's controller: a worker that stopped on the board URI's usage error."""
    message = getattr(node, "workeroutput", {}).get(USAGE_KEY)
    if message:
        node.config.stash[_USAGE] = message


@pytest.fixture(scope="session")
def _xbar_board_checked(request: pytest.FixtureRequest, pytestconfig: pytest.Config) -> str:
    """The board URI, checked once per session: a URI no board can be opened from stops the
    session with one usage error (where every test using a fixture would fail with the same).
    A lab board's URI (not ``emulator://``) is opened once to check it answers, and closed
    without the safe state (it may be another host's board)."""
    from drivers.uri import looking_uri, parse_options

    uri, where = _board_uri(pytestconfig)
    problem = None  # the usage error, raised outside the except: its message alone, no chained traceback
    try:
        parse_options(uri)
    except Exception as exc:  # a ConfigurationError, or a third-party backend's own error
        problem = f"{where} {uri!r}: {exc}"
    if problem is None and _is_lab(uri):
        from drivers import open_device
        from drivers.errors import PortInUse

        try:
            open_device(looking_uri(uri)).close_link()  # not taking a board another host may own
        except PortInUse:  # a serial port another session has open: there, busy (waited for as taken)
            pass
        except Exception as exc:  # unreachable, refused, or no board answering there
            problem = (
                f"{where} {uri!r}: cannot open the board ({type(exc).__name__}: {exc}); check that it is "
                "powered, connected and served at that address, or pass an emulator:// URI"
            )
    if problem is not None:
        _usage_error(request, problem)
    return uri


class _LabBoards:
    """The lab boards (URIs other than emulator://) this session holds: each opened once, when
    a test first needs it, taking the board's lock (docs/protocol.md, "Ownership") with one
    token, held as `hold` (--xbar-board-hold) says: the whole session, or until `close(uris)`
    after a module's or a test's last use, then taken again with a new token by the next test
    that needs it; every fixture of a test is lent that one device. A board
    another session holds is waited for up to `wait_s` (--xbar-board-wait), then refused once
    for the session (each test that needs it fails with the same message, without waiting
    again). Closed, with the safe state and the lock given back, when the session ends."""

    def __init__(self, wait_s: float, hold: str = "session") -> None:
        self.wait_s = wait_s
        self.hold = hold
        self.devices: dict[str, Device] = {}
        self.refused: dict[str, str] = {}
        self._term: contextlib.ExitStack | None = None  # SIGTERM taken as Ctrl-C while a board is held
        self.terminated = False  # a SIGTERM came while a board was held

    def _hold_signals(self) -> None:
        """While this session holds a lab board, SIGTERM (a CI job cancelled, `timeout`) is
        Ctrl-C (`hil.cli.common.sigterm_as_interrupt`): pytest stops, the fixtures' teardown and
        `close` give the board back reset and safe at once, where the default action killed the
        process and left the board configured and locked until its lease lapsed. The previous
        handler comes back when no board is held (a SIGTERM received leaves it ignored for the
        clean-up that follows); the session then exits with code 143, as `hil` commands do
        (`pytest_sessionfinish`), where pytest's own code for an interrupted session is 2."""
        if self._term is None:
            from hil.cli.common import sigterm_as_interrupt

            self._term = contextlib.ExitStack()
            handler = self._term.enter_context(sigterm_as_interrupt())
            self._term.callback(lambda: setattr(self, "terminated", self.terminated or handler.received))

    def _release_signals(self) -> None:
        if self._term is not None and not self.devices:
            term, self._term = self._term, None
            term.close()

    def take(self, uri: str) -> Device:
        if uri in self.refused:
            pytest.fail(self.refused[uri], pytrace=False)
        if uri not in self.devices:
            self._hold_signals()
            try:
                self.devices[uri] = self._open(uri)
            finally:
                self._release_signals()
        return self.devices[uri]

    def _open(self, uri: str) -> Device:
        from drivers import open_device
        from drivers.errors import BoardLocked, PortInUse

        deadline = time.monotonic() + self.wait_s
        pause = WAIT_POLL_S[0]
        refusal: BoardLocked | PortInUse
        while True:
            try:
                return open_device(uri)
            except (BoardLocked, PortInUse) as exc:  # its lock, or its serial port's, held elsewhere
                refusal = exc
            left = deadline - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(pause, left))
            pause = min(2 * pause, WAIT_POLL_S[1])
        waited = f"waited {self.wait_s:g} s (--xbar-board-wait)" if self.wait_s else "did not wait for it"
        if isinstance(refusal, BoardLocked):
            held, gone = (
                f"held by {_holder(uri, refusal.message)}",
                f"if the owner is gone: hil lock break {uri}",
            )
        else:  # its serial port: the board cannot be asked who has it, the port's lock goes with its holder
            held, gone = f"in use: {refusal}", "the port is free once that process closes it or ends"
        self.refused[uri] = (
            f"lab board {uri!r} is {held}; {waited}. One board runs one "
            f"test session at a time: pass --xbar-board-wait SECONDS (at most {MAX_BOARD_WAIT_S:g}; or the "
            "ini option xbar_board_wait) so that this session waits for the other to finish, or use an "
            f"emulator:// board, whose fixtures run in parallel; {gone}"
        )
        pytest.fail(self.refused[uri], pytrace=False)

    def close(self, uris: Iterable[str] | None = None) -> None:
        """Each board (of `uris`, default all) reset (unconfigured for whoever comes next),
        then closed: the safe state, then the lock given back; one that fails does not keep
        the others. A board closed is taken again by the next test that needs it."""
        with contextlib.ExitStack() as stack:
            stack.callback(self._release_signals)  # run last: once the boards are given back
            for uri in list(self.devices if uris is None else uris):
                dev = self.devices.pop(uri, None)
                if dev is not None:
                    stack.callback(dev.close)
                    stack.callback(dev.reset)  # the stack runs it first


def _holder(uri: str, refusal: str) -> str:
    """Who holds the board, as its owner query says (the refusal's text if that fails)."""
    from drivers import open_device
    from drivers.uri import looking_uri

    try:
        dev = open_device(looking_uri(uri))  # only looking: no lock, closed without the safe state
        try:
            owner = dev.owner()
        finally:
            dev.close_link()
    except Exception:  # the board went away meanwhile: its refusal says who held it
        return f"another session or host ({refusal})"
    if owner is None or owner.token is None:
        return f"another session or host ({refusal}; it has let go since)"
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(owner.since)) if owner.since else "?"
    if owner.lapses_in is not None:  # no connection presents the token: the lease runs out
        lapses = math.ceil(owner.lapses_in)
        return (
            f"{owner.token!r} since {since}, but the owner is gone (no connection presents its token); "
            f"the lock lapses in ~{lapses} s: --xbar-board-wait {lapses + 1} (or more) takes the board then"
        )
    return f"{owner.token!r} (another test session or host) since {since}"


@pytest.fixture(scope="session")
def _xbar_lab_boards(pytestconfig: pytest.Config) -> Iterator[_LabBoards]:
    wait = pytestconfig.getoption("--xbar-board-wait")
    wait_s = _wait_seconds(str(pytestconfig.getini("xbar_board_wait"))) if wait is None else wait
    boards = _LabBoards(wait_s, _hold(pytestconfig))
    try:
        yield boards
    finally:
        boards.close()
        pytestconfig.stash[_TERMINATED] = boards.terminated


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """Exit code 143 (128 + SIGTERM, what CI runners and batch schedulers expect of a
    terminated job) for a session that SIGTERM stopped while it held a lab board; pytest says
    2 (interrupted) for it as for Ctrl-C. Runs after the session fixtures' teardown."""
    if session.config.stash.get(_TERMINATED, False):
        session.exitstatus = SIGTERM_EXIT
    elif session.config.stash.get(_USAGE, None):  # pytest-xdist: a worker's usage error, not an interrupt
        session.exitstatus = pytest.ExitCode.USAGE_ERROR


def _fresh(dev: Device) -> None:
    """A lab board as a test gets it and leaves it: reset (power-on state: no topology, the
    error queue empty) and in its safe state. What a reset keeps (the board's own state: its
    non-volatile conductances, meter, safety counters, an open programming transaction) stays."""
    dev.reset()
    dev.safe_state()


@pytest.fixture(scope="module")
def _xbar_lab_module(_xbar_lab_boards: _LabBoards) -> Iterator[_LabBoards]:
    """--xbar-board-hold module: the module's lab boards given back when its tests are done
    at the latest (a test that is the module's last user gives them back sooner)."""
    yield _xbar_lab_boards
    if _xbar_lab_boards.hold == "module":
        _xbar_lab_boards.close()


def _uses_board(item: pytest.Item) -> bool:
    return "_xbar_board_for" in getattr(item, "fixturenames", ())


def _last_user_in_module(node: pytest.Item) -> bool:
    """Whether no test after `node` in its module (in this session's order) uses a board fixture."""
    items = node.session.items
    try:
        later = items[items.index(node) + 1 :]
    except ValueError:
        return False
    return not any(_uses_board(it) for it in later if it.path == node.path)


@pytest.fixture
def _xbar_board_for(
    request: pytest.FixtureRequest, _xbar_lab_module: _LabBoards
) -> Iterator[Callable[[str], str | Device]]:
    """Factory: the board a fixture serves for `uri` in this test: the URI itself for an
    emulator:// board (each fixture starts its own), the session's device, lent, for a lab
    board, reset when this test first uses it and again when the test ends, then given back
    if --xbar-board-hold says so (test; module: after the module's last test that uses it)."""
    boards = _xbar_lab_module
    used: dict[str, Device] = {}

    def board_for(uri: str) -> str | Device:
        if not _is_lab(uri):
            return uri
        dev = boards.take(uri)
        if uri not in used:
            _fresh(dev)
            used[uri] = dev
        return lend(dev)

    yield board_for
    try:
        for dev in used.values():
            _fresh(dev)
    finally:
        if boards.hold == "test" or (boards.hold == "module" and _last_user_in_module(request.node)):
            boards.close(used)


@pytest.fixture
def xbar_board(_xbar_board_checked: str) -> str:
    """The board's URI: ``--xbar-board``, else the ini option ``xbar_board``."""
    return _xbar_board_checked


@pytest.fixture
def emulated_board(
    xbar_board: str, _xbar_board_for: Callable[[str], str | Device]
) -> Iterator[Callable[..., BoardServers]]:
    """Factory: ``emulated_board(board=URI or Device, plan=FaultPlan(...), ack_timeout=...)``
    starts a board (default `xbar_board`) behind both servers; all are closed after the test
    (a Device given is closed with them; a lab board's URI serves the session's board)."""
    with contextlib.ExitStack() as stack:

        def start(board: str | Device | None = None, **kw: Any) -> BoardServers:
            board = board or xbar_board
            board = _xbar_board_for(board) if isinstance(board, str) else board
            return stack.enter_context(served_board(board=board, **kw))

        yield start


@pytest.fixture
def board_servers(xbar_board: str, _xbar_board_for: Callable[[str], str | Device]) -> Iterator[BoardServers]:
    """The board (`xbar_board`) behind both servers: a new board for an emulator:// URI; a lab
    board, reset, is the session's (docs/sweep.md section 4)."""
    with served_board(board=_xbar_board_for(xbar_board)) as servers:
        yield servers


@pytest.fixture(params=TRANSPORTS)
def transport_device(
    request: pytest.FixtureRequest, xbar_board: str, _xbar_board_for: Callable[[str], str | Device]
) -> Iterator[Device]:
    """The board (`xbar_board`) over each transport in turn: its own URI opened as it is (id:
    the URI's scheme, ``emulator`` in process), then behind each server. A new board for an
    emulator:// URI; a lab board, reset, is the session's."""
    with open_transport(request.param, _xbar_board_for(xbar_board)) as dev:
        yield dev


@pytest.fixture
def device_on(
    xbar_board: str, _xbar_board_for: Callable[[str], str | Device]
) -> Iterator[Callable[..., Device]]:
    """Factory: ``device_on(transport, board=None, **params)`` is a Device for the board
    (default `xbar_board`) over `transport` (one of TRANSPORTS), with URI query parameters
    such as ``timeout="1"``; closed, with its servers, after the test. Each call on an
    emulator:// URI starts a new board; on a lab board every call reaches the one board the
    session holds, reset before the test's first use and after the test."""
    with contextlib.ExitStack() as stack:

        def open_(transport: str, board: str | None = None, **params: str) -> Device:
            return stack.enter_context(
                open_transport(transport, _xbar_board_for(board or xbar_board), **params)
            )

        yield open_
