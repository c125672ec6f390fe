"""The setups of the MHN's tests (`tests/test_mhn.py`, `test_mhn_learn.py`, `test_mhn_layer.py`),
shared with `benchmarks/mhn_checks.py`, which prints the quantities the tests bound (docs/mhn.md
"Measured figures"). One place for each setup, so that the printed figures are of the setups the
tests assert on. Every board is the in-process emulator's `ideal` preset, seed 0, unless named."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from drivers import open_device
from hil.mhn.block import MHNBlock
from hil.mhn.core import RetrievalBudget, update
from hil.mhn.digits import corrupt, digit_memory
from hil.mhn.phase import Critical, Starts, critical_beta, equidistant_patterns

IDEAL = "emulator://?preset=ideal&seed=0"

# the ideal board's retrieval against the torch update
RETRIEVAL_BETA = 14.0
RETRIEVAL_STEPS = 40
RETRIEVAL_CONVERGED = RetrievalBudget(max_steps=500, tol=1e-7)

# EP gradients of the patterns (at 0.5 beta_c float32 reads stop short of 1e-8)
GRADIENT_BUDGET = RetrievalBudget(max_steps=1000, tol=1e-8)
GRADIENT_RATIOS = (0.5, 1.5, 3.0)  # beta / beta_c

# the MHN layer in an ff-EBM
LAYER_D_IN, LAYER_D_OUT, LAYER_N, LAYER_BETA = 8, 4, 6, 3.0

# the measured transition
TRANSITION_SETTINGS = ((10, 64, 1.0), (5, 32, 2.0), (8, 16, 0.5))  # (n, d, r)
TRANSITION_FACTORS = (0.5, 0.8, 0.9, 0.95, 1.05, 1.1, 1.25, 2.0)  # beta / beta_c
TRANSITION_BUDGET = RetrievalBudget(max_steps=3000, tol=1e-8)

# stored digits retrieved from corrupted queries
DIGITS_PER_CLASS, DIGITS_REPEATS, DIGITS_CORRUPTION = 1, 10, 0.3
DIGITS_RETRIEVED_RATIOS = (2.0, 4.0)
DIGITS_COLLAPSED_RATIOS = (0.5, 0.8)


def ideal_block(xi: torch.Tensor, beta: float, budget: RetrievalBudget | None = None) -> MHNBlock:
    """Patterns `xi` (d x n) on the ideal board."""
    return MHNBlock(open_device(IDEAL), xi.float().numpy(), beta=beta, budget=budget)


def retrieval_setup() -> tuple[MHNBlock, np.ndarray]:
    """10 orthonormal patterns in d = 64 at beta 14, a 40-step budget without a tolerance, and 48
    queries uniform in the state box."""
    xi = equidistant_patterns(10, 64, 1.0, seed=1)
    blk = ideal_block(xi, beta=RETRIEVAL_BETA, budget=RetrievalBudget(max_steps=RETRIEVAL_STEPS, tol=0.0))
    lo, hi = blk.box()
    x0 = np.random.default_rng(0).uniform(lo, hi, (48, 64))
    return blk, x0


@dataclass
class GradientProblem:
    block: MHNBlock
    beta: float
    x0: np.ndarray  # (12, 16) queries
    target: np.ndarray  # (12, 16)
    mask: np.ndarray  # (16,): the loss on the first 8 components


def gradient_problem(ratio: float) -> GradientProblem:
    """6 patterns in d = 16 at `ratio` times beta_c, 12 queries (convex combinations of the
    patterns), targets on 8 of the 16 components."""
    xi = equidistant_patterns(6, 16, 1.0, seed=3)
    beta = ratio * critical_beta(xi).beta_c
    blk = MHNBlock(open_device(IDEAL), xi.float().numpy(), beta=beta, budget=GRADIENT_BUDGET)
    rng = np.random.default_rng(0)
    lo, hi = blk.box()
    x0 = rng.dirichlet(np.ones(6), 12) @ xi.numpy().T
    target = 0.5 * rng.uniform(lo, hi, (12, 16))
    mask = np.zeros(16)
    mask[:8] = 1.0
    return GradientProblem(blk, beta, x0, target, mask)


def gradient_clamp() -> np.ndarray:
    """The clamped half of `gradient_problem`'s state (an input)."""
    clamp = np.zeros(16, dtype=bool)
    clamp[8:] = True
    return clamp


def layer_setup() -> tuple[MHNBlock, torch.Generator]:
    """An 8-in, 4-out block of 6 random patterns at beta 3 with a margin of 0.1, and the
    generator the tests draw their inputs from. (A margin: a state at a pattern's extreme value
    sits on the box's edge, where a nudge would be clipped; margin 0 gave a cosine of 0.95 for
    the patterns' gradient.)"""
    gen = torch.Generator().manual_seed(0)
    xi = 0.8 * torch.randn(LAYER_D_IN + LAYER_D_OUT, LAYER_N, generator=gen, dtype=torch.float64)
    budget = RetrievalBudget(max_steps=2000, tol=1e-9)
    blk = MHNBlock(open_device(IDEAL), xi.float().numpy(), beta=LAYER_BETA, budget=budget, margin=0.1)
    return blk, gen


def layer_unrolled(xin: torch.Tensor, xi: torch.Tensor, steps: int = 400) -> torch.Tensor:
    """The output part at the clamped fixed point, by plain iteration of the torch update
    (autograd through it converges to the implicit gradient where the iteration contracts)."""
    out = torch.zeros(xin.shape[0], LAYER_D_OUT, dtype=xi.dtype)
    for _ in range(steps):
        out = update(torch.cat([xin, out], 1), xi, LAYER_BETA)[:, LAYER_D_IN:]
    return out


@dataclass
class TransitionSetup:
    xi: torch.Tensor
    crit: Critical
    block: MHNBlock
    starts: Starts


def transition_setup(n: int, d: int, r: float) -> TransitionSetup:
    """`n` equidistant patterns of norm `r` in `d` dimensions on the ideal board, 24 near-centre
    and 16 anywhere starts."""
    xi = equidistant_patterns(n, d, r, seed=0)
    crit = critical_beta(xi)
    blk = ideal_block(xi, beta=crit.beta_c, budget=TRANSITION_BUDGET)
    starts = Starts.draw(xi, centre=24, anywhere=16, eps=0.02, seed=0)
    return TransitionSetup(xi, crit, blk, starts)


@dataclass
class DigitsSetup:
    labels_of_patterns: np.ndarray  # (10,)
    crit: Critical
    block: MHNBlock
    queries: np.ndarray  # (100, 64), clipped to the state box
    labels: np.ndarray  # (100,)


def digits_setup() -> DigitsSetup:
    """One stored digit per class, ten queries of each with 30 % of pixels replaced by uniform
    noise (seed 0), on the ideal board."""
    mem = digit_memory(per_class=DIGITS_PER_CLASS, norm=1.0)
    xi = mem.patterns
    crit = critical_beta(xi)
    rng = np.random.default_rng(0)
    images = np.repeat(mem.raw.T, DIGITS_REPEATS, axis=0)
    labels = np.repeat(mem.labels, DIGITS_REPEATS)
    queries = mem.encode(corrupt(images, DIGITS_CORRUPTION, rng))
    blk = ideal_block(xi, beta=crit.beta_c, budget=TRANSITION_BUDGET)
    return DigitsSetup(mem.labels, crit, blk, np.clip(queries, *blk.box()), labels)
