"""Data parallel training on the Ray board pool of `hil sweep` (docs/distributed.md, "Ray").

The ranks of one job are the board actors of a `RayExecutor` (`hil/sweep/ray_runner.py`):
actor r (boards in name order) is rank r and trains on its own board, with the environment
``torchrun`` would give it: ``MASTER_ADDR`` is rank 0's node address and ``MASTER_PORT`` a
port free on that host. Rank 0 writes the run log at `out`, on its own host's file system.

When a rank fails (its actor died, its board stopped answering, any error), the other ranks
would wait in their collectives until the process group's timeout, so every actor of the job
is stopped and, `max_restarts` times, started afresh on the same boards; the new attempt
resumes from rank 0's last snapshot in `out` (as a job restarted by ``torchrun
--max-restarts`` does). `out` must therefore be reachable from rank 0's host on every attempt.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hil.config import RunConfig
from hil.sweep.ray_runner import RayExecutor, import_ray
from hil.sweep.study import SweepError

MAX_RESTARTS = 8  # restarts one job may take


@dataclass(frozen=True)
class RayJobResult:
    """What rank 0 reported at the end of a data parallel job on Ray."""

    test_acc: float
    epochs: int
    run_log: str
    boards: tuple[str, ...]  # rank order
    restarts: int


def endpoint() -> tuple[str, int]:
    """This node's address and a TCP port free on it now (the rendezvous of rank 0)."""
    import ray

    with socket.socket() as s:
        s.bind(("", 0))
        port = int(s.getsockname()[1])
    return ray.util.get_node_ip_address(), port


def run_rank(
    cfg: RunConfig, devices: list[str], rank: int, world: int, master: tuple[str, int], out: str,
    resume: bool, overwrite: bool,
) -> dict[str, Any] | None:  # fmt: skip
    """One rank of the job, in its board actor's process: join the process group, train on
    its board (`rank_config`: `devices[rank]`, or without `devices` cfg.device's emulator
    spread over the ranks by seed, as under torchrun); rank 0 writes the run log `out` (with
    `resume`, continues it from its last snapshot when it has one) and returns the result,
    the other ranks return None."""
    import os

    import torch

    from hil.cli.common import resume_log
    from hil.distributed import DataParallel, rank_config
    from hil.runlog import RunLog
    from hil.train_classifier import train_classifier

    torch.set_num_threads(1)
    # torchrun's environment; the actor process is this rank's alone
    env = {
        "RANK": rank,
        "WORLD_SIZE": world,
        "LOCAL_RANK": 0,
        "MASTER_ADDR": master[0],
        "MASTER_PORT": master[1],
    }
    os.environ.update({k: str(v) for k, v in env.items()})
    dp = DataParallel.from_env(cfg.compute)
    try:
        cfg = rank_config(cfg, dp, devices)
        log, state = None, None
        if rank == 0:
            if resume and (Path(out) / "zarr.json").exists():
                log, state = resume_log(Path(out), cfg.device)
            else:
                log = RunLog.create(out, cfg, kind="train-classifier", name=cfg.name, overwrite=overwrite)
        if log is None:
            train_classifier(cfg, dp=dp)
            reply = None
        else:
            with log:
                res = train_classifier(cfg, log=log, state=state, dp=dp)
            reply = {"test_acc": res.test_acc, "epochs": len(res.history), "run_log": str(log.path)}
    except BaseException:
        dp.close(wait=False)
        raise
    dp.close()
    return reply


def run_data_parallel(
    executor: RayExecutor, cfg: RunConfig, out: Path, *, resume: bool = False, overwrite: bool = False,
    max_restarts: int = 1, start_timeout_s: float = 120.0,
) -> RayJobResult:  # fmt: skip
    """Train `cfg` data parallel over every board of `executor` (one rank per board, in board
    name order; a board without its own URI trains on `cfg.device`) and return rank 0's
    result. `resume`: continue the run log `out` from its last snapshot (else it is created;
    `overwrite` replaces one there). A failed attempt is restarted up to `max_restarts` times
    from rank 0's last snapshot in `out`; then the error says what to rerun. The error names
    the first rank that reported a failure, which may be a peer of the rank that died.
    `start_timeout_s`: how long the actors of an attempt may take to start (a restarted
    actor waits for its board's host)."""
    if not 0 <= max_restarts <= MAX_RESTARTS:
        raise SweepError(f"max_restarts = {max_restarts}: give 0 to {MAX_RESTARTS}")
    ray = import_ray()
    names = sorted(executor.actors)
    uris = [executor.boards[n].uri for n in names]
    devices = [u or cfg.device for u in uris] if any(uris) else []
    errors: list[str] = []
    for attempt in range(max_restarts + 1):
        actors = [executor.actors[n] for n in names]
        probes = [a.endpoint.remote() for a in actors]  # every actor up (a restarted one: placed again)
        _, late = ray.wait(probes, num_returns=len(probes), timeout=start_timeout_s)
        if late:
            missing = ", ".join(names[probes.index(r)] for r in late)
            raise SweepError(
                f"board actors {missing} did not start within {start_timeout_s:.0f} s (is the host of the "
                f"board up, with a free CPU?); the run log {out} keeps rank 0's last snapshot: continue "
                "with run_data_parallel(..., resume=True) or hil train classifier --resume RUN --distributed"
            )
        master = ray.get(probes[0])
        refs = [
            a.run_rank.remote(cfg, devices, r, len(names), master, str(out), resume or attempt > 0, overwrite)
            for r, a in enumerate(actors)
        ]  # fmt: skip
        executor.busy.update(zip(names, refs, strict=True))  # interrupted, not just killed, when stopped
        error = _first_error(ray, refs, names)
        if error is None:
            for name in names:
                executor.busy.pop(name, None)
            reply = ray.get(refs[0])
            return RayJobResult(
                reply["test_acc"], reply["epochs"], reply["run_log"], tuple(names), attempt
            )  # fmt: skip
        errors.append(error)
        # the other ranks wait in their collectives: end the attempt, each rank interrupted first
        # (its board to its safe state) and killed after the executor's grace period
        executor.stop(names)
        ray.wait(refs, num_returns=len(refs), timeout=60)  # every rank's process gone (the run log's writer)
        for name in names:  # fresh actors on the same boards: for the next attempt, or the pool's next job
            executor.restart(name)
    raise SweepError(
        f"the data parallel job failed {len(errors)} time(s) ({'; '.join(errors)}); its run log {out} "
        f"keeps rank 0's last snapshot: rerun with hil train classifier --resume {out} --distributed "
        "under torchrun, or run_data_parallel(..., resume=True) on working boards"
    )


def train_on_ray(
    cfg: RunConfig, address: str, boards: list[str], out: Path, resume: bool, overwrite: bool,
    stop_grace_s: float | None = None,
) -> RayJobResult:  # fmt: skip
    """`hil train classifier --distributed --ray-address ADDRESS --board ...`: the job on the
    board actors of the cluster at `address` (`local`: a Ray instance started here declaring
    `boards`), restarted once from its last snapshot if a rank fails. `stop_grace_s`: the
    executor's (`RayExecutor`; None: its default)."""
    from hil.sweep.ray_runner import Board

    executor = RayExecutor(
        [Board.parse(b) for b in boards], address, default_uri=cfg.device, stop_grace_s=stop_grace_s
    )
    try:
        return run_data_parallel(executor, cfg, out, resume=resume, overwrite=overwrite)
    finally:
        executor.close()


def _first_error(ray: Any, refs: list[Any], names: list[str]) -> str | None:
    """Wait for every rank; at the first one that fails, say which and why (None: all done)."""
    pending = list(refs)
    while pending:
        [ref], pending = ray.wait(pending, num_returns=1)
        try:
            ray.get(ref)
        except Exception as exc:
            cause = str(exc).strip().splitlines()
            return f"rank {refs.index(ref)} on board {names[refs.index(ref)]}: {type(exc).__name__}" + (
                f": {cause[-1]}" if cause else ""
            )
    return None
