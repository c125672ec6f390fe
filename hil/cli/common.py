"""What the `hil` commands share: one-line errors with exit code 2, run folders, resumed configs.

Every command turns the errors a user can cause (a bad device URI, a board that does not
answer, a missing file, a bad config value, a run log that is not one) into one line on
stderr, ``error: ...`` naming the problem and the fix, and exit code 2: no traceback.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import typer

RUN_STORE = "run.zarr"  # the run log inside a run folder (`hil train vae --out RUN`)

T = TypeVar("T")


def fail(message: str) -> typer.Exit:
    """Print ``error: message`` on stderr; return the exit (code 2) for the caller to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def refuse_option_and_set(option: str, value: str | None, key: str, sets: list[str] | None) -> None:
    """Refuse (exit 2) an option given together with a --set of the config key it stands for
    (``--programming verify --set ep.programming=pulsed``, or its table ``--set
    'ep={programming="pulsed"}'``): as a --set key given twice
    (`hil.config.check_repeated_overrides`), one of the two would win without a word."""
    if value is None:
        return
    from hil.config import overlapping, override_keys

    for item in sets or []:
        _, sep, _ = item.partition("=")
        if sep and any(overlapping(k, key) for k in override_keys(item)):
            raise fail(f"{option} {value} and --set {item} both set {key}; keep the one you mean")


def show_progress(option: bool | None) -> bool:
    """Whether a command draws progress bars: as ``--progress/--no-progress`` says, and when
    neither is given, only if stderr is a terminal (tqdm's ``disable=None``): written to a file
    or a CI log, a bar's redraws are one line of carriage-return frames, and the command's
    plain lines (one per epoch or stage) say the same once."""
    if option is not None:
        return option
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # no stderr, or a closed one
        return False


JSON_HELP = (
    "Also write what is printed as one JSON object (keys: {doc}) to this file; - writes it to stdout "
    "in place of the text."
)


def to_stdout(dest: Path | None) -> bool:
    """``--json -``: the JSON object is all of stdout (the human-readable text goes to stderr
    or is left out)."""
    return dest is not None and str(dest) == "-"


def check_json_dest(dest: Path | None) -> None:
    """Refuse a ``--json FILE`` whose folder does not exist before any work (exit 2)."""
    if dest is not None and not to_stdout(dest) and not dest.parent.is_dir():
        raise fail(f"--json {dest}: folder {dest.parent} does not exist; create it or pick another")


def write_json(record: dict[str, Any], dest: Path) -> None:
    """``--json DEST``: `record` as one JSON object (`plain`), to stdout for ``-``, otherwise to
    the file DEST (a disk error is one line, exit 2), like `hil conformance --json`."""
    import json

    from hil.runlog.meta import plain

    text = json.dumps(plain(record), indent=1, allow_nan=False)
    if to_stdout(dest):
        typer.echo(text)
        return
    try:
        dest.write_text(text + "\n")
    except OSError as exc:
        raise fail(f"cannot write --json {dest}: {exc}") from None


def check_boards(uris: Iterable[str]) -> dict[str, Any]:
    """Open each board of `uris` (each URI once) and close it again, before a command starts
    work that would run against it (a sweep's trials): a malformed URI or a board that does not
    answer is one line naming it, exit 2 (`fail`). It looks as `hil info` does: no lock taken,
    nothing configured or driven, no safe state on close. Returns each board's declared
    `Limits` by URI (a sweep checks its space against them)."""
    from drivers import open_device
    from drivers.uri import looking_uri

    limits: dict[str, Any] = {}
    for uri in dict.fromkeys(uris):
        try:
            dev = open_device(looking_uri(uri))
        except user_errors() as exc:
            raise fail(f"cannot open the board {uri}: {exc}") from None
        limits[uri] = dev.info.limits
        dev.close_link()
    return limits


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean bad input or an unreachable board, not a bug."""
    from calibration import CalibrationError
    from drivers import DeviceError
    from hil.data import DataError

    return (DeviceError, CalibrationError, DataError, ValueError, OSError)


DISK_ERRNOS = {
    errno.ENOSPC: "free some space",
    errno.EROFS: "make it writable",
    errno.EDQUOT: "free some space",
}


@contextmanager
def one_line_errors(prefix: str = "") -> Iterator[None]:
    """Turn `user_errors` raised inside into `fail` (one line, exit 2); a full or read-only
    disk is named as such, with what to do."""
    try:
        yield
    except user_errors() as exc:
        fix = DISK_ERRNOS.get(exc.errno) if isinstance(exc, OSError) else None  # type: ignore[arg-type]
        where = (
            f" ({exc.filename})"
            if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in str(exc)
            else ""
        )
        hint = (
            f"{where}: the disk of the run log or its output is full or read-only; {fix} before going on"
            if fix
            else ""
        )
        raise fail(f"{prefix}{exc}{hint}") from None


SIGINT_EXIT = 128 + signal.SIGINT  # 130: Ctrl-C, as shells and typer report it
SIGTERM_EXIT = 128 + signal.SIGTERM  # 143: what batch schedulers expect of a terminated job


class TermAsInterrupt:
    """The SIGTERM handler `sigterm_as_interrupt` installs: it notes that SIGTERM came
    (`received`, which `hil.cli.main` turns into exit code 143), ignores the SIGTERMs after it
    and raises SIGINT in the process, which Python delivers as KeyboardInterrupt once the
    board's transaction in flight is complete."""

    def __init__(self) -> None:
        from hil.processes import note_stop_signal

        self.received = False
        note_stop_signal(None)

    def __call__(self, *_: object) -> None:
        from hil.processes import note_stop_signal

        self.received = True
        note_stop_signal("SIGTERM")  # what the run log records: interrupted by SIGTERM, not Ctrl-C
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.kill(os.getpid(), signal.SIGINT)


@contextmanager
def sigterm_as_interrupt() -> Iterator[TermAsInterrupt]:
    """Inside, SIGTERM (torchrun stopping the other ranks of a job whose rank failed, a batch
    scheduler's time limit, `kill`) is taken as Ctrl-C: the board's transaction in flight
    finishes, the board goes to its safe state, the run log is closed as interrupted by SIGTERM
    (its `error` and `stopped` say so, with the last step; docs/runlog.md) and the
    `--resume` command is printed, where the default action ended the process at once and left
    the run log saying it still runs. Later SIGTERMs are ignored from then on (torchrun and
    schedulers send more than one, and the clean-up after the block must not be cut; they kill
    with SIGKILL after their grace period). Outside the main thread it does nothing. It yields
    the handler, whose `received` says whether SIGTERM came; inside another one, it yields that
    one's handler and changes nothing.

    `hil` (`hil.cli.main`) runs every command inside it: each command that drives a board
    (calibrate, demo, gradcheck, mhn, conformance, sweep, train...) stops on SIGTERM as on
    Ctrl-C, with exit code 143 (128 + SIGTERM, what batch schedulers expect of a terminated
    job; Ctrl-C itself exits with 130). A process started in the background by a
    non-interactive shell inherits SIGINT ignored: inside, SIGINT is then Python's Ctrl-C
    again, or the SIGTERM taken as one would be ignored too."""
    current = signal.getsignal(signal.SIGTERM)
    if isinstance(current, TermAsInterrupt):  # `hil.cli.main`'s, around a command that asks again
        yield current
        return
    handler = TermAsInterrupt()
    try:
        before = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: signals are not ours to take
        yield handler
        return
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield handler
    finally:
        if not handler.received:
            signal.signal(signal.SIGTERM, before)
            if ignored:
                signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextmanager
def resume_hint(command: str, run: Path | None) -> Iterator[None]:
    """On Ctrl-C inside, or on an error of the board, its link or the disk (`user_errors`
    less bad input), close with one line saying where the run stopped and how to continue it
    (`resume_line`); the exception then ends the command as before. Put it outside
    `one_line_errors`, which prints the error."""
    try:
        yield
    except KeyboardInterrupt:
        if run is not None:
            _say_held(lambda: f"interrupted: {resume_line(command, run)}")
        raise
    except typer.Exit as exc:
        from drivers import ConfigurationError, DeviceError
        from drivers.errors import Unreachable

        cause = exc.__context__  # what `one_line_errors` reported
        # a board that cannot be reached may be off or starting: a resume works once it is back
        stopped = isinstance(cause, DeviceError | OSError) and (
            not isinstance(cause, ConfigurationError) or isinstance(cause, Unreachable)
        )
        if run is not None and stopped:
            try:
                _say_held(
                    lambda: f"stopped: once the board (or the disk) is back, {resume_line(command, run)}"
                )
            except KeyboardInterrupt:  # a stop signal came before the signals were held
                _say_held(lambda: f"interrupted: {resume_line(command, run)}")
                raise
        raise


def _say_held(line: Callable[[], str]) -> None:
    """Print `line()` on stderr with SIGINT and SIGTERM held, so a stop signal that comes while
    the line is made (it reads the run log) or written is taken after it, not in its place
    (torchrun's SIGTERM to a rank reporting that another rank stopped). The signals are noted
    by a handler of their own meanwhile and sent again once the line is out; a thread mask would
    not do, since the run log's threads would take them. Off the main thread, printed as is."""
    if threading.current_thread() is not threading.main_thread():
        typer.echo(line(), err=True)
        return
    came: list[int] = []
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    held = [signum for signum, handler in before.items() if handler is not None]  # None: not Python's
    for signum in held:
        signal.signal(signum, lambda signum, frame: came.append(signum))
    try:
        typer.echo(line(), err=True)
    finally:
        for signum in held:
            signal.signal(signum, before[signum])
    if came:
        os.kill(os.getpid(), came[0])  # now its own handler takes it


def resume_line(command: str, run: Path) -> str:
    """What `--resume` does for the run log at `run` (a store, or a run folder holding one):
    continue from its last snapshot (naming its step), or, without one, start again from the
    first step (a resume works then too: it only has nothing to continue from)."""
    step = _snapshot_step(run)
    if step is None:
        return f"the run log {run} has no snapshot yet: `{command} --resume {run}` starts again from the first step"
    return (
        f"the run log {run} keeps what was logged up to its last snapshot (step {step}): "
        f"`{command} --resume {run}` continues from there and programs every tile again "
        "(the board may hold a half-finished update)"
    )


def _snapshot_step(run: Path) -> int | None:
    """The step of the last snapshot of the run log at `run` (a store, or a run folder holding
    one); None without one (or without a readable run log)."""
    from hil.runlog import RunLogError, open_run

    store = run / RUN_STORE if (run / RUN_STORE).exists() else run
    try:
        log = open_run(store, validate=False)
        return int(log.snapshot_attrs(log.snapshots[-1])["step"]) if log.snapshots else None
    except (RunLogError, KeyError, TypeError, ValueError):
        return None


@contextmanager
def boards_closed_on_error(devices: Iterable[Any], then: Callable[[], None] | None = None) -> Iterator[None]:
    """A block run after a command opened its boards (creating or resuming its run log): if it
    fails, each board is put in its safe state and closed (their errors added to the block's as
    notes), then `then` runs (a distributed group's close), and the block's error goes on."""
    try:
        yield
    except BaseException as err:
        from hil.boards import close_boards

        close_boards(devices, during=err)
        if then is not None:
            then()
        raise


def run_store(path: Path) -> Path:
    """The run-log store that `path` names: the store itself, or a run folder holding one
    (``RUN/run.zarr``, what `hil train vae --out RUN` writes)."""
    if not (path / "zarr.json").exists() and (path / RUN_STORE / "zarr.json").exists():
        return path / RUN_STORE
    return path


def claim_new_run(kind: str, root: Path = Path("runs")) -> Path:
    """A new run-log folder ``root/KIND-YYYYmmdd-HHMMSS.zarr`` (``-2``, ``-3``... when taken),
    made here so that runs started in the same second (a shell loop, one per GPU) each get
    their own: ``mkdir`` succeeds for one process only. The caller creates the run log in it
    with ``overwrite=True`` (the folder is empty and its own)."""
    import time

    root.mkdir(parents=True, exist_ok=True)
    stem = f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    for k in range(1, 1000):
        path = root / (f"{stem}.zarr" if k == 1 else f"{stem}-{k}.zarr")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise OSError(f"{root}: 999 runs named {stem}*.zarr already; pass --out")


def exists_message(path: Path, resume: Path) -> str:
    """What to say when a new run would replace the run at `path`: the flags that decide."""
    return (
        f"{path} already exists (a run); add --overwrite to replace it, --resume {resume} to "
        "continue it, or pick another --out"
    )


# the boards' addresses may change between a run and its resume (`device`, and `devices` of a
# model whose EB blocks have boards of their own), and so may the host's torch device
# (`compute`: the same seed gives the same numbers on cpu and cuda to float tolerance)
RESUME_MAY_CHANGE = ("device", "devices", "compute")


def resumed_config(stored: T, asked: T) -> T:
    """`asked` (the stored config with this command's --config/--set applied) if it differs
    from `stored` (the run's config) only in `RESUME_MAY_CHANGE`; otherwise a `ConfigError`
    naming the keys: a resumed run must go on as it started, only on another address."""
    from hil.config import ConfigError, dotted_keys

    old = dotted_keys(stored.to_dict())  # type: ignore[attr-defined]
    new = dotted_keys(asked.to_dict())  # type: ignore[attr-defined]
    changed = [k for k in new if k not in RESUME_MAY_CHANGE and new[k] != old.get(k)]
    if changed:
        what = ", ".join(f"{k} (run: {old.get(k)!r}, asked: {new[k]!r})" for k in changed)
        raise ConfigError(
            f"--resume continues the run with its own config; these would change it: {what}. "
            f"Only {', '.join(RESUME_MAY_CHANGE)} may change on resume; start a new run for the rest"
        )
    return asked


def resume_log(store: Path, device: str) -> tuple[Any, dict | None]:
    """Reopen the run log `store` for `--resume` on the board at `device` (recorded when it
    moved), printing a ``note:`` line for every damaged snapshot the resume fell back past."""
    from hil.runlog import open_for_resume

    log, state = open_for_resume(store)
    log.set_device_uri(device)
    for note in log.fallback_notes():
        typer.echo(f"note: {note}", err=True)
    if state is None:
        typer.echo(
            "note: the run was stopped before its first snapshot: training starts again from its first step",
            err=True,
        )
    return log, state
