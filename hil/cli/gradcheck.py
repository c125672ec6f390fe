"""`hil gradcheck`: EP gradients on a Device against implicit differentiation."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import typer

from hil.cli.common import check_json_dest, fail, one_line_errors, show_progress, to_stdout, write_json

if TYPE_CHECKING:
    from hil.gradcheck import CheckRow

MODES = ("positive", "centered")  # one-sided and centered EP, the two columns of the table


@contextmanager
def _progress(checks: int, *, enabled: bool = True) -> Iterator[Callable[[str], None]]:
    """A bar over what `hil.gradcheck.gradcheck` does: one tick for the reference (implicit
    differentiation, float64) and the free phase, then one per EP estimate (beta x mode);
    yields the `on_step` callback that advances it."""
    from tqdm import tqdm

    bar = tqdm(total=1 + checks, desc="reference", unit="check", disable=not enabled, dynamic_ncols=True)

    def tick(what: str) -> None:
        bar.set_description(what)
        bar.update(1)

    try:
        yield tick
    finally:
        bar.close()


# What centered EP reaches at small beta on the ideal board, by the docs (docs/neuron.md) and the
# tests (tests/test_ep.py, tests/test_activation.py: cosine >= 0.999 at beta 0.01 on every
# parameter and the input). At `hil gradcheck`'s smallest default beta, 0.001, centered EP on the
# default network is at 0.99998 or more on the ideal emulator, with --loss ce, --dense and every
# activation (2026-12-06).
MIN_COSINE = 0.999


_JSON = typer.Option(
    None,
    "--json",
    help="Also write the results (device, network, every row, the check and the rows that failed it) "
    "as one JSON object to this file (keys: README, hil gradcheck); - writes it to stdout, and the "
    "table to stderr.",
)


def below(rows: list[CheckRow], min_cosine: float) -> list[CheckRow]:
    """The centered-EP rows of the smallest beta (every parameter and the input) whose cosine is
    below `min_cosine`: what `hil gradcheck` fails on. Centered EP is the estimate the trainers
    use; one-sided EP (biased by O(beta)) and the larger betas (a bias that grows with beta by
    design) are tabulated beside it for comparison, not checked."""
    smallest = min(r.beta for r in rows)
    checked = [r for r in rows if r.beta == smallest and r.mode == "centered"]
    return [r for r in checked if not r.cosine >= min_cosine]  # a NaN fails too


def format_table(rows: list[CheckRow]) -> str:
    """One line per (beta, parameter): cosine and relative error of one-sided and centered EP."""
    by = {}
    for r in rows:
        by.setdefault((r.beta, r.param), {})[r.mode] = r
    cols = ("cos 1-sided", "err 1-sided", "cos centered", "err centered")
    head = f"{'beta':>8}  {'parameter':<12}" + "".join(f"{c:>14}" for c in cols)
    lines = [head, "-" * len(head)]
    for (beta, param), d in by.items():
        one, cen = d.get("one-sided"), d.get("centered")
        cells = ""
        for r in (one, cen):
            cells += f"{r.cosine:>14.6f}{r.rel_error:>14.2e}" if r else " " * 28
        lines.append(f"{beta:>8g}  {param:<12}{cells}")
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    @app.command()
    def gradcheck(
        betas: str = typer.Option("0.1,0.01,0.001", help="Comma-separated nudge strengths to tabulate."),
        uri: str = typer.Option(
            "emulator://?preset=ideal&seed=0", "--uri", "--device", help="Device URI (see `hil demo --help`)."
        ),
        sizes: str = typer.Option(
            "64,256,10",
            help="Layer sizes, comma-separated, from the 64 inputs (the digits' pixels) to the 10 outputs "
            "(their classes).",
        ),
        dense: bool = typer.Option(False, "--dense", help="All-to-all network over the same groups."),
        batch: int = typer.Option(64, min=1, max=1024, help="Digits images in the checked batch."),
        init_scale: float = typer.Option(0.5, help="Weights N(0, scale^2/fan_in); biases U(0.1, 0.4)."),
        seed: int = typer.Option(0, help="Seed of the random weights."),
        settle: str = typer.Option(
            "auto",
            help="Where settles run: board, host (iterated through the board's mvm) or auto (board if it can settle).",
        ),
        progress: bool | None = typer.Option(
            None,
            "--progress/--no-progress",
            help="Progress bar on stderr: the reference, then each beta and mode (default: when stderr "
            "is a terminal).",
        ),
        activation: str = typer.Option(
            "hard_sigmoid",
            help="Node curve: hard_sigmoid, logistic or soft_sigmoid[:width] (docs/neuron.md).",
        ),
        loss: str = typer.Option(
            "mse",
            help="mse (nudged towards the one-hot target) or ce (the classifier's nudge: beta times "
            "tau (softmax(tau s_out) - onehot), as `hil train classifier` applies it).",
        ),
        tau: float = typer.Option(
            6.0, min=1e-6, max=1e3, help="Softmax temperature of --loss ce (the classifier's ep.tau)."
        ),
        min_cosine: float = typer.Option(
            MIN_COSINE,
            min=-1.0,
            max=1.0,
            help="Exit with code 1, naming the rows, when centered EP's cosine at the smallest of --betas "
            "is below this for any parameter or the input. One-sided EP and the larger betas are shown "
            f"for comparison (their bias grows with beta) and are not checked. Default {MIN_COSINE}: "
            "what centered EP reaches at small beta on the ideal emulator (docs/neuron.md); -1 checks "
            "nothing.",
        ),
        json_out: Path = _JSON,
    ) -> None:
        """Compare EP gradients measured on the device with implicit differentiation of the
        pure-torch reference (float64, the weights read back from the device), for the loss
        1/2 |s_out - onehot|^2 (or, with --loss ce, the classifier's cross-entropy of
        softmax(tau s_out)) on a batch of digits.

        For every beta and every parameter (each tile's weights and bias row separately, and
        the clamped input) it prints the cosine and the relative error |g_EP - g| / |g| of
        one-sided EP (free and +beta) and of centered EP (+beta and -beta). Centered EP's bias
        is O(beta^2), one-sided's O(beta); with the hard sigmoid both also err where a unit
        crosses a saturation kink between the phases, which shrinks with beta (and can make
        centered EP no better than one-sided: docs/neuron.md); a smooth --activation has no
        kinks.

        Exit code 0 when centered EP's cosine at the smallest beta reaches --min-cosine for every
        parameter and the input, 1 when one does not (a FAIL line on stderr names them), 2 on bad
        input or a board that cannot be opened."""
        import torch

        from hil.boards import open_board
        from hil.data import load_digits
        from hil.gradcheck import CHECK_BUDGET, NOISY_RESIDUAL, check_block
        from hil.gradcheck import gradcheck as run_check

        t0 = time.perf_counter()
        try:
            beta_list = tuple(float(b) for b in betas.split(","))
            layer_sizes = [int(s) for s in sizes.split(",")]
        except ValueError:
            raise fail("--betas and --sizes take comma-separated numbers (e.g. --betas 0.1,0.01)") from None
        if not all(math.isfinite(b) and b > 0 for b in beta_list):  # NaN passes a `b <= 0` test
            raise fail(f"--betas must be finite and > 0, got {betas!r}")
        if loss not in ("mse", "ce"):
            raise fail(f"--loss takes mse or ce, got {loss!r}")
        if settle not in ("auto", "board", "host"):
            raise fail(f"--settle takes auto, board or host, got {settle!r}")
        ds = load_digits()
        if layer_sizes[0] != ds.features:
            raise fail(f"--sizes: the first size must be {ds.features} (the digits' pixels), got {sizes!r}")
        if layer_sizes[-1] != ds.classes:  # the one-hot targets have one unit per class
            raise fail(f"--sizes: the last size must be {ds.classes} (the digits' classes), got {sizes!r}")
        if min(layer_sizes) < 1:
            raise fail(f"--sizes: every layer needs at least one node, got {sizes!r}")
        x = ds.x_train[:batch]
        y = torch.nn.functional.one_hot(ds.y_train[:batch], layer_sizes[-1]).float()
        check_json_dest(json_out)
        say = (lambda line: typer.echo(line, err=True)) if to_stdout(json_out) else typer.echo
        # open_board: a layer wider than the board's tiles is placed on several of them, as in hil train
        with one_line_errors(), open_board(uri) as dev:
            # the check's long budget, within the steps the board declares (it refuses more)
            largest = max(beta_list)
            if largest > dev.info.limits.max_beta:  # before anything is programmed, naming the option
                raise fail(
                    f"--betas {betas}: {largest:g} is past the max_beta {dev.info.limits.max_beta:g} the board "
                    f"at {uri} declares (the largest nudge it takes); pass --betas of at most "
                    f"{dev.info.limits.max_beta:g}"
                )
            drive, max_drive = float(f"{largest * tau:.12g}"), dev.info.limits.max_drive
            if loss == "ce" and drive > max_drive:  # the ce nudge injects up to beta x tau
                raise fail(
                    f"--betas {betas} with --loss ce --tau {tau:g}: the nudge injects a current of up to "
                    f"beta x tau = {drive:g}, past the max_drive {max_drive:g} the board at {uri} declares; "
                    f"pass --betas of at most {max_drive / tau:.4g} or --tau of at most {max_drive / largest:.4g}"
                )
            most = dev.info.limits.max_settle_steps
            budget = CHECK_BUDGET.capped(most)
            blk = check_block(
                dev, layer_sizes, dense=dense, init_scale=init_scale, seed=seed, settle=settle,
                activation=activation, budget=budget,
            )  # fmt: skip
            free = blk.free(x)
            kind = "dense" if dense else "layered"
            identity = dev.info.identity.idn()
            say(f"device   {identity}  ({uri}); settles on the {blk.settle_path}")
            say(
                f"network  {kind} {'-'.join(map(str, layer_sizes))}, {blk.topology.activation.spec}, "
                f"batch {len(x)}, loss {'mse' if loss == 'mse' else f'ce (tau {tau:g})'}; free phase "
                f"{'converged' if free.converged else 'NOT converged'} in {free.steps} steps "
                f"(residual {free.residual:.1e})"
                + (
                    f"; at most {most} steps a settle (the board's max_settle_steps)"
                    if most < CHECK_BUDGET.max_steps
                    else ""
                )
            )
            if free.residual > NOISY_RESIDUAL:
                typer.echo(
                    f"warning: the free states still move by {free.residual:.1e} from one settle step to "
                    f"the next (the check settles to {CHECK_BUDGET.tol:.0e}). On a noisy board that is its "
                    "noise, and where it exceeds what a nudge of beta moves the states, the cosines below "
                    "measure the noise, not EP: check EP itself on emulator://?preset=ideal, and on this "
                    "board compare larger --betas.",
                    err=True,
                )
            with _progress(len(beta_list) * len(MODES), enabled=show_progress(progress)) as tick:
                kind_of_loss: Literal["mse", "ce"] = "ce" if loss == "ce" else "mse"
                rows = run_check(
                    blk, x, y, betas=beta_list, modes=MODES, on_step=tick, loss=kind_of_loss, tau=tau
                )
        failed = below(rows, min_cosine)
        smallest = min(beta_list)
        say(format_table(rows))
        wall = time.perf_counter() - t0
        if json_out is not None:
            record = {
                "uri": uri,
                "identity": identity,
                "settle_path": blk.settle_path,
                "network": {
                    "kind": kind, "sizes": layer_sizes, "activation": blk.topology.activation.spec,
                    "batch": len(x), "loss": loss, "tau": tau if loss == "ce" else None,
                    "init_scale": init_scale, "seed": seed,
                },
                "free": {"converged": bool(free.converged), "steps": int(free.steps),
                         "residual": float(free.residual)},
                "min_cosine": min_cosine,
                "checked_beta": smallest,
                "ok": not failed,
                "failed": [dataclasses.asdict(r) for r in failed],
                "rows": [dataclasses.asdict(r) for r in rows],
                "wall_s": wall,
            }  # fmt: skip
            write_json(record, json_out)
            if not to_stdout(json_out):
                say(f"results  {json_out}")
        if failed:
            named = ", ".join(f"{r.param} {r.cosine:.6f}" for r in failed)
            typer.echo(
                f"FAIL: EP does not match implicit differentiation at beta {smallest:g} (the smallest of "
                f"--betas, the one checked): centered EP's cosine below --min-cosine {min_cosine:g} for "
                f"{named}. On a noisy board the nudge may be below its noise (try larger --betas); with "
                "the hard sigmoid, units on a kink bias EP (docs/neuron.md); --min-cosine -1 tabulates "
                "without checking",
                err=True,
            )
            raise typer.Exit(1)
        say(f"check    PASS: centered EP's cosines at beta {smallest:g} reach --min-cosine {min_cosine:g}")
        say(f"done in {wall:.1f} s")
