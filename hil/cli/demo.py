"""`hil demo`: a first look at a board."""

from __future__ import annotations

import math

import typer

from hil.cli.common import fail, one_line_errors


def register(app: typer.Typer) -> None:
    @app.command()
    def demo(
        uri: str = typer.Option(
            "emulator://?preset=rram&seed=0",
            "--uri",
            "--device",
            help="Device URI: emulator://?preset=NAME&seed=N, visa://RESOURCE, serial://PORT, ...",
        ),
        sizes: str = typer.Option(
            "64,256,10",
            help="Layer sizes, comma-separated, from the 64 inputs (the digits' pixels) to the 10 outputs "
            "(their classes).",
        ),
        batch: int = typer.Option(64, min=1, max=1024, help="Test images settled at once."),
        beta: float = typer.Option(
            0.2, help="Nudge strength, > 0: the two nudged phases take +beta and -beta."
        ),
        seed: int = typer.Option(0, help="Seed of the random weights."),
        settle: str = typer.Option(
            "auto",
            help="Where settles run: board (the board relaxes), host (the host iterates through the board's mvm) or auto (board if it can settle).",
        ),
        threads: int = typer.Option(
            1,
            min=0,
            max=1024,
            help="torch CPU threads (0: torch's default, one per core). Default 1: fastest for the small "
            "products of a settle on 2 cores.",
        ),
    ) -> None:
        """Program a layered network with write-verify, settle free and nudged (+-beta) on
        handwritten digits, and print convergence, energies, settle time, joules and the
        board's safety counters."""
        try:
            layer_sizes = tuple(int(s) for s in sizes.split(","))
        except ValueError:
            raise fail(f"--sizes takes comma-separated integers (e.g. 64,256,10), got {sizes!r}") from None
        if settle not in ("auto", "board", "host"):
            raise fail(f"--settle takes auto, board or host, got {settle!r}")
        if not (math.isfinite(beta) and beta > 0):
            raise fail(
                f"--beta: the nudge strength, > 0 (the nudged phases take +beta and -beta), got {beta:g}"
            )
        import torch

        from hil.demo import run_demo

        if threads:  # 0: torch's default, as in every command's --threads
            torch.set_num_threads(threads)
        with one_line_errors():
            r = run_demo(uri, layer_sizes, batch, beta, seed, settle)
        typer.echo(f"board     {r.identity}")
        where = "the board" if r.settle == "board" else "the host, through the board's mvm"
        typer.echo(f"settles   on {where}")
        typer.echo(f"network   {'-'.join(map(str, layer_sizes))}, {r.cells} crossbar cells")
        for tile, iters, pulses, within, gave_up in r.programming:
            typer.echo(
                f"program   {tile}: {iters} verify iterations, {pulses} pulses, {within:.1%} within tol"
                + ("" if gave_up is None else f", gave up on {gave_up} devices")
            )
        header = ("phase", "steps", "conv", "energy", "settle (us)", "joules", "wall (ms)")
        typer.echo(
            f"{header[0]:<14}{header[1]:>6}{header[2]:>6}{header[3]:>10}"
            + "".join(f"{h:>13}" for h in header[4:])
        )
        for p in r.phases:
            energy = f"{'-':>10}" if math.isnan(p.energy) else f"{p.energy:>10.4f}"  # NaN: not measured
            typer.echo(
                f"{p.name:<14}{p.steps:>6}{'yes' if p.converged else 'no':>6}{energy}"
                f"{p.settle_time_s * 1e6:>13.2f}{p.energy_j:>13.3e}{p.wall_s * 1e3:>13.1f}"
            )
        if any(math.isnan(p.energy) for p in r.phases):
            typer.echo(
                "energy    - : a host-iterated settle reads products from the board, not the network's energy"
            )
        typer.echo(f"safety    {r.refused} refused requests, {r.violations} limit violations at the array")
