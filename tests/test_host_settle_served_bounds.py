"""Every read of a host-iterated settle through the emulator's real servers is within the
board's declared bounds (the safety audit of 2026-12-07: what held up, kept as a property)."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivers import Device, Nudge, SettleBudget, Topology
from hil.host_settle import HostSettle
from tests.test_host_settle_audit import LINKS, served

__all__ = ["served"]  # the module-scoped fixture of the served MVM-only board, shared


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    link=st.sampled_from(LINKS),
    batch=st.integers(1, 8),
    steps=st.integers(1, 25),
    tol=st.sampled_from([0.0, 1e-3, 0.1]),
    every=st.integers(1, 6),
    dt=st.floats(0.05, 1.0),
    dense=st.booleans(),
    update=st.sampled_from(["synchronous", "alternating"]),
    nudge=st.booleans(),
    init=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_every_read_of_a_host_iterated_settle_is_within_the_boards_bounds(
    served: tuple[Device, list[tuple[int, float]], dict[str, Device]],
    link: str,
    batch: int,
    steps: int,
    tol: float,
    every: int,
    dt: float,
    dense: bool,
    update: str,
    nudge: bool,
    init: bool,
    seed: int,
) -> None:
    """Random settles (clamps, elastic nudges and initial states anywhere the read-voltage
    limit allows, noisy rram, probe reads at every check) through a real server: every mvm the
    board runs carries at most `max_batch` rows within `clamp_max`, and the board refuses
    nothing and counts no violation: the host sent only what the board takes."""
    board, seen, hosts = served
    dev = hosts[link]
    lim = dev.info.limits
    rng = np.random.default_rng(seed)
    budget = SettleBudget(max_steps=steps, tol=tol, dt=dt, check_every=every)
    if dense:
        if update == "alternating":
            update = "synchronous"  # a dense tile has no two halves (refused, tests/test_host_update.py)
        topo = Topology.dense({"s0": 4, "s1": 5, "s2": 3}, budget=budget)
    else:
        topo = Topology.layered([4, 5, 3], budget=budget)
    dev.configure(topo)
    for c in topo.couplings:
        g = rng.uniform(lim.g_min, lim.g_max, (2, *topo.tile_shape(c.tile))).astype(np.float32)
        dev.program(c.tile, g[0], g[1])
    top = np.float32(lim.clamp_max)
    x = rng.uniform(-top, top, (batch, 4)).astype(np.float32)
    nd = None
    if nudge:
        nd = {
            "s2": Nudge(
                float(rng.uniform(-lim.max_beta, lim.max_beta)),
                target=rng.uniform(-top, top, (batch, 3)).astype(np.float32),
            )
        }
    ini = (
        {
            g: rng.uniform(-top, top, (batch, n)).astype(np.float32)
            for g, n in topo.groups.items()
            if g != "s0"
        }
        if init
        else None
    )
    seen.clear()
    before = board.safety()
    HostSettle(dev, update=update)({"s0": x}, nudge=nd, init=ini, trace=seed % 3)  # type: ignore[arg-type]
    after = board.safety()
    assert after.refused == before.refused and after.violations == 0, (before, after)
    assert seen
    for rows, peak in seen:
        assert 1 <= rows <= lim.max_batch and peak <= lim.clamp_max, (rows, peak)
