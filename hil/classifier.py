"""The model of a classifier run on Devices, its optimiser and its per-batch step (`Classifier`).

Two model kinds (``model.kind``):

- ``dhn``: one layered Deep Hopfield Network on one board, trained by EP alone: the free
  settle gives the prediction (the output layer's states), the loss's gradient at the free
  equilibrium becomes the nudge of the output layer, and the EP gradients of the two nudged
  phases update the weights, which are programmed back into the board.
- ``ffebm``: a layered DHN split into EB blocks (one board per block) chained by digital
  parts, trained end to end by BP-EP chaining (`hil.ffebm`).

Losses (``ep.loss``): ``ce`` is the cross-entropy of ``softmax(tau * s_out)``; its gradient
at the free state is injected as a constant current (``Nudge(grad=...)``). ``mse`` is
``1/2 |s_out - onehot|^2`` through the elastic target nudge (``Nudge(target=...)``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from drivers import Device, Equilibrium, ProgramReport, SettleBudget, Topology, seeds
from drivers.base import board_of
from drivers.checks import settle_samples_most
from drivers.errors import ConfigurationError, DeviceError, LimitViolation
from drivers.shared import SharedBoard
from drivers.tiled import placement_record
from hil.boards import block_uris, close_boards, open_distinct
from hil.compute import board_uri, resolve_compute
from hil.config import RunConfig, board_bounds, model_activation
from hil.ep import EBBlock
from hil.ffebm import FFEBM, split_layered
from hil.init import init_weights
from hil.programming import make_scheme

if TYPE_CHECKING:
    from hil.distributed import DataParallel
    from hil.runlog import RunLog


def _budgets(cfg: RunConfig) -> tuple[SettleBudget, dict[str, SettleBudget]]:
    e = cfg.ep
    free = SettleBudget(max_steps=e.free_steps, tol=e.tol, dt=e.dt)
    nudge = SettleBudget(max_steps=e.nudge_steps, tol=0.0 if e.nudge_fixed else e.tol, dt=e.dt)
    return free, {"free": free, "nudge": nudge}


class Classifier:
    """The model of a run plus its optimiser: `step(x, y)` trains on one batch, `predict(x)`
    returns the output states."""

    def __init__(
        self,
        cfg: RunConfig,
        features: int,
        classes: int,
        opener: Callable[[str], Device],
        image_shape: tuple[int, int, int] | None = None,
    ) -> None:
        self.devices: list[Device] = []  # the boards, each once (a board blocks share: once)
        self._building: int | None = None  # the EB block being built on its board (`dev` in `_build`)
        try:
            self._build(cfg, features, classes, opener, image_shape)
        except BaseException as err:
            close_boards(self.devices, during=err)  # the boards opened before the failure, each safe
            if isinstance(err, LimitViolation | ConfigurationError) and self._building is not None:
                self._name_block(err, cfg, self._building)
            raise

    def _name_block(self, err: DeviceError, cfg: RunConfig, k: int) -> None:
        """Prefix a refusal met while block `k` configured its board (a network too large for
        the board's tiles, ...) with the block, its layers and its board, and say what to change
        for that block: a model on several boards was told to "split it into EB blocks on several
        boards" without learning which block or board was refused. A lone block (an ff-EBM of one
        block) is named the same way, its fix then a board with more or larger tiles or more
        blocks; a DHN has no EB blocks, and its board's refusal says what to change."""
        m = cfg.model
        if m.kind != "ffebm":
            return
        uris = block_uris(cfg)
        board = "device" if len(uris) == 1 and not cfg.devices else f"devices[{k}]"
        layers = "" if m.channels else f" (layers {split_layered(m.sizes, m.block_layers)[k]})"
        others = [j for j, u in enumerate(uris[:k]) if u == uris[k]]
        shared = (
            f" (shared with block{'s' if len(others) > 1 else ''} {', '.join(map(str, others))})"
            if others
            else ""
        )
        tiles = isinstance(err, LimitViolation) and "tile" in err.limit  # too many (physical) tiles
        fix = (
            f" For this block: {board} = a board with more or larger tiles"
            + (" or a board of its own" if others else "")
            + ", or a smaller model.block_layers to spread its layers over more blocks and boards"
            if tiles
            else ""  # the board's refusal says what to change; devices[k] names the board
        )
        text = str(err).rstrip(".")
        err.args = (f"EB block {k}{layers} on board {uris[k]}{shared}: {text}.{fix}", *err.args[1:])

    def _build(
        self,
        cfg: RunConfig,
        features: int,
        classes: int,
        opener: Callable[[str], Device],
        image_shape: tuple[int, int, int] | None,
    ) -> None:
        self.cfg = cfg
        m, e, t = cfg.model, cfg.ep, cfg.train
        sizes = list(m.sizes)
        conv = m.kind == "ffebm" and bool(m.channels)
        if conv:
            if image_shape is None or image_shape[0] * image_shape[1] * image_shape[2] != features:
                raise ValueError(
                    "model.channels (a conv ff-EBM) needs image data with its (C, H, W) shape; "
                    f"got {image_shape} for {features} features"
                )
            if m.between == "linear":
                raise ValueError(
                    "model.between = 'linear' is for fully connected blocks; use 'identity' or 'bn'"
                )
            sizes = [features, classes]  # model.sizes is not used by a conv ff-EBM
        elif m.between == "bn" or m.head != "eb" or m.front:
            raise ValueError(
                "model.between = 'bn', model.head and model.front are for conv ff-EBMs: set "
                "model.kind = 'ffebm' and model.channels"
            )
        if sizes[0] != features or sizes[-1] != classes:
            raise ValueError(
                f"model.sizes {sizes} must start with the {features} input features and end with the "
                f"{classes} classes of {cfg.data.name}"
            )
        free, budgets = _budgets(cfg)
        gen = seeds.torch_generator(t.seed, "classifier.init")  # a CPU generator whatever `compute` is
        self.board_uris: list[str] = []  # the URI of each of `devices`
        lost_at_open: list[int] = []  # each board's arrays-lost count when it was opened
        self.block_boards: list[int] = []  # block k lives on devices[block_boards[k]]
        # the host stack's torch device; an in-process emulator board gets it too (`hil.compute`)
        self.compute = resolve_compute(cfg.compute)
        uris = block_uris(cfg)
        shared: dict[str, SharedBoard] = {}  # URI -> the board several blocks share

        def dev(k: int) -> Device:
            self._building = k
            uri = uris[k]
            if uri not in self.board_uris:
                board = open_distinct(
                    lambda: opener(board_uri(uri, self.compute)),
                    uri,
                    k,
                    self.devices,
                    uris,
                    "EB blocks' networks",
                    within=board_bounds(cfg),
                )
                self.devices.append(board)
                self.board_uris.append(uri)
                lost_at_open.append(_arrays_lost(board))
                if uris.count(uri) > 1:
                    shared[uri] = SharedBoard(board)
            self.block_boards.append(self.board_uris.index(uri))
            # a block alone on its board gets the board itself; blocks sharing one get views
            return shared[uri].view(f"b{k}") if uri in shared else self.devices[-1]

        refresh_mode = None if e.refresh_mode == "auto" else e.refresh_mode
        if m.kind == "dhn":
            curve = model_activation(m)
            topo = Topology.layered(
                sizes, gain=m.gain, w_max=m.w_max, budget=free, mode=e.settle_mode, activation=curve
            )
            w0 = init_weights(topo, m.init, m.init_scale, gen, m.init_bias)
            scheme = None
            if e.programming != "ideal" or e.refresh_every or refresh_mode:
                scheme = make_scheme(
                    e.programming, refresh_every=e.refresh_every, refresh_mode=refresh_mode, seed=t.seed
                )
            self.block = EBBlock(
                dev(0), topo, weights=w0, budgets=budgets,
                programming=scheme, seed=t.seed, joint_phases=e.joint_phases, settle=e.settle,
                compute=self.compute,
            )  # fmt: skip
            self.ffebm: FFEBM | None = None
            tiles = list(self.block.weights.values())
        else:
            # the options every EB block of an ff-EBM shares
            blocks = dict(
                gain=m.gain, activation=model_activation(m), w_max=m.w_max, budget=free, budgets=budgets,
                init=m.init, init_bias=m.init_bias,
                init_scale=m.init_scale, beta=e.beta, mode=e.mode, settle_mode=e.settle_mode, seed=t.seed,
                programming=None if e.programming == "ideal" else e.programming,
                refresh_every=e.refresh_every, refresh_mode=refresh_mode, joint_phases=e.joint_phases,
                settle=e.settle, compute=self.compute,
            )  # fmt: skip
            if conv:
                assert image_shape is not None
                self.ffebm = FFEBM.convolutional(
                    image_shape, m.channels, m.pools or [2] * len(m.channels), m.block_layers, classes, dev,
                    kernel=m.kernel, padding=m.padding, pool_mode=m.pool_mode, front=m.front,
                    between=m.between,  # type: ignore[arg-type]
                    head=m.head, **blocks,  # type: ignore[arg-type]
                )  # fmt: skip
            else:
                self.ffebm = FFEBM.layered(
                    sizes,
                    m.block_layers,
                    dev,
                    between=m.between,
                    **blocks,  # type: ignore[arg-type]
                )
            tiles = self.ffebm.block_parameters()
        self._building = None  # every block configured on its board
        for board, lost in zip(self.devices, lost_at_open, strict=True):
            if _arrays_lost(board) > lost:  # lost while its blocks were first written
                self.reprogram(board)  # the block being written repaired itself; those before it did not
        for blk in self.blocks():
            blk.free_start = e.free_start
            blk.host_update = e.host_update
        lrs = [t.lr[min(i, len(t.lr) - 1)] for i in range(len(tiles))]
        groups: list[dict] = [{"params": [p], "lr": lr} for p, lr in zip(tiles, lrs, strict=True)]
        if self.ffebm is not None and self.ffebm.digital_parameters():
            groups.append({"params": self.ffebm.digital_parameters(), "lr": t.lr_digital})
        if t.optimizer == "adam":
            self.opt: torch.optim.Optimizer = torch.optim.Adam(groups, weight_decay=t.weight_decay)
        else:
            self.opt = torch.optim.SGD(groups, momentum=t.momentum, weight_decay=t.weight_decay)
        self.sched = (
            torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, t.epochs) if t.schedule == "cosine" else None
        )
        self.classes = classes
        self.last_settles: dict[str, Equilibrium] = {}  # phase -> equilibrium of the last step
        self.last_programming: list[ProgramReport] = []  # what the last step's update did to the tiles

    # --------------------------------------------------------------------------------- loss
    def _loss(self, out: Tensor, y: Tensor) -> Tensor:
        if self.cfg.ep.loss == "ce":
            return F.cross_entropy(self.cfg.ep.tau * out, y)
        return 0.5 * ((out - F.one_hot(y, self.classes).to(out.dtype)) ** 2).sum(-1).mean()

    # --------------------------------------------------------------------------------- step
    def blocks(self) -> list[EBBlock]:
        return [self.block] if self.ffebm is None else [lay.block for lay in self.ffebm.eb_layers]

    def reprogram(self, board: Device) -> None:
        """Program every tile of the blocks on `board` (one of `devices`) again from the host's
        weights: the board lost its arrays (`drivers.base.repair_lost_arrays`)."""
        for k, blk in enumerate(self.blocks()):
            if self.devices[self.block_boards[k]] is board:
                blk.sync(force=True)

    def tile_shapes(self) -> dict[str, tuple[int, int]]:
        """(rows, cols) of every tile on the boards, by run-log name."""
        return {
            self._tile_name(k, c.tile): blk.topology.tile_shape(c.tile)
            for k, blk in enumerate(self.blocks())
            for c in blk.topology.couplings
        }

    def _tile_name(self, k: int, tile: str) -> str:
        return tile if len(self.blocks()) == 1 else f"b{k}.{tile}"

    def log_tiles(self, log: RunLog, step: int) -> None:
        """Snapshot every tile's host weights and conductances."""
        for k, blk in enumerate(self.blocks()):
            for tile, p in blk.weights.items():
                gp, gm = blk.device.read_conductance(tile)
                w = p.detach().cpu().numpy()
                log.tile(step, self._tile_name(k, tile), weights=w, g_plus=gp, g_minus=gm)

    def step(
        self, x: Tensor, y: Tensor, trace: int = 0, dp: DataParallel | None = None, lr_scale: float = 1.0
    ) -> tuple[float, float, dict[str, float]]:
        """One optimisation step; returns (loss, accuracy, settle statistics) of the batch.
        `trace`: record the free settle's trace every `trace` steps (layered DHN only). With
        `dp`, (x, y) is this rank's shard and the gradients are all-reduced over the ranks
        before the optimiser steps (`hil.distributed`). `lr_scale` multiplies every learning
        rate for this step only (`warmup_scale`); the schedule never sees it."""
        e = self.cfg.ep
        x, y = x.to(self.compute), y.to(self.compute)  # no copy when they are there already
        if self.ffebm is not None:
            self.opt.zero_grad(set_to_none=True)  # autograd accumulates; the DHN branch assigns
            out = self.ffebm(x)
            loss = self._loss(out, y)
            loss.backward()
            layers = self.ffebm.eb_layers
            free = [lay.last_vjp.free for lay in layers if lay.last_vjp is not None]
            nud = [eq for lay in layers if lay.last_vjp is not None
                   for eq in (lay.last_vjp.first, lay.last_vjp.second)]  # fmt: skip
        else:
            blk = self.block
            f = blk.free(x, trace=trace)
            self.last_settles = {"free": f}
            out = blk.as_tensor(f.states[blk.outputs[0]])
            # the gradients are written into last step's .grad tensors (the optimizer has read
            # them and keeps no reference): no new tile-sized tensors per step
            grads = {t: p.grad for t, p in blk.weights.items() if p.grad is not None}
            if e.loss == "ce":
                # dL/ds of the cross-entropy of tau * s: tau (softmax(tau s) - onehot), and L itself
                logp = torch.log_softmax(out * e.tau, dim=1)
                loss = F.nll_loss(logp, y)
                grad = logp.exp_().sub_(F.one_hot(y, self.classes)).mul_(e.tau)
                r = blk.ep(x, grad=grad, beta=e.beta, mode=e.mode, free=f, input_grads=False, trace=trace,
                           out=grads)  # fmt: skip
            else:
                target = F.one_hot(y, self.classes).to(out.dtype)
                r = blk.ep(x, target=target, beta=e.beta, mode=e.mode, free=f, input_grads=False, trace=trace,
                           out=grads)  # fmt: skip
                loss = self._loss(out, y)
            for tile, p in blk.weights.items():
                if p.grad is not r.grads[tile]:
                    p.grad = r.grads[tile]
            free = [f]
            nud = [eq for eq in (r.first, r.second) if eq is not f]
            for eq, b in zip((r.first, r.second), r.betas, strict=True):
                if b != 0:
                    self.last_settles[f"nudged{'+' if b > 0 else '-'}"] = eq
        if dp is not None:
            dp.reduce_grads([p for g in self.opt.param_groups for p in g["params"]])
        rates = [g["lr"] for g in self.opt.param_groups]
        for g in self.opt.param_groups:
            g["lr"] = g["lr"] * lr_scale  # exact at 1.0: no warmup, the schedule's rates
        self.opt.step()
        for g, lr in zip(self.opt.param_groups, rates, strict=True):
            g["lr"] = lr
        # the update reaches the devices inside this step (and its programming transaction):
        # every report of it, refreshes included, is in `last_programming`
        self.last_programming = []
        blocks = self.blocks()
        for k, blk in enumerate(blocks):
            blk.sync()
            if len(blocks) == 1:  # tiles keep their own names
                self.last_programming += blk.last_updates
            else:
                named = [replace(u, tile=self._tile_name(k, u.tile)) for u in blk.last_updates]
                self.last_programming += named
        acc = int((out.argmax(1) == y).sum()) / len(y)
        stats = {
            "free_steps": sum(q.steps for q in free) / max(1, len(free)),
            "nudge_steps": sum(q.steps for q in nud) / max(1, len(nud)),
            "settles": len(free) + len(nud),
            "unconverged": sum(not q.converged for q in free + nud),
        }
        return float(loss.detach()) if isinstance(loss, Tensor) else float(loss), acc, stats

    @torch.no_grad()
    def predict(self, x: Tensor, batch_size: int = 512) -> Tensor:
        """The output states for `x`. An ff-EBM's digital parts run in eval mode here (its
        batch-norm normalises with the running statistics of training and does not update
        them), so an image's output does not depend on the others predicted with it."""
        # chunks whose settles fit the bound on one settle's values (feature-map networks)
        fits = [settle_samples_most(blk.board_topology()) for blk in self.blocks()]
        batch_size = max(1, min([batch_size, *fits]))
        training = self.ffebm is not None and self.ffebm.training
        if self.ffebm is not None:
            self.ffebm.eval()
        try:
            outs = []
            for i in range(0, len(x), batch_size):
                xb = x[i : i + batch_size].to(self.compute)
                if self.ffebm is not None:
                    outs.append(self.ffebm(xb))
                else:
                    outs.append(self.block.predict(xb).clone())
            return torch.cat(outs)
        finally:
            if self.ffebm is not None:
                self.ffebm.train(training)

    def accuracy(self, x: Tensor, y: Tensor) -> float:
        return float((self.predict(x).argmax(1).cpu() == y.cpu()).float().mean())

    def epoch_end(self) -> None:
        if self.sched is not None:
            self.sched.step()

    def identities(self) -> list[str]:
        """The *IDN string of every board, each once (`devices`' order)."""
        return [d.info.identity.idn() for d in self.devices]

    def board_records(self) -> list[dict[str, object]]:
        """Which board holds which EB block: per block its URI, *IDN and board index (blocks
        with the same index share one board), and the run-log names of its tiles."""
        return [
            {
                "block": k,
                "board": i,
                "uri": self.board_uris[i],
                "idn": self.devices[i].info.identity.idn(),
                "tiles": [self._tile_name(k, c.tile) for c in blk.topology.couplings],
                **placement_record(blk.device),  # a block larger than the board's tiles: where it lies
            }
            for k, (i, blk) in enumerate(zip(self.block_boards, self.blocks(), strict=True))
        ]

    def close(self) -> None:
        """Put every board in its safe state and close it, once each (a board several blocks
        share included); a board that fails does not keep the others open (`close_boards`)."""
        close_boards(self.devices)


def _arrays_lost(device: Device) -> int:
    """How often the board `device` drives found its arrays lost (0 for a board in this process)."""
    recovery = getattr(board_of(device), "recovery", None)
    return int(getattr(recovery, "arrays_lost", 0))
