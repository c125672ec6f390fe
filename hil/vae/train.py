"""Training and evaluation of the VAE family (`hil train vae`)."""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from drivers import Device, Equilibrium, OpenTransactionWarning, SettleBudget, seeds
from drivers.base import board_of, programming_transaction, repair_lost_arrays, report_open_transactions
from drivers.errors import LimitViolation
from drivers.watch import SafetyWatch
from hil.boards import close_boards, lost_board, open_board, open_distinct, record_end_state
from hil.compute import board_uri, resolve_compute
from hil.data import Dataset, load_dataset
from hil.ep import settle_paths
from hil.runlog import DataOrder, RunLog, restore_training, training_state
from hil.vae.config import TWO_BOARDS, VAERunConfig, vae_board_bounds, vae_boards
from hil.vae.fvae import FVAE
from hil.vae.hopfield import HopfieldVAE
from hil.vae.images import save_grid, save_reconstructions
from hil.vae.latent import LatentCode, Likelihood, kl_normal, make_likelihood, reparameterize
from hil.vae.metrics import DigitsFeatures, frechet_distance


@dataclass
class Evaluation:
    neg_elbo: float  # nats per image, test set, averaged over eps draws
    recon_mse: float  # mean squared error per pixel, z = mu
    frechet: float  # Frechet distance of generated samples to the test images (digits features)
    energy_per_image_j: float  # settle energy of one encode + decode (0 for F-VAE)
    converged: float  # fraction of evaluation settles that converged (1 for F-VAE)


@dataclass
class VAEResult:
    config: VAERunConfig
    variant: str
    cells: int
    initial: Evaluation
    final: Evaluation
    history: list[dict[str, float]] = field(default_factory=list)
    wall_s: float = 0.0
    identity: str = ""
    pictures: list[Path] = field(default_factory=list)
    neuron: str = ""  # the Hopfield variants' node curve ("auto" resolved); "" for F-VAE
    settles: str = ""  # where the Hopfield variants settle, `ep.settle` resolved; "" for F-VAE


EVAL_CHUNK = 512  # samples per settle when evaluating a whole test set (as EBBlock's predict)


def _for_the_vae(err: LimitViolation, cfg: VAERunConfig, uris: list[str], devices: list[Device]) -> None:
    """Word a board's refusal of the VAE's network (too many physical tiles for its tiles,
    `drivers.placement`) for `hil train vae`: the board and the VAE's own keys, where the
    placement's hint names the classifier's (``model.kind = 'ffebm'``, ``model.block_layers``)."""
    if not err.limit.startswith("physical tiles"):
        return
    m = cfg.model
    # the board that refused: the first whose network was never placed (encoder, then decoder)
    refused = [u for u, d in zip(uris, devices, strict=False) if getattr(d, "placement", None) is None]
    board = (refused or uris)[0]
    two = (
        ""
        if m.variant in TWO_BOARDS
        else f"; {' and '.join(TWO_BOARDS)} put the encoder and the decoder on two boards (`devices`)"
    )
    text = str(err).split("; use a smaller network", 1)[0]
    err.args = (
        f"{m.variant} on {board}: {text}; use a smaller model.hidden (now {m.hidden}) or "
        f"model.copies (now {m.copies}), or a board with more or larger tiles{two} (docs/placement.md)",
    )


class _Model:
    """One face for F-VAE (autograd) and the Hopfield VAEs (EP on a Device)."""

    def __init__(self, cfg: VAERunConfig, pixels: int) -> None:
        m = cfg.model
        self.cfg = cfg
        self.code = LatentCode(m.latent, m.mu_scale, m.lv_min, m.lv_max, m.copies)
        self.fvae: FVAE | None = None
        self.hvae: HopfieldVAE | None = None
        self.devices: list[Device] = []
        self.uris: list[str] = []  # the URI of each of `devices`
        self.calibration_id: str | None = None
        self.last_free: dict[str, Equilibrium] = {}
        if m.variant == "f-vae":
            self.fvae = FVAE(pixels, m.hidden, m.latent, seed=cfg.train.seed)
            self.params = list(self.fvae.parameters())
            self.identity = "digital (no device)"
            self.module: torch.nn.Module = self.fvae
            return
        compute = resolve_compute(cfg.compute)
        self.uris = vae_boards(cfg)
        what = "networks (the encoder's and the decoder's)"
        # one at a time: a board that fails to open closes those before it
        for k, uri in enumerate(self.uris):
            try:
                # an in-process board on `compute`
                board = open_distinct(
                    functools.partial(open_board, board_uri(uri, compute), cfg.calibration),
                    uri,
                    k,
                    self.devices,
                    self.uris,
                    what,
                    within=vae_board_bounds(cfg),
                )
                self.devices.append(board)
            except BaseException as err:
                close_boards(self.devices, during=err)
                raise
        self.calibration_id = (
            f"{cfg.calibration} ({self.devices[0].record.created})" if cfg.calibration else None  # type: ignore[attr-defined]
        )
        try:
            self.hvae = self._hopfield(cfg, pixels, compute)
        except BaseException as err:  # a network its board refuses: every board opened, safe and closed
            close_boards(self.devices, during=err)
            if isinstance(err, LimitViolation):
                _for_the_vae(err, cfg, self.uris, self.devices)
            raise
        self.params = self.hvae.parameters()
        self.identity = self.devices[0].info.identity.idn()
        self.module = torch.nn.ModuleDict(self.hvae.blocks())

    def _hopfield(self, cfg: VAERunConfig, pixels: int, compute: torch.device) -> HopfieldVAE:
        """The Hopfield VAE's blocks, each configured and programmed on its board."""
        m = cfg.model
        budget = SettleBudget(max_steps=cfg.ep.steps, tol=cfg.ep.tol, dt=cfg.ep.dt)
        return HopfieldVAE(
            m.variant,  # type: ignore[arg-type]
            tuple(self.devices),
            pixels=pixels,
            hidden=m.hidden,
            code=self.code,
            budget=budget,
            gain=m.gain,
            activation=m.activation,
            w_max=m.w_max,
            init_scale=m.init_scale,
            init_bias=m.init_bias,
            init=m.init,
            seed=cfg.train.seed,
            programming=cfg.ep.programming,
            joint_phases=cfg.ep.joint_phases,
            settle=cfg.ep.settle,
            compute=compute,  # the blocks' weights, gradients and settles' tensors there too
        )

    def cells(self) -> int:
        return 0 if self.hvae is None else self.hvae.cells()

    def reprogram(self, board: Device) -> None:
        """Program every tile of the blocks on `board` (one of `devices`) again from the host's
        weights: the board lost its arrays (`drivers.base.repair_lost_arrays`)."""
        if self.hvae is None:
            return
        for blk in self.hvae.blocks().values():
            if board_of(blk.device) is board_of(board):
                blk.sync(force=True)

    def settles(self) -> str:
        """Where the Hopfield VAE's blocks settle (``board``, ``host``); "" for F-VAE."""
        return "" if self.hvae is None else settle_paths(self.hvae.blocks().values())

    def close(self) -> None:
        """Every board to its safe state and closed; one that fails does not keep the others open."""
        close_boards(self.devices)

    def _chunks(self, x: Tensor) -> list[Tensor]:
        """`x` in pieces a settle takes (evaluation passes a whole test set: 10000 MNIST
        images exceed a board's `max_batch`); one piece when it fits, so results stay as they were."""
        size = min([EVAL_CHUNK, *(d.info.limits.max_batch for d in self.devices)])
        return list(torch.split(x, size)) if len(x) > size else [x]

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor, float, bool]:
        """(mu, logvar, settle joules, converged)."""
        if self.fvae is not None:
            with torch.no_grad():
                mu, lv = self.fvae.encode(x)
            return mu, lv, 0.0, True
        assert self.hvae is not None
        parts = [self.hvae.encode(xb) for xb in self._chunks(x)]
        # on the CPU, where the evaluation's metrics are computed (no copy when computed there)
        mu, lv = torch.cat([p[0] for p in parts]).cpu(), torch.cat([p[1] for p in parts]).cpu()
        return mu, lv, sum(p[2].energy_j for p in parts), all(p[2].converged for p in parts)

    def decode(self, z: Tensor) -> tuple[Tensor, float, bool]:
        if self.fvae is not None:
            with torch.no_grad():
                return self.fvae.decode(z), 0.0, True
        assert self.hvae is not None
        parts = [self.hvae.decode(zb) for zb in self._chunks(z)]
        x_hat = torch.cat([p[0] for p in parts]).cpu()
        return x_hat, sum(p[1].energy_j for p in parts), all(p[1].converged for p in parts)

    def log_tiles(self, log: RunLog, step: int) -> None:
        """Snapshot every tile's host weights and conductances, and its last programming report."""
        if self.hvae is None:
            return
        for name, block in self.hvae.blocks().items():
            for tile, p in block.weights.items():
                gp, gm = block.device.read_conductance(tile)
                label = tile if self.hvae.shared else f"{name}.{tile}"
                log.tile(step, label, weights=p.detach(), g_plus=gp, g_minus=gm)
            for report in block.last_reports.values():
                log.program(step, report)

    def train_step(
        self, x: Tensor, eps: Tensor, lik: Likelihood, opt: torch.optim.Optimizer, trace: int = 0
    ) -> dict[str, float]:
        opt.zero_grad()
        if self.fvae is not None:
            mu, lv = self.fvae.encode(x)
            nll = lik.nll(x, self.fvae.decode(reparameterize(mu, lv, eps)))
            kl = kl_normal(mu, lv)
            loss = (nll + kl).mean()
            loss.backward()
            opt.step()
            return {"loss": loss.item(), "nll": nll.mean().item(), "kl": kl.mean().item()}
        assert self.hvae is not None
        r = self.hvae.step(x, eps, lik, beta=self.cfg.ep.beta, mode=self.cfg.ep.mode, trace=trace)  # type: ignore[arg-type]
        self.last_free = {"encoder free": r.encoder_free, "decoder free": r.decoder_free, **r.nudged}
        self.hvae.apply(r.grads)
        opt.step()
        return {
            "loss": r.loss,
            "nll": r.nll,
            "kl": r.kl,
            "settle_steps": float(r.settle_steps),
            "encoder_steps": float(r.encoder_steps),
            "decoder_steps": float(r.decoder_steps),
            "settle_energy_j": r.settle_energy_j,
            "converged": float(r.converged),
        }


def evaluate(
    model: _Model,
    data: Dataset,
    lik: Likelihood,
    features: DigitsFeatures,
    draws: int,
    samples: int,
    seed: int,
) -> Evaluation:
    gen = seeds.torch_generator(seed, "vae.eval")
    x = data.x_test.reshape(len(data.x_test), -1)
    d = model.code.dim
    mu, lv, e_enc, c_enc = model.encode(x)
    total = torch.zeros(len(x), dtype=torch.float64)
    energy = e_enc
    conv = [c_enc]
    for _ in range(draws):
        z = reparameterize(mu, lv, torch.randn(len(x), d, generator=gen))
        x_hat, _, c = model.decode(z)
        total += (lik.nll(x, x_hat) + kl_normal(mu, lv)).double()
        conv.append(c)
    recon, e_dec, c = model.decode(mu)
    energy += e_dec
    conv.append(c)
    gen_x, _, c = model.decode(torch.randn(samples, d, generator=gen))
    conv.append(c)
    fd = frechet_distance(features.features(gen_x).numpy(), features.features(x).numpy())
    return Evaluation(
        neg_elbo=float(total.mean() / draws),
        recon_mse=float(((recon - x) ** 2).mean()),
        frechet=fd,
        energy_per_image_j=energy / len(x),
        converged=float(np.mean(conv)),
    )


@dataclass
class VAEPrepared:
    """A VAE run made ready (`prepare_vae`): its data set and its model, on its boards (open),
    and when the preparation started (the run's wall time counts from there)."""

    data: Dataset
    model: _Model
    started: float


def prepare_vae(cfg: VAERunConfig) -> VAEPrepared:
    """Everything of a run that can fail on its data or its boards, done before anything is
    written: load the data set and build the model on its boards (opening them). `hil train vae`
    calls it before it creates the run folder, so that such an error leaves no run behind. On
    failure the boards opened are closed (in their safe state)."""
    t0 = time.perf_counter()
    d = cfg.data
    data = load_dataset(
        d.name, d.root or None, limit_train=d.limit_train or None, limit_test=d.limit_test or None
    )
    with warnings.catch_warnings():
        # a board left mid-transaction is reported once, by `train_vae`, not also by its link as it opens
        warnings.simplefilter("ignore", OpenTransactionWarning)
        model = _Model(cfg, int(np.prod(data.image_shape)))
    return VAEPrepared(data, model, t0)


def train_vae(
    cfg: VAERunConfig,
    *,
    progress: bool | None = None,
    out_dir: Path | None = None,
    log: RunLog | None = None,
    state: dict | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    prepared: VAEPrepared | None = None,
) -> VAEResult:
    """Train the configured variant. With `log`, record config, device, metrics, free-settle
    traces, tile snapshots, programming reports and resume snapshots (`RunLog.snapshot_due`: at an
    epoch's end, at most every `log.snapshot_every_s`, and at the last); with `state`
    (from `open_for_resume`), continue from that snapshot. PNGs of samples and
    reconstructions go to `out_dir`. `progress`: a tqdm bar on stderr (None: when stderr is a
    terminal). `prepared`: the run made ready by `prepare_vae` (with the same config), else it
    is prepared here. A board found with its arrays lost mid-run (STATUS `arrays_id` changed) gets
    every tile of its blocks programmed again from the host's weights, and the operation it
    was running resent (`drivers.base.repair_lost_arrays`)."""
    if prepared is None:
        prepared = prepare_vae(cfg)
    with repair_lost_arrays(prepared.model.devices, prepared.model.reprogram):
        return _train_vae(
            cfg,
            progress=progress,
            out_dir=out_dir,
            log=log,
            state=state,
            on_epoch=on_epoch,
            prepared=prepared,
        )


def _train_vae(
    cfg: VAERunConfig,
    *,
    progress: bool | None,
    out_dir: Path | None,
    log: RunLog | None,
    state: dict | None,
    on_epoch: Callable[[int, dict[str, float]], None] | None,
    prepared: VAEPrepared,
) -> VAEResult:
    """`train_vae` once its run is prepared and its boards' arrays are watched."""
    t0, data, model = prepared.started, prepared.data, prepared.model
    step = 0  # where the run is, for the error of a board lost on the way
    try:
        # the board first, as soon as it is open: a run log whose device is null never opened
        # its board (docs/runlog.md). On resume too: the board may have moved
        if log is not None and model.devices:
            log.set_device(model.devices[0].info, uri=model.uris[0])
            log.set_calibration(model.calibration_id)
        lik = make_likelihood(cfg.likelihood.kind, cfg.likelihood.sigma, cfg.likelihood.eps)
        features = DigitsFeatures.load_or_train()
        # left by a killed host: the first step programs every tile again, in its own transaction
        report_open_transactions(model.devices)
        opt = torch.optim.Adam(model.params, lr=cfg.train.lr)
        steps_per_epoch = math.ceil(len(data.x_train) / cfg.train.batch_size)
        total = cfg.train.epochs * steps_per_epoch
        sched = (
            torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
            if cfg.train.schedule == "cosine"
            else torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        )
        ev = cfg.eval
        x_train = data.x_train.reshape(len(data.x_train), -1)
        if log is not None:
            log.configure(**dataclasses.asdict(cfg.log))
        if log is not None and model.devices:
            if (h := model.hvae) is not None:
                resolved = {"activation": h.activation, "init": h.weight_init, "init_bias": h.bias_init}
                log.set_resolved(
                    {**{f"model.{k}": v for k, v in resolved.items()}, "ep.settle": model.settles()}
                )
            log.device_state("start", model.devices, model.uris)
        if state is None:
            initial = evaluate(model, data, lik, features, ev.eps_draws, ev.samples, cfg.train.seed)
            order, step = DataOrder(len(x_train), cfg.train.seed), 0
            noise = seeds.torch_generator(cfg.train.seed, "vae.eps")
            if log is not None:
                log.metrics("test", step=0, epoch=0, **_eval_row(initial))
        else:
            # every draw of the loop is from its own generators (`extra`): the process's global
            # ones are neither set nor used
            extra = restore_training(
                state, model=model.module, optimizer=opt, scheduler=sched, global_rng=False
            )
            order, step = DataOrder.from_state(extra["order"]), int(extra["step"])
            noise = torch.Generator()
            noise.set_state(torch.as_tensor(extra["noise"]))
            initial = Evaluation(**extra["initial"])
        history: list[dict[str, float]] = []
        bar = tqdm(
            total=total,
            initial=step,
            desc=f"train {cfg.model.variant}",
            disable=None if progress is None else not progress,
            unit="batch",
        )
        sums: dict[str, float] = {}
        count = 0
        watch = SafetyWatch(model.devices)  # the boards' violation counters, read once per epoch
        for epoch, idx in order.batches(cfg.train.batch_size, cfg.train.epochs):
            eps = torch.randn(len(idx), cfg.model.latent, generator=noise)
            trace = log.trace_for(step) if log is not None else 0
            with programming_transaction(model.devices, f"step-{step + 1}"):
                stats = model.train_step(x_train[idx], eps, lik, opt, trace)
            sched.step()
            step += 1
            bar.update(1)
            if log is not None:
                log.metrics("train", step=step, epoch=epoch, **stats)
                for phase, eq in model.last_free.items():
                    log.settle(step, phase, eq)
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
            if order.pos != 0:
                continue
            row = {"epoch": float(epoch + 1), **{k: v / count for k, v in sums.items()}}
            sums, count = {}, 0
            if ev.every and (epoch + 1) % ev.every == 0 and epoch + 1 < cfg.train.epochs:
                e = evaluate(model, data, lik, features, ev.eps_draws, ev.samples, cfg.train.seed)
                row.update(test_neg_elbo=e.neg_elbo, test_frechet=e.frechet)
                if log is not None:
                    log.metrics("test", step=step, epoch=epoch + 1, **_eval_row(e))
            history.append(row)
            bar.set_postfix(epoch=epoch + 1, loss=f"{row['loss']:.2f}")
            if log is not None:
                model.log_tiles(log, step)
            unsafe = watch.new_violations()
            if log is not None and log.snapshot_due(last=epoch + 1 == cfg.train.epochs or bool(unsafe)):
                log.snapshot(
                    step,
                    training_state(
                        model=model.module,
                        optimizer=opt,
                        scheduler=sched,
                        step=step,
                        order=order.state(),
                        noise=noise.get_state(),
                        initial=dataclasses.asdict(initial),
                        global_rng=False,  # every draw is from the run's own seeded generators
                    ),
                )
            if on_epoch is not None:
                on_epoch(epoch, row)
            if unsafe:  # after the snapshot: the run can resume once the board is mended
                raise watch.error(unsafe, f"during epoch {epoch + 1}", cfg.device)
        bar.close()
        final = evaluate(model, data, lik, features, ev.eps_draws, ev.samples, cfg.train.seed)
        if log is not None:
            log.metrics("test", step=step, epoch=cfg.train.epochs, **_eval_row(final))
        pictures = _pictures(model, data, out_dir, cfg, noise) if out_dir is not None else []
        if log is not None and model.devices:
            log.device_state("end", model.devices, model.uris)
        result = VAEResult(
            cfg,
            cfg.model.variant,
            model.cells(),
            initial,
            final,
            history,
            time.perf_counter() - t0,
            model.identity,
            pictures,
            "" if model.hvae is None else model.hvae.activation,
            model.settles(),
        )
    except BaseException as err:
        record_end_state(log, model.devices, model.uris, during=err)  # as the run failed
        close_boards(model.devices, during=err)  # never in place of the run's own error
        where = log.where() if log is not None else f"after step {step}"
        lost = lost_board(err, model.devices, model.uris, where)
        if lost is not None:  # one line: which board, where, which operation failed
            raise lost from err
        raise
    model.close()
    return result


def _eval_row(e: Evaluation) -> dict[str, float]:
    return {
        "neg_elbo": e.neg_elbo,
        "recon_mse": e.recon_mse,
        "frechet": e.frechet,
        "energy_per_image_j": e.energy_per_image_j,
        "converged": e.converged,
    }


def _pictures(
    model: _Model, data: Dataset, out_dir: Path, cfg: VAERunConfig, gen: torch.Generator
) -> list[Path]:
    shape = data.image_shape[1:]
    latent_gen = seeds.torch_generator(cfg.train.seed, "vae.samples")
    samples = torch.randn(50, cfg.model.latent, generator=latent_gen)
    gen_x, _, _ = model.decode(samples)
    xt = data.x_test[:30]
    xt = xt.reshape(len(xt), -1)  # data.limit_test may leave fewer than 30
    mu, _, _, _ = model.encode(xt)
    recon, _, _ = model.decode(mu)
    title = f"{cfg.model.variant}"
    return [
        save_grid(out_dir / "samples.png", gen_x.numpy(), shape, f"{title} samples, z ~ N(0, I)"),
        save_reconstructions(
            out_dir / "reconstructions.png",
            xt.numpy(),
            recon.numpy(),
            shape,
            f"{title}: test images (odd rows) and their reconstructions (even rows)",
        ),
    ]
