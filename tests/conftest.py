"""Suite-wide fixtures. Every emulated board a test opens is checked at the end of the
session: its limit-violation counter (out-of-limit conditions that reached an array)
must still be zero."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import drivers.emulated as emulated

# One intra-op thread: the tests use small matrices, and several threads (a server thread beside
# the client) each asking for two OpenMP workers on two cores stall for milliseconds per op.
torch.set_num_threads(1)

_boards: list[emulated.Board] = []


@pytest.fixture(autouse=True, scope="session")
def _track_boards() -> Iterator[None]:
    original = emulated.EmulatedDevice.__init__

    def tracking_init(self: emulated.EmulatedDevice, board: emulated.Board, **kw: Any) -> None:
        original(self, board, **kw)
        _boards.append(board)

    emulated.EmulatedDevice.__init__ = tracking_init  # type: ignore[method-assign]
    yield
    emulated.EmulatedDevice.__init__ = original  # type: ignore[method-assign]
    bad = [(b.preset.name, b.seed, b.safety.violations) for b in _boards if b.safety.violations]
    assert not bad, f"limit violations reached the array on boards {bad}"


@pytest.fixture(scope="module")
def digits() -> tuple[Any, Any]:
    """24 scikit-learn digits (8 x 8) and their one-hot labels, numpy float32, for the checks of
    small networks on the host-iterated settle (a module may define its own `digits`)."""
    from hil.data import load_digits

    ds = load_digits()
    return ds.x_train[:24].numpy(), torch.nn.functional.one_hot(ds.y_train[:24], 10).float().numpy()


@pytest.fixture
def crash_and_resume() -> Callable[[Any, Path], Any]:
    """`run(cfg, path)`: train the classifier `cfg` with a run log at `path`, let it die after
    its first epoch's snapshot, resume it from the run log and return the resumed run's
    result (a `TrainResult`)."""
    from hil.runlog import RunLog, open_for_resume
    from hil.train_classifier import train_classifier

    class Crash(RuntimeError):
        """The simulated failure after the first epoch."""

    def crash(stats: Any) -> None:
        raise Crash("simulated crash after epoch 1")

    def run(cfg: Any, path: Path) -> Any:
        # a snapshot at every epoch (the default waits 10 s between them), so the crash after
        # the first epoch leaves one to resume from
        cfg = dataclasses.replace(cfg, log=dataclasses.replace(cfg.log, snapshot_every_s=0.0))
        with pytest.raises(Crash), RunLog.create(path, cfg) as log:
            train_classifier(cfg, log=log, on_epoch=crash)
        log, state = open_for_resume(path)
        assert state is not None
        with log:
            return train_classifier(cfg, log=log, state=state)

    return run
