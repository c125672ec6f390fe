"""A converter's step: the one definition of the least-significant bit that the board, its
calibration and the host stack share.

`lsb(bits, span)` is one step of a `bits`-bit DAC or ADC over `span`, ``span / (2**bits - 1)``
(the codes 0 ... 2**bits - 1 cover the span end to end). An ideal converter (`bits` None)
has no step: 0.0, or with ``ideal_bits=IDEAL_LSB_BITS`` the step of an 8-bit one, the unit in
which the emulator draws and the calibration reports offsets (so an offset in LSB means the
same on a board with ideal converters).

A signed read-out over ``[-full, full]`` (the mvm ADC) has the same step, ``lsb(bits, 2 full)``,
on a grid through zero (mid-tread): codes ``k step``, ``|k| <= 2**(bits-1) - 1``, so that a zero
current reads 0; its rails, the outermost codes, lie half a step inside the range and
``2**bits - 2`` steps apart (`rail_lsb` gives the step from rails that were measured).
"""

from __future__ import annotations

IDEAL_LSB_BITS = 8  # an ideal converter's offsets are counted in the steps of an 8-bit one (1/255)


def lsb(bits: int | None, span: float, *, ideal_bits: int | None = None) -> float:
    """One step of a `bits`-bit converter over `span`; for an ideal converter (`bits` None or
    0) 0.0, or the step of an `ideal_bits`-bit one when given."""
    b = bits or ideal_bits
    return span / ((1 << b) - 1) if b else 0.0


def rail_lsb(bits: int | None, rails: float, *, ideal_bits: int | None = None) -> float:
    """One step of a signed, mid-tread `bits`-bit converter whose rails (its outermost codes,
    ``+-(2**(bits-1) - 1)`` steps) are `rails` apart: ``rails / (2**bits - 2)``; a 1-bit one
    (a comparator, rails at ``+-full``) steps across them, ``rails``. An ideal one as `lsb`
    (0.0, or the step of an `ideal_bits`-bit one over `rails`)."""
    if not bits:
        return lsb(bits, rails, ideal_bits=ideal_bits)
    return rails if bits == 1 else rails / ((1 << bits) - 2)
