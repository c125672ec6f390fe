"""`hil conformance` keeps its nudged settle within the nudge the board declares.

The safety audit: the conformance run's "settle nudged" check nudged with beta 0.5 whatever
the board declared; on a board of max_beta 0.01 the host refused it (LimitViolation) and the
board, which only declared a narrower nudge, was reported FAIL. The check now nudges with the
board's max_beta where it is below 0.5 and, where such a nudge moves the group by less than
its noise, checks the nudged fixed point without requiring the move. Served over TCP
(pyvisa-py SCPI).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from typer.testing import CliRunner

from hil.cli import app
from hil.testing import BoardServers


def test_a_board_of_a_small_max_beta_passes_the_nudged_settle_within_it(
    emulated_board: Callable[..., BoardServers],
) -> None:
    served = emulated_board("emulator://?preset=rram&seed=0&max_beta=0.01")
    res = CliRunner().invoke(app, ["conformance", served.uri("visa-tcp"), "--limit-probes"])
    line = next(s for s in res.output.splitlines() if "settle nudged" in s)
    assert line.startswith("PASS"), line
    assert "beta 0.01 " in line and "exceeded" not in line
    assert res.exit_code == 0, res.output
    assert served.device.safety().violations == 0


@pytest.mark.parametrize("transport", ["visa-tcp", "serial-socket"])
@pytest.mark.parametrize("bound", ["max_w_max=0.5", "max_gain=0.5"])
def test_a_board_of_a_narrower_weight_scale_or_gain_is_checked_within_it(
    emulated_board: Callable[..., BoardServers], transport: str, bound: str
) -> None:
    """Every network the checks configured had w_max 1 and gain 1: on a board declaring
    max_w_max 0.5 (or max_gain 0.5) the host refused the configure checks ('w_max of W0
    exceeded: requested 1, limit 0.5') and the run stopped after six checks, three FAILs of a
    board that only declared a narrower scale. The checks now configure at the board's bound."""
    served = emulated_board(f"emulator://?preset=rram&seed=0&{bound}")
    res = CliRunner().invoke(app, ["conformance", served.uri(transport), "--limit-probes"])
    assert res.exit_code == 0, res.output
    assert "exceeded" not in "\n".join(s for s in res.output.splitlines() if s.startswith("FAIL"))
    assert re.search(r"\b\d+ passed, 0 failed", res.output), res.output
    assert served.device.safety().violations == 0
