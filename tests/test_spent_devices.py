"""Spent devices (at the declared pulse endurance): one rule, said the same everywhere. A pulse
names a count for every device, so one that asks a spent device for a pulse is refused whole
(-222, nothing applied) and its error says how to go on (that device at 0, or a program); a
pulse that gives the spent device 0 runs; a program skips spent devices and counts them in its
report's `spent`. Through the framed server over TCP and the SCPI server over pyvisa-py TCP;
`hil info`'s help says the same (it said a program of such a tile is refused)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from typer.testing import CliRunner

from drivers import Topology, open_device
from drivers.errors import LimitViolation
from hil.testing import BoardServers

BOARD = "emulator://?preset=ideal&seed=0&pulse_endurance=10"


@pytest.mark.parametrize("transport", ["serial-socket", "visa-tcp"])
def test_a_spent_device_refuses_a_pulse_whole_and_a_program_skips_it(
    emulated_board: Callable[..., BoardServers], transport: str
) -> None:
    servers = emulated_board(BOARD)
    with open_device(servers.uri(transport)) as dev:
        dev.configure(Topology.layered([2, 2]))
        zero = np.zeros((3, 2), np.int32)
        spend = zero.copy()
        spend[0, 0] = 10
        servers.device.pulse("W0", spend, zero)  # G+ (0, 0) spent by another host: the board's count
        g_before = servers.device.read_conductance("W0")
        refused = servers.device.safety().refused
        more = zero.copy()
        more[0, 0] = more[1, 1] = 1
        with pytest.raises(LimitViolation, match=r"give it 0 \(spent: a program skips it\)") as err:
            dev.pulse("W0", more, zero)
        assert str(err.value).endswith("or use another tile or board")  # whole, also over SCPI
        assert servers.device.safety().refused == refused + 1  # the board's own refusal
        for a, b in zip(g_before, servers.device.read_conductance("W0"), strict=True):
            np.testing.assert_array_equal(a, b)  # nothing applied
        more[0, 0] = 0
        assert dev.pulse("W0", more, zero).pulses == 1  # the spent device at 0: the rest runs
        g = np.full((3, 2), 5e-6, np.float32)
        report = dev.program("W0", g, g)
        assert report.spent == 1  # skipped, counted, not refused
        assert dev.wear().tiles["W0"].spent == 1  # type: ignore[union-attr]
        dev.pulse("W0", more, zero)  # G+ (1, 1): 2 pulses sent by this session
        nine = zero.copy()
        nine[1, 1] = 9
        with pytest.raises(LimitViolation, match=r"this session's pulses.*give it at most 8,"):
            dev.pulse("W0", nine, zero)  # the host's own check: nothing sent


def test_hil_info_says_what_a_spent_device_does() -> None:
    from hil.cli import app

    text = " ".join(CliRunner().invoke(app, ["info", "--help"], terminal_width=200).output.split())
    assert "is then refused" not in text
    assert "a program of the tile still runs" in text
