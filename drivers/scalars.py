"""Strict scalar checks: a count, index or scale parameter is checked in the width it is used
in (a Python int or a float64) before any narrowing cast, and wrong types are refused.

`as_int` takes Python and numpy integers only (the value is used as given, so a float,
even a whole one, is refused like booleans, complex numbers, strings and other objects). `as_float` takes any
real number that converts to a finite float64. Out of range: ConfigurationError, or
LimitViolation when the bound is a declared device limit (`limit` names it).
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from drivers.errors import ConfigurationError, LimitViolation, distinct_numbers

INT32_MAX = 2**31 - 1  # widest count the wire and the board's int32 buffers hold


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _as_reported(v: float | int) -> float:
    """A value LimitViolation can format (a Python int beyond float range is shown as inf)."""
    try:
        return float(v)
    except OverflowError:
        return math.inf if v > 0 else -math.inf


def as_int(name: str, value: object, lo: int, hi: int, limit: str | None = None, fix: str = "") -> int:
    """`value` as a Python int in [lo, hi]; past `hi` with a `limit`, a LimitViolation saying
    `fix` (what to do instead)."""
    if type(value) is int:  # the common case first (a bool's type is bool, not int)
        v = value
    elif isinstance(value, bool | np.bool_):
        raise ConfigurationError(f"{name} must be an integer, got the boolean {value!r}")
    elif isinstance(value, numbers.Integral):
        v = int(value)
    else:  # floats too, whole or not: the value is used as an int and must arrive as one
        raise ConfigurationError(f"{name} must be an integer, got {type(value).__name__} {_shown(value)}")
    if v < lo:
        raise ConfigurationError(f"{name} must be >= {lo}, got {v}")
    if v > hi:
        if limit is not None:
            raise LimitViolation(limit, _as_reported(v), hi, fix)
        raise ConfigurationError(f"{name} must be <= {hi}, got {v}")
    return v


def as_float(
    name: str,
    value: object,
    lo: float,
    hi: float,
    *,
    lo_open: bool = False,
    limit: str | None = None,
    fix: str = "",
) -> float:
    """`value` as a finite float64 in [lo, hi] (``(lo, hi]`` with `lo_open`); past `hi` with a
    `limit`, a LimitViolation saying `fix` (what to do instead)."""
    if type(value) is float:  # the common case first
        f = value
    elif isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise ConfigurationError(f"{name} must be a real number, got {type(value).__name__} {_shown(value)}")
    else:
        try:
            f = float(value)
        except (OverflowError, ValueError, TypeError):
            f = math.nan
    if not math.isfinite(f):
        raise ConfigurationError(f"{name} must be finite, got {_shown(value)}")
    if f < lo or (lo_open and f == lo):
        got, bound = distinct_numbers(f, lo)
        raise ConfigurationError(f"{name} must be {'>' if lo_open else '>='} {bound}, got {got}")
    if f > hi:
        if limit is not None:
            raise LimitViolation(limit, f, hi, fix)
        got, bound = distinct_numbers(f, hi)
        raise ConfigurationError(f"{name} must be <= {bound}, got {got}")
    return f


def check_within(
    label: str,
    name: str,
    value: object,
    lo: float,
    hi: float,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    unit: str = "",
    why: str = "",
) -> float:
    """`value` as a float in the interval from `lo` to `hi` (closed unless `lo_open` /
    `hi_open`); otherwise ConfigurationError naming the ``label`` parameter `name`, its value,
    the allowed interval, `why` the bound is there and the fix. NaN and infinities fall outside
    every interval."""
    interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}{' ' + unit if unit else ''}"
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise ConfigurationError(
            f"{label} parameter {name} must be a real number in {interval}, got "
            f"{type(value).__name__} {_shown(value)}"
        )
    try:
        f = float(value)
    except (OverflowError, ValueError, TypeError):
        f = math.nan
    above = f > lo if lo_open else f >= lo
    below = f < hi if hi_open else f <= hi
    if not (above and below):  # NaN fails both
        # the value and the end it passed, as text that differs (6 digits can print them alike)
        shown, end = distinct_numbers(f, lo if not above else hi)
        lo_t, hi_t = (end, f"{hi:g}") if not above else (f"{lo:g}", end)
        ends = f"{'(' if lo_open else '['}{lo_t}, {hi_t}{')' if hi_open else ']'}"
        interval = ends + (f" {unit}" if unit else "")
        raise ConfigurationError(
            f"{label} parameter {name}={shown} is outside {interval}"
            + (f": {why}" if why else "")
            + f"; set {name} to a value in {interval}"
        )
    return f
