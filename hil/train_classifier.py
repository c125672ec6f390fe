"""Train a classifier on Devices by Equilibrium Propagation: the run loop (`train_classifier`)
with its logging, resume and safety watch. The model, its optimiser and its per-batch step are
`hil.classifier.Classifier`; the boards of a multi-block model, `hil.boards.block_uris`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from drivers import Device, OpenTransactionWarning
from drivers.base import ProgramReport, programming_transaction, repair_lost_arrays, report_open_transactions
from drivers.watch import SafetyWatch
from hil.augment import check_shift, shift_images, step_offsets
from hil.boards import close_boards, lost_board, open_board, record_end_state
from hil.classifier import Classifier
from hil.config import RunConfig, model_activation
from hil.data import Dataset, hold_out, limited, load_dataset
from hil.ep import settle_paths
from hil.runlog import DataOrder, RunLog, restore_training, training_state

if TYPE_CHECKING:
    from hil.distributed import DataParallel


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    train_acc: float
    test_acc: float
    seconds: float
    free_steps: float  # mean settle steps of the free phase
    nudge_steps: float  # mean settle steps of one nudged phase
    unconverged: float  # fraction of settles that hit their step budget above tol
    val_acc: float | None = None  # on the held-out training images (data.validation), if any
    # the epoch's closed-loop programming (write-verify, tuning refreshes): `verified` devices
    # (tuning: pairs) worked on, `gave_up` of them given up on because they did not move; None
    # when a board did not report it (the count is then unknown, not 0); in a data parallel job
    # the sums over every rank's board
    verified: int = 0
    gave_up: int | None = 0

    @property
    def gave_up_share(self) -> float | None:
        """`gave_up / verified`, or None when nothing was verified or the count is unknown."""
        if not self.verified or self.gave_up is None:
            return None
        return self.gave_up / self.verified


@dataclass
class TrainResult:
    config: RunConfig
    devices: list[str]  # *IDN strings, one per board
    test_acc: float
    history: list[EpochStats] = field(default_factory=list)
    model: object = None
    tiles: dict[str, tuple[int, int]] = field(default_factory=dict)  # crossbar (rows, cols) per tile
    val_acc: float | None = None  # the last epoch's, with a validation split (data.validation)
    resumed_epochs: int = 0  # epochs of `history` that a run before the resume trained

    @property
    def cells(self) -> int:
        """Crossbar cells (differential pairs) of every tile, bias rows included."""
        return sum(r * c for r, c in self.tiles.values())

    def describe_tiles(self) -> str:
        """``W0 19x8, W1 73x16`` (a conv tile: C_in k^2 + 1 rows by C_out columns)."""
        return ", ".join(f"{t} {r}x{c}" for t, (r, c) in self.tiles.items())


@dataclass
class Prepared:
    """A classifier run made ready (`prepare_classifier`): its data set, limited and split as
    the config says and checked, and its model built on its boards, which are open."""

    ds: Dataset
    model: Classifier


def prepare_classifier(
    cfg: RunConfig,
    *,
    data: Dataset | None = None,
    opener: Callable[[str], Device] = open_board,
    dp: DataParallel | None = None,
) -> Prepared:
    """Everything of a run that can fail on its config, its data or its boards, done before
    anything is written: load the data set (unless given) and apply the config's limits and
    validation split, check it against the config (pixel range, shifts, model.sizes against
    its features and classes, a data parallel job's batches) and build the model on its boards
    (`hil.classifier.Classifier`: opening them, refusing what they cannot hold). `hil train
    classifier` calls it before it creates the run log, so that a config or board error leaves
    no run behind. On failure the boards opened are closed (in their safe state)."""
    # one path for a data set given by the caller and one loaded by name: the run log records
    # the config, and a limit that is not applied would make that record wrong
    if data is None:
        data = load_dataset(cfg.data.name, cfg.data.root or None)
    ds = hold_out(limited(data, cfg.data.limit_train, cfg.data.limit_test), cfg.data.validation)
    if ds.x_train.min() < 0 or ds.x_train.max() > 1:
        raise ValueError("input pixels must lie in [0, 1] (the clamp range of the board)")
    check_shift(cfg.train.shift, ds.image_shape)
    if cfg.calibration:
        opener = functools.partial(open_board, calibration=cfg.calibration)
    if dp is not None:
        dp.check_batches(len(ds.x_train), cfg.train.batch_size)
    with warnings.catch_warnings():
        # a board left mid-transaction is reported once, by `_train` (which programs it again),
        # not also by its link as it opens
        warnings.simplefilter("ignore", OpenTransactionWarning)
        model = Classifier(cfg, ds.features, ds.classes, opener, image_shape=ds.image_shape)
    return Prepared(ds, model)


def train_classifier(
    cfg: RunConfig,
    *,
    progress: bool | None = False,
    data: Dataset | None = None,
    opener: Callable[[str], Device] = open_board,
    on_epoch: Callable[[EpochStats], None] | None = None,
    log: RunLog | None = None,
    state: dict | None = None,
    dp: DataParallel | None = None,
    prepared: Prepared | None = None,
) -> TrainResult:
    """Train `cfg` and return the test accuracy after the last epoch and the history. With
    `log`, record device, metrics, free-settle traces, tile snapshots, programming reports and
    resume snapshots (at an epoch's end, at most every `log.snapshot_every_s`, and at the
    last); with `state` (from `open_for_resume`), continue from it. If training fails, the
    boards are closed (left in their safe state) before the error goes on. With `dp`
    (`hil.distributed`), this is one rank of a data parallel job: it settles its shard of
    every batch on its own board (cfg.device), `log` is given on rank 0 only, and rank 0's
    `state` is broadcast to every rank. `prepared`: the run made ready by `prepare_classifier`
    (with the same config; `data` and `opener` are then unused), else it is prepared here.
    `progress`: a tqdm bar on stderr (None: when stderr is a terminal)."""
    if prepared is None:
        prepared = prepare_classifier(cfg, data=data, opener=opener, dp=dp)
    ds, model = prepared.ds, prepared.model
    try:
        # the board first, as soon as it is open: a run log whose device is null never opened
        # its board (docs/runlog.md). On resume too: the board may have moved
        if log is not None and model.devices:
            log.set_device(model.devices[0].info, uri=model.board_uris[0])
            log.set_calibration(cfg.calibration or None)
        if dp is not None:
            state = dp.broadcast(state)
        if log is not None:
            log.configure(**dataclasses.asdict(cfg.log))
            log.set_boards(model.board_records())
        # a board found with its arrays lost (STATUS `arrays_id` changed: a board or chip swapped, an
        # emulator started again) gets every tile of its blocks programmed again from the host's
        # weights, and the operation it was running resent: the step goes on as it would have
        with repair_lost_arrays(model.devices, model.reprogram):
            return _train(cfg, ds, model, progress, on_epoch, log, state, dp)
    except BaseException as err:
        # the boards' counters as the run failed (not of a board whose link it lost)
        record_end_state(log, model.devices, model.board_uris, during=err)
        # each board to its safe state, its port released; the run log keeps every step
        close_boards(model.devices, during=err)
        lost = lost_board(err, model.devices, model.board_uris, "" if log is None else log.where())
        if lost is not None:  # one line: which board, where, which operation failed
            raise lost from err
        raise


def warmup_scale(step: int, warmup: float, steps_per_epoch: int) -> float:
    """The learning-rate factor of optimiser step `step` (0-based) under a linear warmup over
    `warmup` epochs of `steps_per_epoch` steps: ``(step + 1) / n`` for the first ``n =
    ceil(warmup * steps_per_epoch)`` steps, then 1. A function of the step alone, so a resumed
    run continues the ramp where it stopped."""
    n = math.ceil(warmup * steps_per_epoch)
    return 1.0 if step >= n else (step + 1) / n


def _train(
    cfg: RunConfig,
    ds: Dataset,
    model: Classifier,
    progress: bool | None,
    on_epoch: Callable[[EpochStats], None] | None,
    log: RunLog | None,
    state: dict | None,
    dp: DataParallel | None = None,
) -> TrainResult:
    from tqdm.auto import tqdm

    report_open_transactions(model.devices)  # left by a killed host: the steps below program every tile
    watch = SafetyWatch(model.devices)  # the boards' violation counters, read once per epoch
    module = model.block if model.ffebm is None else model.ffebm
    bs = cfg.train.batch_size
    n_batches = (len(ds.x_train) + bs - 1) // bs
    history: list[EpochStats] = []
    if dp is not None:  # every rank's board, recorded by rank 0; boards of different kinds said so
        from hil.distributed import MixedBoardsWarning, rank_boards

        info = model.devices[0].info
        ranks = dp.gather({
            "rank": dp.rank, "uri": model.board_uris[0], "idn": info.identity.idn(),
            "model": info.identity.model, "limits": repr(info.limits),
        })  # fmt: skip
        mixed = rank_boards(ranks)
        if mixed and dp.rank == 0:
            warnings.warn(MixedBoardsWarning(mixed), stacklevel=2)
        if log is not None:
            log.set_ranks([{k: r[k] for k in ("rank", "uri", "idn", "model")} for r in ranks])
    if log is not None and model.devices:  # the device itself is recorded by `train_classifier`, first
        log.set_resolved(
            {"model.activation": model_activation(cfg.model), "ep.settle": settle_paths(model.blocks())}
        )
        log.device_state("start", model.devices, model.board_uris)
    resumed_epochs = 0
    if state is None:
        order, step = DataOrder(len(ds.x_train), cfg.train.seed), 0
    else:
        # the loop draws from its own generators (`extra`), never from the process's global ones
        extra = restore_training(
            state, model=module, optimizer=model.opt, scheduler=model.sched, global_rng=False
        )
        order, step = DataOrder.from_state(extra["order"]), int(extra["step"])
        history = [EpochStats(**h) for h in extra["history"]]
    resumed_epochs = len(history)
    bar = tqdm(
        total=cfg.train.epochs * n_batches,
        initial=step,
        disable=None if progress is None else not progress,  # None: a bar when stderr is a terminal
        unit="batch",
        dynamic_ncols=True,
    )
    totals = dict.fromkeys(("loss", "acc", "free", "nudge", "settles", "unconverged", "n"), 0.0)
    verified, gave_up = 0, 0  # this epoch's closed-loop programming (gave_up None: unknown)
    t0 = time.perf_counter()
    try:
        for epoch, idx in order.batches(bs, cfg.train.epochs):
            n = len(idx)
            offsets = step_offsets(n, cfg.train.shift, cfg.train.seed, step) if cfg.train.shift else None
            if dp is not None:
                idx = dp.shard(idx)
                offsets = None if offsets is None else dp.shard(offsets)  # the same share of the batch
            x, y = ds.x_train[idx], ds.y_train[idx]
            if offsets is not None:
                x = shift_images(x, ds.image_shape, offsets)
            trace = log.trace_for(step) if log is not None and model.ffebm is None else 0
            scale = warmup_scale(step, cfg.train.warmup, n_batches)
            with programming_transaction(model.devices, f"step-{step + 1}"):
                loss, acc, st = model.step(x, y, trace=trace, dp=dp, lr_scale=scale)
            if dp is not None:  # the global batch's loss and accuracy, settle steps averaged over ranks
                keys = ("free_steps", "nudge_steps", "settles", "unconverged")
                sums = dp.sums([loss * len(y), acc * len(y), *(st[k] for k in keys)])
                loss, acc = sums[0] / n, sums[1] / n
                st = dict(zip(keys, sums[2:], strict=True))
                st["free_steps"] /= dp.world
                st["nudge_steps"] /= dp.world
            step += 1
            totals["loss"] += loss * n
            totals["acc"] += acc * n
            totals["free"] += st["free_steps"]
            totals["nudge"] += st["nudge_steps"]
            totals["settles"] += st["settles"]
            totals["unconverged"] += st["unconverged"]
            totals["n"] += n
            verified, gave_up = _closed_loop(model.last_programming, verified, gave_up)
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.3f}")
            if log is not None:
                log.metrics("train", step=step, epoch=epoch, loss=loss, acc=acc, **st)
                for report in model.last_programming:
                    log.program(step, report)
                if trace:
                    for phase, eq in model.last_settles.items():
                        log.settle(step, phase, eq)
            if order.pos != 0:
                continue
            model.epoch_end()
            if dp is not None:  # every rank programmed its own board: the job's counts are the sums
                verified, gave_up = dp.count_sums(verified, gave_up)
            accuracy = model.accuracy if dp is None else functools.partial(dp.accuracy, model.predict)
            test_acc = accuracy(ds.x_test, ds.y_test)
            val_acc = None if ds.x_val is None else accuracy(ds.x_val, ds.y_val)
            n, k = max(1.0, totals["n"]), max(1.0, totals["n"] / bs)
            stats = EpochStats(
                epoch + 1, totals["loss"] / n, totals["acc"] / n, test_acc, time.perf_counter() - t0,
                totals["free"] / k, totals["nudge"] / k, totals["unconverged"] / max(1.0, totals["settles"]),
                val_acc, verified, gave_up,
            )  # fmt: skip
            totals = dict.fromkeys(totals, 0.0)
            verified, gave_up = 0, 0
            t0 = time.perf_counter()
            history.append(stats)
            shown = {} if val_acc is None else {"val": f"{val_acc:.2%}"}
            bar.set_postfix(epoch=epoch + 1, loss=f"{stats.train_loss:.3f}", **shown, test=f"{test_acc:.2%}")
            if log is not None:
                held = {} if val_acc is None else {"val_acc": val_acc}
                log.metrics(
                    "test", step=step, epoch=epoch + 1, test_acc=test_acc, train_loss=stats.train_loss, **held
                )
                model.log_tiles(log, step)
            unsafe = watch.new_violations()
            if log is not None and log.snapshot_due(last=epoch + 1 == cfg.train.epochs or bool(unsafe)):
                log.snapshot(
                    step,
                    training_state(
                        model=module, optimizer=model.opt, scheduler=model.sched, step=step,
                        order=order.state(), history=[dataclasses.asdict(h) for h in history],
                        global_rng=False,  # every draw is from the run's own seeded generators
                    ),
                )  # fmt: skip
            if on_epoch is not None:
                on_epoch(stats)
            if unsafe:  # after the snapshot: the run can resume once the board is mended
                raise watch.error(unsafe, f"during epoch {epoch + 1}", model.board_uris[0])
    finally:
        bar.close()
    for dev in model.devices:  # every line to 0 V: the model stays usable, the boards stay open
        dev.safe_state()
    if log is not None and model.devices:
        log.device_state("end", model.devices, model.board_uris)
    last = history[-1]
    result = TrainResult(
        cfg, model.identities(), last.test_acc, history, model, model.tile_shapes(), last.val_acc,
        resumed_epochs,
    )  # fmt: skip
    return result


def _closed_loop(reports: list[ProgramReport], verified: int, gave_up: int | None) -> tuple[int, int | None]:
    """`verified` and `gave_up` with the closed-loop reports among `reports` added (an
    `UpdateReport`'s `verified`; a report whose board did not say `gave_up` makes it None)."""
    for r in reports:
        n = int(getattr(r, "verified", 0))
        if not n:
            continue
        verified += n
        gave_up = None if gave_up is None or r.gave_up is None else gave_up + int(r.gave_up)
    return verified, gave_up
