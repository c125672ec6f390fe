"""State-dependent device statistics: noise and drift that depend on the conductance a device
holds, as published characterisations measure them.

`DeviceModel.statistics` names the model; ``"constant"`` (every preset but ``pcm``) keeps
the model's `write_noise`, `read_noise`, `drift_nu` and `drift_nu_dtod` for every device
in every state. ``"pcm"`` is the statistical model of Nandakumar et al., "Phase-change
memory models for deep learning training and inference", ICECS 2019 (fitted on a
million-device PCM array, the fit IBM's aihwkit ships as `PCMLikeNoiseModel`), with
``g_rel = G / g_max``:

- programming (direct write) noise, a quadratic in the target:
  ``sigma_prog = (0.26348 + 1.9650 g_rel - 1.1731 g_rel^2) uS x g_max / 25 uS``;
- drift exponent, drawn anew at every write of a device from the conductance written:
  ``nu = |mu + sigma N(0, 1)|`` with ``mu = clip(-0.0155 ln g_rel + 0.0244, 0.049, 0.1)``
  and ``sigma = clip(-0.0125 ln g_rel - 0.0059, 0.008, 0.045)``: devices at low
  conductance drift faster and spread more;
- read noise, 1/f in the fit: its size relative to G is
  ``Q(G) = min(0.0088 / max(g_rel^0.65, 1e-3), 0.2)``, so a read's std is proportional to
  ``Q(G) G`` (growing as G^0.35 over most of the window). The fit gives the noise
  accumulated over a time window, not one read's: the scale is the emulator's choice, set
  by `DeviceModel.read_noise` as the std of one read at mid-window (``G = g_max / 2``).

Firmware-facing figures (`DeviceModel.write_noise`, `read_noise`, `drift_nu`,
`drift_nu_dtod`) stay the nominal mid-window values; the functions here are the truth the
devices follow.
"""

from __future__ import annotations

import math

import torch

from drivers.errors import ConfigurationError

STATISTICS = ("constant", "pcm")

PCM_PROG_UA = (0.26348, 1.9650, -1.1731)  # uS at g_max = PCM_FIT_G_MAX; coefficients of g_rel^0, ^1, ^2
PCM_FIT_G_MAX = 25e-6  # S: the window the programming-noise polynomial was fitted on
_ZERO = 1e-7  # the fit's floor on g_rel (its log and power diverge at 0)


def check_statistics(name: str) -> None:
    if name not in STATISTICS:
        raise ConfigurationError(f"device statistics must be one of {STATISTICS}, got {name!r}")


def pcm_write_std(g: torch.Tensor, g_max: float) -> torch.Tensor:
    """Programming-noise std (S) of a direct write to target `g` (S)."""
    x = g / g_max
    c0, c1, c2 = PCM_PROG_UA
    return (c0 + x * (c1 + c2 * x)).clamp_min_(0.0).mul_(1e-6 * g_max / PCM_FIT_G_MAX)


def pcm_nu_moments(g: torch.Tensor, g_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the drift exponent of a device written to `g` (S)."""
    log_rel = torch.log((g.abs() / g_max).clamp_min(_ZERO))
    mu = (-0.0155 * log_rel + 0.0244).clamp_(0.049, 0.1)
    sd = (-0.0125 * log_rel - 0.0059).clamp_(0.008, 0.045)
    return mu, sd


def pcm_nu(g: torch.Tensor, g_max: float, z: torch.Tensor) -> torch.Tensor:
    """Drift exponents of devices written to `g`, from standard normal draws `z`."""
    mu, sd = pcm_nu_moments(g, g_max)
    return mu.add_(sd * z).abs_()


def _relative_1f(g: torch.Tensor, g_max: float) -> torch.Tensor:
    """``Q(G) G``: the fit's 1/f noise size (S, up to the time-window factor)."""
    rel = (g.abs() / g_max).clamp_min(_ZERO)
    q = (0.0088 / rel.pow(0.65).clamp_min(1e-3)).clamp_max(0.2)
    return q * g.abs()


def pcm_1f_q(g: torch.Tensor, g_max: float) -> torch.Tensor:
    """The fit's relative 1/f noise ``Q(G) = min(0.0088 / max(g_rel^0.65, 1e-3), 0.2)`` of
    devices at `g` (S): the accumulated noise's std is ``Q(G) G sqrt(ln((t + t_read) / (2
    t_read)))`` at a time t after programming (`pcm_1f_time`)."""
    rel = (g.abs() / g_max).clamp_min(_ZERO)
    return (0.0088 / rel.pow(0.65).clamp_min(1e-3)).clamp_max(0.2)


def pcm_1f_time(tau: float, t_read: float) -> float:
    """``sqrt(ln((tau + t_read) / (2 t_read)))``, the 1/f noise's growth with the time `tau` (s)
    since programming ended; 0 up to ``tau = t_read`` (no read can finish sooner)."""
    return math.sqrt(math.log((max(tau, t_read) + t_read) / (2.0 * t_read)))


def pcm_1f_times(tau: torch.Tensor, t_read: float) -> torch.Tensor:
    """`pcm_1f_time` of a tensor of times (float64 in, float32 out)."""
    return ((tau.clamp_min(t_read) + t_read) / (2.0 * t_read)).log_().sqrt_().to(torch.float32)


def pcm_read_std(g: torch.Tensor, g_max: float, read_noise_mid: float) -> torch.Tensor:
    """One read's noise std (S) of devices at `g`: ``Q(G) G`` scaled so that a device at
    mid-window reads with std `read_noise_mid`."""
    mid = min(0.0088 / 0.5**0.65, 0.2) * 0.5 * g_max  # Q(G) G at G = g_max / 2
    return _relative_1f(g, g_max).mul_(read_noise_mid / mid)


def pcm_nu_mid(g_max: float) -> tuple[float, float]:
    """(mean, std) of the drift exponent at mid-window, the preset's nominal figures."""
    mu, sd = pcm_nu_moments(torch.tensor(0.5 * g_max, dtype=torch.float64), g_max)
    return float(mu), float(sd)


def pcm_write_std_mid(g_max: float) -> float:
    return float(pcm_write_std(torch.tensor(0.5 * g_max, dtype=torch.float64), g_max))
