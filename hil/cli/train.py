"""`hil train ...`: training runs (`hil train classifier`; other models register beside it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from hil.config import RunConfig
    from hil.runlog import RunLog
    from hil.train_classifier import EpochStats, TrainResult

train_app = typer.Typer(
    help="Train models on a board (or the emulator) by Equilibrium Propagation.",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    """Add the `train` command group (other modules add their models to `train_app`, e.g.
    ``@train_app.command("vae")``) and its companion `hil gradcheck`."""
    from hil.cli import gradcheck, train_vae

    train_vae.register(train_app)
    app.add_typer(train_app, name="train")
    gradcheck.register(app)


@train_app.command("classifier")
def classifier(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="TOML config file (sections \\[data] \\[model] \\[ep] \\[train])."
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            "-s",
            help="Override one config key, dotted, TOML value: --set train.epochs=5 "
            "--set model.sizes=[64,128,10] --set 'device=emulator://?preset=rram&seed=0' (quoted: a shell ends a command at &). Repeatable, each key once.",
        ),
    ] = None,
    programming: Annotated[
        str | None,
        typer.Option(
            "--programming",
            help="How weight updates reach the devices: ideal (direct writes), verify (write-verify), "
            "pulsed (stochastic pulse counts) or mixed (pulses plus a digital accumulator); the same as "
            "--set ep.programming=NAME. docs/programming.md compares them.",
        ),
    ] = None,
    show_config: Annotated[
        bool, typer.Option("--show-config", help="Print the resolved config (TOML) and exit.")
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Run log folder (a Zarr store). Default: runs/classifier-DATE-TIME.zarr."
        ),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            help="Continue the run log RUN from its last snapshot (with --set device=URI: on a board "
            "at another address; the rest of the config must stay as it was).",
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing run log at --out.")
    ] = False,
    progress: Annotated[
        bool | None,
        typer.Option(
            "--progress/--no-progress",
            help="Progress bar (--no-progress: one line per epoch on stdout instead); "
            "default: a bar when stderr is a terminal, the epoch lines otherwise (a CI log, 2> FILE).",
        ),
    ] = None,
    threads: Annotated[
        int,
        typer.Option(
            min=0,
            max=1024,
            help="torch CPU threads (0: torch's default, one per core). Default 1: small networks run "
            "fastest on one thread; on a 2-core Intel Xeon with a test suite on the other core, 5 "
            "epochs of the default classifier trained in 3.8-3.9 s on 1 thread and 23-29 s on 2 "
            "(2026-12-04). Extra threads only help wide layers and large batches on idle cores.",
        ),
    ] = 1,
    distributed: Annotated[
        bool,
        typer.Option(
            "--distributed",
            help="One rank of a data parallel job launched by torchrun (torchrun --nproc-per-node N -m "
            "hil.cli train classifier --distributed --out RUN ...): each rank settles its share of every "
            "batch on its own board, the gradients are all-reduced, rank 0 writes the run log, and a "
            "job restarted by torchrun --max-restarts resumes from its last snapshot (docs/distributed.md).",
        ),
    ] = False,
    rank_device: Annotated[
        list[str] | None,
        typer.Option(
            "--rank-device",
            help="With --distributed: the board URI of each rank, once per rank in rank order (real "
            "boards). Default: the emulator's device with seed + 1000 x rank.",
        ),
    ] = None,
    rank_calibration: Annotated[
        list[str] | None,
        typer.Option(
            "--rank-calibration",
            help="With --distributed: the calibration record of each rank's board, once per rank in rank "
            "order.",
        ),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray-address",
            help="With --distributed, instead of torchrun: run the ranks on the board actors of a Ray "
            "cluster (auto, HOST:PORT, ray://HOST:10001; `local` starts Ray here with the --board boards), "
            "one rank per board in name order; a failed job restarts once from its last snapshot "
            "(docs/distributed.md). Needs the ray extra.",
        ),
    ] = None,
    board: Annotated[
        list[str] | None,
        typer.Option(
            "--board",
            help="With --ray-address: a board of the job, NAME=URI or NAME (the config's device, emulator "
            "seeds spread over the ranks). Repeatable. Default: every board:NAME resource of the cluster.",
        ),
    ] = None,
    stop_grace: Annotated[
        float | None,
        typer.Option(
            "--stop-grace",
            metavar="SECONDS",
            help="With --ray-address: how long a rank stopped mid-run (Ctrl-C, SIGTERM, a failed rank's "
            "peers) is given to put its board in its safe state before its actor is killed; 0 to 300, "
            "0: killed at once. Default: 5 (docs/sweep.md).",
        ),
    ] = None,
) -> None:
    """Train a classifier by EP on a device and report its test accuracy.

    Defaults: a layered DHN 64-256-10 on scikit-learn's digits (built in), on the ideal
    emulator (device = "emulator://?preset=ideal&seed=0"), centered EP with beta 0.2 and a
    cross-entropy nudge, SGD with a cosine schedule, 30 epochs (`--show-config` prints them
    all). model.kind = "ffebm" splits model.sizes into EB blocks of model.block_layers free
    layers (one board per block; emulator seeds seed, seed+1, ...) chained by digital parts
    (model.between) and trains them end to end by BP-EP chaining, e.g. --set model.kind=ffebm
    --set model.sizes=[64,256,128,10] --set model.between=linear --set model.init=goe --set
    model.init_scale=0.5. With model.channels (e.g. --config examples/ffebm_conv_mnist.toml) the
    EB blocks are convolutional: one kernel per crossbar tile, read at every position
    (docs/conv.md). MNIST / Fashion-MNIST (IDX files) and CIFAR-10 (python batches) are read
    from data.root, the 28 x 28 mnist5k subset from the \\[data] extra; nothing is downloaded.

    The last line gives the test accuracy, the device identity and the config."""
    from hil.cli.common import (
        boards_closed_on_error,
        claim_new_run,
        exists_message,
        fail,
        one_line_errors,
        refuse_option_and_set,
        resume_hint,
        resume_log,
        resumed_config,
        run_store,
        show_progress,
        sigterm_as_interrupt,
    )
    from hil.config import (
        ConfigError,
        RunConfig,
        apply_dict,
        apply_recorded,
        check_repeated_overrides,
        load_config,
        load_into,
        to_toml,
        validate,
    )
    from hil.runlog import RunExistsError, RunLog, RunLogError, open_run

    progress = show_progress(progress)
    state = None
    refuse_option_and_set("--programming", programming, "ep.programming", set_)
    try:
        check_repeated_overrides(set_ or [])
    except ConfigError as exc:
        raise fail(str(exc)) from None
    overrides = [*(set_ or []), *([f"ep.programming={programming}"] if programming is not None else [])]
    if resume is not None and (out is not None or overwrite):
        raise fail(
            f"--resume {resume} continues that run log where it is; --out and --overwrite are for a new run: drop them"
        )
    try:
        if resume is not None:
            resume = run_store(resume)
            stored = apply_recorded(RunConfig(), open_run(resume, validate=False).config)
            cfg = resumed_config(
                stored, load_into(apply_dict(RunConfig(), stored.to_dict()), config, overrides)
            )
            validate(cfg)
        else:
            cfg = load_config(config, overrides)
    except (ConfigError, RunLogError) as exc:
        raise fail(str(exc)) from None
    if show_config:
        typer.echo(to_toml(cfg), nl=False)
        raise typer.Exit(0)

    if threads:
        import torch

        torch.set_num_threads(threads)

    import contextlib
    import os

    dp = None
    if ray_address is not None or board or stop_grace is not None:
        if not distributed or ray_address is None or (out is None and resume is None):
            raise fail(
                "--ray-address, --board and --stop-grace go with --distributed and --out RUN (or --resume RUN)"
            )
        if rank_device or rank_calibration:
            raise fail("with --ray-address, give each rank's board as --board NAME=URI (no --rank-device)")
        from hil.distributed_ray import train_on_ray
        from hil.sweep.study import SweepError

        try:
            with one_line_errors():
                res = train_on_ray(
                    cfg, ray_address, board or [], resume or out, resume is not None, overwrite, stop_grace
                )
        except (SweepError, ConfigError, RunLogError) as exc:
            raise fail(str(exc)) from None
        typer.echo(f"run log {res.run_log}")
        typer.echo(
            f"test accuracy {res.test_acc:.2%} | boards {', '.join(res.boards)} | restarts {res.restarts}"
        )
        return
    if distributed:
        from hil.distributed import DataParallel, rank_config

        if out is None and resume is None:
            raise fail("--distributed needs --out RUN: a restarted job resumes from the run log there")
        try:
            dp = DataParallel.from_env(cfg.compute)
            cfg = rank_config(cfg, dp, rank_device or (), rank_calibration or ())
        except ConfigError as exc:
            raise fail(str(exc)) from None
        # torchrun restarted the job (--max-restarts): continue from the run log it left
        if resume is None and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
            assert out is not None
            if (run_store(out) / "zarr.json").exists():
                resume = run_store(out)
    elif rank_device or rank_calibration:
        raise fail("--rank-device and --rank-calibration are for --distributed runs")

    from hil.train_classifier import prepare_classifier, train_classifier

    command = (
        "torchrun [its options] -m hil.cli train classifier --distributed"
        if dp is not None
        else "hil train classifier"
    )
    # the data, the model and its boards before the run log: a config, data or board error
    # (model.sizes that do not fit the data, a board that does not answer) leaves no run behind,
    # and a resume on a board that does not answer leaves the run log as it was
    try:
        with resume_hint(command, resume), one_line_errors(prefix="" if dp is None else f"rank {dp.rank}: "):
            prepared = prepare_classifier(cfg, dp=dp)
    except BaseException:
        if dp is not None:
            dp.close(wait=False)
        raise

    warned = []
    warned_gave_up = []

    def on_epoch(st: EpochStats) -> None:
        if dp is not None and dp.rank != 0:
            return
        if not progress:
            typer.echo(
                f"epoch {st.epoch:>3}  loss {st.train_loss:.4f}  train {st.train_acc:.2%}  "
                f"{'' if st.val_acc is None else f'val {st.val_acc:.2%}  '}test {st.test_acc:.2%}  "
                f"{st.seconds:.2f} s"
                + (f"  unconverged {share_text(st.unconverged)}" if st.unconverged and cfg.ep.tol > 0 else "")
                + ("" if st.gave_up_share is None else f"  gave up {st.gave_up_share:.2%}")
            )
        note = unconverged_warning(st.unconverged, cfg.ep.tol, cfg.ep.free_steps, cfg.ep.nudge_steps)
        if note and not warned:
            warned.append(st.epoch)
            typer.echo(f"warning (epoch {st.epoch}): {note}", err=True)
        note = gave_up_warning(st.gave_up, st.verified)
        if note and not warned_gave_up:
            warned_gave_up.append(st.epoch)
            typer.echo(f"warning (epoch {st.epoch}): {note}", err=True)

    with boards_closed_on_error(prepared.model.devices, None if dp is None else lambda: dp.close(wait=False)):
        try:
            if dp is not None and dp.rank != 0:
                log = None  # rank 0 writes the run log
            elif resume is not None:
                log, state = resume_log(resume, cfg.device)
            else:
                run = out or claim_new_run("classifier")
                log = RunLog.create(
                    run, cfg, kind="train-classifier", name=cfg.name, overwrite=overwrite or out is None
                )
        except RunExistsError:
            raise fail(exists_message(run, run)) from None
        except (RunLogError, OSError) as exc:  # a damaged store, or one on a full or read-only disk
            raise fail(str(exc)) from None
    try:
        # every rank names the run to resume (rank 0 writes it; the others were given its --out)
        run_path = log.path if log is not None else (resume or out)
        with (
            sigterm_as_interrupt(),
            resume_hint(command, run_path),
            one_line_errors(prefix="" if dp is None else f"rank {dp.rank}: "),
            log if log is not None else contextlib.nullcontext(),
        ):
            try:
                res = train_classifier(
                    cfg, progress=progress and (dp is None or dp.rank == 0), on_epoch=on_epoch, log=log,
                    state=state, dp=dp, prepared=prepared,
                )  # fmt: skip
            except RuntimeError as exc:  # a collective whose peer stopped: said so, and logged so
                from hil.distributed import peer_failure

                peer = None if dp is None else peer_failure(exc)
                if peer is None:
                    raise
                raise peer from exc
    except BaseException:
        if dp is not None:
            dp.close(wait=False)
        raise
    if dp is not None:
        dp.close()
    try:
        if log is not None:
            _print_result(res, log, cfg)
    finally:
        res.model.close()  # each board to its safe state, its link released
    if dp is not None:
        dp.exit_worker()


def _print_result(res: TrainResult, log: RunLog, cfg: RunConfig) -> None:
    """Rank 0's (or a single board's) summary of a finished run."""
    from hil.config import model_activation
    from hil.ep import settle_paths

    last = res.history[-1]
    ran = res.history[res.resumed_epochs :]  # this session's epochs (a resume continues a run)
    what = (
        f"{len(ran)} epochs"
        if not res.resumed_epochs
        else f"epochs {res.resumed_epochs + 1}-{len(res.history)}"
    )
    typer.echo(
        f"trained {what} in {sum(h.seconds for h in ran):.1f} s; "
        f"final train loss {last.train_loss:.4f}, train accuracy {last.train_acc:.2%}"
    )
    compact = json.dumps(cfg.to_dict(), separators=(",", ":"))
    devices = " ; ".join(res.devices)
    typer.echo(
        f"crossbar cells {res.cells} ({res.describe_tiles()}); {model_activation(cfg.model)} neuron; "
        f"settles on the {settle_paths(res.model.blocks())}"
    )
    typer.echo(f"run log {log.path}")
    line = gave_up_line(ran)
    if line:
        typer.echo(line)
    if res.val_acc is not None:
        typer.echo(f"validation accuracy {res.val_acc:.2%} ({cfg.data.validation} held-out training images)")
    uris = " ; ".join(cfg.devices) if cfg.devices else cfg.device  # `device` is unused when `devices` is set
    typer.echo(f"test accuracy {res.test_acc:.2%} | device {devices} ({uris}) | config {compact}")


def share_text(share: float) -> str:
    """A share of settles as the epoch line prints it: whole percent from 1 % up, one decimal
    below (`0.4%`, `<0.1%` under 0.05 %), so a nonzero share never reads `0%` (a line that
    said `unconverged 0%` left the reader to guess why it was printed at all)."""
    if share <= 0 or share >= 0.01:
        return f"{share:.0%}"
    text = f"{share:.1%}"
    return "<0.1%" if text == "0.0%" else text


UNCONVERGED_WARN = 0.05  # share of an epoch's settles that stopped at their budget above tol


def unconverged_warning(share: float, tol: float, free_steps: int, nudge_steps: int) -> str | None:
    """The warning `hil train classifier` prints once, at the first epoch in which more than
    `UNCONVERGED_WARN` of the settles hit their step budget with the states still moving by
    more than `tol` (None otherwise; with ``tol = 0`` the step counts are fixed by choice and
    no settle claims convergence)."""
    if tol <= 0 or share <= UNCONVERGED_WARN:
        return None
    return (
        f"{share:.0%} of this epoch's settles stopped at their step budget (ep.free_steps {free_steps}, "
        f"ep.nudge_steps {nudge_steps}) with states still moving by more than ep.tol {tol:g}: EP then "
        "differences states that have not settled, which biases its gradient. Raise ep.free_steps / "
        "ep.nudge_steps (or ep.tol), or set ep.tol=0 to run fixed step counts knowingly."
    )


# Share of the devices write-verify worked on that it gave up on (they did not move), above
# which `hil train classifier` warns. Healthy emulated chips stay well below it: with
# ep.programming=verify, pcm 0.30-0.40 % and rram 0.15-0.18 % per epoch (docs/programming.md).
GAVE_UP_WARN = 0.02


def gave_up_warning(gave_up: int | None, verified: int) -> str | None:
    """The warning `hil train classifier` prints once, at the first epoch in which write-verify
    (or a tuning refresh) gave up on more than `GAVE_UP_WARN` of the devices it worked on
    (None otherwise, and when the board did not report the count)."""
    if gave_up is None or not verified or gave_up <= GAVE_UP_WARN * verified:
        return None
    return (
        f"write-verify gave up on {gave_up} of the {verified} devices it programmed this epoch "
        f"({gave_up / verified:.1%}, more than {GAVE_UP_WARN:.0%}): they did not move when pulsed, "
        "so they are stuck or worn, and the weights they hold are not the ones trained. A share that "
        "grows over a run is a chip wearing out: check it (hil conformance, hil calibrate) or move "
        "the network to a fresh tile or board."
    )


def gave_up_line(epochs: list[EpochStats]) -> str | None:
    """The summary line on write-verify's give-ups over `epochs` (None when nothing was
    write-verified)."""
    verified = sum(h.verified for h in epochs)
    if not verified:
        return None
    if any(h.gave_up is None for h in epochs):
        return f"write-verify programmed {verified} devices; the board did not report how many it gave up on"
    gave_up = sum(int(h.gave_up or 0) for h in epochs)
    return f"write-verify gave up on {gave_up} of {verified} devices programmed ({gave_up / verified:.2%})"
