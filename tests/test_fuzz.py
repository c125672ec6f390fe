"""Property-based fuzzing of what a network peer can send (issue 9 groundwork): the SCPI
parser and session, and the frame decoder, fed thousands of generated inputs, never raise
and keep answering a valid ``*IDN?`` afterwards."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivers import open_device
from drivers.wire import frames, scpi
from drivers.wire.frames import Frame
from emulator.server.scpi import Connection

# fragments of the real grammar mixed into the noise, so that inputs get past the first byte
SCPI_WORDS = st.sampled_from(
    [
        b"*IDN?",
        b"*RST",
        b"*CLS",
        b"*OPC?",
        b":SYST:ERR?",
        b"TILE:PULS",
        b"CONF",
        b"SETT?",
        b";",
        b",",
        b'"',
        b"#",
        b"#3",
        b"#9",
        b"\n",
        b" ",
        b"?",
        b":",
        b"1e309",
        b"-0",
        b"nan",
    ]
)
SCPI_INPUT = st.lists(st.one_of(SCPI_WORDS, st.binary(max_size=12)), max_size=30).map(b"".join)


@pytest.fixture(scope="module")
def device():
    with open_device("emulator://?preset=rram&seed=0") as dev:
        yield dev


def _serve(conn: Connection, data: bytes) -> list[bytes]:
    """What the server's connection loop does with received bytes (`Connection.respond`,
    the function the loop calls), less the writing to a socket."""
    return [bytes(piece) for answer in conn.respond(data) for piece in answer.reply or ()]


@given(SCPI_INPUT)
@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_scpi_session_survives_any_input_and_still_answers_idn(device, data: bytes) -> None:
    conn = Connection(device)
    _serve(conn, data)
    conn.splitter.clear()
    reply = b"".join(_serve(conn, b"*IDN?\n"))
    assert device.info.identity.idn().encode() in reply
    assert device.safety().violations == 0


@given(st.lists(st.binary(max_size=64), max_size=20))
@settings(max_examples=2000, deadline=None)
def test_frame_decoder_survives_any_input_and_still_decodes_a_frame(chunks: list[bytes]) -> None:
    d = frames.Deframer()
    for chunk in chunks:
        for piece in d.feed(chunk):
            with contextlib.suppress(frames.FrameError):
                frames.decode(piece)
    good = Frame(0x10, 7, 0, b"*IDN?")
    decoded = []
    for piece in d.feed(b"\x00" + frames.encode(good)):
        with contextlib.suppress(frames.FrameError):
            decoded.append(frames.decode(piece))
    assert good in decoded


@given(SCPI_INPUT)
@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_checked_scpi_session_survives_any_input_and_still_answers_a_sealed_idn(device, data: bytes) -> None:
    """Checked mode (noisy serial lines): garbage never runs (its checksum fails) and a
    valid sealed ``*IDN?`` still gets a sealed answer."""
    conn = Connection(device)
    conn.session.checked = True
    _serve(conn, data)
    conn.splitter.clear()
    assert conn.session.checked  # nothing in the garbage ran, so nothing turned checked mode off
    reply = b"".join(_serve(conn, scpi.seal_request(b"*IDN?")))
    assert scpi.open_response(reply.removesuffix(b"\n")) == device.info.identity.idn().encode()
    assert device.safety().violations == 0
