"""`hil sweep SWEEP.toml`: Bayesian optimisation (Optuna) over a `hil train` config."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from hil.cli.common import check_boards, fail

if TYPE_CHECKING:
    from hil.sweep import SweepSpec
    from hil.sweep.trial import TrialEvent


def register(app: typer.Typer) -> None:
    app.command("sweep")(sweep)


def sweep(
    spec_file: Annotated[Path, typer.Argument(metavar="SWEEP.toml", help="The sweep spec (docs/sweep.md).")],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Sweep folder (study, trials' run logs, summary). Default: runs/sweeps/NAME (the spec's name). An existing folder of the same sweep is continued.",
        ),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray-address",
            help="Run the trials on a Ray cluster's boards: auto, HOST:PORT or ray://HOST:10001; `local` starts Ray on this machine with the --board boards. Needs the ray extra: pip install 'xbar-hil\\[ray]'.",
        ),
    ] = None,
    board: Annotated[
        list[str] | None,
        typer.Option(
            "--board",
            "-b",
            help="A board to run trials on: NAME=URI, NAME (the base config's device on the host declaring board:NAME) or URI. Repeatable with --ray-address; without it, one URI replaces the base config's device. Default: every board:NAME resource of the cluster.",
        ),
    ] = None,
    n_trials: Annotated[
        int | None,
        typer.Option(
            "--n-trials",
            "-n",
            min=1,
            max=100_000,
            help="Override sweep.n_trials (e.g. to extend a finished sweep).",
        ),
    ] = None,
    max_board_losses: Annotated[
        int,
        typer.Option(
            "--max-board-losses",
            min=1,
            max=1024,
            help="With --ray-address: a trial that has lost this many boards (its actor died or its board stopped answering) is reported failed instead of being moved to another board.",
        ),
    ] = 2,
    stop_grace: Annotated[
        float | None,
        typer.Option(
            "--stop-grace",
            metavar="SECONDS",
            help="With --ray-address: how long a board actor stopped mid-trial (Ctrl-C, SIGTERM, an error, the sweep's end) is given to put its board in its safe state before it is killed; 0 to 300, 0: killed at once, its board left as it was. Default: 5 (docs/sweep.md).",
        ),
    ] = None,
) -> None:
    """Tune any `hil train` config by Bayesian optimisation (Optuna's TPE), in this process or across the boards of a Ray cluster.

    SWEEP.toml names the trainer (classifier or vae), the objective (a metric of its result), the budget, the base config and the search space (a \\[space."train.lr"] table with type, low, high, log). Each trial is a normal run log under OUT/trials/NNNN/run.zarr; the study lives in OUT/optuna.db, the table of trials in OUT/summary.json and OUT/trials.csv.

    Prints one line per trial, then the best trial and its run log. A bad spec exits with code 2 and a message that starts with the offending key."""
    from drivers import DeviceError
    from hil.config import ConfigError
    from hil.sweep import SpecError, SweepError, load_spec, run_sweep
    from hil.sweep.spec import check_within_boards
    from hil.sweep.study import FolderInUse, claim_folder, trials_done

    try:
        spec = load_spec(spec_file, n_trials)
        _check_uris(spec.base["device"], board or [])
        executor = _executor(ray_address, board or [], spec.base["device"], max_board_losses, stop_grace)
        # in this process, the trials' boards before the first trial and the sweep folder: a board
        # that does not answer is one line and exit 2, where every trial failed on it (exit 1)
        local = None if ray_address else spec.trainer_def.boards(spec.config_for({}, executor.uri))
    except (SpecError, SweepError, DeviceError, ConfigError) as exc:
        raise fail(str(exc)) from None
    if local is not None:
        try:
            limits = check_boards(local)
        except typer.Exit:
            executor.close()
            raise
        try:  # the base and the space's ends against what those boards declare
            check_within_boards(spec, limits, executor.uri)
        except SpecError as exc:
            executor.close()
            raise fail(str(exc)) from None
    else:  # on Ray: what each actor's board declared as it opened on its host
        try:
            check_within_boards(spec, getattr(executor, "limits", {}))
        except SpecError as exc:
            executor.close()
            raise fail(str(exc)) from None
    try:
        folder = claim_folder(spec, out or Path("runs") / "sweeps" / spec.name)
    except SweepError as exc:
        executor.close()
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    done = trials_done(folder)
    so_far = f" (continued: {done} done)" if done else ""
    typer.echo(
        f"sweep {spec.name}: {_trials(spec.n_trials)}{so_far} of the {spec.trainer} trainer, {spec.direction} "
        f"{spec.objective}, {spec.batch} per round, {executor.describe()}; folder {folder}"
    )
    if done >= spec.n_trials:
        typer.echo(
            f"nothing to run: {_trials(done)} {'is' if done == 1 else 'are'} done; --n-trials N (above {done}) extends the sweep"
        )
    try:
        result = run_sweep(spec, folder, executor, on_event=lambda e: _progress(spec, e))
    except FolderInUse as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except SweepError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo(
            f"interrupted: {folder} keeps every finished trial; `hil sweep {spec_file} --out {folder}` "
            "continues the sweep (a trial cut short runs again, and does not count towards n_trials)",
            err=True,
        )
        raise
    finally:
        executor.close()
    failed = sum(t.state != "COMPLETE" for t in result.trials)
    typer.echo(f"summary {result.out / 'summary.json'} ({_trials(len(result.trials))}, {failed} failed)")
    best = result.best
    if best is None:
        typer.echo("error: no trial completed; see the errors in the summary", err=True)
        raise typer.Exit(1)
    typer.echo(f"best trial {best.number}: {spec.objective} {best.value:.6g}  {_params(best.params)}")
    typer.echo(f"best run log {result.best_run_log}")


def _check_uris(device: str, boards: list[str]) -> None:
    """Refuse a malformed device URI (base config or --board) before any trial runs: parsed and
    validated, not opened (a board may only be reachable from the cluster's hosts)."""
    from drivers.uri import parse_options
    from hil.sweep.ray_runner import Board

    for uri in [device, *(b.uri for b in map(Board.parse, boards) if b.uri)]:
        parse_options(uri)


def _executor(
    ray_address: str | None,
    boards: list[str],
    device: str,
    max_board_losses: int = 2,
    stop_grace_s: float | None = None,
) -> Any:
    from hil.sweep import SweepError
    from hil.sweep.local import LocalExecutor
    from hil.sweep.ray_runner import Board, RayExecutor

    parsed = [Board.parse(b) for b in boards]
    if ray_address:
        return RayExecutor(
            parsed,
            ray_address,
            default_uri=device,
            max_board_losses=max_board_losses,
            stop_grace_s=stop_grace_s,
        )
    if len(parsed) > 1:
        raise SweepError(
            "several --board need --ray-address (`--ray-address local` for this machine's boards)"
        )
    if parsed and parsed[0].uri is None:
        raise SweepError(f"--board {parsed[0].name}: give a device URI to run in this process")
    if parsed:
        return LocalExecutor(parsed[0].uri, parsed[0].name or "local")
    return LocalExecutor()


def _trials(n: int) -> str:
    """`n` trials, counted in words: "1 trial", "0 trials", "2 trials"."""
    return f"{n} trial" if n == 1 else f"{n} trials"


def _params(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _progress(spec: SweepSpec, e: TrialEvent) -> None:
    if e.kind == "retry":
        typer.echo(f"trial {e.number:>4}  board {e.board}  lost ({e.message}); retrying on another board")
    elif e.kind == "done" and e.outcome is not None:
        o = e.outcome
        head = f"trial {e.number:>4}  board {e.board}  {o.seconds:6.1f} s  "
        value = (o.metrics or {}).get(spec.objective)
        if value is None:
            typer.echo(f"{head}FAILED {o.error}  {_params(o.params)}")
        else:
            typer.echo(f"{head}{spec.objective} {value:.4g}  {_params(o.params)}")
