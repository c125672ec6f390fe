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

Stopping an actor that runs a trial or a rank (`RayExecutor.stop`: the executor closed, the
driver interrupted, a rank's peers ended) interrupts its task as Ctrl-C would, so the board
goes to its safe state and the run log is closed as interrupted, waits `stop_grace_s` for that
and only then kills the actor (`interruptible` says how). A worker that receives SIGTERM (its
node shutting down) likewise stops its task as on Ctrl-C first, then exits as Ray's own
SIGTERM handler makes it.

Ray is optional: this module imports it only when an executor is made.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import socket
import tarfile
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
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
STOP_GRACE_S = 5.0  # how long a stopped actor's trial or rank may take to make its board safe
STOP_GRACE_MAX_S = 300.0
_ACTOR_TITLE = b"ray::BoardActor"  # how Ray titles a board actor's worker process (its cmdline)


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


class _FirstInterrupt:
    """The SIGINT handler inside `interruptible`: the first SIGINT is Ctrl-C, later ones are
    ignored, so that a second one (the terminal's Ctrl-C, then the executor's interrupt) does
    not cut the clean-up the first one started."""

    def __call__(self, signum: int, frame: object) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt


@contextmanager
def interruptible() -> Iterator[None]:
    """Around a board actor's task: SIGINT interrupts it as Ctrl-C does, and SIGTERM is taken
    as Ctrl-C (`hil.cli.common.TermAsInterrupt`), so the board goes to its safe state and the
    run log is closed as interrupted. Outside the main thread it does nothing.

    Why a signal, and why this way (found with Ray 2.x; tests/test_sweep.py checks it):
    `ray.cancel` does not interrupt a running task of a regular actor (the task runs to its
    end and is then reported cancelled). A second concurrency group with an `interrupt`
    method does not work either: an actor that declares concurrency groups runs its default
    group's tasks in a worker thread, not the main thread, where no signal reaches them and
    where the drivers cannot defer Ctrl-C until a board transaction is complete. A regular
    actor runs its tasks in the worker process's main thread, but Ray blocks SIGINT there
    (`pthread_sigmask`), so a SIGINT sent to the process stays pending. Inside this block
    SIGINT is unblocked, so the SIGINT that `RayExecutor.stop` sends to the worker, from a
    zero-CPU task on the actor's node, raises KeyboardInterrupt in the task (one that came
    before the task began, while SIGINT was blocked, as the block is entered).

    Ray's own SIGTERM handler raises SystemExit wherever the task is: the trial's clean-up
    runs, but a board transaction in flight is cut (the drivers defer SIGINT, not SystemExit),
    which can leave the link broken and the safe state unsent. Inside this block SIGTERM is
    taken as Ctrl-C instead, and once the task's clean-up is done the SIGTERM is raised again
    under Ray's handler, so the worker exits as Ray meant it to (the driver sees the actor
    died, and moves the trial on)."""
    from hil.cli.common import TermAsInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    term = TermAsInterrupt()
    before_int = signal.signal(signal.SIGINT, _FirstInterrupt())
    before_term = signal.signal(signal.SIGTERM, term)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # one pending: raised here
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        signal.signal(signal.SIGINT, before_int)
        signal.signal(signal.SIGTERM, before_term)
        if term.received:
            signal.raise_signal(signal.SIGTERM)  # now Ray's: the worker exits


def _interrupt_worker(pid: int) -> bool:
    """SIGINT to the board actor's worker process `pid` on this node (run there as a Ray
    task); False if that process is gone or is no longer a board actor's."""
    cmdline = Path(f"/proc/{pid}/cmdline")
    try:
        if cmdline.exists() and not cmdline.read_bytes().startswith(_ACTOR_TITLE):
            return False
        os.kill(pid, signal.SIGINT)
    except (ProcessLookupError, PermissionError, FileNotFoundError):
        return False
    return True


class BoardActor:
    """The Ray actor that owns one board (wrapped by `ray.remote` in `RayExecutor`)."""

    def __init__(self, name: str, uri: str | None) -> None:
        self.name = name
        self.uri = uri

    def where(self, default_uri: str | None) -> dict[str, Any]:
        """Where the actor runs, whether its board opens (`error`: why not) and what it
        declares (`limits`, its `drivers.Limits`, and `uri`: the driver checks the sweep's
        space against them before any trial). Also loads torch, so that the first trial's
        time is its own."""
        import ray
        import torch  # noqa: F401

        uri = self.uri or default_uri
        error, limits = self._probe(uri) if uri else (None, None)
        return {
            "board": self.name,
            "host": socket.gethostname(),
            "node": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "error": error,
            "uri": uri,
            "limits": limits,
        }

    def ident(self) -> tuple[str, int]:
        """The node this actor runs on and its worker's process id (to interrupt it)."""
        import ray

        return ray.get_runtime_context().get_node_id(), os.getpid()

    def endpoint(self) -> tuple[str, int]:
        """This host's address and a free port: the rendezvous when this actor is rank 0 of a
        data parallel job (`hil.distributed_ray`)."""
        from hil.distributed_ray import endpoint

        return endpoint()

    def run_rank(self, *args: Any) -> dict[str, Any] | None:
        """One rank of a data parallel job on this actor's board (`hil.distributed_ray.run_rank`)."""
        from hil.distributed_ray import run_rank

        with interruptible():
            return run_rank(*args)

    @staticmethod
    def _probe(uri: str) -> tuple[str | None, Any]:
        """(None, its declared limits) if the board at `uri` opens (and closes) now, else (why
        not, None)."""
        from drivers import open_device

        try:
            dev = open_device(uri)
            limits = dev.info.limits
            dev.close()
        except Exception as exc:
            return f"cannot open {uri}: {type(exc).__name__}: {exc}", None
        return None, limits

    def run(self, spec: SweepSpec, number: int, params: dict[str, Any]) -> dict[str, Any]:
        """Run one trial; returns its status (ok | failed | lost), metrics or error, seconds
        and the run folder as a tar archive. A board that no longer opens is lost, not the
        trial's fault."""
        with interruptible():
            return self._run(spec, number, params)

    def _run(self, spec: SweepSpec, number: int, params: dict[str, Any]) -> dict[str, Any]:
        uri = self.uri or spec.base["device"]
        reply: dict[str, Any] = {"status": "ok", "metrics": None, "error": None, "archive": b""}
        if (error := self._probe(uri)[0]) is not None:
            return {**reply, "status": "lost", "error": error}
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="xbar-trial-") as tmp:
            run_dir = Path(tmp) / "trial"
            try:
                reply["metrics"] = run_trial(spec, number, params, uri, run_dir)
            except BoardLost as exc:
                reply.update(status="lost", error=str(exc))
            except Exception as exc:
                reply.update(status="failed", error=describe_error(exc, run_dir, number))
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
    boards down, and would otherwise take every board of the cluster with it.
    `stop_grace_s`: how long an actor stopped while it runs a trial or a rank (`stop`) is
    given to make its board safe before it is killed (0 to STOP_GRACE_MAX_S; 0: killed at
    once, its board left as it was; None: STOP_GRACE_S)."""

    def __init__(
        self,
        boards: list[Board] | None = None,
        address: str | None = None,
        *,
        default_uri: str | None = None,
        cpus_per_board: float = 1.0,
        ready_timeout_s: float = 120.0,
        max_board_losses: int = 2,
        stop_grace_s: float | None = None,
    ) -> None:
        if max_board_losses < 1:
            raise SweepError(f"max_board_losses must be >= 1, got {max_board_losses}")
        stop_grace_s = STOP_GRACE_S if stop_grace_s is None else stop_grace_s
        if not 0.0 <= stop_grace_s <= STOP_GRACE_MAX_S:  # NaN too
            raise SweepError(f"stop_grace_s must be within [0, {STOP_GRACE_MAX_S:g}] s, got {stop_grace_s}")
        self.max_board_losses = max_board_losses
        self.stop_grace_s = float(stop_grace_s)
        self.actors: dict[str, Any] = {}
        self.busy: dict[str, Any] = {}  # board -> the ref of the trial or rank its actor runs
        self._idents: dict[str, Any] = {}  # board -> the ref of its actor's (node id, pid)
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
                if address == "auto" and isinstance(exc, ConnectionError):
                    # Ray's own words name its `ray` CLI's --address flag, which hil does not take
                    raise SweepError(
                        "--ray-address auto: no Ray cluster runs on this machine (and RAY_ADDRESS names "
                        "none); start one (ray start --head, its nodes declaring their boards: "
                        "docs/sweep.md), give a head on another host as --ray-address HOST:PORT, or run "
                        "Ray in this process with --ray-address local --board NAME=URI"
                    ) from None
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
        for b in boards:
            self.actors[b.name] = self._actor(ray, b)
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
        # what each board that opened declares, by URI (`hil.sweep.spec.check_within_boards`)
        self.limits: dict[str, Any] = {
            f"{p['uri']} (board {n})": p["limits"]
            for n, p in self.placement.items()
            if n in self.actors and p.get("limits") is not None
        }

    def _actor(self, ray: Any, board: Board) -> Any:
        remote = ray.remote(BoardActor)
        actor = remote.options(resources={board.resource: 1}, num_cpus=self._cpus, max_restarts=0).remote(
            board.name, board.uri
        )
        self._idents[board.name] = actor.ident.remote()  # its first task: known before any trial
        return actor

    def restart(self, name: str) -> None:
        """Replace the actor of board `name` by a fresh one (the old one stopped, if alive: `stop`)."""
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
                self.busy[name] = self.actors[name].run.remote(spec, job.number, job.params)
                running[self.busy[name]] = (job, name)
                on_event(TrialEvent("start", job.number, name))
            if not running:
                left = ", ".join(str(j.number) for j in queue)
                raise SweepError(f"every board was lost; trials {left} did not run")
            [ref], _ = ray.wait(list(running), num_returns=1)
            job, name = running.pop(ref)
            self.busy.pop(name, None)
            try:
                reply = ray.get(ref)
            except RayActorError as exc:
                reply = {"status": "lost", "error": f"actor died: {type(exc).__name__}"}
            except Exception as exc:  # a task error outside the trial (e.g. pickling)
                error = describe_error(exc, job.run_dir, job.number)
                reply = {"status": "failed", "error": error, "metrics": None}
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
        self.stop([name])

    def stop(self, names: Iterable[str]) -> None:
        """Stop the actors of boards `names` (leaving the pool): those running a trial or a
        rank (`busy`) are interrupted as by Ctrl-C (`interruptible`), so their boards go to
        their safe state, and given `stop_grace_s` for it together; then every one is killed.
        An interrupt for a worker on another host is sent by a task there, which waits for a
        worker process to start (seconds): the grace period starts once it is sent, and the
        sending gets as long at most."""
        ray = import_ray()
        names = [n for n in names if n in self.actors]
        refs = {n: self.busy.pop(n) for n in names if n in self.busy}
        running = [n for n in refs if not ray.wait([refs[n]], timeout=0)[0]]
        if running and self.stop_grace_s > 0:
            sent = self._interrupt(ray, running)
            ray.wait(sent, num_returns=len(sent), timeout=self.stop_grace_s)
            ray.wait([refs[n] for n in running], num_returns=len(running), timeout=self.stop_grace_s)
        for name in names:
            ray.kill(self.actors.pop(name))
            self._idents.pop(name, None)

    def _interrupt(self, ray: Any, names: list[str]) -> list[Any]:
        """Send SIGINT to the worker processes of the actors of `names`: from here to those on
        this driver's node, from a zero-CPU task on its node to every other (the refs of those
        tasks are returned). An actor whose process is not known yet is running nothing."""
        from ray.util.client import ray as client
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = None if client.is_connected() else ray.get_runtime_context().get_node_id()
        send = ray.remote(num_cpus=0, max_retries=0)(_interrupt_worker)
        idents = [self._idents[n] for n in names if n in self._idents]
        ready, _ = ray.wait(idents, num_returns=len(idents), timeout=min(1.0, self.stop_grace_s))
        sent = []
        for ident in ready:
            try:
                node, pid = ray.get(ident)
            except Exception:  # the actor died before it answered
                continue
            if node == here:
                _interrupt_worker(pid)
            else:
                strategy = NodeAffinitySchedulingStrategy(node, soft=False)
                sent.append(send.options(scheduling_strategy=strategy).remote(pid))
        return sent

    def close(self) -> None:
        """Stop every actor (`stop`: a trial or rank running is interrupted first), then Ray
        if this executor started it."""
        ray = import_ray()
        if ray.is_initialized():
            self.stop(list(self.actors))
        if self._owns_ray:
            ray.shutdown()
