"""Suite-wide fixtures. Every emulated board a test opens is checked at the end of the
session: its limit-violation counter (out-of-limit conditions that reached an array)
must still be zero."""

from __future__ import annotations

import dataclasses
import re
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

# a test module that defines one of these fixtures shares it between its tests
_SHARED_FIXTURE = re.compile(r"""@pytest\.fixture\([^)]*scope=["'](?:class|module|package)["']""")


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Under ``-n`` (pytest-xdist's default ``--dist load``): the tests of a module that defines
    a module- or class-scoped fixture go to one worker as one unit, so the fixture (six
    calibration sessions, a torchrun job, a Ray cluster, a trained run the tests inspect) is
    built once, not once on each worker that draws one of its tests; every other test is
    handed out one by one as before. Units go out largest first (pytest-xdist's loadscope
    order), the single tests last, so the two workers still end together. Another ``--dist``
    asked for explicitly is left alone. (``--dist loadgroup`` with ``xdist_group`` marks would
    say the same, but pytest-xdist 3.8 renames the test ids for it through an attribute pytest
    9 no longer reads, so the marks group nothing.)

    A/B on the whole fast suite (`-m "not slow" -n 2`, 2258 tests, 2 shared vCPUs, 2026-12-07
    UTC): with the hook 597 s (08:20) and 490 s (08:48), without it 588 s (08:30) and 491 s
    (08:40): no difference the machine's noise lets one see; it stays for the fixtures it
    builds once (a torchrun job, six calibration sessions), not for the suite's wall time."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    grouped = {
        f"{path.relative_to(config.rootpath).as_posix()}"
        for path in (config.rootpath / "tests").glob("test_*.py")
        if _SHARED_FIXTURE.search(path.read_text(encoding="utf-8"))
    }

    class SharedFixtureScheduling(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if module in grouped else nodeid

    return SharedFixtureScheduling(config, log)


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
