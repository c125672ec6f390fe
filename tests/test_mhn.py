"""Issue 19: MHN blocks on a crossbar (retrieval through Device.mvm) and the temperature
phase transition (derived and measured)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers import ConfigurationError
from hil.mhn import MHNBlock, RetrievalBudget, critical_beta, equidistant_patterns, retrieve
from hil.mhn.core import MAX_BETA, MAX_RETRIEVAL_STEPS, check_beta, energy, jacobian, update
from hil.mhn.phase import covariance, distinct, measured_critical, sweep
from hil.mhn.setups import (
    DIGITS_COLLAPSED_RATIOS,
    DIGITS_RETRIEVED_RATIOS,
    RETRIEVAL_CONVERGED,
    TRANSITION_FACTORS,
    TRANSITION_SETTINGS,
    digits_setup,
    ideal_block,
    retrieval_setup,
    transition_setup,
)

IDEAL = "emulator://?preset=ideal&seed=0"


def _block(xi: torch.Tensor, beta: float, budget: RetrievalBudget | None = None) -> MHNBlock:
    return ideal_block(xi, beta, budget)


def _board_retrieve(blk: MHNBlock):
    def run(x0: np.ndarray, beta: float) -> np.ndarray:
        return blk.retrieve(x0, beta=beta).x

    return run


def test_ideal_board_retrieval_equals_the_torch_update() -> None:
    blk, x0 = retrieval_setup()  # shared with benchmarks/mhn_checks.py, which prints the figures
    steps = RetrievalBudget(max_steps=40, tol=0.0)
    got = blk.retrieve(x0)
    want = retrieve(torch.from_numpy(x0), blk.device_patterns(), 14.0, steps).x.numpy()
    np.testing.assert_allclose(got.x, want, rtol=0, atol=1e-5)
    assert got.steps == 40 and got.mvm_calls == 2 * 40 + 1  # two reads per step, one for the energy
    # the energy is the torch energy at the returned state; the update never raised it
    e_ref = energy(torch.from_numpy(got.x), blk.device_patterns(), 14.0).numpy()
    np.testing.assert_allclose(got.energy, e_ref, rtol=0, atol=1e-5)
    e0 = energy(torch.from_numpy(x0), blk.device_patterns(), 14.0).numpy()
    assert (got.energy <= e0 + 1e-6).all()
    assert got.time_s > 0 and got.energy_j > 0
    # with a tolerance: it converges, to the same states, within far fewer steps
    conv = blk.retrieve(x0, budget=RETRIEVAL_CONVERGED)
    assert conv.converged and conv.steps < 40 and conv.noise_floor == 0.0
    np.testing.assert_allclose(conv.x, want, rtol=0, atol=1e-5)


def test_retrieval_budget_is_declared_and_checked() -> None:
    xi = equidistant_patterns(4, 8, 1.0)
    blk = _block(xi, beta=2.0, budget=RetrievalBudget(max_steps=3, tol=1e-12))
    lo, hi = blk.box()
    x0 = np.full((2, 8), 0.5 * (lo + hi))
    r = blk.retrieve(x0 + 0.01 * np.random.default_rng(1).standard_normal((2, 8)).clip(-1, 1) * (hi - lo))
    assert r.steps == 3 and not r.converged
    with pytest.raises(ConfigurationError, match=r"state box"):
        blk.retrieve(np.full((1, 8), hi + 1.0))
    with pytest.raises(ConfigurationError, match=r"shape"):
        blk.retrieve(np.zeros((1, 7)))
    with pytest.raises(ConfigurationError, match=r"max_steps"):
        RetrievalBudget(max_steps=MAX_RETRIEVAL_STEPS + 1)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    steps=st.one_of(st.integers(), st.floats(allow_nan=True), st.booleans()),
    tol=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5)),
    every=st.integers(-3, MAX_RETRIEVAL_STEPS + 3),
)
def test_budget_bounds_property(steps, tol, every) -> None:
    ok = (
        isinstance(steps, int)
        and not isinstance(steps, bool)
        and 1 <= steps <= MAX_RETRIEVAL_STEPS
        and math.isfinite(tol)
        and tol >= 0
        and 1 <= every <= MAX_RETRIEVAL_STEPS
    )
    if ok:
        b = RetrievalBudget(max_steps=steps, tol=tol, check_every=every)
        assert b.max_steps == steps
    else:
        with pytest.raises(ConfigurationError, match=r"retrieval budget"):
            RetrievalBudget(max_steps=steps, tol=tol, check_every=every)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(beta=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 10)))
def test_beta_bounds_property(beta) -> None:
    if math.isfinite(beta) and 0 < beta <= MAX_BETA:
        assert check_beta(beta) == float(beta)
    else:
        with pytest.raises(ConfigurationError, match=r"beta must be"):
            check_beta(beta)


def test_jacobian_at_the_symmetric_point_is_beta_times_the_covariance() -> None:
    """The derivation's step, checked: at the mean of equidistant patterns p is uniform and
    dT/dx = beta C, so beta_c = 1 / lambda_max(C) = N / (r^2 (1 - c))."""
    for n, d, r, c in ((10, 64, 1.0, 0.0), (6, 12, 2.0, 0.3), (5, 5, 0.7, -0.2)):
        xi = equidistant_patterns(n, d, r, cos=c, seed=n)
        m = xi.mean(1, keepdim=True).T
        np.testing.assert_allclose(update(m, xi, 3.0).numpy(), m.numpy(), atol=1e-12)
        x = m.clone().requires_grad_(True)
        auto = torch.autograd.functional.jacobian(lambda v, xi=xi: update(v, xi, 3.0)[0], x)[:, 0, :]
        np.testing.assert_allclose(jacobian(m, xi, 3.0)[0].numpy(), auto.numpy(), atol=1e-10)
        np.testing.assert_allclose(auto.numpy(), 3.0 * covariance(xi).numpy(), atol=1e-10)
        crit = critical_beta(xi)
        assert crit.symmetric
        assert crit.beta_c == pytest.approx(n / (r * r * (1 - c)), rel=1e-9)


@pytest.mark.parametrize(("n", "d", "r"), TRANSITION_SETTINGS)
def test_measured_transition_on_the_ideal_board_within_ten_percent(n: int, d: int, r: float) -> None:
    setup = transition_setup(n, d, r)
    xi, crit, blk, starts = setup.xi, setup.crit, setup.block, setup.starts
    factors = TRANSITION_FACTORS
    pts = sweep(
        _board_retrieve(blk), xi, [f * crit.beta_c for f in factors], crit=crit, starts=starts, box=blk.box()
    )
    measured = measured_critical(pts)
    assert measured == pytest.approx(crit.beta_c, rel=0.10)
    low, high = pts[0], pts[-1]
    assert low.escaped == 0.0 and low.minima == 1  # one attractor: every start ends there
    assert high.escaped == 1.0 and high.minima == n  # one minimum per pattern
    assert min(high.overlaps) > 0.99


def test_stored_digits_retrieved_above_the_transition_and_collapse_below() -> None:
    setup = digits_setup()
    crit, blk, queries, labels = setup.crit, setup.block, setup.queries, setup.labels
    assert not crit.symmetric  # a general set: the branch of x* ends at a fold
    pats = blk.device_patterns().numpy()
    for ratio in DIGITS_RETRIEVED_RATIOS:
        end = blk.retrieve(queries, beta=ratio * crit.beta_c).x
        nearest = np.linalg.norm(end[:, :, None] - pats[None], axis=1).argmin(1)
        assert (setup.labels_of_patterns[nearest] == labels).mean() >= 0.95, ratio
    for ratio in DIGITS_COLLAPSED_RATIOS:
        end = blk.retrieve(queries, beta=ratio * crit.beta_c).x
        assert len(distinct(end, 0.01)) == 1, ratio  # every query fell to the single attractor
