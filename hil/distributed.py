"""Data parallel training over boards on `torch.distributed` (docs/distributed.md).

Each rank of a ``torchrun`` job owns one board (an emulated one, or a real one with its own
calibration record) and settles a contiguous shard of every global batch. Before the
optimiser steps, the EP gradients of all ranks are all-reduced (averaged, each rank weighted
by its shard size, so the result is the gradient of the whole batch); every rank then takes
the same optimiser step and programs the same host weights onto its own board. Rank 0 writes
the run log; on a restart every rank continues from rank 0's last snapshot, broadcast to all.

The process group uses gloo when the host stack computes on the CPU and NCCL on CUDA. Under
gloo every collective is waited for in slices (`wait_interruptibly`), so that a stop (Ctrl-C,
torchrun's SIGTERM, `RayExecutor.stop`'s SIGINT) reaches a rank that waits for a peer which
will never contribute, and its board goes to its safe state instead of waiting out the group's
timeout; the collective left pending then keeps its group alive until the process ends.
"""

from __future__ import annotations

import gc
import os
import pickle
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import Tensor

from drivers.uri import parse_options, replace_params
from hil.config import ConfigError, RunConfig

MAX_WORLD = 1024  # ranks (boards) one job may span
RANK_SEED_STRIDE = 1000  # emulator seed of rank r: seed + 1000 r (ff-EBM blocks take seed + k, k < 1000)
ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# How long one wait on a gloo collective blocks before Python looks at its signals: the most a
# stop (Ctrl-C, SIGTERM taken as one, RayExecutor.stop's SIGINT) waits to reach a rank blocked
# in a collective. A collective that completes wakes its waiter at once, whatever the slice.
WAIT_SLICE_S = 0.05


def wait_interruptibly(work: Any, pending: list[Any] | None = None, slice_s: float = WAIT_SLICE_S) -> None:
    """Wait for the collective `work` (``async_op=True``) in slices of `slice_s`, between which
    Python runs its signal handlers: a KeyboardInterrupt (or any error a handler raises) gets
    through within a slice, where ``work.wait()`` blocks in C++ until every peer has
    contributed. The collective's own error (a peer's connection closed, the group's timeout)
    is raised as ``work.wait()`` raises it. Interrupted, a work still pending is appended to
    `pending` (`DataParallel.collective_abandoned`)."""
    step = timedelta(seconds=slice_s)
    try:
        while True:
            try:
                work.wait(step)  # wakes as soon as the work completes
                return
            except RuntimeError:  # the slice ran out ("Operation timed out!"), or the work failed
                if work.is_completed():
                    work.wait()  # its own result: returns, or raises the collective's error
                    return
    except BaseException:
        if pending is not None and not work.is_completed():
            pending.append(work)
        raise


def group_left_up() -> bool:
    """Whether this process's process group is still up: a rank that stopped waiting for a
    collective keeps it (`DataParallel.close`), since destroying it, or the interpreter's
    teardown freeing it, joins the gloo worker thread that still waits for the peers; such a
    process ends with `DataParallel.exit_worker` (``os._exit``)."""
    return dist.is_available() and dist.is_initialized()


class MixedBoardsWarning(UserWarning):
    """The ranks of a data parallel job train on boards of different kinds (models or limits):
    their gradients are averaged as if they came from one kind of board."""


def rank_boards(records: Sequence[Mapping[str, Any]]) -> str | None:
    """From every rank's board record (``rank``, ``uri``, ``idn``, ``model``, ``limits``), a
    warning naming the ranks whose boards differ in model or limits from rank 0's (None: all
    alike). Boards of one model and limits are the data parallel case; others mix their
    errors into one average gradient."""
    first = records[0]
    odd = [r for r in records[1:] if (r["model"], r["limits"]) != (first["model"], first["limits"])]
    if not odd:
        return None
    named = "; ".join(f"rank {r['rank']}: {r['idn']} ({r['uri']})" for r in [first, *odd])
    return (
        f"the ranks train on boards of different kinds ({named}): their gradients are averaged as if "
        "from one kind of board; give every rank the same model and limits (--rank-device)"
    )


class PeerFailed(ConnectionError):
    """A collective failed because another rank of the job stopped (its board, link or disk
    failed, or it was killed): that rank printed its own error; this one names the job's
    state. A ConnectionError, so the command line prints it on one line with the resume hint."""


def peer_failure(exc: BaseException) -> PeerFailed | None:
    """`exc` as a `PeerFailed` when it is a collective's error (gloo or NCCL: the peer's
    connection closed or reset, a timeout), else None."""
    dist_error = getattr(dist, "DistError", ())
    text = str(exc)
    if not isinstance(exc, RuntimeError) or not (
        isinstance(exc, dist_error) or any(k in text for k in ("gloo", "NCCL", "Connection closed by peer"))
    ):
        return None
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return PeerFailed(  # the command line puts this rank's number in front
        "another rank of this job stopped, so the gradients could not be all-reduced "
        f"({first[:200]}); that rank's own error is in its output"
    )


@dataclass
class DataParallel:
    """This process's place in a data parallel job, and the collectives the training loop uses.

    `shard` picks this rank's slice of a global batch and remembers the shard sizes that
    `reduce_grads` weights by. `reduce_s` and `reduce_calls` count the time spent in
    collectives (for `benchmarks/many_boards.py`)."""

    rank: int
    world: int
    local_rank: int = 0
    backend: str = "gloo"
    device: str = "cpu"  # where collectives' tensors live: cuda:LOCAL_RANK under NCCL
    reduce_s: float = 0.0
    reduce_calls: int = 0
    # collectives this rank stopped waiting for (interrupted) that are still queued on the gloo
    # group's worker thread, which only the peers (or the group's timeout) can end
    _pending: list[Any] = field(default_factory=list, repr=False)
    _batch: tuple[int, int] = field(default=(0, 0), repr=False)  # (this rank's, global) examples

    @staticmethod
    def from_env(compute: str = "cpu", timeout_s: float = 600.0) -> DataParallel:
        """Join the process group that ``torchrun`` describes in the environment (RANK,
        WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)."""
        missing = [v for v in ENV_VARS if v not in os.environ]
        if missing:
            raise ConfigError(
                f"data parallel training needs torchrun's environment ({', '.join(missing)} not set): "
                "launch it as torchrun --nproc-per-node N -m hil.cli train classifier ... --distributed"
            )
        rank, world, local = (int(os.environ[v]) for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        if not 1 <= world <= MAX_WORLD:
            raise ConfigError(f"WORLD_SIZE={world}: a data parallel job spans 1 to {MAX_WORLD} ranks")
        cuda = torch.device(compute).type == "cuda"
        backend = "nccl" if cuda else "gloo"
        if cuda:
            torch.cuda.set_device(local)
        if not dist.is_initialized():
            dist.init_process_group(
                backend, store=_job_store(rank, world, timeout_s), rank=rank, world_size=world,
                timeout=timedelta(seconds=timeout_s),
            )  # fmt: skip
        return DataParallel(rank, world, local, backend, f"cuda:{local}" if cuda else "cpu")

    def close(self, wait: bool = True) -> None:
        """Leave the process group; with `wait`, once every rank is done with its collectives
        (a gloo rank torn down while a peer still talks to it can abort its process at exit).
        `wait=False` after a failure, when the other ranks may be gone. The collection that
        follows runs the destructors of the group's C++ objects (worker threads, pairs) now,
        while the interpreter is whole, not during its teardown. After an interrupted
        collective (`collective_abandoned`) the group is left as it is: destroying it would
        wait for the pending collective, i.e. for peers that may never contribute."""
        if self.collective_abandoned():
            return
        if dist.is_initialized():
            if wait:
                self._barrier()
            dist.destroy_process_group()
        gc.collect()

    @staticmethod
    def exit_worker(code: int = 0) -> NoReturn:
        """End a torchrun worker whose work is done, flushed and closed, without the
        interpreter's teardown.

        At teardown the C++ state of torch's distributed runtime is destroyed in an order
        nobody controls; once in a full CI run that aborted rank 1 of a finished job
        ("terminate called without an active exception", SIGABRT), torchrun then reported the
        whole job failed, and with --max-restarts it would have restarted a finished job. The
        run log is closed and the output flushed before this is called, so nothing is lost."""
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    # ------------------------------------------------------------------------------ shards
    def span(self, n: int) -> tuple[int, int]:
        """[start, stop) of this rank's contiguous share of `n` items (sizes differ by at most 1)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (self.rank < extra)

    def shard(self, idx: Tensor) -> Tensor:
        """This rank's slice of the global batch `idx`; `reduce_grads` weights by its size."""
        start, stop = self.span(len(idx))
        self._batch = (stop - start, len(idx))
        return idx[start:stop]

    def check_batches(self, n_train: int, batch_size: int) -> None:
        """Refuse a batch size that would leave a rank without examples in some batch."""
        last = n_train % batch_size
        if batch_size < self.world or 0 < last < self.world:
            raise ConfigError(
                f"train.batch_size = {batch_size} over {n_train} examples gives a batch of "
                f"{last or batch_size} for {self.world} ranks: every rank needs one example of every "
                f"batch; set train.batch_size to at least {self.world} with a last batch "
                f"(n mod batch_size) of 0 or at least {self.world}, or use fewer ranks"
            )

    # ------------------------------------------------------------------------- collectives
    @property
    def _interruptible(self) -> bool:
        """gloo: collectives issued with ``async_op=True`` and waited for in slices. NCCL's
        keep the blocking calls: there a work's ``wait`` makes the CUDA stream wait and the
        host blocks later, at a synchronisation, so slicing the wait is not the same fix (and
        not one to make without a GPU to test it on)."""
        return self.backend == "gloo"

    def collective_abandoned(self) -> bool:
        """Whether this rank stopped waiting for a collective that is still pending: its process
        group cannot be destroyed, nor the interpreter torn down, before the peers end it."""
        return any(not w.is_completed() for w in self._pending)

    def _all_reduce(self, t: Tensor) -> None:
        t0 = time.perf_counter()
        if self._interruptible:
            wait_interruptibly(dist.all_reduce(t, async_op=True), self._pending)
        else:
            dist.all_reduce(t)
        self.reduce_s += time.perf_counter() - t0
        self.reduce_calls += 1

    def _barrier(self) -> None:
        if self._interruptible:
            wait_interruptibly(dist.barrier(async_op=True), self._pending)
        else:
            dist.barrier()

    def reduce_grads(self, params: Sequence[Tensor]) -> None:
        """Replace every parameter's ``.grad`` by the gradient of the global batch: the sum
        over ranks of (shard size / batch size) x the rank's gradient, in one all-reduce."""
        n_local, n_global = self._batch
        if n_global == 0:
            raise RuntimeError("reduce_grads before shard: the shard sizes are unknown")
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads]).mul_(n_local / n_global)
        self._all_reduce(flat)
        for p, g, part in zip(params, grads, flat.split([g.numel() for g in grads]), strict=True):
            g.copy_(part.view_as(g))
            if p.grad is None:
                p.grad = g

    def sums(self, values: Sequence[float]) -> list[float]:
        """The sums over ranks of `values` (float64, one all-reduce)."""
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        self._all_reduce(t)
        return t.tolist()

    def count_sums(self, count: int, known: int | None) -> tuple[int, int | None]:
        """(`count`, `known`) summed over ranks, in one all-reduce; `known` is None (unknown:
        a board that does not report it) when it is None on any rank. For the closed-loop
        programming counts (devices written, devices write-verify gave up on): each rank
        programs its own board, so the job's figures are the sums over its boards."""
        total, part, unknown = self.sums([count, known or 0, known is None])
        return int(total), None if unknown else int(part)

    def accuracy(self, predict: Callable[[Tensor], Tensor], x: Tensor, y: Tensor) -> float:
        """Test accuracy over all of (x, y), each rank predicting its contiguous share."""
        start, stop = self.span(len(x))
        right = (
            int((predict(x[start:stop]).argmax(1).cpu() == y[start:stop].cpu()).sum()) if stop > start else 0
        )
        return self.sums([right])[0] / max(1, len(x))

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank (picklable objects)."""
        if not self._interruptible:
            out: list[Any] = [None] * self.world
            dist.all_gather_object(out, obj)
            return out
        # all_gather_object's two collectives (the sizes, then the padded pickles), each waited
        # for interruptibly
        data = _bytes(obj)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
        wait_interruptibly(dist.all_gather(sizes, torch.tensor([len(data)]), async_op=True), self._pending)
        longest = max(int(n) for n in sizes)
        parts = [torch.empty(longest, dtype=torch.uint8) for _ in range(self.world)]
        mine = torch.zeros(longest, dtype=torch.uint8)
        mine[: len(data)] = data
        wait_interruptibly(dist.all_gather(parts, mine, async_op=True), self._pending)
        return [pickle.loads(p[: int(n)].numpy().tobytes()) for p, n in zip(parts, sizes, strict=True)]

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (e.g. the resume state of rank 0's run log)."""
        if not self._interruptible:
            box = [obj if self.rank == 0 else None]
            dist.broadcast_object_list(box, src=0)
            return box[0]
        data = _bytes(obj) if self.rank == 0 else torch.empty(0, dtype=torch.uint8)
        size = torch.tensor([len(data)])
        wait_interruptibly(dist.broadcast(size, src=0, async_op=True), self._pending)
        if self.rank != 0:
            data = torch.empty(int(size), dtype=torch.uint8)
        wait_interruptibly(dist.broadcast(data, src=0, async_op=True), self._pending)
        return obj if self.rank == 0 else pickle.loads(data.numpy().tobytes())


def _bytes(obj: Any) -> Tensor:
    """`obj` pickled, as a uint8 tensor."""
    return torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)


def _job_store(rank: int, world: int, timeout_s: float) -> dist.Store:
    """The rendezvous store of this attempt of the job.

    torchrun's agent shares one TCP store with its workers for all attempts
    (TORCHELASTIC_USE_AGENT_STORE): the process group of a restarted job would find the
    addresses the killed attempt's ranks published there and fail to connect to them
    ("Gloo connectFullMesh failed ... Connection refused"). So each attempt's keys go under
    its restart count. Without the agent's store (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, the
    setting for multi-host jobs, whose hosts may count restarts differently), rank 0 serves a
    fresh store for every attempt, as ``env://`` does."""
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
        is_master=rank == 0 and not agent, timeout=timedelta(seconds=timeout_s),
    )  # fmt: skip
    if not agent:
        return store
    return dist.PrefixStore(f"hil-attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def rank_config(
    cfg: RunConfig, dp: DataParallel, devices: Sequence[str] = (), calibrations: Sequence[str] = ()
) -> RunConfig:
    """The config rank `dp.rank` trains with: its own board and calibration record.

    `devices` (one URI per rank, in rank order) names real boards; without it, an emulator
    URI is spread over the ranks by seed (rank r: seed + 1000 r), and any other URI, which
    names one physical board, is refused for more than one rank. `calibrations`, when given,
    holds one record per rank."""
    for name, items in (("--rank-device", devices), ("--rank-calibration", calibrations)):
        if items and len(items) != dp.world:
            raise ConfigError(
                f"{name} was given {len(items)} times for {dp.world} ranks: give it once per rank, in "
                "rank order"
            )
    if devices:
        device = devices[dp.rank]
    else:
        scheme, _, options = parse_options(cfg.device)
        if scheme == "emulator":
            device = replace_params(cfg.device, seed=options.seed + RANK_SEED_STRIDE * dp.rank)
        elif dp.world > 1:
            raise ConfigError(
                f"device = {cfg.device!r} names one board, and each of the {dp.world} ranks needs its own: "
                "give --rank-device URI once per rank (and --rank-calibration PATH per rank)"
            )
        else:
            device = cfg.device
    calibration = calibrations[dp.rank] if calibrations else cfg.calibration
    cfg = replace(cfg, device=device, calibration=calibration)
    blocks = list(getattr(cfg, "devices", ()))  # per-block boards of an ff-EBM (docs/multiboard.md)
    if blocks and dp.world > 1:
        spread = []
        for uri in blocks:
            scheme, _, options = parse_options(uri)
            if scheme != "emulator":
                raise ConfigError(
                    f"devices = {blocks}: per-block boards are one set for one rank; data parallel over "
                    "real per-block boards is not supported: use emulator URIs or one board per rank"
                )
            spread.append(replace_params(uri, seed=options.seed + RANK_SEED_STRIDE * dp.rank))
        cfg = replace(cfg, devices=spread)
    return cfg
