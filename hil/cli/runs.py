"""`hil inspect RUN` and `hil plot RUN`: read a run log."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hil.cli.common import JSON_HELP, check_json_dest, fail, run_store, to_stdout, write_json

RunArg = Annotated[
    Path,
    typer.Argument(
        help="The run: its run-log store (a .zarr folder) or the run folder holding it (RUN/run.zarr).",
        show_default=False,
    ),
]

_JSON = typer.Option(None, "--json", help=JSON_HELP.format(doc='docs/runlog.md, "hil inspect --json"'))


def register(app: typer.Typer) -> None:
    @app.command()
    def inspect(run: RunArg, json_out: Path = _JSON) -> None:
        """Print a run's summary: status, versions, device, config, metrics (last, min, max),
        traces, tiles, programming reports and snapshots. --json writes the same as one JSON
        object."""
        from hil.runlog import RunLogError, open_run
        from hil.runlog.summary import summary, summary_record

        check_json_dest(json_out)
        run = run_store(run)
        try:
            log = open_run(run, verify=True)
            text = summary(log)
            record = summary_record(log) if json_out is not None else None
        except RunLogError as exc:
            raise fail(str(exc)) from None
        except Exception as exc:  # a store this reader did not foresee: still one line
            raise fail(f"{run}: cannot read the run log: {type(exc).__name__}: {exc}") from None
        if not to_stdout(json_out):
            typer.echo(text)
        if record is not None and json_out is not None:
            write_json(record, json_out)

    @app.command()
    def plot(
        run: RunArg,
        out: Annotated[
            Path | None,
            typer.Option(
                help="Folder for the PNGs. Default: beside the run-log store, its name without .zarr "
                "and '-plots': RUN/run-plots for a run folder RUN (hil train vae's, holding run.zarr), "
                "runs/NAME-plots for a store runs/NAME.zarr (hil train classifier's)."
            ),
        ] = None,
    ) -> None:
        """Write PNGs: loss and accuracy curves, settle energy traces (free vs nudged),
        conductance histograms per tile over time."""
        from hil.runlog import RunLogError, open_run
        from hil.runlog.plots import plot_run

        run = run_store(run)
        target = out or run.with_name(run.name.removesuffix(".zarr") + "-plots")
        try:
            files, notes = plot_run(open_run(run), target)
        except RunLogError as exc:
            raise fail(str(exc)) from None
        except Exception as exc:
            raise fail(f"{run}: cannot plot the run log: {type(exc).__name__}: {exc}") from None
        for f in files:
            typer.echo(f"wrote {f}")
        for n in notes:
            typer.echo(f"note: {n}")
