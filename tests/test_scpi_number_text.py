"""Numeric parameters over SCPI are decimal numbers as SCPI writes them (<NRf>: sign, digits,
point, exponent), through the real SCPI server over TCP. The server parsed them with Python's
float and int, which also take `1_0` (10) and `1_000` (1000): text that is not a number ran as
one, where docs/protocol.md section 2 (and a firmware written from it) says `-120`. (Bytes past
ASCII never reach a parameter: `-101`, the rest of the line dropped.)"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers import open_device
from emulator.server import ScpiServer
from tests.raw_scpi import RawScpi


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    with open_device("emulator://?preset=ideal&seed=0") as board, ScpiServer(board) as server:  # type: ignore[arg-type]
        yield server.listen_tcp()[1]


NOT_NUMBERS = ["1_0", "1_000", "1__0", "1.0_0", "1e1_0", "0x10", "1e", "+-1", ".", "0b1", "infinite"]


@pytest.mark.parametrize("text", NOT_NUMBERS)
def test_text_that_is_not_an_scpi_number_is_minus_120(port: int, text: str) -> None:
    with RawScpi(port) as s:
        s.send(b"*ESE 0\n")
        assert s.ask(f"*ESE {text};*ESE?") == "0"  # nothing set
        code, _ = s.error()
        assert code == -120, (text, code)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    mantissa=st.from_regex(r"\A[+]?([0-9]{1,3}(\.[0-9]{0,2})?|\.[0-9]{1,2})\Z"),
    exponent=st.sampled_from(["", "e0", "E+1", "e-1", "E2"]),
)
def test_scpi_numbers_are_taken(port: int, mantissa: str, exponent: str) -> None:
    value = float(mantissa + exponent)
    with RawScpi(port) as s:
        s.send(b"*ESE 0\n")
        reply = s.ask(f"*ESE {mantissa}{exponent};*ESE?")
        code, _ = s.error()
    if value == int(value) and 0 <= value <= 255:
        assert (reply, code) == (str(int(value)), 0)
    else:
        assert reply == "0" and code in (-120, -222)
