"""Suite-wide fixtures. Every emulated board a test opens is checked at the end of the
session: its limit-violation counter (out-of-limit conditions that reached an array)
must still be zero."""

from __future__ import annotations

from collections.abc import Iterator
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
