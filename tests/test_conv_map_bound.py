"""The pre-pooling maps a settle holds are bounded like its states: a conv tile of C_out
channels at P positions holds ``batch x C_out x P`` values before its pooling, up to 64 times
the destination's nodes, which the bound on a settle's states (`MAX_SETTLE_VALUES`, batch x
nodes) counts. A settle past it is refused on the host and on the board (through the real SCPI
and framed servers), naming the tile and how many samples fit, and the board stays configured
with nothing counted as a violation; hil's EB blocks settle such a batch in chunks that fit."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from drivers import Coupling, LimitViolation, SettleBudget, Topology, open_device
from drivers.base import Device
from drivers.checks import MAX_SETTLE_VALUES, check_settle, settle_samples_most
from drivers.topology import MAX_NODES
from drivers.wire import codes
from drivers.wire import payload as pl
from drivers.wire.frames import Flag
from drivers.wire.scpi import SETTLE_Q, short_form
from drivers.wire.scpi import block as scpi_block
from emulator.server import FramedServer, ScpiServer
from hil.testing import socket_link
from tests.raw_scpi import RawScpi

BUDGET = SettleBudget(max_steps=1, tol=0.0)


def _pooled(c_out: int, pool: int = 8, side: int = 64) -> Topology:
    """A clamped 1 x side x side map through a 1 x 1 kernel into c_out channels, pooled."""
    out = side // pool
    return Topology(
        {"s0": side * side, "s1": c_out * out * out},
        (Coupling("W0", ("s0", "bias"), ("s1",), "conv", 1.0, 1, 0, pool),),
        shapes={"s0": (1, side, side), "s1": (c_out, out, out)},
        budget=BUDGET,
    )


WIDE = _pooled(1024)  # 69 632 nodes, 4 194 304 pre-pooling values per sample
BATCH = 17  # 1.2 M states (the state bound: 963 samples), 71 M pre-pooling values


@pytest.fixture(scope="module")
def board() -> Iterator[Device]:
    with open_device("emulator://?preset=rram&seed=0") as dev:
        dev.configure(WIDE)
        yield dev


def _clamp(batch: int = BATCH) -> dict[str, np.ndarray]:
    return {"s0": np.full((batch, 64 * 64), 0.5, np.float32)}


def test_the_host_refuses_a_settle_past_the_pre_pooling_bound(board: Device) -> None:
    assert BATCH * sum(WIDE.groups.values()) < MAX_SETTLE_VALUES < BATCH * 1024 * 64 * 64
    with pytest.raises(LimitViolation, match=r"pre-pooling values of conv tile 'W0'.*chunks of at most 16"):
        check_settle(WIDE, board.info.limits, _clamp(), None, None)
    assert settle_samples_most(WIDE) == 16
    check_settle(WIDE, board.info.limits, _clamp(16), None, None)  # what fits is not refused


def _after_refusal(board: Device, refused: int) -> None:
    assert board.topology == WIDE and board.status().configured
    safety = board.safety()
    assert safety.violations == 0 and safety.refused == refused + 1


def test_the_scpi_board_refuses_it(board: Device) -> None:
    before = board.safety().refused
    msg = pl.settle_request(_clamp(), {}, {}, False)
    with ScpiServer(board) as server, RawScpi(server.listen_tcp()[1], timeout=30) as raw:  # type: ignore[arg-type]
        meta, data = pl.meta_json(msg), pl.pack_arrays(msg.arrays)
        raw.send(short_form(SETTLE_Q).encode() + b" " + scpi_block(meta) + b"," + scpi_block(data) + b"\n")
        assert raw.line() == b"#10"  # a failed block query
        code, text = raw.error()
        assert code == codes.DATA_OUT_OF_RANGE and "pre-pooling values of conv tile 'W0'" in text, text
        assert "chunks of at most 16" in text
        status = raw.query("SYST:STAT?")
        assert json.loads(status[2 + int(status[1:2]) :])["configured"] is True
    _after_refusal(board, before)


def test_the_framed_board_refuses_it(board: Device) -> None:
    before = board.safety().refused
    with (
        FramedServer(board) as server,
        socket.create_connection(("127.0.0.1", server.listen_tcp()[1]), timeout=5) as sock,
    ):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = socket_link(sock, ack_timeout=1.0, retries=3)
        seq = link.send(pl.Op.SETTLE, pl.pack(pl.settle_request(_clamp(), {}, {}, False)))
        got = link.receive(30.0, response=True, ref=seq)
        assert got is not None and got[0].flags & Flag.ERROR
        err = pl.loads(got[1])
        assert err["code"] == codes.DATA_OUT_OF_RANGE and "pre-pooling values" in err["message"], err
    _after_refusal(board, before)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    c_out=st.integers(1, 1024),
    pool=st.sampled_from([1, 2, 4, 8]),
    batch=st.integers(1, 1024),
)
def test_the_bound_is_the_product_in_python_integers(c_out: int, pool: int, batch: int) -> None:
    """Refused exactly when the states or the pre-pooling maps pass the bound, and
    `settle_samples_most` is the largest batch that is not."""
    assume(4096 + c_out * (64 // pool) ** 2 <= MAX_NODES)
    t = _pooled(c_out, pool)
    limits = open_device("emulator://?preset=ideal&seed=0").info.limits
    over = max(batch * sum(t.groups.values()), batch * c_out * 64 * 64) > MAX_SETTLE_VALUES
    most = settle_samples_most(t)
    assert (batch > most) == over
    x = {"s0": np.zeros((batch, 64 * 64), np.float32)}
    if over:
        with pytest.raises(LimitViolation, match=f"chunks of at most {most} "):
            check_settle(t, limits, x, None, None, copy=False)
    else:
        check_settle(t, limits, x, None, None, copy=False)
