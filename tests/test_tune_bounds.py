"""The work of a refresh by tuning has declared, checked bounds (the safety audit: a pulsed
scheme with ``tune_iters=10**6`` and ``tune_tol=nan`` tuned a 2 x 2 tile for 6 893 rounds,
30 320 pulses, 19 s: a NaN tolerance passed ``tol <= 0`` and is never met).

`RefreshPolicy` (and so `make_scheme`), `tune_pairs` and `probe_steps` refuse a tolerance that
is not finite and > 0, and a round count, read count or pulse count past its bound, with a
ValueError that names the parameter, the bound and what to do; nothing reaches the device.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers import SettleBudget, Topology, open_device
from hil.programming import RefreshPolicy, make_scheme, probe_steps, tune_pairs
from hil.programming.tune import MAX_PROBE_PULSES, MAX_ROUND_PULSES, MAX_TUNE_ITERS, MAX_TUNE_READS


class _Reached(Exception):
    """Raised by `_Untouchable` when a call got past its checks to the device."""


class _Untouchable:
    """A Device stand-in for calls that must be refused before they reach it."""

    def __getattr__(self, name: str) -> Any:
        raise _Reached(name)


def _counts(g: np.ndarray, dev: np.ndarray) -> np.ndarray:
    return np.zeros_like(dev)


def _tune(**kw: Any) -> None:
    args: dict[str, Any] = {"one_sided": False, "g_min": 1e-6, "g_max": 1e-5, "tol": 1e-8} | kw
    tune_pairs(_Untouchable(), "W0", np.zeros((2, 2)), _counts, **args)  # type: ignore[arg-type]


def test_the_audit_case_is_refused_when_the_scheme_is_made() -> None:
    with pytest.raises(ValueError, match=r"tune_tol must be finite and in \(0, 1\], got nan; give it"):
        make_scheme("pulsed", refresh_mode="tune", tune_iters=10**6, tune_tol=float("nan"))
    with pytest.raises(ValueError, match=rf"tune_iters must be in \[0, {MAX_TUNE_ITERS}\], got 1000000; "):
        make_scheme("pulsed", refresh_mode="tune", tune_iters=10**6)
    with pytest.raises(ValueError, match=rf"tune_reads must be in \[1, {MAX_TUNE_READS}\], got 1000; "):
        make_scheme("pulsed", tune_reads=1000)


def test_a_refresh_at_the_bounds_runs_and_stops_on_a_2x2_tile() -> None:
    """The largest accepted budget with a tolerance no pair meets: the refresh ends after
    `MAX_TUNE_ITERS` rounds at most (6 893 rounds with the old unchecked 10**6)."""
    with open_device("emulator://?preset=rram&seed=0") as dev:
        dev.configure(Topology.layered([1, 2], budget=SettleBudget(max_steps=5)))
        scheme = make_scheme(
            "pulsed", refresh_mode="tune", tune_iters=MAX_TUNE_ITERS, tune_tol=1e-9, tune_reads=1
        )
        scheme.program(dev, "W0", np.full((2, 2), 0.2))
        res = scheme.refresh(dev, "W0", "tune")
    assert res.report.iterations <= MAX_TUNE_ITERS


@pytest.mark.parametrize(
    ("kw", "pattern"),
    [
        ({"tol": float("nan")}, r"tune tol must be finite"),
        ({"tol": float("inf")}, r"tune tol must be finite"),
        ({"tol": 0.0}, r"tune tol must be finite and in \(0, inf\]"),
        ({"max_iters": MAX_TUNE_ITERS + 1}, rf"tune max_iters must be in \[0, {MAX_TUNE_ITERS}\]"),
        ({"reads": MAX_TUNE_READS + 1}, rf"tune reads must be in \[1, {MAX_TUNE_READS}\]"),
        ({"reads": 2.0}, r"tune reads must be an integer"),
        ({"max_pulses": MAX_ROUND_PULSES + 1}, rf"tune max_pulses must be in \[1, {MAX_ROUND_PULSES}\]"),
        ({"gain": float("nan")}, r"tune gain must be finite"),
        ({"ceiling": 0.0}, r"tune ceiling must be finite"),
        ({"patience": 0}, r"tune patience must be in \[1, "),
    ],
)
def test_tune_pairs_refuses_unbounded_work_before_a_read(kw: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        _tune(**kw)


@pytest.mark.parametrize(
    ("kw", "pattern"),
    [
        ({"reads": MAX_TUNE_READS + 1}, rf"probe reads must be in \[1, {MAX_TUNE_READS}\]"),
        ({"reads": 0}, r"probe reads must be in \[1, "),
        ({"k": MAX_PROBE_PULSES + 1}, rf"probe k must be in \[1, {MAX_PROBE_PULSES}\]"),
        ({"k": 0}, r"probe k must be in \[1, "),
        ({"probes": 0}, r"probes must be in \[1, "),  # [-0:] picked every device
    ],
)
def test_probe_steps_refuses_unbounded_work_before_a_read(kw: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        probe_steps(_Untouchable(), "W0", **kw)  # type: ignore[arg-type]


_FLOATS = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, -0.0, 1.0, 1e-300, 5e-324])
_EDGES = [b + d for b in (0, 1, MAX_TUNE_ITERS, MAX_TUNE_READS) for d in (-1, 0, 1)]
_INTS = st.sampled_from(_EDGES) | st.integers(-(2**70), 2**70) | st.integers(0, 2 * MAX_TUNE_READS)


@settings(max_examples=300, deadline=None)
@given(tol=_FLOATS, iters=_INTS, reads=_INTS, drift=_FLOATS)
def test_refresh_policy_accepts_exactly_the_bounded_settings(
    tol: float, iters: int, reads: int, drift: float
) -> None:
    ok = math.isfinite(tol) and 0 < tol <= 1 and 0 <= iters <= MAX_TUNE_ITERS and 1 <= reads <= MAX_TUNE_READS
    ok = ok and math.isfinite(drift) and drift >= 0
    if ok:
        p = RefreshPolicy(tune_tol=tol, tune_iters=iters, tune_reads=reads, drift_tol=drift)
        assert (p.tune_iters, p.tune_reads) == (iters, reads)
        return
    with pytest.raises(ValueError, match=r"(tune_tol|tune_iters|tune_reads|drift_tol) must be") as err:
        RefreshPolicy(tune_tol=tol, tune_iters=iters, tune_reads=reads, drift_tol=drift)
    assert "got" in str(err.value)


@settings(max_examples=300, deadline=None)
@given(tol=_FLOATS, iters=_INTS, reads=_INTS)
def test_tune_pairs_checks_everything_before_the_device(tol: float, iters: int, reads: int) -> None:
    """Accepted settings get as far as the device (its first read), refused ones never do."""
    ok = math.isfinite(tol) and tol > 0 and 0 <= iters <= MAX_TUNE_ITERS and 1 <= reads <= MAX_TUNE_READS
    with pytest.raises(_Reached if ok else ValueError):
        _tune(tol=tol, max_iters=iters, reads=reads)
