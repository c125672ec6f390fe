"""The sweep driver: an Optuna study in the sweep's folder, asked and told in rounds.

Folder layout (``--out``)::

    spec.json          the resolved spec (base config included); a continued sweep must match it
    optuna.db          the Optuna study (SQLite), readable with optuna or optuna-dashboard
    trials/NNNN/       trial NNNN's run folder; its run log is trials/NNNN/run.zarr
    summary.json       every trial (state, value, params, board, run log, error) and the best
    trials.csv         the same, one row per trial

Each round asks `spec.batch` trials, hands them to the executor (which may run them in any
order, on any board), and tells the results in trial-number order once the round is over:
the sampler's history, and so the trials it proposes, does not depend on the executor.
Running the same folder again continues the sweep up to `n_trials`. A trial's outcome is kept
as soon as it finishes, so one that finished before a sweep was killed is told then; one
that was interrupted is failed as such, its parameters run again, and it does not count
towards `n_trials`. One sweep at a time runs in a folder (`FolderLock`).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from hil.processes import other_process_alive, this_process
from hil.sweep.spec import SweepSpec
from hil.sweep.trainers import RUN_LOG
from hil.sweep.trial import EventHook, TrialEvent, TrialJob, TrialOutcome

STORAGE = "optuna.db"
SPEC = "spec.json"


class SweepError(RuntimeError):
    """The sweep cannot go on (a folder holding another sweep, no board left, ...)."""


class FolderInUse(SweepError):
    """Another sweep runs in the folder (`FolderLock`)."""


class Executor(Protocol):
    """Runs the trials of one round on its boards; yields each outcome as it finishes."""

    def describe(self) -> str: ...

    def run(self, spec: SweepSpec, jobs: list[TrialJob], on_event: EventHook) -> Iterator[TrialOutcome]: ...

    def close(self) -> None: ...


@dataclass
class TrialRecord:
    number: int
    state: str  # COMPLETE | FAIL | RUNNING ...
    value: float | None
    params: dict[str, Any]
    board: str = ""
    run_log: str = ""  # relative to the sweep folder
    seconds: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    lost_on: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass
class SweepResult:
    out: Path
    spec: SweepSpec
    trials: list[TrialRecord]
    best: TrialRecord | None

    @property
    def best_run_log(self) -> Path | None:
        return self.out / self.best.run_log if self.best is not None and self.best.run_log else None


def run_sweep(
    spec: SweepSpec, out: str | Path, executor: Executor, *, on_event: EventHook | None = None
) -> SweepResult:
    """Run (or continue) the sweep `spec` in the folder `out` on `executor`."""
    import optuna

    folder = Path(out).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    with FolderLock(folder):
        out = claim_folder(spec, folder)
        hook: EventHook = on_event or (lambda _: None)
        study = optuna.create_study(
            study_name=spec.name,
            storage=f"sqlite:///{out / STORAGE}",
            direction=spec.direction,
            sampler=spec.make_sampler(),
            load_if_exists=True,
        )
        _settle_left_running(study, spec, out)
        if spec.start_at_base and not study.trials:
            study.enqueue_trial(spec.base_params())  # trial 0: the base config itself
        while (k := min(spec.batch, spec.n_trials - _counted(study))) > 0:
            asked: dict[int, optuna.trial.Trial] = {}
            jobs = []
            for _ in range(k):
                trial = study.ask()
                params = {p.key: p.suggest(trial) for p in spec.space}
                asked[trial.number] = trial
                jobs.append(TrialJob(trial.number, params, out / "trials" / f"{trial.number:04d}"))
            outcomes: dict[int, TrialOutcome] = {}
            try:
                for outcome in executor.run(spec, jobs, hook):
                    outcomes[outcome.number] = outcome
                    # kept at once: a sweep killed before the round ends still has it
                    asked[outcome.number].set_user_attr(FINISHED, asdict(outcome))
                    hook(TrialEvent("done", outcome.number, outcome.board, outcome=outcome))
            finally:
                for number in sorted(outcomes):
                    _tell(study, asked[number], outcomes[number], spec, out)
                write_summary(out, spec, records(study))
        trials = records(study)
        return SweepResult(out, spec, trials, best_of(spec, trials))


FINISHED = "finished"  # a trial's user attribute: its outcome, kept as soon as it finished
INTERRUPTED = "interrupted"  # ... and on a trial the sweep was stopped in the middle of


def _settle_left_running(study: Any, spec: SweepSpec, out: Path) -> None:
    """Trials a killed or interrupted sweep left running: one that had finished is told its
    kept outcome; one that had not is failed as interrupted, its parameters queued to run
    again, and it does not count towards `n_trials` (`_counted`)."""
    import optuna

    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        trial = optuna.trial.Trial(study, t._trial_id)  # a live handle on the stored trial
        kept = t.user_attrs.get(FINISHED)
        if kept is not None:
            _tell(study, trial, TrialOutcome(**kept), spec, out)
            continue
        trial.set_user_attr(INTERRUPTED, True)
        trial.set_user_attr(
            "error", "interrupted: the sweep stopped while it ran; its parameters run again as a new trial"
        )
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(dict(t.params))


def trials_done(out: Path) -> int:
    """Trials of the sweep in folder `out` that count towards `n_trials`, from its summary (0:
    none yet)."""
    try:
        trials = json.loads((out / "summary.json").read_text())["trials"]
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    return sum(not str(t.get("error") or "").startswith("interrupted") for t in trials)


def _counted(study: Any) -> int:
    """Trials that count towards `n_trials`: all but those a stopped sweep interrupted, and
    those queued to run (an interrupted trial's parameters, which count once they ran)."""
    import optuna

    waiting = optuna.trial.TrialState.WAITING
    return sum(
        not t.user_attrs.get(INTERRUPTED) and t.state != waiting for t in study.get_trials(deepcopy=False)
    )


class FolderLock:
    """One sweep at a time in a folder: ``sweep.lock`` holds the running sweep's process id
    and host; a second sweep on the same folder is refused while that process lives."""

    def __init__(self, out: Path) -> None:
        self.path = out / "sweep.lock"

    def check(self) -> None:
        """Raise `FolderInUse` if a live process on this host holds the folder."""
        try:
            held = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        pid = other_process_alive(held)
        if pid is not None:
            raise FolderInUse(
                f"{self.path.parent} is in use by the sweep of process {pid} on this host; wait "
                "for it to end (or stop it), or pick another --out"
            )

    def __enter__(self) -> FolderLock:
        self.check()
        self.path.write_text(json.dumps(this_process()))
        return self

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)


def claim_folder(spec: SweepSpec, out: str | Path) -> Path:
    """Record the spec in the sweep folder `out` (made if missing), or check that the sweep
    already there is the same one (n_trials aside); returns the folder's absolute path."""
    out = Path(out).resolve()
    FolderLock(out).check()  # a running sweep's spec is not rewritten under it
    path = out / SPEC
    mine = spec.to_dict()
    if path.exists():
        theirs = json.loads(path.read_text())
        keys = (mine.keys() | theirs.keys()) - {"n_trials"}
        diff = sorted(k for k in keys if mine.get(k) != theirs.get(k))
        if diff:
            raise SweepError(
                f"{out} holds another sweep (it differs in {', '.join(diff)}); pick another --out"
            )
    elif (out / STORAGE).exists() or (out / "trials").exists():
        raise SweepError(f"{out} holds files of an unknown sweep; pick another --out")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(mine, indent=2) + "\n")
    return out


def _tell(study: Any, trial: Any, outcome: TrialOutcome, spec: SweepSpec, out: Path) -> None:
    import optuna

    run_log = out / "trials" / f"{outcome.number:04d}" / RUN_LOG
    trial.set_user_attr("board", outcome.board)
    trial.set_user_attr("run_log", str(run_log.relative_to(out)) if run_log.exists() else "")
    trial.set_user_attr("seconds", round(outcome.seconds, 3))
    trial.set_user_attr("metrics", outcome.metrics or {})
    trial.set_user_attr("lost_on", outcome.lost_on)
    value = (outcome.metrics or {}).get(spec.objective)
    if value is None or not math.isfinite(value):
        trial.set_user_attr("error", outcome.error or f"objective {spec.objective} is {value}")
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    else:
        study.tell(trial, float(value))


def records(study: Any) -> list[TrialRecord]:
    out = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        out.append(
            TrialRecord(
                number=t.number,
                state=t.state.name,
                value=t.value,
                params=dict(t.params),
                board=a.get("board", ""),
                run_log=a.get("run_log", ""),
                seconds=a.get("seconds", 0.0),
                metrics=a.get("metrics", {}),
                lost_on=a.get("lost_on", []),
                error=a.get("error"),
            )
        )
    return out


def best_of(spec: SweepSpec, trials: list[TrialRecord]) -> TrialRecord | None:
    """The best complete trial; ties go to the lowest trial number."""
    done = [t for t in trials if t.state == "COMPLETE" and t.value is not None]
    if not done:
        return None
    sign = -1.0 if spec.direction == "maximize" else 1.0
    return min(done, key=lambda t: (sign * t.value, t.number))  # type: ignore[operator]


def write_summary(out: Path, spec: SweepSpec, trials: list[TrialRecord]) -> None:
    best = best_of(spec, trials)
    summary = {
        "name": spec.name,
        "trainer": spec.trainer,
        "objective": spec.objective,
        "direction": spec.direction,
        "best": asdict(best) if best else None,
        "trials": [asdict(t) for t in trials],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    keys = [p.key for p in spec.space]
    with (out / "trials.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["number", "state", spec.objective, *keys, "board", "seconds", "run_log", "error"])
        for t in trials:
            w.writerow([t.number, t.state, t.value, *(t.params.get(k) for k in keys), t.board,
                        t.seconds, t.run_log, t.error or ""])  # fmt: skip
