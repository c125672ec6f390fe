"""How `hil ... --help` and usage errors look.

Typer shows each option's type as ``<int range>``, ``<path>``, ``<str>``, and ``<bool>`` for
a flag (which takes no value). On an 80-column terminal that column and the flags' negative
forms left the descriptions about 25 columns: a sentence over ten lines. The usual short
metavars (``INT``, ``PATH``, ``TEXT``, none for a flag) give them a dozen columns more.

Help written to a pipe or a file (``hil train classifier --help | cat``, a CI log) is drawn
`PIPED_WIDTH` columns wide: at rich's default of 80 its option table cut words longer than its
help column with an ellipsis (``model.sizes=[64,…``). Usage errors are plain text (click's)
when stderr is not a terminal, boxed by rich when it is.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, TextIO

import click
from typer.core import TyperGroup, TyperOption

# Typer's type labels and the metavar shown instead; a label not listed (a choice) is kept
SHORT = {
    "<int>": "INT",
    "<int range>": "INT",
    "<float>": "FLOAT",
    "<float range>": "FLOAT",
    "<path>": "PATH",
    "<str>": "TEXT",
    "<list[str]>": "TEXT",  # a repeatable option: its help says so
}


def short_metavars(cmd: Any) -> None:
    """Give every option of `cmd` and its subcommands without a metavar of its own a short
    one: none for a flag, ``INT``, ``FLOAT``, ``PATH`` or ``TEXT`` for a value."""
    params = list(getattr(cmd, "params", []))
    if hasattr(cmd, "get_help_option"):  # --help: made on demand, then kept by the command
        params.append(cmd.get_help_option(cmd.context_class(cmd)))
    for param in params:
        if not isinstance(param, TyperOption) or param.metavar is not None:
            continue
        if param.is_flag:
            param.metavar = ""
        else:
            param.metavar = SHORT.get(str(param.display_type(None)))
    for sub in getattr(cmd, "commands", {}).values():
        short_metavars(sub)


# Columns of help written to a pipe or a file: every command's option texts fit without an
# ellipsis (at 100 columns `hil train classifier --help` still cut one, at 120 none)
PIPED_WIDTH = 120


def _is_terminal(stream: TextIO | None) -> bool:
    try:
        return stream is not None and stream.isatty()
    except ValueError:  # a closed stream
        return False


def piped_width() -> int | None:
    """The width for help that goes to a pipe or a file: `PIPED_WIDTH`, or the terminal's if
    stdin or stderr is a wider one. None (rich measures as it does) when stdout is a terminal
    or the user set the width (``COLUMNS``, or typer's ``TERMINAL_WIDTH``)."""
    if os.environ.get("COLUMNS") or os.environ.get("TERMINAL_WIDTH") or _is_terminal(sys.stdout):
        return None
    widths = [PIPED_WIDTH]
    for fd in (0, 2):
        with suppress(OSError):
            widths.append(os.get_terminal_size(fd).columns)
    return max(widths)


@contextmanager
def help_width() -> Iterator[None]:
    """Inside, help is drawn `piped_width` columns wide: rich takes the width from ``COLUMNS``,
    set for the moment the help is written and removed after (typer gives no other way in)."""
    width = piped_width()
    if width is None:
        yield
        return
    os.environ["COLUMNS"] = str(width)
    try:
        yield
    finally:
        os.environ.pop("COLUMNS", None)


def wide_piped_help(cmd: Any, ctx: click.Context | None = None) -> None:
    """Make the help of `cmd` and its subcommands draw inside `help_width`: the one ``--help``
    shows, and the one a group shows when it is given no command (``hil train``), which its
    `parse_args` draws."""
    if hasattr(cmd, "get_help_option"):
        option = cmd.get_help_option(ctx or cmd.context_class(cmd))
        if option is not None and option.callback is not None:
            option.callback = _in_help_width(option.callback)
    if getattr(cmd, "no_args_is_help", False):
        cmd.parse_args = _in_help_width(cmd.parse_args)
    for sub in getattr(cmd, "commands", {}).values():
        wide_piped_help(sub)


def _in_help_width(show: Callable[..., Any]) -> Callable[..., Any]:
    def drawn_wide(*args: Any) -> Any:
        with help_width():
            return show(*args)

    return drawn_wide


class ShortMetavarGroup(TyperGroup):
    """The root group of `hil`: its command tree gets `short_metavars` and `wide_piped_help`
    before it runs, and its usage errors are plain text when stderr is not a terminal (typer
    boxes them with rich by the root's `rich_markup_mode`, which the root's own help keeps)."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        short_metavars(self)
        wide_piped_help(self)
        self.help_markup_mode = self.rich_markup_mode
        if not _is_terminal(sys.stderr):
            self.rich_markup_mode = None  # typer then lets click print the error
        return super().main(*args, **kwargs)

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        errors, self.rich_markup_mode = (
            self.rich_markup_mode,
            getattr(self, "help_markup_mode", self.rich_markup_mode),
        )
        try:
            super().format_help(ctx, formatter)
        finally:
            self.rich_markup_mode = errors
