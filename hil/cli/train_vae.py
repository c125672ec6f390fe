"""`hil train vae`: train a member of the Hopfield VAE family and write its run log and pictures."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(train_app: typer.Typer) -> None:
    train_app.command("vae")(vae)


def vae(
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="f-vae (feedforward, backprop), h-vae (separate layered Hopfield nets), dh-vae "
            "(separate dense), tdh-vae (one dense net as encoder and decoder: half the crossbar), "
            "shared-layered (one layered net both ways). Default: the config's (tdh-vae).",
        ),
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML config file.")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            "-s",
            help="Override a config key, dotted, TOML value: --set train.epochs=10 "
            "--set 'device=emulator://?preset=rram&seed=0' (quoted: a shell ends a command at &). Repeatable, each key once.",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Run folder (run.zarr, samples.png, reconstructions.png). Default: runs/VARIANT (the model.variant).",
        ),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume", help="Continue the run in this folder (or its run.zarr) from its last snapshot."
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run folder.")] = False,
    show_config: Annotated[
        bool, typer.Option("--show-config", help="Print the resolved config and exit.")
    ] = False,
    progress: Annotated[
        bool | None,
        typer.Option(
            "--progress/--no-progress",
            help="Progress bar (--no-progress: one line per epoch on stdout instead); default: a bar "
            "when stderr is a terminal, the epoch lines otherwise (a CI log, 2> FILE).",
        ),
    ] = None,
    threads: Annotated[
        int,
        typer.Option(
            min=0,
            max=1024,
            help="torch CPU threads (0: torch's default, one per core). Default 1, as measured in `hil train classifier --help`.",
        ),
    ] = 1,
) -> None:
    """Train a VAE on the digits by EP (or backprop for f-vae) on a board or the emulator.

    Defaults: TDH-VAE (hidden 64, latent 4) on the ideal emulator, Gaussian likelihood with sigma 0.3, centered EP with beta 0.2, Adam with a cosine schedule, 40 epochs (--show-config prints them all).

    Prints the crossbar cells used, then the test negative ELBO (nats per image), reconstruction error, Frechet distance of samples (before and after training), settle energy per image and convergence.

    The run log (RUN/run.zarr) records config, device, metrics, settle traces, tile snapshots and resume snapshots (at an epoch's end, at most every log.snapshot_every_s seconds, default 10, and at the last epoch): see it with `hil inspect RUN` and `hil plot RUN`; continue a killed run with --resume RUN (add --set device=URI if the board moved: the rest of the config must stay as it was)."""
    import time

    import torch

    from hil.cli.common import (
        RUN_STORE,
        boards_closed_on_error,
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
        apply_dict,
        apply_recorded,
        check_repeated_overrides,
        load_into,
        to_toml,
    )
    from hil.runlog import RunExistsError, RunLog, RunLogError, open_run
    from hil.vae.config import VAERunConfig, vae_boards, validate_vae
    from hil.vae.hopfield import dense_topology
    from hil.vae.train import prepare_vae, train_vae

    if threads:
        torch.set_num_threads(threads)
    progress = show_progress(progress)
    state = None
    if resume is not None and (out is not None or overwrite):
        raise fail(
            f"--resume {resume} continues that run log where it is; --out and --overwrite are for a new run: drop them"
        )
    refuse_option_and_set("--model", model, "model.variant", set_)
    try:
        check_repeated_overrides(set_ or [])
        if resume is not None:
            store = run_store(resume)
            run_dir = store.parent if store.name == RUN_STORE else store
            stored = apply_recorded(VAERunConfig(), open_run(store, validate=False).config)
            asked = load_into(apply_dict(VAERunConfig(), stored.to_dict()), config, set_ or [])
            if model is not None:
                asked = apply_dict(asked, {"model": {"variant": model}})
            cfg = resumed_config(stored, asked)
        else:
            cfg = load_into(VAERunConfig(), config, set_ or [])
            if model is not None:
                cfg = apply_dict(cfg, {"model": {"variant": model}})
            if out is not None:  # the config records where the run went: --out's folder is under its parent
                cfg = apply_dict(cfg, {"out": str(out.parent)})
    except (ConfigError, RunLogError) as exc:
        raise fail(str(exc)) from None
    try:
        validate_vae(cfg)
    except ConfigError as exc:
        raise fail(f"config: {exc}") from None
    if show_config:
        typer.echo(to_toml(cfg), nl=False)
        raise typer.Exit(0)
    m = cfg.model
    if resume is None:
        run_dir = out or Path(cfg.out) / m.variant
    # the data, the model and its boards before the run folder: a data or board error (a board
    # that does not answer) leaves no run behind, and a resume on a board that does not answer
    # leaves the run log as it was
    with resume_hint("hil train vae", run_dir if resume is not None else None), one_line_errors():
        prepared = prepare_vae(cfg)
    with boards_closed_on_error(prepared.model.devices):
        try:
            if resume is not None:
                log, state = resume_log(store, cfg.device)
            else:
                log = RunLog.create(
                    run_dir / RUN_STORE, cfg, kind="train-vae", name=m.variant, overwrite=overwrite
                )
        except RunExistsError:
            raise fail(exists_message(run_dir, run_dir)) from None
        except (RunLogError, OSError) as exc:  # a damaged store, or one on a full or read-only disk
            raise fail(str(exc)) from None
    if m.variant in ("tdh-vae", "dh-vae"):
        one = dense_topology(64, m.hidden, m.latent * m.copies).cells()
        typer.echo(
            f"crossbar cells: TDH-VAE {one}, DH-VAE {2 * one} (same layer sizes): the shared net uses half"
        )
    t0 = time.perf_counter()

    def on_epoch(epoch: int, row: dict[str, float]) -> None:
        nonlocal t0
        test = f"  test -ELBO {row['test_neg_elbo']:.3f}" if "test_neg_elbo" in row else ""
        typer.echo(
            f"epoch {epoch + 1:>3}/{cfg.train.epochs}  loss {row['loss']:.3f}  nll {row['nll']:.3f}  "
            f"kl {row['kl']:.3f}{test}  {time.perf_counter() - t0:.1f} s"
        )
        t0 = time.perf_counter()

    with sigterm_as_interrupt(), resume_hint("hil train vae", run_dir), one_line_errors(), log:
        result = train_vae(
            cfg,
            progress=progress,
            out_dir=run_dir,
            log=log,
            state=state,
            on_epoch=None if progress else on_epoch,
            prepared=prepared,
        )
    f, i = result.final, result.initial
    neuron = f", {result.neuron} neuron" if result.neuron else ""
    typer.echo(f"model        {result.variant}, {result.cells} crossbar cells{neuron}")
    settles = f"; settles on the {result.settles}" if result.settles else ""
    boards = vae_boards(cfg)  # none for f-vae: no board, no settles
    if not boards:
        typer.echo("device       none (f-vae is digital: backprop on the host)")
    else:
        typer.echo(f"device       {result.identity}  ({', '.join(boards)}){settles}")
    typer.echo(f"test -ELBO   {f.neg_elbo:.3f} nats/image (untrained {i.neg_elbo:.3f})")
    typer.echo(f"recon MSE    {f.recon_mse:.4f} per pixel")
    typer.echo(f"Frechet      {f.frechet:.2f} (untrained {i.frechet:.2f})")
    if boards:
        typer.echo(
            f"settle       {f.energy_per_image_j:.3e} J per image (encode + decode), {f.converged:.1%} converged"
        )
    typer.echo(f"run log      {run_dir / RUN_STORE}   pictures: {', '.join(str(p) for p in result.pictures)}")
    typer.echo(f"wall time    {result.wall_s:.1f} s")
