"""`benchmarks/mvm_only.py` runs each part with the node curve docs/bringup.md states for its
figures, and each JSON line says which: the accuracy table with the hard sigmoid, the wire
counts and the epoch times with the classifier's default soft sigmoid. The script's comment
said all its figures were of the hard sigmoid, and its lines named no curve. Training is
replaced by a stub that records each run's configuration: no run is measured here."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

import benchmarks.mvm_only as bench
from hil.config import AUTO_ACTIVATION, RunConfig, model_activation


@pytest.fixture
def runs(monkeypatch: pytest.MonkeyPatch) -> list[RunConfig]:
    ran: list[RunConfig] = []

    def train(cfg: RunConfig, *, opener: Callable[[str], Any] | None = None, **_: object) -> Any:
        ran.append(cfg)
        if opener is not None:
            opener(cfg.device)
        stats = SimpleNamespace(per_step=2, per_settle=1)
        history = [SimpleNamespace(seconds=1.0, free_steps=3.0, nudge_steps=2.0)]
        block = SimpleNamespace(host_settle=SimpleNamespace(stats=stats))
        return SimpleNamespace(test_acc=0.9, history=history, model=SimpleNamespace(block=block))

    @contextlib.contextmanager
    def served(seed: int) -> Iterator[str]:
        yield "serial+socket://127.0.0.1:1"

    monkeypatch.setattr(bench, "train_classifier", train)
    monkeypatch.setattr(bench, "served_board", served)
    monkeypatch.setattr(bench, "open_device", lambda uri: SimpleNamespace(info=None))
    monkeypatch.setattr(bench, "CallCounter", lambda d: SimpleNamespace(calls={"mvm": 10}))
    monkeypatch.setattr(bench, "load_dataset", lambda name: SimpleNamespace(x_train=np.zeros((32, 64))))
    return ran


def test_each_part_runs_and_names_the_curve_of_its_figures_in_docs_bringup(runs: list[RunConfig]) -> None:
    rows = [bench.accuracy("rram", True, 1, 1), bench.wire_calls(), bench.epoch_times(1)]
    assert [r.get("activation") for r in rows] == ["hard_sigmoid", "soft_sigmoid:0.1", "soft_sigmoid:0.1"]
    assert [model_activation(c.model) for c in runs] == ["hard_sigmoid", *["soft_sigmoid:0.1"] * 3]
    assert AUTO_ACTIVATION["dhn"] == bench.SOFT  # the classifier's default, as the doc says
