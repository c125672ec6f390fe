"""Option columns of `hil ... --help` that leave room for the help text.

Typer shows each option's type as ``<int range>``, ``<path>``, ``<str>``, and ``<bool>`` for
a flag (which takes no value). On an 80-column terminal that column and the flags' negative
forms left the descriptions about 25 columns: a sentence over ten lines. The usual short
metavars (``INT``, ``PATH``, ``TEXT``, none for a flag) give them a dozen columns more.
"""

from __future__ import annotations

from typing import Any

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


class ShortMetavarGroup(TyperGroup):
    """The root group of `hil`: its command tree gets `short_metavars` before it runs."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        short_metavars(self)
        return super().main(*args, **kwargs)
