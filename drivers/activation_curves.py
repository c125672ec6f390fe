"""The node curves of `drivers.activation` as torch functions: `Activation`'s methods call
these, and `rho_inplace` is what TorchScript compiles into a settle loop
(`emulator.settle_script`, which imports it from `drivers.activation`, as does everyone).

Kept apart from `drivers.activation` so that the curves' names, `Activation` and the
`Topology` that holds one, load without torch (`hil info`, `hil lock status` of a configured
board, tests/test_lazy_packages.py); this module is imported at the first curve computed.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from drivers.activation import _EDGE, _PI2_12, _TOP

if TYPE_CHECKING:
    from drivers.activation import Activation


def rho(act: Activation, u: Tensor, gain: float) -> Tensor:
    """The node's output for the drive `u`."""
    if act.kind == "hard_sigmoid":
        return torch.clamp(gain * u, 0.0, 1.0)
    if act.kind == "logistic":
        return torch.sigmoid(4.0 * gain * u - 2.0)
    return _soft_rho_(gain * u, act.width)


def rho_(act: Activation, x: Tensor, gain: float) -> Tensor:
    """`rho` in place on the drive `x` (the settle loops' buffers); returns `x`."""
    return rho_inplace(x, act.kind, gain, act.width)


def rho_prime(act: Activation, u: Tensor, gain: float) -> Tensor:
    """d rho / du: for the hard sigmoid ``gain`` off the rails and 0 on them (its value at
    the corners themselves is the one-sided 0)."""
    a = gain * u
    if act.kind == "hard_sigmoid":
        return ((a > 0) & (a < 1)).to(u.dtype) * gain
    if act.kind == "logistic":
        r = torch.sigmoid(4.0 * a - 2.0)
        return 4.0 * gain * r * (1.0 - r)
    return gain * (torch.sigmoid(a / act.width) - torch.sigmoid((a - 1.0) / act.width))


def inverse(act: Activation, s: Tensor, gain: float) -> Tensor:
    """The drive u with ``rho(u) = s`` (for the hard sigmoid: ``s / gain``, the leak's
    current); ±inf at the rails of the smooth curves."""
    if act.kind == "hard_sigmoid":
        return s / gain
    if act.kind == "logistic":
        return (torch.logit(s) + 2.0) / (4.0 * gain)
    return _soft_inverse(s, act.width) / gain


def leak(act: Activation, s: Tensor, gain: float) -> Tensor:
    """The energy's node term ``G(s)``, elementwise: ``G' = rho^{-1}``, so that the energy
    ``sum_free G(s) - Phi(s)`` is stationary exactly at ``s = rho(dPhi/ds)``. Finite on
    [0, 1] (states at the rails included); G(rho(0)) = 0."""
    if act.kind == "hard_sigmoid":
        return s.square() / (2.0 * gain)
    x = s.double().clamp(_EDGE, _TOP)
    if act.kind == "logistic":
        g = _logistic_g(x) - _logistic_g(torch.tensor(1.0 / (1.0 + math.exp(2.0)), dtype=x.dtype))
    else:
        a = _soft_inverse(x, act.width)
        g = x * a - _soft_primitive(a, act.width)
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
