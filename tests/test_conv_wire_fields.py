"""A conv coupling's optional fields sent raw through the real servers (SCPI over TCP, the
framed protocol over a TCP socket): a malformed value is refused on the board, naming the
field, and the board keeps the topology it had and reports no violation; the host's
`Topology` refuses the same values before anything is sent."""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivers import ConfigurationError, Coupling, Topology, open_device
from drivers.base import Device
from drivers.wire import codes
from drivers.wire import payload as pl
from drivers.wire.frames import Flag
from drivers.wire.scpi import block as scpi_block
from emulator.server import FramedServer, ScpiServer
from hil.testing import socket_link
from tests.raw_scpi import RawScpi

BOARD = "emulator://?preset=ideal&seed=0"
KEPT = Topology({"k": 4, "m": 2}, (Coupling("W0", ("k", "bias"), ("m",)),))

# JSON values that are not a pool group's name; the falsy ones (0, false, null, [], {}) once
# passed for "no pool group" on the board and on the host
NOT_A_NAME = st.one_of(
    st.sampled_from([0, False, None, [], {}, 0.0, 1, True, ["g"], {"g": 1}]),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.lists(st.text(max_size=3), max_size=2),
)


def _conv_topology(pool_group: Any) -> dict[str, Any]:
    shapes = {"a": [2, 4, 4], "b": [1, 2, 2]}
    return {
        "groups": {g: c * h * w for g, (c, h, w) in shapes.items()},
        "shapes": shapes,
        "couplings": [
            {
                "tile": "W0",
                "rows": ["a", "bias"],
                "cols": ["b"],
                "kind": "conv",
                "w_max": 1.0,
                "kernel": 3,
                "padding": 1,
                "pool": 2,
                "pool_group": pool_group,
            },
        ],
        "budget": {"max_steps": 2, "tol": 0.0},
    }


@pytest.fixture(scope="module")
def board() -> Iterator[Device]:
    with open_device(BOARD) as dev:
        dev.configure(KEPT)
        yield dev


@pytest.fixture(scope="module")
def scpi_port(board: Device) -> Iterator[int]:
    with ScpiServer(board) as server:  # type: ignore[arg-type]
        yield server.listen_tcp()[1]


@pytest.fixture(scope="module")
def framed_port(board: Device) -> Iterator[int]:
    with FramedServer(board) as server:
        yield server.listen_tcp()[1]


def _still_safe(board: Device, refused: int) -> None:
    """The refused topology changed nothing: the board kept its own, is configured, and no
    request passed a limit."""
    assert board.topology == KEPT
    assert board.status().configured
    safety = board.safety()
    assert safety.violations == 0 and safety.refused >= refused


_SETTINGS = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@_SETTINGS
@given(value=NOT_A_NAME)
def test_scpi_board_refuses_a_pool_group_that_is_not_a_name(
    board: Device, scpi_port: int, value: Any
) -> None:
    before = board.safety().refused
    body = json.dumps(_conv_topology(value)).encode()
    with RawScpi(scpi_port, timeout=10) as raw:
        raw.send(b"CONF:TOP " + scpi_block(body) + b"\n")
        code, text = raw.error()
        assert code == codes.CONFIGURATION and "pool_group is a name" in text, (value, code, text)
        assert "leave the field out" in text
        status = raw.query("SYST:STAT?")
        digits = int(status[1:2])
        assert json.loads(status[2 + digits :])["configured"] is True, status
    _still_safe(board, before)


@_SETTINGS
@given(value=NOT_A_NAME)
def test_framed_board_refuses_a_pool_group_that_is_not_a_name(
    board: Device, framed_port: int, value: Any
) -> None:
    before = board.safety().refused
    body = json.dumps(_conv_topology(value)).encode()
    with socket.create_connection(("127.0.0.1", framed_port), timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = socket_link(sock, ack_timeout=1.0, retries=3)
        seq = link.send(pl.Op.CONFIGURE, struct.pack("<I", len(body)) + body)
        got = link.receive(5.0, response=True, ref=seq)
        assert got is not None, "no reply"
        first, reply = got
        assert first.flags & Flag.ERROR, reply[:200]
        err = pl.loads(reply)
        assert err["code"] == codes.CONFIGURATION and "pool_group is a name" in err["message"], err
        seq = link.send(pl.Op.STATUS, pl.pack(pl.Message()))
        got = link.receive(5.0, response=True, ref=seq)
        assert got is not None and not got[0].flags & Flag.ERROR
        assert pl.board_status(pl.unpack(got[1])).configured
    _still_safe(board, before)


@settings(max_examples=50, deadline=None, derandomize=True)
@given(value=NOT_A_NAME)
def test_host_topology_refuses_a_pool_group_that_is_not_a_name(value: Any) -> None:
    with pytest.raises(ConfigurationError, match="pool_group is a name"):
        pl.topology_from_dict(_conv_topology(value))
