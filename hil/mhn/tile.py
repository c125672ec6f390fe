"""How a pattern set sits on a crossbar tile, and how states reach it through the converters.

The tile has ``d + 1`` rows (the state's d lines and a bias line held at 1) and N columns, one
per pattern, differential pairs as every tile of the project (`hil.programming`). The DAC only
drives states within its range ``[lo, hi]`` (`Limits.adc_range`, normalised), and a pattern's
components are signed, so a state x goes to the rows affinely, ``u = a x + b``, and the bias
row undoes the offset:

    W = k [xi ; -b 1^T xi]     =>    [u, 1] W = k a xi^T x          (the similarities)

The read-out drives the columns with the softmax scaled to the DAC's top, ``q = hi p / max p``
(the probabilities use the whole DAC range: a peaked softmax would otherwise sit on a few
codes), and ``q W^T`` gives ``k hi xi p / max p`` on the first d rows; the host multiplies
back. `k` is chosen so that no read-out can leave the mvm ADC's range (`out_range`, weight
units; the emulator's default is 4) for any state in the box, and the coupling's `w_max` is the
largest weight, so the tile uses its whole conductance window.

The encoding is fixed when the block is made (from the initial patterns and `margin`):
learned patterns that leave the box are clipped to +-w_max when programmed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from drivers import BIAS, ConfigurationError, Coupling, Limits, SettleBudget, Topology

STATE, SIM = "x", "p"  # the node groups: the state (rows) and the pattern similarities (columns)


@dataclass(frozen=True)
class Encoding:
    """The affine map of states onto the DAC and the weight scale of the tile."""

    x_lo: float  # the box of states the DAC can carry (the patterns' range, with margin)
    x_hi: float
    dac_lo: float
    dac_hi: float
    k: float  # weights per pattern unit
    w_max: float  # the coupling's w_max: the largest |weight| at the initial patterns

    @property
    def a(self) -> float:
        return (self.dac_hi - self.dac_lo) / (self.x_hi - self.x_lo)

    @property
    def b(self) -> float:
        return self.dac_lo - self.a * self.x_lo

    def weights(self, xi: Tensor) -> Tensor:
        """The tile's (d + 1, N) weights for patterns `xi` (d, N)."""
        return self.k * torch.cat([xi, -self.b * xi.sum(0, keepdim=True)], 0)

    def patterns(self, w: Tensor) -> Tensor:
        """The patterns a tile's weights hold (the inverse of `weights`, bias row dropped)."""
        return w[:-1] / self.k

    @staticmethod
    def of(xi: Tensor, limits: Limits, *, out_range: float = 4.0, margin: float = 0.0) -> Encoding:
        """The encoding for patterns `xi` on a board with `limits` (see the module docstring)."""
        if xi.ndim != 2 or min(xi.shape) < 1:
            raise ConfigurationError(f"patterns must be a (d, N) matrix, got shape {tuple(xi.shape)}")
        if not bool(torch.isfinite(xi).all()):
            raise ConfigurationError("patterns contain NaN or infinite values")
        if not (math.isfinite(out_range) and out_range > 0):
            raise ConfigurationError(f"out_range must be > 0, got {out_range!r}")
        lo, hi = float(xi.min()), float(xi.max())
        span = max(hi - lo, 1e-12)
        lo, hi = lo - margin * span, hi + margin * span
        if lo == hi:
            lo, hi = lo - 0.5, hi + 0.5
        dlo, dhi = limits.adc_range
        dhi = min(dhi, limits.clamp_max)
        if not dlo <= 0.0 < dhi:
            raise ConfigurationError(
                f"the board's DAC range {limits.adc_range} does not hold 0; an MHN tile needs it for "
                "the softmax read-out"
            )
        enc = Encoding(lo, hi, dlo, dhi, 1.0, 1.0)
        w = enc.weights(xi.double())
        umax = max(abs(dlo), abs(dhi))
        bound = max(float(w.abs().sum(0).max()) * umax, float(w.abs().sum(1).max()) * dhi)
        k = out_range / max(bound, 1e-30)
        w_max = float(w.abs().max()) * k
        if w_max > limits.max_w_max:
            # w_max is proportional to out_range and does not depend on the patterns' scale
            fits = math.floor(out_range * limits.max_w_max / w_max * 1000) / 1000
            raise ConfigurationError(
                f"patterns need w_max {w_max:.3g} > the board's {limits.max_w_max:g} (their largest weight "
                f"when the read-out fills the mvm ADC's out_range {out_range:g}); give out_range={fits:g} or "
                f"less (MHNBlock(out_range=...), `hil mhn phase --out-range {fits:g}`): the reads then use "
                f"{fits:g} of the ADC's {out_range:g} weight units. Scaling the patterns changes nothing "
                "(the encoding is scale-free); more patterns, or longer ones, lower w_max"
            )
        return Encoding(lo, hi, dlo, dhi, k, w_max)


def topology(
    d: int,
    n: int,
    w_max: float,
    tile: str = "xi",
    max_steps: int | None = None,
    max_gain: float | None = None,
) -> Topology:
    """One bipartite tile, ``(x, bias) x p``; no settle is asked of the board (mode ``mvm``).
    `max_steps`: the steps the board declares (`Limits.max_settle_steps`); the budget, which
    no settle uses, keeps within them (the default's 100 steps were refused by a board that
    declares fewer, with a fix about a budget the user of an MHN block never sets). `max_gain`:
    the board's (`Limits.max_gain`); the gain, which no settle uses either, keeps within it
    (gain 1 was refused by a board declaring less, naming Topology.gain)."""
    budget = SettleBudget() if max_steps is None else SettleBudget().capped(max_steps)
    return Topology(
        {STATE: d, SIM: n},
        (Coupling(tile, (STATE, BIAS), (SIM,), w_max=w_max),),
        mode="mvm",
        budget=budget,
        gain=1.0 if max_gain is None else min(1.0, max_gain),
    )
