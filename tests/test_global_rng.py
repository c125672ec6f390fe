"""The trainers draw only from generators of their own, seeded from the config: a training run
in-process neither sets nor consumes torch's, numpy's or Python's global generator (a user's
notebook, or another test in the same process, draws the same numbers with or without it),
and its result does not depend on their state."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch

from hil.config import apply_dict, load_config
from hil.train_classifier import train_classifier
from hil.vae.config import VAERunConfig
from hil.vae.train import train_vae

SMALL = ["train.epochs=1", "data.limit_train=48", "data.limit_test=24"]


@contextmanager
def global_state(seed: int) -> Iterator[None]:
    """Inside: the global generators seeded with `seed`; checks that the body leaves them as it
    found them; outside, the process's own states (torch's `fork_rng` restores torch's)."""
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        before = torch.random.get_rng_state().clone()
        np_before, py_before = np.random.get_state()[1].copy(), random.getstate()
        yield
        assert torch.equal(torch.random.get_rng_state(), before), "torch's global generator moved"
        assert np.array_equal(np.random.get_state()[1], np_before), "numpy's global generator moved"
        assert random.getstate() == py_before, "Python's global generator moved"
    np.random.set_state(np_state)
    random.setstate(py_state)


def twice(run: Callable[[], Any]) -> tuple[Any, Any]:
    """`run` under two different global states, each left unchanged."""
    with global_state(1):
        a = run()
    with global_state(2):
        b = run()
    return a, b


@pytest.mark.parametrize(
    "sets",
    [
        # dense-layer DHN, random-sign nudges, shifted images
        ["model.sizes=[64,16,10]", "ep.mode=random", "train.shift=1"],
        # two EB blocks with a digital Linear between them
        ["model.kind=ffebm", "model.sizes=[64,16,16,10]", "model.block_layers=1", "model.between=linear"],
        # conv front, batch-norm between blocks, a digital head
        ["model.kind=ffebm", "model.channels=[4,4]", "model.pools=[1,2]", "model.block_layers=1",
         "model.front=4", "model.between=bn", "model.head=digital"],
    ],
    ids=["dhn", "ffebm-linear", "ffebm-conv"],
)  # fmt: skip
def test_classifier_training_leaves_the_global_generators_alone(sets: list[str]) -> None:
    cfg = load_config(None, [*SMALL, *sets])
    a, b = twice(lambda: train_classifier(cfg))
    assert a.test_acc == b.test_acc
    assert [h.train_loss for h in a.history] == [h.train_loss for h in b.history]


@pytest.mark.parametrize("variant", ["f-vae", "tdh-vae"])
def test_vae_training_leaves_the_global_generators_alone(variant: str) -> None:
    cfg = apply_dict(
        VAERunConfig(),
        {
            "model": {"variant": variant},
            "train": {"epochs": 1},
            "data": {"limit_train": 64, "limit_test": 32},
        },
    )
    a, b = twice(lambda: train_vae(cfg, progress=False))
    assert a.final == b.final and a.initial == b.initial


def test_resumed_classifier_leaves_the_global_generators_alone(tmp_path, crash_and_resume) -> None:
    """A resume restores the loop's own generators from the snapshot, not the global ones."""
    cfg = load_config(
        None, ["train.epochs=2", "data.limit_train=48", "data.limit_test=24", "model.sizes=[64,8,10]"]
    )
    with global_state(3):
        crash_and_resume(cfg, tmp_path / "run.zarr")
