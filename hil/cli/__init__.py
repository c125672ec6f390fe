"""The `hil` command line. Each command group lives in its own module."""

from __future__ import annotations

import typer

from hil.cli import calibrate, conformance, demo, emulator_cmd, mhn, runs, sweep, train

app = typer.Typer(
    help="xbar-hil: Equilibrium Propagation on analog crossbar boards and their emulator.",
    no_args_is_help=True,
    add_completion=False,
)
calibrate.register(app)
conformance.register(app)
demo.register(app)
emulator_cmd.register(app)
mhn.register(app)
runs.register(app)
sweep.register(app)
train.register(app)


@app.callback()
def _root() -> None:
    """Run `hil COMMAND --help` for each command's options."""


def main() -> None:
    app()
