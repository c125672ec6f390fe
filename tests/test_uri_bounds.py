"""A link's URI parameters that set how long a host goes on before it reports a board it cannot
reach have declared bounds (the safety audit of 2026-12-07, round 4): ``attempts=1000000000``
or ``timeout=1e300`` were accepted, and a host whose board was gone retried or waited for
days without a word (the board had made itself safe; the operator never heard)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.errors import ConfigurationError
from drivers.uri import parse_options
from drivers.wire.client import MAX_ACK_TIMEOUT_S, MAX_ATTEMPTS, MAX_TIMEOUT_S

SERIAL = "serial+socket://127.0.0.1:7000"
VISA = "visa://TCPIP0::127.0.0.1::5025::SOCKET"
# (base URI, parameter, accepted range, integer-valued, lower bound open)
BOUNDS = [
    (SERIAL, "timeout", 0.0, MAX_TIMEOUT_S, False, True),
    (VISA, "timeout", 0.0, MAX_TIMEOUT_S, False, True),
    (SERIAL, "ack_timeout", 0.0, MAX_ACK_TIMEOUT_S, False, True),
    (SERIAL, "attempts", 1, MAX_ATTEMPTS, True, False),
    (VISA, "attempts", 1, MAX_ATTEMPTS, True, False),
    (SERIAL, "retries", 0, MAX_ATTEMPTS, True, False),
]


@settings(max_examples=300, deadline=None)
@given(
    case=st.sampled_from(BOUNDS),
    value=st.one_of(
        st.integers(-5, 10**12),
        st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e300),
        st.sampled_from([86_400.0, 86_400.5, 60.0, 60.000001, 1000, 1001, 1e9]),
    ),
)
def test_a_link_parameter_is_accepted_exactly_within_its_declared_bound(
    case: tuple[str, str, float, float, bool, bool], value: float
) -> None:
    base, name, lo, hi, integer, lo_open = case
    if integer and not float(value).is_integer():
        return  # an integer parameter's own type check, not its bound
    text = str(int(value)) if integer else repr(float(value))
    inside = (lo < value if lo_open else lo <= value) and value <= hi
    try:
        parse_options(f"{base}?{name}={text}")
    except ConfigurationError as exc:
        assert not inside, (name, value, exc)
        assert name in str(exc)
    else:
        assert inside, (name, value)


@pytest.mark.parametrize("uri", [f"{SERIAL}?attempts=4000000", f"{VISA}?timeout=1e300"])
def test_the_refusal_names_the_parameter_and_its_bound(uri: str) -> None:
    with pytest.raises(ConfigurationError, match=r"must be .*<= (1000|86400)"):
        parse_options(uri)
