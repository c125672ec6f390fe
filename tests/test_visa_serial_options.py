"""VISA serial (ASRL) resources take their line settings from the URI (the instrument audit:
``?baud=`` was an unknown parameter and the session stayed at pyvisa-py's 9600)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import pytest

from drivers import DeviceError, Topology, open_device
from hil.testing import BoardServers, FaultPlan

BOARD = "emulator://?preset=ideal"


def test_a_visa_serial_resource_takes_its_line_rate(board_servers: BoardServers) -> None:
    """``visa://ASRL...?baud=N`` sets the session's line rate; on a TCP resource it is refused."""
    from drivers.errors import ConfigurationError

    with open_device(board_servers.uri("visa-asrl", baud="115200")) as dev:
        assert dev._res.baud_rate == 115200  # type: ignore[attr-defined]
        dev.safety()
    with pytest.raises(ConfigurationError, match="baud= is the line rate of a serial"):
        open_device(board_servers.uri("visa-tcp", baud="115200"))
    with pytest.raises(ConfigurationError, match="baud"):
        open_device(board_servers.uri("visa-asrl", baud="0"))


def test_a_visa_serial_resource_is_checked_unless_told_otherwise(
    emulated_board: Callable[..., BoardServers],
) -> None:
    """A serial line has no integrity check of its own (TCP has its checksums): an ASRL
    session runs in checked mode (a CRC-32 on every message and reply) unless the URI says
    ``check=0``. Unchecked, a bit flipped on the line reached the board as another number
    (the board ran another product, or the host took a garbled reply for data)."""
    topo = Topology.layered([6, 5, 3])
    x = np.linspace(0, 1, 14, dtype=np.float32).reshape(2, 7)
    with open_device(f"{BOARD}&seed=3") as ref:
        ref.configure(topo)
        want = ref.mvm("W0", x).tobytes()
    s = emulated_board(f"{BOARD}&seed=3", plan=FaultPlan(ber=2e-4, seed=11))
    plain = s.uris["visa-asrl"].partition("?")[0]  # the resource as a user writes it: no check=
    with open_device(plain + "?timeout=2&attempts=6") as dev:
        dev.configure(topo)
        got = 0
        for _ in range(60):
            with contextlib.suppress(DeviceError):  # detected and given up on: never wrong data
                y = dev.mvm("W0", x)
                assert y.tobytes() == want, "a corrupted product was taken for the board's"
                got += 1
        assert got >= 30
        assert dev.check  # type: ignore[attr-defined]
        s.plan.ber = 0.0  # a quiet line for the close (its safe state)
    assert s.plan.summary()["corrupt"] > 20, s.plan.summary()  # the line did flip bits
    with open_device(s.uri("visa-asrl", check="0")) as dev:  # said so: unchecked
        assert not dev.check  # type: ignore[attr-defined]
    with open_device(s.uri("visa-tcp", check="0")) as dev:
        assert not dev.check  # type: ignore[attr-defined]
