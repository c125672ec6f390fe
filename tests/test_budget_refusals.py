"""A settle budget that a board refuses (NaN, infinities, negative, zero or past the board's
bound, a float where a count belongs) is refused naming the field, its value, the bound and what
to give instead, on every path: the budget bounds the per-sample stop's checks and the
host-iterated settle's reads (`drivers.settle_stop`, `hil.host_settle`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivers import ConfigurationError, Device, LimitViolation, SettleBudget, Topology, open_device
from hil.testing import BoardServers

BOARD = "emulator://?preset=rram&seed=0&capabilities=mvm,program_verify&max_settle_steps=500"
LINKS = ("emulator", "visa-tcp", "serial-socket")

_BAD = {
    "tol": st.one_of(
        st.sampled_from([math.nan, math.inf, -math.inf, -1e-9, -1.0]), st.floats(max_value=-1e-300)
    ),
    "dt": st.one_of(
        st.sampled_from([math.nan, math.inf, 0.0, -0.5, 1.0000001, 1e308]), st.floats(min_value=1.5)
    ),
    "check_every": st.one_of(
        st.integers(max_value=0), st.integers(min_value=501), st.sampled_from([2.0, 5.5])
    ),
    "max_steps": st.one_of(st.integers(max_value=0), st.sampled_from([3.0, math.nan])),
}


@pytest.fixture(scope="module")
def devices() -> Iterator[dict[str, Device]]:
    from hil.testing import serve_board

    servers = serve_board(BOARD, lock=False)
    devs = {"emulator": open_device(BOARD)} | {t: open_device(servers.uri(t)) for t in LINKS[1:]}
    try:
        yield devs
    finally:
        for d in devs.values():
            d.close()
        servers.close()


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data(), link=st.sampled_from(LINKS), field=st.sampled_from(sorted(_BAD)))
def test_a_bad_settle_budget_is_refused_naming_the_field_and_the_fix(
    devices: dict[str, Device], data: st.DataObject, link: str, field: str
) -> None:
    value = data.draw(_BAD[field])
    dev = devices[link]
    with pytest.raises(ConfigurationError) as info:
        dev.configure(Topology.layered([4, 3, 2], budget=SettleBudget(**{field: value})))
    text = str(info.value)
    assert f"settle budget {field}" in text, text  # the field and its value...
    assert f"give SettleBudget.{field} " in text, text  # ... and what to give instead


def test_a_budget_past_the_boards_steps_says_its_own_fix(devices: dict[str, Device]) -> None:
    for dev in devices.values():
        with pytest.raises(
            LimitViolation, match=r"give the settle budget at most 500 steps \(SettleBudget.max_steps\)"
        ):
            dev.configure(Topology.layered([4, 3, 2], budget=SettleBudget(max_steps=501)))


def test_the_boards_own_refusal_of_a_budget_names_the_fix(
    emulated_board: Callable[..., BoardServers],
) -> None:
    """A raw CONFIGURE (no host check on the way) with tol -1: the board's error names the fix."""
    import socket

    from drivers.wire import payload as pl
    from drivers.wire.frames import Flag
    from drivers.wire.payload import Op
    from hil.testing import socket_link

    s = emulated_board(BOARD, lock=False)
    port = int(s.uris["serial-socket"].rsplit(":", 1)[1].split("?")[0])
    topo = pl.topology_to_dict(Topology.layered([4, 3, 2]))
    topo["budget"]["tol"] = -1.0
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        link = socket_link(sock, ack_timeout=1.0, retries=3)
        ref = link.send(Op.CONFIGURE, pl.pack(pl.Message(topo)))
        got = link.receive(10.0, response=True, ref=ref, opcode=Op.CONFIGURE)
    assert got is not None and got[0].flags & Flag.ERROR
    error = pl.loads(got[1])
    assert error["code"] == 100 and "give SettleBudget.tol a finite tolerance >= 0" in error["message"], error
