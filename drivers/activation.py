"""The neuron: a node circuit's transfer curve and the energy term that goes with it.

Every settle (the emulator's analog and mvm modes, its conv settle, the host-iterated settle
over `mvm`, the reference DHN) computes the next state of a free node as ``s = rho(u)`` of
its drive ``u = dPhi/ds``, and its energy as

    E(s) = sum_free G(s) - Phi(s) (+ the nudge's cost),   G(s) = integral of rho^{-1}(s) ds

(the Hopfield 1984 / Cohen-Grossberg form): dE/ds = rho^{-1}(s) - u vanishes exactly at the
fixed point s = rho(u), so EP (which only reads dPhi/dtheta at the fixed points) and the
reference's implicit differentiation (which uses rho'(u) there) stay exact for every curve
here. For the hard sigmoid G is today's ``s^2 / (2 gain)``.

All curves are written in the normalised drive ``a = gain * u``, and each has the hard
sigmoid's midpoint (rho = 1/2 at a = 1/2) and at most its slope (``gain``), so the step and
noise-floor bounds the settles derive from ``gain`` hold for all of them. Kinks bias EP: at a
corner rho' jumps, and a finite beta straddles it (issue 20); the smooth curves have none.

This module is the one place where the curves live; it imports torch only, so the emulator,
the host stack and the drivers share it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from drivers.errors import ConfigurationError
from drivers.scalars import as_float

ActivationKind = Literal["hard_sigmoid", "soft_sigmoid", "logistic"]
ACTIVATIONS: tuple[str, ...] = ("hard_sigmoid", "soft_sigmoid", "logistic")

# declared bounds of the soft sigmoid's corner width (in units of the linear range, a = 0..1):
# below 0.01 the corner is narrower than one step of a 7-bit DAC (1/128) and the curve is the
# hard sigmoid for every practical purpose (and its rho' as kinked); above 0.25 the node no
# longer reaches its rails (rho = 0.17 at a = 0) and its slope is 0.76 gain at most
MIN_WIDTH = 0.01
MAX_WIDTH = 0.25
DEFAULT_WIDTH = 0.1

_PI2_12 = math.pi**2 / 12.0
# where G is evaluated, states are kept this far inside (0, 1) (its limits there are finite; a
# float64 state closer to 1 than 1e-16 is 1)
_EDGE = 1e-300
_TOP = 1.0 - 2.0**-53


@dataclass(frozen=True)
class Activation:
    """A node circuit's transfer curve, by name (`ACTIVATIONS`) and, for the soft sigmoid,
    its corner width.

    - ``hard_sigmoid``: ``clamp(a, 0, 1)``. A transimpedance amplifier (op-amp with a
      feedback resistor, gain = R_f / R_ref) whose output saturates at its supply rails,
      idealised as two sharp corners. The default.
    - ``soft_sigmoid``: ``w softplus(a / w) - w softplus((a - 1) / w)``, the hard sigmoid with
      each corner rounded over a width ``w`` (`width`, in units of the linear range). The same
      amplifier with a diode or transistor clamp at each rail: an exponential I-V turns on
      over a few thermal voltages, so the rails are reached smoothly.
    - ``logistic``: ``sigmoid(4 a - 2)``. A differential pair (BJT, or MOS in subthreshold):
      its output current is ``I_tail / 2 (1 + tanh(v / 2 U_T))``, a logistic in the input
      voltage; the tanh-type saturating amplifier mapped to [0, 1] is this very curve
      (``(1 + tanh(x)) / 2 = sigmoid(2 x)``), so it is not a separate model. Scaled to the hard
      sigmoid's midpoint and slope.
    """

    kind: str = "hard_sigmoid"
    width: float = 0.0  # soft_sigmoid only; 0 there means DEFAULT_WIDTH

    def __post_init__(self) -> None:
        if self.kind not in ACTIVATIONS:
            raise ConfigurationError(
                f"unknown activation {self.kind!r}; choose one of {', '.join(ACTIVATIONS)}"
            )
        if self.kind == "soft_sigmoid":
            w = DEFAULT_WIDTH if self.width == 0.0 else self.width
            w = as_float("soft_sigmoid corner width", w, -math.inf, math.inf)
            if not MIN_WIDTH <= w <= MAX_WIDTH:
                raise ConfigurationError(
                    f"soft_sigmoid corner width must be in [{MIN_WIDTH}, {MAX_WIDTH}] (units of the "
                    f"linear range), got {w!r}; use hard_sigmoid for a sharper corner, logistic "
                    "for a wider one"
                )
            object.__setattr__(self, "width", w)
        elif self.width not in (0, 0.0):
            raise ConfigurationError(
                f"a corner width ({self.width!r}) is a soft_sigmoid parameter; {self.kind} has "
                "none: drop it, or choose soft_sigmoid"
            )

    # ------------------------------------------------------------------------------- names
    @classmethod
    def parse(cls, spec: Activation | str) -> Activation:
        """An `Activation` from itself or a name, ``"soft_sigmoid"`` or ``"soft_sigmoid:0.05"``."""
        if isinstance(spec, Activation):
            return spec
        if not isinstance(spec, str):
            raise ConfigurationError(f"activation must be a name, got {type(spec).__name__} {spec!r:.40}")
        kind, _, width = spec.partition(":")
        if not width:
            return cls(kind)
        try:
            w = float(width)
        except ValueError:
            raise ConfigurationError(
                f"activation {spec!r}: the corner width after ':' must be a number, e.g. soft_sigmoid:0.05"
            ) from None
        return cls(kind, w)

    @property
    def spec(self) -> str:
        """The name `parse` reads back: ``"logistic"``, ``"soft_sigmoid:0.1"``."""
        return f"{self.kind}:{self.width:g}" if self.kind == "soft_sigmoid" else self.kind

    @property
    def hard(self) -> bool:
        return self.kind == "hard_sigmoid"

    # ------------------------------------------------------------------------------ curves
    def rho(self, u: Tensor, gain: float) -> Tensor:
        """The node's output for the drive `u`."""
        if self.kind == "hard_sigmoid":
            return torch.clamp(gain * u, 0.0, 1.0)
        if self.kind == "logistic":
            return torch.sigmoid(4.0 * gain * u - 2.0)
        return _soft_rho_(gain * u, self.width)

    def rho_(self, x: Tensor, gain: float) -> Tensor:
        """`rho` in place on the drive `x` (the settle loops' buffers); returns `x`."""
        return rho_inplace(x, self.kind, gain, self.width)

    def rho_prime(self, u: Tensor, gain: float) -> Tensor:
        """d rho / du: for the hard sigmoid ``gain`` off the rails and 0 on them (its value at
        the corners themselves is the one-sided 0)."""
        a = gain * u
        if self.kind == "hard_sigmoid":
            return ((a > 0) & (a < 1)).to(u.dtype) * gain
        if self.kind == "logistic":
            r = torch.sigmoid(4.0 * a - 2.0)
            return 4.0 * gain * r * (1.0 - r)
        return gain * (torch.sigmoid(a / self.width) - torch.sigmoid((a - 1.0) / self.width))

    def inverse(self, s: Tensor, gain: float) -> Tensor:
        """The drive u with ``rho(u) = s`` (for the hard sigmoid: ``s / gain``, the leak's
        current); ±inf at the rails of the smooth curves."""
        if self.kind == "hard_sigmoid":
            return s / gain
        if self.kind == "logistic":
            return (torch.logit(s) + 2.0) / (4.0 * gain)
        return _soft_inverse(s, self.width) / gain

    def leak(self, s: Tensor, gain: float) -> Tensor:
        """The energy's node term ``G(s)``, elementwise: ``G' = rho^{-1}``, so that the energy
        ``sum_free G(s) - Phi(s)`` is stationary exactly at ``s = rho(dPhi/ds)``. Finite on
        [0, 1] (states at the rails included); G(rho(0)) = 0."""
        if self.kind == "hard_sigmoid":
            return s.square() / (2.0 * gain)
        x = s.double().clamp(_EDGE, _TOP)
        if self.kind == "logistic":
            g = _logistic_g(x) - _logistic_g(torch.tensor(1.0 / (1.0 + math.exp(2.0)), dtype=x.dtype))
        else:
            a = _soft_inverse(x, self.width)
            g = x * a - _soft_primitive(a, self.width)
        return (g / gain).to(s.dtype)


def _logistic_g(x: Tensor) -> Tensor:
    """An antiderivative of the logistic's inverse ``(logit(x) + 2) / 4``: the binary entropy's
    negative over 4, plus x / 2."""
    return (torch.xlogy(x, x) + torch.xlogy(1.0 - x, 1.0 - x)) / 4.0 + x / 2.0


def rho_inplace(x: Tensor, kind: str, gain: float, width: float) -> Tensor:
    """`Activation.rho_` of the curve named `kind` (with its corner `width`) as a plain
    function of tensors, strings and floats, so that TorchScript can compile it into a
    settle loop (`emulator.settle_script`): the same calls, so the same numbers."""
    if kind == "hard_sigmoid":
        if gain != 1.0:
            x.mul_(gain)
        return x.clamp_(0.0, 1.0)
    if kind == "logistic":
        return x.mul_(4.0 * gain).sub_(2.0).sigmoid_()
    if gain != 1.0:
        x.mul_(gain)
    return _soft_rho_(x, width)


def _soft_rho_(a: Tensor, w: float) -> Tensor:
    """The soft sigmoid of the normalised drive `a`, in place on `a`: ``w sp(a/w) - w sp((a-1)/w)``
    written as ``clamp(a, 0, 1) + w log(1 + e^{-|a|/w}) - w log(1 + e^{-|a-1|/w})`` (``w sp(x/w) =
    relu(x) + w log(1 + e^{-|x|/w})`` and ``relu(a) - relu(a - 1) = clamp(a, 0, 1)``), each corner
    term one ``softplus`` of a non-positive argument, so that `F.softplus` never switches to its
    linear branch (past its threshold it returns x, an error of w e^{-20} that the inverse near a
    rail, with its slope near 0, would blow up). 10 torch calls against 18 for the two softplus
    written out; the same curve to float rounding, and exactly 1 far past the upper rail, where
    ``relu(a) - relu(a - 1)`` rounds."""
    beta = 1.0 / w
    low = F.softplus(torch.abs(a).neg_(), beta)
    high = F.softplus(torch.sub(a, 1.0).abs_().neg_(), beta)
    return a.clamp_(0.0, 1.0).add_(low).sub_(high)


def _log1mexp(t: Tensor) -> Tensor:
    """``log(1 - exp(-t))`` for t > 0, accurate at small and large t."""
    return torch.where(t < math.log(2.0), torch.log(-torch.expm1(-t)), torch.log1p(-torch.exp(-t)))


def _soft_inverse(s: Tensor, w: float) -> Tensor:
    """The normalised drive a with ``w sp(a/w) - w sp((a-1)/w) = s``: solving for e^{a/w} gives
    ``a = s + w log(1 - e^{-s/w}) - w log(1 - e^{-(1-s)/w})``."""
    x = s.clamp(_EDGE, _TOP) if s.dtype == torch.float64 else s.clamp(1e-38, 1.0 - 2.0**-24)
    return x + w * _log1mexp(x / w) - w * _log1mexp((1.0 - x) / w)


def _eta(t: Tensor) -> Tensor:
    """``eta(T) = integral_0^T log(1 + e^{-x}) dx`` for T >= 0: a Taylor series of
    ``T log 2 - T^2/4 + integral log cosh(x/2)`` below 1, else ``pi^2/12 + Li2(-e^{-T})`` as its
    alternating series (24 terms: error below 1e-13)."""
    small = t < 1.0
    x = torch.where(small, t, torch.zeros_like(t)) / 2.0
    x2 = x * x
    series = x2 * x * (1 / 6 + x2 * (-1 / 60 + x2 * (1 / 315 + x2 * (-17 / 22680 + x2 * 31 / 155925))))
    low = t * math.log(2.0) - t * t / 4.0 + 2.0 * series
    q = torch.exp(-torch.where(small, torch.ones_like(t), t))
    tail = torch.zeros_like(t)
    p = torch.ones_like(t)
    for k in range(1, 25):
        p = p * q
        tail = tail + (1.0 if k % 2 else -1.0) * p / (k * k)
    return torch.where(small, low, _PI2_12 - tail)


def _soft_primitive(a: Tensor, w: float) -> Tensor:
    """``F(a) = integral_0^a rho(x) dx`` of the soft sigmoid (normalised drive): the hard
    sigmoid's ``relu(a)^2/2 - relu(a-1)^2/2`` plus the corners' share ``w^2 [sgn(a) eta(|a|/w)
    - sgn(a-1) eta(|a-1|/w) - eta(1/w)]`` (``w softplus(x/w) = relu(x) + w log(1 + e^{-|x|/w})``)."""
    b = a - 1.0
    hard = (F.relu(a).square() - F.relu(b).square()) / 2.0
    corners = torch.sign(a) * _eta(a.abs() / w) - torch.sign(b) * _eta(b.abs() / w)
    return hard + w * w * (corners - _eta(torch.tensor(1.0 / w, dtype=a.dtype)))


HARD_SIGMOID = Activation()
