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
Running the same folder again continues the sweep up to `n_trials` (trials left running by a
killed sweep are marked failed).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from hil.sweep.spec import SweepSpec
from hil.sweep.trainers import RUN_LOG
from hil.sweep.trial import EventHook, TrialEvent, TrialJob, TrialOutcome

STORAGE = "optuna.db"
SPEC = "spec.json"


class SweepError(RuntimeError):
    """The sweep cannot go on (a folder holding another sweep, no board left, ...)."""


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

    out = claim_folder(spec, out)
    hook: EventHook = on_event or (lambda _: None)
    study = optuna.create_study(
        study_name=spec.name,
        storage=f"sqlite:///{out / STORAGE}",
        direction=spec.direction,
        sampler=spec.make_sampler(),
        load_if_exists=True,
    )
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)  # left running by a killed sweep
    if spec.start_at_base and not study.trials:
        study.enqueue_trial(spec.base_params())  # trial 0: the base config itself
    while (k := min(spec.batch, spec.n_trials - len(study.trials))) > 0:
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
                hook(TrialEvent("done", outcome.number, outcome.board, outcome=outcome))
        finally:
            for number in sorted(outcomes):
                _tell(study, asked[number], outcomes[number], spec, out)
            write_summary(out, spec, records(study))
    trials = records(study)
    return SweepResult(out, spec, trials, best_of(spec, trials))


def claim_folder(spec: SweepSpec, out: str | Path) -> Path:
    """Record the spec in the sweep folder `out` (made if missing), or check that the sweep
    already there is the same one (n_trials aside); returns the folder's absolute path."""
    out = Path(out).resolve()
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
