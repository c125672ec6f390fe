"""The host-iterated settle of an MVM-only board, audited (2026-12-07): each test drives a
request of `hil.host_settle.HostSettle` that a board's own settle path refuses, or a bound the
settle's reads must keep, and asserts the refusal and its words."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivers import ConfigurationError, Device, SettleBudget, Topology, checks, open_device
from hil.host_settle import HostSettle

MVM_ONLY = "emulator://?preset=rram&seed=0&capabilities=mvm,program_verify"


def _mvm_only(uri: str = MVM_ONLY, budget: SettleBudget | None = None) -> HostSettle:
    dev = open_device(uri)
    dev.configure(Topology.layered([6, 5, 3], budget=budget or SettleBudget(max_steps=20, tol=1e-3)))
    return HostSettle(dev)


@pytest.mark.parametrize(
    ("trace", "words"),
    [
        (2.5, "trace interval must be an integer, got float 2.5"),
        (np.float64(2.0), "trace interval must be an integer, got float64"),
        ("3", "trace interval must be an integer, got str '3'"),
        (100_001, "trace interval must be <= 100000, got 100001"),
        (-1, "trace interval must be >= 0, got -1"),
        # a subnormal: checked outside the settle's flushed mode, where its text read 0.0
        (5e-324, "trace interval must be an integer, got float 5e-324"),
    ],
)
def test_the_host_iterated_settle_checks_its_trace_interval_as_a_board_settle_does(
    trace: object, words: str
) -> None:
    """A board's settle refuses a trace interval that is not an integer (never truncated) or
    beyond `max_settle_steps` (`drivers.checks.check_trace`); the host-iterated settle took
    2.5 as 2, the string "3" as 3 and 10**9 as no trace at all (and raised ValueError for "",
    OverflowError for inf)."""
    hs = _mvm_only()
    assert hs.device.info.limits.max_settle_steps == 100_000
    x = np.full((2, 6), 0.5, np.float32)
    with pytest.raises(ConfigurationError) as info:
        hs({"s0": x}, trace=trace)
    assert words in str(info.value)
    assert hs.stats.mvm_calls == 0  # refused before the first product
    # what a board takes, the host takes alike
    eq = hs({"s0": x}, trace=np.int64(5))
    assert eq.trace is not None and list(eq.trace["step"][:3]) == [0, 5, 10]


# ---- through the real servers ------------------------------------------------------------------

SERVED = "emulator://?preset=rram&seed=0&capabilities=mvm,program_verify&max_batch=3"
LINKS = ("visa-tcp", "serial-socket")


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[Device, list[tuple[int, float]], dict[str, Device]]]:
    """An MVM-only rram board that takes at most 3 samples a request, behind its SCPI and framed
    servers (no ownership: one host per link here), each mvm the board runs recorded (rows, peak
    |x|), and a host on each TCP link."""
    from hil.testing import serve_board

    servers = serve_board(SERVED, lock=False)
    seen: list[tuple[int, float]] = []
    board = servers.device.board  # type: ignore[attr-defined]
    inner = board.mvm

    def spy(name: str, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        seen.append((int(x.shape[0]), float(x.abs().max()) if x.numel() else 0.0))
        return inner(name, x, transpose)

    board.mvm = spy
    hosts = {t: open_device(servers.uri(t)) for t in LINKS}
    try:
        yield servers.device, seen, hosts
    finally:
        for d in hosts.values():
            d.close()
        servers.close()


_TRACES = st.one_of(
    st.booleans(),
    st.integers(-3, 200_000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=3),
    st.builds(np.int64, st.integers(0, 40)),
)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(link=st.sampled_from(LINKS), trace=_TRACES)
def test_a_host_iterated_settle_takes_the_trace_intervals_a_board_takes(
    served: tuple[Device, list[tuple[int, float]], dict[str, Device]], link: str, trace: object
) -> None:
    """Whatever the trace argument, the host-iterated settle over a real server refuses what
    `drivers.checks.check_trace` (a board's settle) refuses, with its words and before any mvm,
    and records every `check_trace(trace)` steps what it takes."""
    _board, seen, hosts = served
    dev = hosts[link]
    dev.configure(Topology.layered([4, 3, 2], budget=SettleBudget(max_steps=12, tol=0.0)))
    try:
        every = checks.check_trace(dev.info.limits, trace)
    except ConfigurationError as exc:
        seen.clear()
        with pytest.raises(ConfigurationError) as info:
            HostSettle(dev)({"s0": np.full((2, 4), 0.5, np.float32)}, trace=trace)  # type: ignore[arg-type]
        assert str(info.value) == str(exc)
        assert not seen  # nothing reached the board
        return
    eq = HostSettle(dev)({"s0": np.full((2, 4), 0.5, np.float32)}, trace=trace)  # type: ignore[arg-type]
    if every == 0:
        assert eq.trace is None
    else:
        assert eq.trace is not None
        steps = list(eq.trace["step"])
        assert steps[0] == 0 and steps[-1] == 12
        assert all(s % every == 0 for s in steps[:-1]), (every, steps)
