"""What the host's framed link can prove about a request it gave up on: a message whose last
fragment never went out (the link gave up on an earlier fragment, NACKed every time) cannot
have run on the board, which hands a message up only at its last fragment (docs/protocol.md
section 3, rule 4); RetriesExhausted says it did not run. A single-frame request, or a last
fragment, that was NACKed on every copy may still have run: NACK(0xFFFF) names no frame, and
a copy the board accepted may have had its ACK lost, so those stay "may have run"."""

from __future__ import annotations

import numpy as np
import pytest

from drivers import RetriesExhausted, Topology, open_device
from drivers.wire import frames
from drivers.wire.frames import Flag, Frame, LinkOp
from drivers.wire.payload import Op
from hil.testing import served_board
from tests.framed_proxy import FrameProxy

# ack_timeout 0.5 s: a NACK that comes back later than the timeout counts as a timeout, and the
# configure and reads around the pulse have no faults to ride out; 0.05 s left a loaded 2-core
# machine no margin (one failure seen)
LINK = "?fragment=256&ack_timeout=0.5&retries=2&attempts=2&backoff=0.01&timeout=2"


def _corrupt(frame: Frame) -> bytes:
    """The frame's bytes with its CRC broken: the board NACKs it (0xFFFF) and drops it."""
    data = bytearray(frames.encode(frame))
    data[-2] ^= 0x55 if data[-2] != 0x55 else 0xAA
    return bytes(data)


def _is_pulse(frame: Frame) -> bool:
    data = frame.opcode not in (LinkOp.ACK, LinkOp.NACK) and not frame.flags & Flag.RESPONSE
    return data and frame.opcode == Op.PULSE


@pytest.mark.parametrize("which", ["second fragment", "last fragment"])
def test_a_pulse_whose_last_fragment_never_went_out_did_not_run(which: str) -> None:
    """Each copy of a pulse in 17 fragments: fragment 2 (or the last) corrupted on the way to the board, every
    time. Given up on fragment 2, the last fragment was never sent: the pulse did not run (the
    tile reads as before), and RetriesExhausted's note says so, where it said "may have run".
    Given up on the last fragment, it stays "may have run" (the board may have taken a copy
    whose ACK was lost)."""
    start = {"seq": -1}  # the seq of the START of the pulse's copy being sent

    def to_board(frame: Frame) -> bytes:
        if _is_pulse(frame):
            if frame.flags & Flag.START:
                start["seq"] = frame.seq
            last = not frame.flags & Flag.MORE
            # every copy (retransmissions repeat the seq) of fragment 2, or of the last fragment
            if (frame.seq - start["seq"]) % 65536 == 1 if which == "second fragment" else last:
                return _corrupt(frame)
        return frames.encode(frame)

    with served_board() as servers:
        port = int(servers.uris["serial-socket"].rsplit(":", 1)[1])
        with FrameProxy(port, to_board=to_board) as proxy, open_device(proxy.uri + LINK) as dev:
            dev.configure(Topology.layered([31, 16], w_max=1.0))
            rows, cols = dev.topology.tile_shape("W0")  # type: ignore[union-attr]
            before = np.stack(dev.read_conductance("W0"))
            counts = np.ones((rows, cols), np.int32)
            with pytest.raises(RetriesExhausted) as err:
                dev.pulse("W0", counts, np.zeros_like(counts))
            notes = " ".join(getattr(err.value, "__notes__", []))
            after = np.stack(dev.read_conductance("W0"))
    sent = [f for f in proxy.host_frames if _is_pulse(f) and f.flags & Flag.START]
    assert len(sent) >= 2, "the pulse was resent after a reconnect"
    if which == "second fragment":
        assert "the pulse did not run" in notes, notes
        np.testing.assert_allclose(after, before, atol=0.05 * float(np.abs(before).max()))
    else:
        assert "may have run" in notes, notes


def _is_mvm(frame: Frame) -> bool:
    return frame.opcode == Op.MVM and not frame.flags & Flag.RESPONSE


@pytest.mark.parametrize("line", ["corrupting", "dropping"])
def test_the_advice_after_a_give_up_fits_what_the_link_saw(line: str) -> None:
    """Every copy of an mvm corrupted on the way to the board (it NACKs each: it is powered and
    connected, the line is noisy or mis-set), or dropped (no answer at all). RetriesExhausted's
    advice asks about power and connection only where nothing came back."""

    def to_board(frame: Frame) -> bytes | None:
        if _is_mvm(frame):
            return _corrupt(frame) if line == "corrupting" else None
        return frames.encode(frame)

    with served_board() as servers:
        port = int(servers.uris["serial-socket"].rsplit(":", 1)[1])
        with FrameProxy(port, to_board=to_board) as proxy, open_device(proxy.uri + LINK) as dev:
            dev.configure(Topology.layered([4, 3], w_max=1.0))
            with pytest.raises(RetriesExhausted) as err:
                dev.mvm("W0", np.full((1, 5), 0.1, np.float32))
    text = str(err.value)
    if line == "corrupting":
        assert "no copy of frame seq" in text and "powered and the link connected" not in text, text
        assert "The board answered with 3 NACK(s), so it is powered and connected" in text, text
        assert "baud=" in text and "ground" in text, text
    else:
        assert "DeviceTimeout: no acknowledgement" in text and "NACKed" not in text, text
        assert text.endswith("is the board connected and running?"), text
