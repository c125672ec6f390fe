"""Scale-out on Ray: one actor per board, pinned to the host the board is attached to.

A board is a custom Ray resource, ``board:<name>``, declared by the node of the host it is
plugged into (``ray start --address HEAD --resources='{"board:rram0": 1}'``). Its actor asks
for that one unit, so Ray places it on that host and never two actors on one board. An
actor opens its board afresh for every trial (as `hil train` does), trains into a local
temporary folder and sends the run folder back as a tar archive, so no shared file system
is needed. A trial whose actor dies (the host went down, the actor was killed) or whose board
stops answering goes back to the queue and runs on another board; the lost board leaves the
pool for the rest of the sweep. The same actors can instead be the ranks of one data parallel
training (`BoardActor.run_rank`, driven by `hil.distributed_ray.run_data_parallel`).

Ray is optional: this module imports it only when an executor is made.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import socket
import tarfile
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hil.sweep.spec import SweepSpec
from hil.sweep.study import SweepError
from hil.sweep.trial import (
    BoardLost,
    EventHook,
    TrialEvent,
    TrialJob,
    TrialOutcome,
    describe_error,
    run_trial,
)

RESOURCE_PREFIX = "board:"
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise SweepError("scale-out needs Ray, which is not installed: pip install 'xbar-hil[ray]'") from None
    return ray


@dataclass(frozen=True)
class Board:
    """A board of the cluster: its resource name and the URI its host opens it by (None: the
    base config's `device`, e.g. the same serial port on every host)."""

    name: str
    uri: str | None = None

    @property
    def resource(self) -> str:
        return RESOURCE_PREFIX + self.name

    @staticmethod
    def parse(text: str) -> Board:
        """``NAME=URI``, ``NAME`` (the base config's device) or ``URI`` (named b0, b1, ... by
        the caller)."""
        head, sep, rest = text.partition("=")
        if sep and _NAME.match(head) and "://" in rest:
            return Board(head, rest)
        if "://" in text:
            return Board("", text)
        if _NAME.match(text):
            return Board(text)
        raise SweepError(f"--board {text!r}: give NAME=URI, NAME or URI (NAME: letters, digits, _.-)")


def name_boards(boards: list[Board]) -> list[Board]:
    """Name the unnamed boards b0, b1, ... (by position); names must be unique."""
    named = [b if b.name else Board(f"b{i}", b.uri) for i, b in enumerate(boards)]
    seen: set[str] = set()
    for b in named:
        if b.name in seen:
            raise SweepError(f"--board {b.name}: named twice")
        seen.add(b.name)
    return named


class BoardActor:
    """The Ray actor that owns one board (wrapped by `ray.remote` in `RayExecutor`)."""

    def __init__(self, name: str, uri: str | None) -> None:
        self.name = name
        self.uri = uri

    def where(self, default_uri: str | None) -> dict[str, Any]:
        """Where the actor runs, and whether its board opens (`error`: why not). Also loads
        torch, so that the first trial's time is its own."""
        import ray
        import torch  # noqa: F401

        return {
            "board": self.name,
            "host": socket.gethostname(),
            "node": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "error": self._probe(uri) if (uri := self.uri or default_uri) else None,
        }

    def endpoint(self) -> tuple[str, int]:
        """This host's address and a free port: the rendezvous when this actor is rank 0 of a
        data parallel job (`hil.distributed_ray`)."""
        from hil.distributed_ray import endpoint

        return endpoint()

    def run_rank(self, *args: Any) -> dict[str, Any] | None:
        """One rank of a data parallel job on this actor's board (`hil.distributed_ray.run_rank`)."""
        from hil.distributed_ray import run_rank

        return run_rank(*args)

    @staticmethod
    def _probe(uri: str) -> str | None:
        """None if the board at `uri` opens (and closes) now, else why not."""
        from drivers import open_device

        try:
            open_device(uri).close()
        except Exception as exc:
            return f"cannot open {uri}: {type(exc).__name__}: {exc}"
        return None

    def run(self, spec: SweepSpec, number: int, params: dict[str, Any]) -> dict[str, Any]:
        """Run one trial; returns its status (ok | failed | lost), metrics or error, seconds
        and the run folder as a tar archive. A board that no longer opens is lost, not the
        trial's fault."""
        uri = self.uri or spec.base["device"]
        reply: dict[str, Any] = {"status": "ok", "metrics": None, "error": None, "archive": b""}
        if (error := self._probe(uri)) is not None:
            return {**reply, "status": "lost", "error": error}
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="xbar-trial-") as tmp:
            run_dir = Path(tmp) / "trial"
            try:
                reply["metrics"] = run_trial(spec, number, params, uri, run_dir)
            except BoardLost as exc:
                reply.update(status="lost", error=str(exc))
            except Exception as exc:
                reply.update(status="failed", error=describe_error(exc))
            reply["seconds"] = time.perf_counter() - t0
            if run_dir.exists():
                reply["archive"] = _pack(run_dir)
        return reply


def _check_reachable(address: str) -> None:
    """Fail in seconds on a HOST:PORT (or ray://HOST:PORT) that nothing listens on: Ray itself
    retries for minutes before it gives up."""
    m = re.fullmatch(r"(?:ray://)?\[?([^\]]+?)\]?:(\d+)", address)
    if m is None:
        return  # "auto" and the like: Ray finds the address itself
    try:
        socket.create_connection((m[1], int(m[2])), timeout=5).close()
    except OSError as exc:
        raise SweepError(
            f"--ray-address {address}: nothing answers there ({exc}); is the head node up?"
        ) from None


def _pack(folder: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:  # zarr chunks are compressed already
        tar.add(folder, arcname=".")
    return buf.getvalue()


def _unpack(data: bytes, folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        tar.extractall(folder, filter="data")


class RayExecutor:
    """Runs each round's trials on the cluster's boards, one trial per board at a time.

    `address`: the cluster to join (``auto``, ``ray://host:10001``, ``host:6379``), or
    ``local`` to start a one-machine Ray instance declaring `boards`; when Ray is already
    initialised in this process (as in the tests) it is used as it is. `boards`: the boards to
    use; by default every ``board:<name>`` resource of the cluster. A board without its own URI
    is opened by the trial's base config `device`. Each actor opens its board once at start
    (boards without a URI: `default_uri`, if given, e.g. the spec's base device); boards that do
    not open are left out (`unavailable`).
    `ready_timeout_s`: how long the actors may take to start. `max_board_losses`: a trial
    that has lost this many boards (its actor died or its board stopped answering each time)
    is reported failed instead of being moved on: such a trial may itself be what brings
    boards down, and would otherwise take every board of the cluster with it."""

    def __init__(
        self,
        boards: list[Board] | None = None,
        address: str | None = None,
        *,
        default_uri: str | None = None,
        cpus_per_board: float = 1.0,
        ready_timeout_s: float = 120.0,
        max_board_losses: int = 2,
    ) -> None:
        if max_board_losses < 1:
            raise SweepError(f"max_board_losses must be >= 1, got {max_board_losses}")
        self.max_board_losses = max_board_losses
        ray = import_ray()
        boards = name_boards(boards or [])
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            local = address == "local"
            if address and not local:
                _check_reachable(address)
            try:
                ray.init(
                    address=None if local else address,
                    resources={b.resource: 1 for b in boards} if local else None,
                    include_dashboard=False if local else None,
                    log_to_driver=False,
                )
            except Exception as exc:
                raise SweepError(f"cannot start or join Ray at {address!r}: {exc}") from None
        try:
            self._start(ray, boards, default_uri, cpus_per_board, ready_timeout_s)
        except BaseException:
            self.close()
            raise

    def _start(
        self, ray: Any, boards: list[Board], default_uri: str | None, cpus: float, timeout_s: float
    ) -> None:
        resources = ray.cluster_resources()
        declared = sorted(k.removeprefix(RESOURCE_PREFIX) for k in resources if k.startswith(RESOURCE_PREFIX))
        if not boards:
            if not declared:
                raise SweepError(
                    "the Ray cluster declares no boards; start each board's node with "
                    "ray start ... --resources='{\"board:NAME\": 1}' (docs/sweep.md)"
                )
            boards = [Board(n) for n in declared]
        for b in boards:
            if b.resource not in resources:
                raise SweepError(
                    f"board {b.name!r}: no node of the Ray cluster declares the resource {b.resource!r} "
                    f"(declared: {', '.join(declared) or 'none'}); start the node it is attached to with "
                    f"ray start ... --resources='{{\"{b.resource}\": 1}}'"
                )
        self.boards = {b.name: b for b in boards}
        self._cpus = cpus
        self.actors: dict[str, Any] = {b.name: self._actor(ray, b) for b in boards}
        refs = {self.actors[n].where.remote(default_uri): n for n in self.actors}
        ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        if pending:
            late = ", ".join(sorted(refs[r] for r in pending))
            raise SweepError(
                f"board actors {late} did not start within {timeout_s:.0f} s (free CPUs on their hosts?)"
            )
        self.placement: dict[str, dict[str, Any]] = {refs[r]: ray.get(r) for r in ready}
        self.unavailable = {n: p["error"] for n, p in self.placement.items() if p["error"]}
        for name in self.unavailable:
            self._drop(ray, name)
        if not self.actors:
            raise SweepError(f"no board opens: {'; '.join(self.unavailable.values())}")

    def _actor(self, ray: Any, board: Board) -> Any:
        remote = ray.remote(BoardActor)
        return remote.options(resources={board.resource: 1}, num_cpus=self._cpus, max_restarts=0).remote(
            board.name, board.uri
        )

    def restart(self, name: str) -> None:
        """Replace the actor of board `name` by a fresh one (the old one killed, if alive)."""
        ray = import_ray()
        self._drop(ray, name)
        self.actors[name] = self._actor(ray, self.boards[name])

    def describe(self) -> str:
        where = ", ".join(f"{n}@{self.placement[n]['host']}" for n in sorted(self.actors))
        text = f"on Ray, boards {where}"
        if self.unavailable:
            text += " (left out, not opening: " + "; ".join(self.unavailable.values()) + ")"
        return text

    def run(self, spec: SweepSpec, jobs: list[TrialJob], on_event: EventHook) -> Iterator[TrialOutcome]:
        ray = import_ray()
        from ray.exceptions import RayActorError

        queue = deque(jobs)
        lost: dict[int, list[str]] = {job.number: [] for job in jobs}
        idle = deque(sorted(self.actors))
        running: dict[Any, tuple[TrialJob, str]] = {}
        while queue or running:
            while queue and idle:
                job, name = queue.popleft(), idle.popleft()
                running[self.actors[name].run.remote(spec, job.number, job.params)] = (job, name)
                on_event(TrialEvent("start", job.number, name))
            if not running:
                left = ", ".join(str(j.number) for j in queue)
                raise SweepError(f"every board was lost; trials {left} did not run")
            [ref], _ = ray.wait(list(running), num_returns=1)
            job, name = running.pop(ref)
            try:
                reply = ray.get(ref)
            except RayActorError as exc:
                reply = {"status": "lost", "error": f"actor died: {type(exc).__name__}"}
            except Exception as exc:  # a task error outside the trial (e.g. pickling)
                reply = {"status": "failed", "error": describe_error(exc), "metrics": None}
            if reply["status"] == "lost":
                self._drop(ray, name)
                lost[job.number].append(name)
                if len(lost[job.number]) < self.max_board_losses:
                    queue.appendleft(job)
                    on_event(TrialEvent("retry", job.number, name, message=str(reply["error"])))
                    continue
                error = (
                    f"lost its board on {len(lost[job.number])} board(s) ({', '.join(lost[job.number])}), "
                    f"the last time: {reply['error']}; not moved on again (max_board_losses)"
                )
                yield TrialOutcome(job.number, job.params, name, error=error, lost_on=lost[job.number])
                continue
            idle.append(name)
            if reply.get("archive"):
                _unpack(reply["archive"], job.run_dir)
            yield TrialOutcome(
                job.number, job.params, name, metrics=reply.get("metrics"), error=reply.get("error"),
                seconds=float(reply.get("seconds", 0.0)), lost_on=lost[job.number],
            )  # fmt: skip

    def _drop(self, ray: Any, name: str) -> None:
        actor = self.actors.pop(name, None)
        if actor is not None:
            ray.kill(actor)

    def close(self) -> None:
        ray = import_ray()
        if ray.is_initialized():
            for name in list(getattr(self, "actors", {})):
                self._drop(ray, name)
        if self._owns_ray:
            ray.shutdown()
