"""Reassembly of a fragmented message (docs/protocol.md section 3, rule 4: consecutive seqs,
same opcode, a START resets reassembly), driven frame by frame through the real framed
server over TCP: a PING's fragments sent missing, duplicated, swapped, interleaved with the
fragments of an older message (a stale request) or of another `ref`. The board echoes a
PING's payload, so what it reassembled comes back: it must be the message as sent or
nothing, never a splice (on a PROGRAM request a splice is a conductance map nobody sent)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivers import open_device
from drivers.wire import frames
from drivers.wire.frames import Flag, Frame, LinkOp
from emulator.server import FramedServer
from hil.testing import socket_link

BOARD = "emulator://?preset=ideal&seed=0"
PING = int(LinkOp.PING)
START, MORE = int(Flag.START), int(Flag.MORE)


@pytest.fixture(scope="module")
def framed_port() -> Iterator[int]:
    with open_device(BOARD) as board, FramedServer(board) as server:
        yield server.listen_tcp()[1]


def _message(payload: bytes, size: int, seq0: int, ref: int = 0) -> list[Frame]:
    parts = frames.fragments(payload, size)
    last = len(parts) - 1
    return [
        Frame(PING, (seq0 + k) % frames.SEQ_MOD, (START if k == 0 else 0) | (MORE if k < last else 0), p, ref)
        for k, p in enumerate(parts)
    ]


def _echoes(port: int, sent: list[Frame], sentinel_seq: int) -> list[bytes]:
    """Send `sent` raw, then a one-frame PING `sentinel`: every PING payload the board echoed
    before the sentinel's echo."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        link = socket_link(sock, seq0=sentinel_seq)
        for f in sent:
            sock.sendall(frames.encode(f))
        link.send(PING, b"sentinel")
        echoed: list[bytes] = []
        while True:
            got = link.receive(3.0, response=True, opcode=PING)
            assert got is not None, "the board stopped answering PING"
            if got[1] == b"sentinel":
                return echoed
            echoed.append(got[1])


def _shuffle(order: list[int], draw: st.DrawFn, n: int) -> list[int]:
    kind = draw(st.sampled_from(["drop", "swap", "repeat", "move"]))
    i = draw(st.integers(1, n - 1))  # the START stays first: the board has a message to build
    j = draw(st.integers(1, n - 1).filter(lambda j: j != i))
    out = list(order)
    if kind == "drop":
        del out[i]
    elif kind == "swap":
        out[i], out[j] = out[j], out[i]
    elif kind == "repeat":  # an earlier fragment again, later (not straight after itself)
        a, b = min(i, j), max(i, j)
        out.insert(b + 1, a)
    else:
        out.insert(j, out.pop(i))
    return out


@st.composite
def garbled(draw: st.DrawFn) -> tuple[bytes, list[Frame], int]:
    """A payload, the frames of its message with one fault, and a free seq for the sentinel."""
    size = draw(st.integers(1, 6))
    payload = draw(st.binary(min_size=2 * size + 1, max_size=8 * size))
    seq0 = draw(st.integers(0, frames.SEQ_MOD - 1))
    msg = _message(payload, size, seq0)
    n = len(msg)
    fault = draw(st.sampled_from(["order", "stale", "ref"]))
    if fault == "order":
        sent = [msg[k] for k in _shuffle(list(range(n)), draw, n)]
    elif fault == "stale":  # a fragment of an older request (the seqs before this one's) in between
        old = _message(draw(st.binary(min_size=2 * size, max_size=4 * size)), size, seq0 - 2 * n - 8)
        k = draw(st.integers(1, len(old) - 1))
        sent = list(msg)
        sent.insert(draw(st.integers(1, n - 1)), old[k])
    else:  # one continuation carries another request's ref (it answers something else)
        k = draw(st.integers(1, n - 1))
        ref = draw(st.integers(1, 255))
        foreign = msg[k]._replace(ref=ref, payload=draw(st.binary(min_size=1, max_size=size)))
        sent = [*msg[:k], foreign, *msg[k:]]
    return payload, sent, (seq0 + n + 10) % frames.SEQ_MOD


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=garbled())
def test_a_garbled_fragment_sequence_is_never_spliced_into_a_message(
    framed_port: int, case: tuple[bytes, list[Frame], int]
) -> None:
    payload, sent, sentinel_seq = case
    echoed = _echoes(framed_port, sent, sentinel_seq)
    assert all(e == payload for e in echoed), (payload, echoed)


def test_the_fragments_in_order_are_reassembled(framed_port: int) -> None:
    payload = bytes(range(40))
    assert _echoes(framed_port, _message(payload, 3, 65530), 100) == [payload]  # the seqs wrap past 65535


def _fixed(fault: str) -> list[Frame]:
    msg = _message(b"ABCDEFGHIJKL", 3, 500)  # ABC DEF GHI JKL: seqs 500 to 503
    old = _message(b"xyzuvw", 3, 490)  # an older request's: seqs 490, 491
    return {
        "missing": [msg[0], msg[1], msg[3]],
        "swapped": [msg[0], msg[2], msg[1], msg[3]],
        "repeated": [msg[0], msg[1], msg[2], msg[1], msg[3]],
        "stale": [msg[0], old[1], *msg[1:]],
        "other ref": [msg[0], msg[1]._replace(ref=7, payload=b"!!!"), *msg[1:]],
    }[fault]


@pytest.mark.parametrize("fault", ["missing", "swapped", "repeated", "stale", "other ref"])
def test_each_kind_of_garbled_sequence_is_refused(framed_port: int, fault: str) -> None:
    assert all(e == b"ABCDEFGHIJKL" for e in _echoes(framed_port, _fixed(fault), 600))
