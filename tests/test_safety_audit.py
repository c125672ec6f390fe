"""Limit checks that a request could slip past (the safety audit of 2026-12-06): each test
drives the path that bypassed a check and asserts the refusal, its message and the board's
counters."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from drivers.errors import LimitViolation
from drivers.topology import Topology
from drivers.uri import open_device


def test_configure_with_new_shapes_is_checked_like_a_new_network() -> None:
    """The board's same-network shortcut (the couplings object and the group sizes unchanged:
    only gain, budget or mode checked) must not take a topology whose conv maps have other
    (C, H, W) shapes: those give its conv tiles other sizes (here 2305 rows on a board of
    1024), which the shortcut neither checked against the tile limits nor allocated."""
    d = open_device("emulator://?preset=ideal")
    limits = d.info.limits
    t = Topology.convolutional((1, 16, 16), [4], pools=[1])
    d.configure(t)
    t2 = dataclasses.replace(t, shapes={"s0": (256, 1, 1), "s1": (1024, 1, 1)})
    assert t2.couplings is t.couplings and t2.groups == t.groups
    assert t2.tile_shape("W0")[0] > limits.tile_rows_max
    with pytest.raises(LimitViolation, match="tile size"):
        d.configure(t2)
    assert d.safety().refused == 1 and d.safety().violations == 0
    # a reshape within the limits configures the tiles anew: the board's tile has the new shape
    t3 = dataclasses.replace(t, shapes={"s0": (4, 8, 8), "s1": (16, 8, 8)})
    d.configure(t3)
    assert d.board.tile("W0").shape == t3.tile_shape("W0") == (37, 16)
    r, c = t3.tile_shape("W0")
    y = d.mvm("W0", np.full((1, r), 0.5, np.float32))
    assert y.shape == (1, c)
    eq = d.settle({"s0": np.full((2, 256), 0.5, np.float32)})
    assert eq.states["s1"].shape == (2, 1024)
