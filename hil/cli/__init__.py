"""The `hil` command line. Each command group lives in its own module."""

from __future__ import annotations

import warnings

import typer

from hil.cli import calibrate, conformance, demo, emulator_cmd, info, lock, mhn, runs, sweep, train
from hil.cli.help_format import ShortMetavarGroup

app = typer.Typer(
    help="xbar-hil: Equilibrium Propagation on analog crossbar boards and their emulator.",
    no_args_is_help=True,
    add_completion=False,
    # Markdown refills each paragraph of a docstring to the terminal's width; Rich's mode keeps
    # the source's line breaks, which an 80-column terminal or a pipe then wraps a second time
    rich_markup_mode="markdown",
    cls=ShortMetavarGroup,  # INT, PATH, TEXT and no value for flags: room for the help column
)
calibrate.register(app)
conformance.register(app)
demo.register(app)
emulator_cmd.register(app)
info.register(app)
lock.register(app)
mhn.register(app)
runs.register(app)
sweep.register(app)
train.register(app)


@app.callback()
def _root() -> None:
    """Run `hil COMMAND --help` for each command's options."""


def one_line_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None
) -> str:
    """A warning as the command line shows it: ``warning: MESSAGE``, one line on stderr (the
    project's warnings name the problem and what to do; the source line that Python's format
    adds tells a lab user nothing)."""
    return f"warning: {message}\n"


def main() -> None:
    """The `hil` command. SIGTERM (a batch scheduler's time limit, `kill`, torchrun stopping
    a job's ranks) is Ctrl-C for every command (`sigterm_as_interrupt`): the transaction in
    flight finishes, the board goes to its safe state, the command says what it kept (and how
    to resume), where the default action ended it mid-request with the board left as it was.
    It then exits with code 143 (128 + SIGTERM, what batch schedulers expect of a terminated
    job), and with 130 after Ctrl-C (SIGINT). A rank of a data parallel job whose process group
    is still up when the command is done (it stopped waiting for a collective:
    `hil.distributed.group_left_up`) ends with `os._exit`: the interpreter's teardown would wait
    for that collective, i.e. for its peers."""
    from hil.cli.common import SIGINT_EXIT, SIGTERM_EXIT, sigterm_as_interrupt

    with warnings.catch_warnings(), sigterm_as_interrupt() as term:
        warnings.formatwarning = one_line_warning
        try:
            app()
        except SystemExit as exc:
            # typer ends a command stopped by KeyboardInterrupt with 130, whichever signal it was
            code = SIGTERM_EXIT if term.received and exc.code == SIGINT_EXIT else exc.code
            _end_if_group_left_up(code)
            if code != exc.code:
                raise SystemExit(code) from None
            raise


def _end_if_group_left_up(code: int | str | None) -> None:
    """`os._exit(code)` (`DataParallel.exit_worker`) if this process's process group is still up
    (a rank interrupted while it waited for a peer keeps it: `DataParallel.close`); else nothing.
    `hil.distributed` is looked up, not imported: a command that did not load it (and torch) has
    no process group."""
    import sys

    distributed = sys.modules.get("hil.distributed")
    if distributed is None or not distributed.group_left_up():
        return
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    distributed.DataParallel.exit_worker(code or 0)
