"""`hil mhn phase`: which side of the temperature transition a modern Hopfield memory sits on,
on any board (docs/mhn.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer

from hil.cli.common import one_line_errors

IDEAL = "emulator://?preset=ideal&seed=0"


def register(app: typer.Typer) -> None:
    mhn_app = typer.Typer(help="Modern Hopfield network blocks on crossbars.", no_args_is_help=True)

    @mhn_app.command()
    def phase(
        device: Annotated[
            str,
            typer.Option(
                "--device",
                "--uri",
                help="Board URI: emulator://?preset=NAME&seed=N, visa://RESOURCE, serial://PORT, ... "
                "(--uri as in hil demo and hil gradcheck).",
            ),
        ] = IDEAL,
        n: Annotated[
            int, typer.Option(min=1, max=1024, help="Patterns (with --digits: digit classes, at most 10).")
        ] = 10,
        d: Annotated[
            int,
            typer.Option(
                min=1,
                max=1024,
                help="Pattern dimension (ignored with --digits: 64); the memory is a (d + 1) x n tile, "
                "split over the board's tiles where it holds fewer rows. Bounded at 1024: the read-back "
                "patterns' critical beta takes d x d eigenproblems (d = 1023: 44 s, 2026-12-06, 2-core Intel Xeon, "
                "one thread).",
            ),
        ] = 64,
        norm: Annotated[float, typer.Option(help="Norm of every pattern.")] = 1.0,
        cos: Annotated[
            float,
            typer.Option(help="Cosine between every pair of equidistant patterns, in (-1/(n-1), 1); n <= d."),
        ] = 0.0,
        digits: Annotated[
            bool, typer.Option("--digits", help="Store digits (one per class, centred, scaled to --norm).")
        ] = False,
        beta: Annotated[
            float | None,
            typer.Option(
                help="Your inverse temperature (default 1/sqrt(d), attention's); also measured, as one "
                "more point of the sweep (so it can move the measured transition a little)."
            ),
        ] = None,
        starts: Annotated[
            int, typer.Option(min=1, max=1024, help="Random starts per family (near-centre, anywhere).")
        ] = 32,
        seed: Annotated[
            int,
            typer.Option(
                help="Seed of the equidistant patterns (not of --digits) and of the starts; the board's "
                "own seed is the URI's seed=."
            ),
        ] = 0,
        programming: Annotated[
            str,
            typer.Option(help="Programming scheme: ideal, verify, pulsed or mixed (docs/programming.md)."),
        ] = "verify",
        out: Annotated[
            Path,
            typer.Option(
                help="Folder for phase.png and phase.json (relative to here; existing ones replaced)."
            ),
        ] = Path("mhn_phase"),
        out_range: Annotated[
            float,
            typer.Option(
                min=1e-6,
                max=1e6,
                help="The mvm ADC's range, in weight units, that the read-out may fill (4: the emulator's); "
                "the tile's largest weight is proportional to it, so a smaller one fits a board with a "
                "smaller w_max (the error says what fits).",
            ),
        ] = 4.0,
        calibration: Annotated[
            str,
            typer.Option(
                help="Calibration record of the board (hil calibrate URI --routines adc,dac,mvm --tiles "
                "(d+1)x(d+1) --out REC): its DAC and mvm-ADC corrections apply to every read (per-device "
                "corrections only from a record of the (d+1)xN tile). A square tile, so that all d+1 "
                "mvm-ADC lines are fitted from forward reads: on a (d+1)xN tile the lines past N keep "
                "up to half an ADC step of offset (docs/mhn.md)."
            ),
        ] = "",
    ) -> None:
        """Sweep beta on the board (0.25 to 3 times the derived critical beta, 12 points, and your
        --beta), count the minima reached and their overlap with the patterns, mark the derived
        critical beta and the one measured on the board, and say where your beta sits. A few
        seconds at the defaults on the ideal board; longer with larger d, n and --starts."""
        import torch

        from hil.boards import open_board
        from hil.mhn.core import MAX_BETA
        from hil.mhn.diagnose import describe, phase_diagnostic
        from hil.mhn.digits import digit_memory
        from hil.mhn.phase import equidistant_patterns
        from hil.mhn.plot import save_phase_figure
        from hil.programming.schemes import SCHEMES

        torch.set_num_threads(1)
        with one_line_errors():
            if beta is not None and not (math.isfinite(beta) and 0.0 < beta <= MAX_BETA):
                raise ValueError(f"--beta: your inverse temperature, in (0, {MAX_BETA:g}], got {beta:g}")
            if not (math.isfinite(norm) and norm > 0):
                raise ValueError(f"--norm: the norm of every pattern, > 0, got {norm:g}")
            if programming not in SCHEMES:
                raise ValueError(
                    f"--programming takes {', '.join(SCHEMES)} (docs/programming.md), got {programming!r}"
                )
            if not digits and n > d:  # n equidistant patterns span n dimensions
                raise ValueError(
                    f"--n {n} equidistant patterns need --d of at least {n} (n <= d), got --d {d}"
                )
            if not digits and not -1.0 / max(n - 1, 1) < cos < 1.0:
                raise ValueError(
                    f"--cos {cos:g}: the cosine of {n} equidistant patterns is in (-1/(n-1), 1) = "
                    f"({-1.0 / max(n - 1, 1):.4g}, 1)"
                )
            if digits:
                if not 1 <= n <= 10:
                    raise ValueError(f"--digits stores one image per class: --n must be 1 to 10, got {n}")
                xi = digit_memory(1, norm=norm, classes=n).patterns
                what = f"{n} digits (centred, norm {norm:g})"
            else:
                xi = equidistant_patterns(n, d, norm, cos=cos, seed=seed)
                what = f"{n} equidistant patterns, d={d}, norm {norm:g}, cos {cos:g}"
            if starts < 1:
                raise ValueError(f"--starts must be >= 1, got {starts}")
            user_beta = beta if beta is not None else 1.0 / math.sqrt(xi.shape[0])
            with open_board(device, calibration) as dev:
                report = phase_diagnostic(
                    dev,
                    xi,
                    centre_starts=starts,
                    anywhere_starts=starts,
                    seed=seed,
                    extra=(user_beta,),
                    programming=programming,
                    out_range=out_range,
                )
            out.mkdir(parents=True, exist_ok=True)
            png = save_phase_figure(report, out / "phase.png", f"{what} on {device}", user_beta)
            data = {"device": device, "patterns": what, "beta": user_beta, **report.to_dict()}
            (out / "phase.json").write_text(json.dumps(data, indent=1) + "\n")
        typer.echo(f"{what} on {device}")
        for line in describe(report, user_beta):
            typer.echo(line)
        typer.echo(f"wrote {png} and {out / 'phase.json'}")

    app.add_typer(mhn_app, name="mhn")
