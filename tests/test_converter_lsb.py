"""`drivers.converters.lsb`, the one converter step of the board, its calibration and the host."""

from __future__ import annotations

import pytest

from drivers.converters import IDEAL_LSB_BITS, lsb


@pytest.mark.parametrize("bits", [1, 2, 6, 8, 12, 16, 32])
@pytest.mark.parametrize("span", [1.0, 8.0, 0.3, 12.345])
def test_lsb_is_the_span_over_the_codes(bits: int, span: float) -> None:
    assert lsb(bits, span) == span / (2**bits - 1)
    assert lsb(bits, span, ideal_bits=IDEAL_LSB_BITS) == lsb(bits, span)  # a real converter: its own step


def test_an_ideal_converter_has_no_step_or_the_offset_unit_of_an_8_bit_one() -> None:
    assert lsb(None, 2.0) == 0.0
    assert lsb(None, 2.0, ideal_bits=IDEAL_LSB_BITS) == 2.0 / 255
