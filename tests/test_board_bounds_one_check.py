"""The test of a run's settings against what a board declares is one helper,
`hil.config.past_bounds`: a board that opens (`hil.boards.check_within_board`) and `hil sweep`
before its first trial (`hil.sweep.spec.check_within_boards`) each had their own copy of the
comparison (``abs(value) > getattr(limits, bound)``), so a change to one (a tolerance, the ce
loss's product bound) would have let a sweep pass what every trial's board then refused, or
refuse what it would run. Each keeps its own words (tests/test_sweep_board_bounds.py,
tests/test_ep_beta_bounds.py, tests/test_drive_bounds.py)."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest

from drivers import open_device
from hil.boards import check_within_board
from hil.config import ConfigError, past_bounds
from hil.sweep.spec import SpecError, check_within_boards, parse_spec

URI = "emulator://?preset=ideal&seed=0"


def test_past_bounds_names_each_setting_past_its_bound_in_order() -> None:
    limits = SimpleNamespace(max_beta=0.5, max_gain=2.0, max_settle_steps=40)
    within = [
        ("ep.beta", -0.6, "max_beta"),
        ("model.gain", 2.0, "max_gain"),
        ("ep.free_steps", 41, "max_settle_steps"),
    ]
    assert past_bounds(within, limits) == [
        ("ep.beta", -0.6, "max_beta", 0.5),  # a magnitude: a negative beta is bounded too
        ("ep.free_steps", 41, "max_settle_steps", 40),
    ]  # the bound itself is within
    assert past_bounds([], limits) == []


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.50000001, 0.7, 1.0])
def test_a_board_that_opens_and_the_sweep_agree_on_every_value(beta: float) -> None:
    """The same value on the same declared bound: refused by both or by neither."""
    with open_device(URI) as dev:
        limits = replace(dev.info.limits, max_beta=0.5)
        board = SimpleNamespace(info=SimpleNamespace(limits=limits))
        refused_on_open = True
        try:
            check_within_board(board, URI, [("ep.beta", beta, "max_beta")])  # type: ignore[arg-type]
            refused_on_open = False
        except ConfigError as exc:
            assert "ep.beta" in str(exc) and "max_beta 0.5" in str(exc)
    data = {
        "sweep": {"trainer": "classifier", "objective": "val_acc", "n_trials": 1},
        "base": {"device": URI, "ep": {"beta": beta}, "data": {"validation": 30}},
        "space": {"train.seed": {"type": "int", "low": 0, "high": 3}},
    }
    spec = parse_spec(data)
    refused_by_sweep = True
    try:
        check_within_boards(spec, {URI: limits})
        refused_by_sweep = False
    except SpecError as exc:
        assert str(exc).startswith("base.ep.beta: ") and "max_beta 0.5" in str(exc)
    assert refused_on_open == refused_by_sweep == (abs(beta) > 0.5)
