"""The phase diagnostic end to end on one board: derive, sweep, refine, report
(`hil mhn phase` and `benchmarks/mhn_phase.py` run it)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from torch import Tensor

from drivers import Device
from hil.mhn.block import MHNBlock
from hil.mhn.core import RetrievalBudget
from hil.mhn.phase import Critical, PhasePoint, Starts, critical_beta, locate, measured_critical, sweep

RATIOS = (0.25, 0.5, 0.7, 0.8, 0.9, 0.95, 1.05, 1.1, 1.2, 1.5, 2.0, 3.0)  # beta / beta_c of the sweep
KINDS = {
    "pitchfork": "pitchfork at the mean",
    "fold": "end of the single-attractor branch at a fold",
    "crossover": "no instability: a crossover, beta_c where the branch is softest",
}
BUDGET = RetrievalBudget(max_steps=3000, tol=1e-7, check_every=5)


@dataclass
class PhaseReport:
    crit: Critical  # derived from the patterns as stored (the host's)
    beta_c_readback: float  # derived from the patterns the tile holds (read back after programming)
    beta_c_measured: float  # where half the near-centre starts stop returning (NaN: not in the sweep)
    points: list[PhasePoint] = field(default_factory=list)
    mvm_calls: int = 0
    board_time_s: float = 0.0
    board_energy_j: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return {
            "beta_c_derived": self.crit.beta_c,
            "beta_c_readback": self.beta_c_readback,
            "beta_c_measured": self.beta_c_measured,
            "lambda_cov": self.crit.lambda_cov,
            "kind": self.crit.kind,
            "mvm_calls": self.mvm_calls,
            "board_time_s": self.board_time_s,
            "board_energy_j": self.board_energy_j,
            "points": [p.to_dict() for p in self.points],
        }


def phase_diagnostic(
    device: Device,
    xi: Tensor,
    *,
    ratios: Sequence[float] = RATIOS,
    budget: RetrievalBudget = BUDGET,
    centre_starts: int = 32,
    anywhere_starts: int = 32,
    eps: float = 0.02,
    refine: int = 4,
    seed: int = 0,
    extra: Sequence[float] = (),
    programming: str = "verify",
    dither: float | str = "auto",
    out_range: float = 4.0,
) -> PhaseReport:
    """Store `xi` (d, N) on `device` (`programming`: a scheme of `hil.programming`), sweep beta
    over `ratios` of the derived beta_c from the same starts (and at the `extra` betas, e.g.
    the user's), and bisect `refine` times inside the bracket where the escape crosses 1/2.
    `dither` (`MHNBlock`): "auto" dithers the reads on a board whose mvm ADC quantises, so
    that displacements of the near-centre starts below an ADC step are not rounded away.
    `out_range`: the mvm ADC's range in weight units the read-out may fill (`MHNBlock`)."""
    crit = critical_beta(xi)
    blk = MHNBlock(
        device,
        xi.float().numpy(),
        beta=crit.beta_c,
        budget=budget,
        seed=seed,
        programming=programming,
        dither=dither,
        out_range=out_range,
    )
    # a second write: the first one's read-back finds stuck devices, and the scheme lets their
    # partners carry the weight (`hil.programming.StuckDevices`); on rram one stuck-high device
    # of a pair otherwise adds a whole w_max to a pattern entry and inflates the covariance
    blk.sync(force=True)
    readback = critical_beta(blk.device_patterns()).beta_c
    starts = Starts.draw(xi, centre=centre_starts, anywhere=anywhere_starts, eps=eps, seed=seed)
    cost = [0, 0.0, 0.0]

    def run(x0: np.ndarray, beta: float) -> np.ndarray:
        r = blk.retrieve(x0, beta=beta)
        cost[0] += r.mvm_calls
        cost[1] += r.time_s
        cost[2] += r.energy_j
        return r.x

    box = blk.box()
    points = sweep(
        run,
        xi,
        [f * crit.beta_c for f in ratios] + [float(b) for b in extra],
        crit=crit,
        starts=starts,
        box=box,
    )
    measured = measured_critical(points)
    ordered = sorted(points, key=lambda p: p.beta)
    for a, b in itertools.pairwise(ordered):
        if a.escaped < 0.5 <= b.escaped and refine > 0:
            measured = locate(run, xi, crit, starts, lo=a.beta, hi=b.beta, iters=refine, box=box)
            break
    return PhaseReport(crit, readback, measured, points, cost[0], cost[1], cost[2])


def describe(report: PhaseReport, beta: float) -> list[str]:
    """The lines `hil mhn phase` prints for a user's `beta`."""
    from hil.mhn.phase import meaning

    c = report.crit
    ratio = c.ratio(beta)
    meas = report.beta_c_measured
    lowest = min(p.beta for p in report.points)
    if math.isfinite(meas):
        where = f"{meas:.4g} ({meas / c.beta_c:.3f} of derived)"
    elif meas < 0:
        where = (
            f"below the sweep: the starts near the centre escape already at its lowest beta, {lowest:.4g} "
            "(no transition measured; on a noisy board or coarse converters the memory may never settle "
            "near its centre: compare with emulator://?preset=ideal)"
        )
    else:
        where = "not in the sweep (no beta of it made the starts escape)"
    lines = [
        f"beta_c derived {c.beta_c:.4g} (lambda_max of the pattern covariance {c.lambda_cov:.4g}; "
        f"{KINDS[c.kind]}); "
        f"from the read-back patterns {report.beta_c_readback:.4g}; measured on the board " + where,
        f"beta {beta:.4g}: beta_eff = beta * lambda_max(C) = {beta * c.lambda_cov:.4g}, critical "
        f"{c.beta_eff_c:.4g}; beta_eff / beta_eff_c = beta / beta_c = {ratio:.3g}",
        meaning(ratio),
    ]
    if math.isfinite(meas) and abs(meas / c.beta_c - 1) > 0.1:
        lines.append(
            f"On this board the transition was measured at {meas:.4g}, not {c.beta_c:.4g}: the board's "
            f"noise and converters move it, and your beta is {beta / meas:.3g} of the measured value."
        )
    return lines
