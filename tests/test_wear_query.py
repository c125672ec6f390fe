"""The wear query (docs/protocol.md, "Pulse endurance"): a board that declares a pulse endurance
counted each device's wear and refused past it, but a lab user could not see how worn a tile
was (only `Board.wear` in-process). Now `SYST:WEAR?` / opcode 0x24 WEAR and `Device.wear()`
report, per tile, the most worn device and the devices near or at the end of their life."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers import NotSupported, ProtocolError, TileWear, Topology, Wear, open_device
from drivers.uri import replace_params
from drivers.wear import near_end_from, tile_wear
from drivers.wire import codes, frames, scpi
from drivers.wire import payload as pl
from hil.testing import BoardServers
from tests.raw_scpi import RawScpi

ENDURANCE = 1000
WORN = f"emulator://?preset=rram&seed=0&pulse_endurance={ENDURANCE}"
NEW = "emulator://?preset=rram&seed=0"
REPLY = (
    b'{"endurance":1000,"near_from":900,"tiles":{"W0":{"max_wear":1000,"near_end":2,"spent":1},'
    b'"W1":{"max_wear":0,"near_end":0,"spent":0}}}'
)
WEAR = Wear(1000, 900, {"W0": TileWear(1000, 2, 1), "W1": TileWear(0, 0, 0)})


def _worn(served: BoardServers) -> None:
    """W0 (5 x 3) with one G+ device at 950 and one G- device at its endurance; W1 new."""
    served.device.configure(Topology.layered([4, 3, 2]))
    cp, cm = np.zeros((5, 3), np.int32), np.zeros((5, 3), np.int32)
    cp[0, 0], cm[1, 1] = 950, 1000
    served.device.pulse("W0", cp, cm)


# ---- SCPI over TCP, through pyvisa-py, byte by byte -------------------------------------------


def test_scpi_wear_query_byte_exact(emulated_board: Callable[..., BoardServers]) -> None:
    import pyvisa

    served = emulated_board(WORN)
    _worn(served)
    rm = pyvisa.ResourceManager("@py")
    try:
        inst = rm.open_resource(served.resources["visa-tcp"], read_termination="\n", write_termination="\n")
        inst.write("SYST:WEAR?")
        assert inst.read_raw() == b"#3133" + REPLY + b"\n"
        inst.write("system:wear?")  # the long form, any case
        assert inst.read_raw() == b"#3133" + REPLY + b"\n"
        inst.write("SYST:WEAR? 1;SYST:ERR?")  # it takes no parameter
        assert (
            inst.read_raw()
            == b'#10;-108,"Parameter not allowed;SYST:WEAR?: SYST:WEAR? takes 0 parameter(s), got 1"\n'
        )
        inst.close()
    finally:
        rm.close()
    # open while another host owns the board (it reads, changes nothing), like SYST:MET?
    with RawScpi(served.uris["visa-tcp"]) as owner, RawScpi(served.uris["visa-tcp"]) as other:
        assert owner.query('SYST:LOCK:ACQ? "alice:1:aa"').startswith(b"#")
        assert other.query("SYST:WEAR?") == b"#3133" + REPLY


def test_scpi_wear_query_on_a_board_without_an_endurance(emulated_board: Callable[..., BoardServers]) -> None:
    import pyvisa

    served = emulated_board(NEW)
    rm = pyvisa.ResourceManager("@py")
    try:
        inst = rm.open_resource(served.resources["visa-tcp"], read_termination="\n", write_termination="\n")
        inst.write("SYST:WEAR?;SYST:ERR?")
        assert (
            inst.read_raw()
            == b'#10;101,"Not supported;this board declares no pulse endurance and counts no wear"\n'
        )
        inst.close()
    finally:
        rm.close()


# ---- framed over a socket, through pyserial, byte by byte ---------------------------------------


def _frames_until_response(port: object, opcode: int) -> frames.Frame:
    deframer, deadline = frames.Deframer(), time.monotonic() + 5
    while time.monotonic() < deadline:
        for chunk in deframer.feed(port.read(port.in_waiting or 1)):  # type: ignore[attr-defined]
            frame = frames.decode(chunk)
            if frame.opcode == opcode:
                return frame
    raise AssertionError("no reply")


def test_framed_wear_opcode_byte_exact(emulated_board: Callable[..., BoardServers]) -> None:
    import serial

    served = emulated_board(WORN)
    _worn(served)
    assert int(pl.Op.WEAR) == 0x24
    request = frames.encode(frames.Frame(0x24, 1, frames.Flag.START, b"\x02\x00\x00\x00{}"))
    # header 01 08 24 00 01 00 06 00 (version, START, WEAR, ref, seq 1, 6 bytes), payload
    # 02 00 00 00 7b 7d (an empty message: JSON `{}`), crc32 0x8b9ac555, COBS between two 00
    assert request == bytes.fromhex("00 04 01 08 24 02 01 02 06 02 02 01 01 07 7b 7d 55 c5 9a 8b 00")
    port = serial.serial_for_url(served.uris["serial-socket"].replace("serial+socket", "socket"), timeout=0.2)
    try:
        port.write(request)
        reply = _frames_until_response(port, 0x24)
        assert reply.flags == frames.Flag.RESPONSE | frames.Flag.START and reply.ref == 1
        assert reply.payload == len(REPLY).to_bytes(4, "little") + REPLY
        port.write(frames.encode(frames.ack(reply.seq)))
        # a board without an endurance: an ERROR reply with code 101
        new = emulated_board(NEW)
        other = serial.serial_for_url(
            new.uris["serial-socket"].replace("serial+socket", "socket"), timeout=0.2
        )
        try:
            other.write(request)
            error = _frames_until_response(other, 0x24)
            assert error.flags == frames.Flag.RESPONSE | frames.Flag.ERROR | frames.Flag.START
            assert json.loads(error.payload) == {
                "code": 101,
                "message": "this board declares no pulse endurance and counts no wear",
            }
        finally:
            other.close()
    finally:
        port.close()


# ---- Device.wear on every backend ------------------------------------------------------------


@pytest.mark.parametrize("transport", ["emulator", "visa-tcp", "serial-socket", "serial-pty"])
def test_device_wear_on_every_backend(emulated_board: Callable[..., BoardServers], transport: str) -> None:
    served = emulated_board(WORN)
    _worn(served)
    uri = None if transport == "emulator" else served.uris[transport]
    if uri is None:
        assert served.device.wear() == WEAR
        return
    with open_device(uri) as dev:
        assert dev.wear() == WEAR
        dev.configure(Topology.layered([4, 3]))  # a smaller network: the wear stays with the devices
        assert dev.wear() == Wear(1000, 900, {"W0": TileWear(1000, 2, 1)})
        dev.reset()
        assert dev.wear() == Wear(1000, 900, {})  # no topology: no tile to name


@pytest.mark.parametrize("transport", ["emulator", "visa-tcp", "serial-socket"])
def test_a_board_without_an_endurance_has_no_wear(
    emulated_board: Callable[..., BoardServers], transport: str
) -> None:
    served = emulated_board(NEW)
    served.device.configure(Topology.layered([4, 3]))
    if transport == "emulator":
        assert served.device.wear() is None
        return
    with open_device(served.uris[transport]) as dev:
        assert dev.wear() is None


@pytest.mark.parametrize("transport", ["visa-tcp", "serial-socket"])
def test_older_firmware_without_the_query_is_a_clear_error_not_a_hang(
    emulated_board: Callable[..., BoardServers], transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Firmware that declares an endurance but predates the query answers it as unknown
    (-113 over SCPI, 110 over the framed link): the host says so at once."""
    from emulator.server import framed
    from emulator.server.scpi import ScpiSession

    table = ScpiSession._table
    monkeypatch.setattr(ScpiSession, "_table", lambda self: [t for t in table(self) if t[0] != scpi.WEAR_Q])
    monkeypatch.setattr(framed, "_OPS", framed._OPS - {0x24})
    served = emulated_board(WORN)
    with open_device(replace_params(served.uris[transport], timeout=3)) as dev:
        start = time.monotonic()
        with pytest.raises(
            NotSupported, match=r"declares a pulse endurance of 1000 but its firmware does not report"
        ):
            dev.wear()
        assert time.monotonic() - start < 1.0
        assert dev.safety().refused == 0  # the link goes on


# ---- the summary and the host's checks of a reply ------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    endurance=st.integers(1, 10**15),
    wear=st.lists(st.integers(0, 100), min_size=1, max_size=12),
)
def test_near_the_end_means_a_tenth_or_less_left(endurance: int, wear: list[int]) -> None:
    """`near_from` in integers is exactly ``endurance - w <= endurance / 10``; the summary counts
    by it (wears drawn near the threshold and the end, where rounding would show)."""
    frm = near_end_from(endurance)
    assert 10 * (endurance - frm) <= endurance < 10 * (endurance - frm + 1)
    w = np.array([min(endurance, max(0, frm - 50 + x)) for x in wear], np.int64)
    t = tile_wear(w.reshape(1, 1, -1), endurance)
    assert t.max_wear == int(w.max())
    assert t.near_end == sum(10 * (endurance - int(x)) <= endurance for x in w)
    assert t.spent == int((w == endurance).sum())


def _reply(**edit: object) -> pl.Message:
    d = json.loads(REPLY)
    d.update(edit)
    return pl.Message(d)


@pytest.mark.parametrize(
    ("reply", "match"),
    [
        (_reply(endurance=999), "endurance 999 is not the board's declared pulse_endurance 1000"),
        (_reply(near_from=1001), "near_from"),
        (_reply(tiles=[]), "tiles must be an object"),
        (_reply(tiles={"W0": {"max_wear": 1001, "near_end": 0, "spent": 0}}), "W0.max_wear"),
        (_reply(tiles={"W0": {"max_wear": 9, "near_end": 31, "spent": 0}}), "W0.near_end"),
        (_reply(tiles={"W0": {"max_wear": 9, "near_end": 1, "spent": 2}}), "W0.spent"),
        (_reply(tiles={"W0": {"max_wear": 9}}), "tile 'W0' must hold max_wear, near_end, spent"),
        (
            _reply(tiles={f"T{i}": {"max_wear": 0, "near_end": 0, "spent": 0} for i in range(65)}),
            "at most 64",
        ),
    ],
)
def test_a_malformed_wear_reply_is_refused(reply: pl.Message, match: str) -> None:
    with open_device(WORN) as dev:
        limits = dev.info.limits
    with pytest.raises(ProtocolError, match=rf"malformed wear reply: .*{match}"):
        pl.wear(reply, limits, {"W0": (5, 3), "W1": (4, 2)})
    assert pl.wear(pl.Message(json.loads(REPLY)), limits, {"W0": (5, 3), "W1": (4, 2)}) == WEAR


def test_wear_codes_name_the_query() -> None:
    assert scpi.OP_HEADERS[pl.Op.WEAR] == "SYSTem:WEAR?" and pl.Op.WEAR in pl.OPEN_WHILE_OWNED
    assert pl.Op.WEAR in pl.IDEMPOTENT and codes.NOT_SUPPORTED == 101
