"""`hil lock`: who owns a shared board, and breaking an owner's lock (docs/protocol.md, "Ownership")."""

from __future__ import annotations

import typer

from hil.cli.common import one_line_errors
from hil.cli.info import owner_line

_URI = typer.Argument(
    ..., help="Device URI of a served board: visa://RESOURCE, serial://PORT, serial+socket://HOST:PORT"
)


def register(app: typer.Typer) -> None:
    group = typer.Typer(
        help="Who owns a shared board (a host takes it when it opens it), and breaking that lock.",
        no_args_is_help=True,
    )
    app.add_typer(group, name="lock")

    @group.command()
    def status(uri: str = _URI) -> None:
        """Print the board's owner: its token (host:pid:random), since when, and whether a
        connection still presents it. Takes nothing: works while another host owns the board."""
        from drivers import open_device
        from drivers.uri import looking_uri

        with one_line_errors():
            dev = open_device(looking_uri(uri))
            try:
                line = owner_line(dev.owner())
            finally:
                dev.close_link()
        typer.echo(line)

    @group.command(name="break")
    def break_(
        uri: str = _URI,
        yes: bool = typer.Option(False, "--yes", help="Do not ask first."),
    ) -> None:
        """Take the board from its owner (a colleague's host that died or went home): the board
        is free, the next host to open it takes it, and the old owner's next request (and its
        reconnect) is refused with error 120. A run still going is not stopped cleanly: ask first."""
        from drivers import open_device
        from drivers.uri import looking_uri

        with one_line_errors():
            dev = open_device(looking_uri(uri))
            try:
                owner = dev.owner()
                if owner is None:
                    raise typer.BadParameter(f"{uri}: the board has no ownership (capability 'lock')")
                if owner.token is None:
                    typer.echo("owner         nobody: nothing to break")
                    return
                if not yes:
                    typer.confirm(f"break the lock of {owner.token}?", abort=True)
                before = dev.break_lock()
            finally:
                dev.close_link()
        typer.echo(f"broke the lock of {before.token}; the board is free")
