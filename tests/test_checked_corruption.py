"""A checked-mode SCPI request corrupted on the line: the board does not run it, answers the
empty checked response ``0`` and queues -360 (docs/protocol.md, section 2). The host took the
``0`` where a block belongs for a private ``_NotABlock`` and, its tries spent, asked whether the
board was powered and its link connected; it is a noisy line, and the error says so and what to
do about it. One corruption is a transient: the request is resent (with its request id) and runs
once."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from drivers import SettleBudget, Topology, open_device
from drivers.base import Device
from drivers.errors import Corrupted, RetriesExhausted
from emulator.server.faults import FaultPlan
from emulator.server.harness import faulty_board

TOPO = Topology.layered([6, 5, 3], budget=SettleBudget(max_steps=30))
G = np.full((7, 5), 5e-6, np.float32)

OPS: dict[str, Callable[[Device], object]] = {
    "program": lambda dev: dev.program("W0", G, G),  # a block query with a request id
    "wait": lambda dev: dev.wait(0.01),  # a command with a request id (its error check: SYST:ERR?)
    "mvm": lambda dev: dev.mvm("W0", np.full((2, 7), 0.5, np.float32)),  # an idempotent block query
}


def _corrupt_next_byte(plan: FaultPlan) -> None:
    """The next byte through the server, in or out, gets a bit flipped; no other byte does."""
    plan.limit = 1
    plan.ber = 1 / 8  # every byte struck, up to the limit


@pytest.mark.parametrize("op", sorted(OPS))
def test_a_request_the_board_refused_as_corrupted_says_so_and_what_to_do(op: str) -> None:
    with (
        faulty_board(plan=FaultPlan(ber=1e-15, seed=0), timeout=5.0) as served,
        open_device(served.visa_uri.replace("attempts=8", "attempts=1")) as dev,
    ):
        dev.configure(TOPO)
        _corrupt_next_byte(served.plan)
        with pytest.raises(RetriesExhausted) as info:
            OPS[op](dev)
        assert served.plan.summary()["corrupt"] == 1
    text = str(info.value)
    assert isinstance(info.value.last, Corrupted), text
    assert "last cause: Corrupted:" in text and "_NotABlock" not in text
    assert "did not run" in text and "corrupted" in text and "-360" in text
    assert "powered" not in text  # not the power and cabling question of a dead board
    assert "baud=" in text and "attempts=" in text and "cable" in text and "serial://" in text
    assert "\n" not in text  # one line


@pytest.mark.parametrize("op", sorted(OPS))
def test_one_corrupted_request_is_resent_and_runs_once(op: str) -> None:
    with (
        faulty_board(plan=FaultPlan(ber=1e-15, seed=0), timeout=5.0) as served,
        open_device(served.visa_uri) as dev,
    ):
        dev.configure(TOPO)
        before = served.device.meter()
        _corrupt_next_byte(served.plan)
        OPS[op](dev)
        assert served.plan.summary()["corrupt"] == 1
        assert dev.recovery.retries == 1  # type: ignore[attr-defined]
        after = served.device.meter()
    assert before is not None and after is not None
    if op == "mvm":
        assert after.mvm_calls - before.mvm_calls == 1  # ran once
    if op == "wait":
        assert after.clock_s - before.clock_s == pytest.approx(0.01)  # waited once, not twice
