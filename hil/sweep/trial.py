"""One trial: the spec's base config with the trial's values, trained on one board.

Shared by the in-process executor and the Ray board actors, so a trial is the same
computation wherever it runs.
"""

from __future__ import annotations

import shutil
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hil.sweep.spec import SweepSpec


class BoardLost(Exception):
    """The board stopped answering during a trial (timeout, broken link): the trial is not
    to blame, so it is retried on another board."""


@dataclass(frozen=True)
class TrialJob:
    number: int
    params: dict[str, Any]
    run_dir: Path  # on the driver: <sweep folder>/trials/NNNN


@dataclass
class TrialOutcome:
    number: int
    params: dict[str, Any]
    board: str  # the board that ran it to the end
    metrics: dict[str, float] | None = None  # None: the trial failed (see error)
    error: str | None = None
    seconds: float = 0.0
    lost_on: list[str] = field(default_factory=list)  # boards lost while running this trial


@dataclass(frozen=True)
class TrialEvent:
    """Progress of a sweep, for the command line: a trial started, was moved off a lost
    board, or finished (`outcome`)."""

    kind: Literal["start", "retry", "done"]
    number: int
    board: str
    message: str = ""
    outcome: TrialOutcome | None = None


EventHook = Callable[[TrialEvent], None]


def trial_name(spec: SweepSpec, number: int) -> str:
    return f"{spec.name}-trial-{number:04d}"


def _lost_errors() -> tuple[type[BaseException], ...]:
    from drivers.errors import DeviceTimeout, ProtocolError

    return (DeviceTimeout, ProtocolError, ConnectionError, TimeoutError)


def run_trial(spec: SweepSpec, number: int, params: dict[str, Any], device: str, run_dir: Path) -> dict:
    """Train trial `number` on the board `device` into `run_dir` (replaced if it exists) and
    return the result's metrics. Raises BoardLost when the board stops answering; any other
    exception is the trial's own failure."""
    import torch

    if run_dir.exists():
        shutil.rmtree(run_dir)
    cfg = spec.config_for(params, device, name=trial_name(spec, number))
    threads = torch.get_num_threads()
    if spec.threads:
        torch.set_num_threads(spec.threads)
    try:
        return spec.trainer_def.run(cfg, run_dir)
    except _lost_errors() as exc:
        raise BoardLost(f"{type(exc).__name__}: {exc}") from exc
    finally:
        torch.set_num_threads(threads)


ERROR_FILE = "error.txt"  # a failed trial's full traceback, in its run folder


def trial_folder(number: int) -> str:
    """Trial `number`'s run folder, relative to the sweep folder (`trials/NNNN`)."""
    return f"trials/{number:04d}"


def describe_error(exc: BaseException, run_dir: Path, number: int) -> str:
    """One line for the summary and the progress line: the error, and where its full traceback
    is. The traceback is written to `run_dir`/error.txt (the trial's run folder, which the
    sweep folder holds as trials/NNNN), and the line names that file: the last frame alone was
    an internal file:line (`(__init__.py:365)`) that told a user nothing."""
    where = f"{trial_folder(number)}/{ERROR_FILE}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / ERROR_FILE).write_text("".join(traceback.format_exception(exc)))
    except OSError as write_error:
        where = f"not kept: {run_dir / ERROR_FILE}: {write_error.strerror or write_error}"
    return f"{type(exc).__name__}: {exc} (traceback: {where})"
