"""What the host's framed link says when a board breaks a link-layer rule, and which of the
board's HELLO fields it honours: an emulated board behind a proxy that rewrites its frames
(tests/framed_proxy.py) plays firmware without ACK frames, with replies lacking START, with a
CRC over the payload only, or declaring small buffers."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from drivers import DeviceError, DeviceFault, LimitViolation, RetriesExhausted, Topology, open_device
from drivers.base import Device
from drivers.wire import frames
from drivers.wire import payload as pl
from drivers.wire.frames import Flag, Frame, LinkOp
from drivers.wire.link import Link
from drivers.wire.payload import Message, Op
from hil.testing import BoardServers, served_board
from tests.framed_proxy import FrameProxy, is_hello_reply, payload_crc, with_json

FAST = {"ack_timeout": "0.05", "retries": "2", "attempts": "1", "timeout": "0.5"}


def _query(params: dict[str, str]) -> str:
    return "?" + "&".join(f"{k}={v}" for k, v in params.items())


@pytest.fixture(scope="module")
def board() -> Iterator[BoardServers]:
    with served_board() as servers:
        yield servers


def _framed_port(servers: BoardServers) -> int:
    return int(servers.uris["serial-socket"].rsplit(":", 1)[1])


def _no_piggyback_hello(frame: Frame) -> bytes:
    """Host -> board: the host's HELLO without its piggyback request, so the emulated board
    acknowledges every frame plainly (as firmware without piggybacking does)."""
    if frame.opcode == LinkOp.HELLO and not frame.flags & Flag.RESPONSE:
        frame = with_json(frame, piggyback=False)
    return frames.encode(frame)


def _hello_fields(**fields: object):  # type: ignore[no-untyped-def]
    def rule(frame: Frame) -> bytes:
        return frames.encode(with_json(frame, **fields) if is_hello_reply(frame) else frame)

    return rule


def test_board_without_piggyback_that_acks_every_frame_works_with_fragments(board: BoardServers) -> None:
    port = _framed_port(board)
    with (
        FrameProxy(port, to_board=_no_piggyback_hello) as proxy,
        open_device(proxy.uri + "?fragment=256") as dev,
    ):
        dev.ping(bytes(range(256)) * 8)  # type: ignore[attr-defined]
        assert dev.board_hello["piggyback"] is False  # type: ignore[attr-defined]
        assert dev._link.reply_acks is False  # type: ignore[attr-defined]


def test_board_that_never_acks_is_told_so_not_blamed_on_the_cable(board: BoardServers) -> None:
    """A board whose HELLO says `"piggyback": false` and which sends no ACK frame: the host
    does not take its replies as ACKs, and says why nothing is acknowledged."""
    port = _framed_port(board)

    def no_acks(frame: Frame) -> bytes | None:
        return None if frame.opcode == LinkOp.ACK else frames.encode(frame)

    uri_params = _query({**FAST, "fragment": "256"})
    with (
        FrameProxy(port, to_host=no_acks, to_board=_no_piggyback_hello) as proxy,
        pytest.raises(RetriesExhausted) as info,
        open_device(proxy.uri + uri_params) as dev,
    ):
        dev.ping(bytes(2048))  # type: ignore[attr-defined]
    text = str(info.value)
    assert "the board answers but sends no ACK frame" in text
    assert "MORE fragments included" in text and "rule 1" in text
    assert "is the board connected" not in text and "link connected" not in text


def test_board_max_fragment_is_honoured(board: BoardServers) -> None:
    port = _framed_port(board)
    with FrameProxy(port, to_host=_hello_fields(max_fragment=1024)) as proxy, open_device(proxy.uri) as dev:
        dev.ping(bytes(range(256)) * 20)  # type: ignore[attr-defined]  # 5120 bytes
        dev.configure(Topology.layered([40, 30]))  # a program request of 9600 bytes of arrays
        tile = dev.topology.couplings[0].tile  # type: ignore[union-attr]
        g = np.full(dev.topology.tile_shape(tile), 5e-6, np.float32)  # type: ignore[union-attr]
        dev.program(tile, g, g)
        sizes = [len(f.payload) for f in proxy.host_frames if f.opcode not in (LinkOp.ACK, LinkOp.NACK)]
        assert max(sizes) == 1024
        assert dev._link.fragment == 1024  # type: ignore[attr-defined]


def test_board_max_message_refuses_a_larger_request_on_the_host(board: BoardServers) -> None:
    port = _framed_port(board)
    with FrameProxy(port, to_host=_hello_fields(max_message=4096)) as proxy, open_device(proxy.uri) as dev:
        _configure_small(dev)
        tile = dev.topology.couplings[0].tile  # type: ignore[union-attr]
        n_in = _tile_rows(dev, tile)
        sent = len(proxy.host_frames)
        with pytest.raises(LimitViolation) as info:
            dev.mvm(tile, np.zeros((4096 // (4 * n_in) + 1, n_in), np.float32))
        text = str(info.value)
        assert text.startswith(f"mvm {tile!r}: the request is ")
        assert "4096-byte max_message" in text and "smaller batch" in text
        assert len(proxy.host_frames) == sent  # nothing went out
        assert dev.mvm(tile, np.zeros((2, n_in), np.float32)).shape[0] == 2  # small ones pass


def test_reply_without_start_is_named_as_stale(board: BoardServers) -> None:
    port = _framed_port(board)

    def no_start(frame: Frame) -> bytes:
        if frame.flags & Flag.RESPONSE and frame.opcode >= 0x10:
            frame = frame._replace(flags=frame.flags & ~Flag.START)
        return frames.encode(frame)

    with FrameProxy(port, to_host=no_start) as proxy, pytest.raises(RetriesExhausted) as info:
        open_device(proxy.uri + _query(FAST))
    text = str(info.value)
    assert "frames from the board were dropped as stale" in text
    assert "a response needs the START flag" in text and "low byte of the request's first seq" in text
    assert "link connected" not in text


def test_crc_over_the_payload_only_is_named(board: BoardServers) -> None:
    port = _framed_port(board)
    with FrameProxy(port, to_host=payload_crc) as proxy, pytest.raises(RetriesExhausted) as info:
        open_device(proxy.uri + _query(FAST))
    text = str(info.value)
    assert "frames from the board that failed their CRC" in text
    assert "the CRC covers header + payload: zlib.crc32" in text
    assert "is the board connected" not in text


def test_board_fault_names_the_operation_and_tile(board: BoardServers) -> None:
    """A board's error reply (here to a program request whose array bytes were cut short on
    the way) is raised naming the request it answers."""

    def truncate_program(frame: Frame) -> bytes:
        if frame.opcode == Op.PROGRAM and not frame.flags & Flag.RESPONSE:
            frame = frame._replace(payload=frame.payload[:-4])
        return frames.encode(frame)

    port = _framed_port(board)
    with FrameProxy(port, to_board=truncate_program) as proxy, open_device(proxy.uri) as dev:
        _configure_small(dev)
        tile = dev.topology.couplings[0].tile  # type: ignore[union-attr]
        g = np.full(dev.topology.tile_shape(tile), 5e-6, np.float32)  # type: ignore[union-attr]
        with pytest.raises(DeviceFault) as info:
            dev.program(tile, g, g)
        assert str(info.value).startswith(f"program {tile!r}: device fault {info.value.code}: ")
        # a board's text that already names the request is not prefixed twice
        wrong = np.full((2, 2), 5e-6, np.float32)
        with pytest.raises(DeviceError) as info2:
            dev.send_unchecked(Op.PROGRAM, pl.program_request(tile, wrong, wrong, False, None, 10))  # type: ignore[attr-defined]
        assert not str(info2.value).startswith(f"program {tile!r}: program")


def test_duplicate_filter_hands_up_a_fresh_frame_that_reuses_the_last_seq() -> None:
    """A board that restarted numbers its frames from its start again: a new frame with the
    seq of the last one accepted is not a retransmission unless it repeats it."""
    sent: list[bytes] = []
    link = Link(lambda timeout: b"", sent.append)
    first = Frame(0x10, 0, int(Flag.RESPONSE | Flag.START), b"one", 7)
    link._handle(first)
    link._handle(first)  # a retransmission: acknowledged again, dropped
    fresh = Frame(0x1C, 0, int(Flag.RESPONSE | Flag.START), b"two", 9)
    link._handle(fresh)
    assert [f.payload for f in link._inbox] == [b"one", b"two"]
    assert link.stats.duplicates == 1


# -- helpers


def _configure_small(dev: Device) -> None:
    dev.configure(Topology.layered([8, 4]))


def _tile_rows(dev: Device, tile: str) -> int:
    return dev.topology.tile_shape(tile)[0]  # type: ignore[union-attr]


def test_a_null_request_id_is_refused_not_run_without_a_record(board: BoardServers) -> None:
    with open_device(board.uri("serial-socket")) as dev:
        with pytest.raises(DeviceFault) as info:
            dev.send_unchecked(Op.WAIT, Message({"seconds": 0.0, "rid": None}))  # type: ignore[attr-defined]
        assert info.value.code == -224
        assert str(info.value).startswith("wait: device fault -224: ")
