"""The embedded executor: every trial in this process, one after another, on one board."""

from __future__ import annotations

import time
from collections.abc import Iterator

from hil.sweep.spec import SweepSpec
from hil.sweep.trial import (
    BoardLost,
    EventHook,
    TrialEvent,
    TrialJob,
    TrialOutcome,
    describe_error,
    run_trial,
)


class LocalExecutor:
    """Runs trials here on the board `uri` (None: each trial's base config `device`).

    With one board there is nowhere to retry a trial whose board stopped answering, so such
    a trial fails like any other and the sweep goes on to the next."""

    def __init__(self, uri: str | None = None, name: str = "local") -> None:
        self.uri = uri
        self.name = name

    def describe(self) -> str:
        return f"in this process on {self.uri or 'the base config device'}"

    def run(self, spec: SweepSpec, jobs: list[TrialJob], on_event: EventHook) -> Iterator[TrialOutcome]:
        device = self.uri or spec.base["device"]
        for job in jobs:
            on_event(TrialEvent("start", job.number, self.name))
            t0 = time.perf_counter()
            outcome = TrialOutcome(job.number, job.params, self.name)
            try:
                outcome.metrics = run_trial(spec, job.number, job.params, device, job.run_dir)
            except BoardLost as exc:
                outcome.error = f"board lost: {exc}"
                outcome.lost_on.append(self.name)
            except Exception as exc:
                outcome.error = describe_error(exc, job.run_dir, job.number)
            outcome.seconds = time.perf_counter() - t0
            yield outcome

    def close(self) -> None:
        """Nothing held between trials: each trial opens and closes its board."""
