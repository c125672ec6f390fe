"""`hil inspect RUN` and `hil plot RUN`: read a run log."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hil.runlog import RunLogError, open_run

RunArg = Annotated[Path, typer.Argument(help="The run log (a .zarr folder).", show_default=False)]


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def register(app: typer.Typer) -> None:
    @app.command()
    def inspect(run: RunArg) -> None:
        """Print a run's summary: status, versions, device, config, metrics (last, min, max),
        traces, tiles, programming reports and snapshots."""
        from hil.runlog.summary import summary

        try:
            text = summary(open_run(run))
        except RunLogError as exc:
            raise _fail(str(exc)) from None
        except Exception as exc:  # a store this reader did not foresee: still one line
            raise _fail(f"{run}: cannot read the run log: {type(exc).__name__}: {exc}") from None
        typer.echo(text)

    @app.command()
    def plot(
        run: RunArg,
        out: Annotated[
            Path | None, typer.Option(help="Folder for the PNGs (default: RUN without .zarr, + '-plots').")
        ] = None,
    ) -> None:
        """Write PNGs: loss and accuracy curves, settle energy traces (free vs nudged),
        conductance histograms per tile over time."""
        from hil.runlog.plots import plot_run

        target = out or run.with_name(run.name.removesuffix(".zarr") + "-plots")
        try:
            files, notes = plot_run(open_run(run), target)
        except RunLogError as exc:
            raise _fail(str(exc)) from None
        except Exception as exc:
            raise _fail(f"{run}: cannot plot the run log: {type(exc).__name__}: {exc}") from None
        for f in files:
            typer.echo(f"wrote {f}")
        for n in notes:
            typer.echo(f"note: {n}")
