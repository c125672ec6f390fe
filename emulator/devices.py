"""Pulse-response models of one resistive device (the physics of one crossbar cell).

Everything is in SI units: siemens, seconds, joules. A device sits at a conductance
``G`` inside its own bounds ``[g_lo, g_hi]`` (the nominal ``[g_min, g_max]`` scattered
device to device by ``bounds_dtod``, and kept inside it: the spread only narrows a device's
window, as a SET's compliance current caps what a real cell conducts, so no device ever
holds more than the g_max its board declares, nor less than its g_min).
With ``x = (G - g_lo) / (g_hi - g_lo)`` the *mean* size of one
potentiating (up) or depressing (down) pulse is

=============  ===============================  =====================================
kind           up step                          down step
=============  ===============================  =====================================
constant       ``dw_up``                        ``dw_down``
linear         ``dw_up * (1 - gamma x)``        ``dw_down * (1 - gamma_dn (1 - x))``
soft_bounds    ``dw_up * (1 - x)``              ``dw_down * x``
exponential    ``dw_up * exp(-gamma x)``        ``dw_down * exp(-gamma_dn (1 - x))``
=============  ===============================  =====================================

(steps are clipped at 0), where ``dw_up = dw_min (1 + up_down)`` and
``dw_down = dw_min (1 - up_down)``, both scaled per device by one log-normal factor of
mean 1 and relative std ``dw_min_dtod`` (``up_down`` itself is scattered by
``up_down_dtod``). So ``dw_min`` is the step a pulse takes when it starts at the bound it
moves away from; ``soft_bounds`` is ``linear`` with ``gamma = 1``, and its mid-range step
is ``dw_min / 2`` (aihwkit quotes its ``dw_min`` at mid-range). Every pulse is multiplied
by ``1 + dw_min_ctoc N(0,1)`` (cycle-to-cycle noise, as aihwkit's ``dw_min_std`` with its
default ``mult_noise=True``; its ReRamSBPresetDevice sets ``mult_noise=False``, an additive
``dw_min dw_min_std N(0,1)`` that does not vanish with the step at a soft bound, where this
model's does) and the result is clipped to the device's bounds.

A one-sided device (PCM) only has gradual SET (up) pulses; a negative pulse count is a
RESET, which melts the cell back to ``g_lo + |N(0, reset_noise)|`` whatever the count.

Drift (PCM): after a write at time ``t_w`` the conductance is
``G(t) = G0 * (max(t - t_w, t0) / t0) ** -nu`` with ``nu`` per device
(``drift_nu + drift_nu_dtod N(0,1)``, clipped at 0), never below the device's own ``g_lo``
(`TileArray` clamps the drifted state: a device does not drift past its RESET / HRS floor).

Accumulated 1/f noise (PCM, opt-in ``noise_1f_scale``): after the write (or pulse train) that
set it ends, a device's conductance wanders as ``G(t) (1 + noise_1f_scale Q(G0) f(tau) z)``,
``f(tau) = sqrt(ln((tau + t_read) / (2 t_read)))`` (0 at ``tau = t_read``), ``z ~ N(0, 1)``
drawn per device at the write: the accumulated 1/f read noise of aihwkit's PCMLikeNoiseModel.
Relaxation (RRAM, opt-in ``relax_sigma`` / ``relax_mean``): likewise a move of
``ln(1 + tau / relax_t0) (relax_mean + relax_sigma z)`` siemens.

Wear-out (only with a declared ``pulse_endurance``): a device's bounds narrow with its pulse
count and a spent device is stuck (`emulator.wear`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Literal, NamedTuple

import torch

from drivers.errors import ConfigurationError
from drivers.scalars import as_int, check_within
from emulator.ir_drop import check_ir_model
from emulator.statistics import check_statistics

MAX_WIRE_OHMS = 1e3  # per cell segment: a declared bound, far above any metal line
MAX_G = 1e-2  # S: 10 mS (100 ohm), ten times the most conductive ReRAM/PCM state (~1 mS)
MAX_GAMMA = 100.0  # step-shape factor: at 100 steps vanish within 1 % (linear) of the window
MAX_CTOC = 5.0  # c2c std of a pulse, relative: the largest of aihwkit's published fits
MAX_DRIFT_T0 = 10 * 365.25 * 86400.0  # s: the 10-year retention of a non-volatile memory
MAX_ENERGY_J = 1e-6  # J per pulse or per device read
MAX_TIME_S = 1.0  # s per pulse or per row read

DeviceKind = Literal["constant", "linear", "soft_bounds", "exponential"]
KINDS: tuple[str, ...] = ("constant", "linear", "soft_bounds", "exponential")


class Bound(NamedTuple):
    """The allowed range of one numeric model parameter and why (`DeviceModel.bounds`)."""

    name: str
    lo: float
    hi: float
    why: str
    unit: str = ""
    lo_open: bool = False
    hi_open: bool = False

    def check(self, label: str, value: object) -> None:
        """ConfigurationError naming the parameter, `value`, the range, why and the fix, unless
        `value` is inside (None: an optional parameter left unset, always accepted)."""
        if value is not None:
            check_within(
                label,
                self.name,
                value,
                self.lo,
                self.hi,
                lo_open=self.lo_open,
                hi_open=self.hi_open,
                unit=self.unit,
                why=self.why,
            )


@dataclass(frozen=True)
class DeviceModel:
    """Nominal parameters of one device technology and its spreads (SI units).

    ``dw_min_ctoc`` and ``bounds_dtod`` are stds of a factor ``1 + s N(0,1)``;
    ``dw_min_dtod`` is the relative std of a log-normal factor of mean 1; ``up_down_dtod``
    and ``drift_nu_dtod`` are absolute stds; ``write_noise``, ``reset_noise`` and
    ``read_noise`` are stds in siemens. Every d2d draw happens once, at fabrication
    (`DeviceParams.draw`); ``drift_nu_dtod = 0`` with ``drift_nu = 0`` disables drift.
    """

    kind: DeviceKind = "constant"
    g_min: float = 1e-6
    g_max: float = 10e-6
    dw_min: float = 1e-9  # nominal step (S), see the module docstring for its meaning per kind
    up_down: float = 0.0  # up step x (1 + up_down), down step x (1 - up_down)
    gamma: float = 0.0  # shape of the linear / exponential up step
    gamma_down: float | None = None  # shape of the down step; None: same as gamma
    dw_min_dtod: float = 0.0  # relative d2d std of the step (log-normal)
    up_down_dtod: float = 0.0  # absolute d2d std of up_down
    dw_min_ctoc: float = 0.0  # relative c2c std of each pulse
    bounds_dtod: float = 0.0  # relative d2d std of g_min and of g_max (each relative to itself, inside them)
    write_noise: float = 0.0  # std (S) of a direct programming write
    reset_noise: float = 0.0  # one-sided devices: a RESET lands at g_lo + |N(0, reset_noise)|
    read_noise: float = 0.0  # std (S) of one read of one device
    drift_nu: float = 0.0  # power-law drift exponent; 0 disables drift
    drift_nu_dtod: float = 0.0  # absolute d2d std of nu
    drift_t0: float = 20.0  # s, drift reference time
    stuck_fraction: float = 0.0  # fraction of devices stuck, half at g_lo, half at g_hi
    one_sided: bool = False  # PCM: gradual SET only; negative counts RESET the device
    # ohms of each wire segment between neighbouring cells (row and column wires alike): the
    # tile's IR drop (`emulator.ir_drop`); 0 = ideal wires
    wire_resistance: float = 0.0
    # how the IR drop is turned into the tile's effective conductances at each write:
    # "attenuation" (one warm-started solve per write, cheap enough to train with; its error
    # against the exact map is measured in docs/emulator.md) or "exact" (R solves per write)
    ir_model: str = "attenuation"
    # "constant": the noise and drift figures above hold for every device in every state;
    # "pcm": they are the mid-window values of the state-dependent model of `emulator.statistics`
    statistics: str = "constant"
    pulse_energy_j: float = 1e-12  # one programming pulse
    pulse_time_s: float = 50e-9  # one programming pulse (rows are programmed one at a time)
    read_time_s: float = 1e-6  # reading one row of devices (all columns in parallel)
    read_energy_j: float = 0.0  # one read of one device
    # pulses one device is rated for over its life, declared as `Limits.pulse_endurance`; the
    # presets declare none; set it (``emulator://?preset=rram&pulse_endurance=1000000``) to
    # try a board that declares one: it counts each device's pulses and refuses past it
    # (`Board.wear`) and models the devices' wear-out (`emulator.wear`, docs/emulator.md "Wear")
    pulse_endurance: int | None = None
    # wear-out, only with a pulse_endurance (`emulator.wear`): the share of the endurance after
    # which a device's window narrows (linearly in log pulses, closed at the endurance), and
    # the share of the devices that fail stuck at g_hi (the others at g_lo). Left out of the
    # repr, so a board without an endurance keeps its configuration fingerprint
    # (`Board.configuration` adds them where an endurance is declared)
    wear_onset: float = field(default=0.1, repr=False)
    wear_stuck_high: float = field(default=0.5, repr=False)
    # accumulated 1/f noise (PCM): the conductance a device holds wanders from what was written
    # by ``noise_1f_scale Q(G0) G(t) sqrt(ln((tau + t_read) / (2 t_read))) z``, tau the time since
    # the write or pulse train that set it ended, z ~ N(0, 1) drawn per device at that write, Q
    # the 1/f term of the PCM fit (`emulator.statistics.pcm_1f_q`); the accumulated read noise of
    # aihwkit's PCMLikeNoiseModel (Nandakumar et al., ICECS 2019; Joshi et al., Nat. Commun.
    # 2020), whose ``read_noise_scale`` is this scale (1: the fit). 0 (every preset): off. Apart
    # from the per-read `read_noise`, which stays: the short-term noise of one read. Out of the
    # repr, so boards without it keep their fingerprint (`extra_key`)
    noise_1f_scale: float = field(default=0.0, repr=False)
    noise_1f_t_read: float = field(default=250e-9, repr=False)  # s: the fit's t_read (aihwkit's default)
    # conductance relaxation (RRAM): after the write (or pulse train) that set it ends, a
    # device moves by ``ln(1 + tau / relax_t0) (relax_mean + relax_sigma z)`` siemens, z ~ N(0, 1)
    # drawn per device at that write: a spread (and a mean decay, < 0) growing with log time,
    # the form of aihwkit's ReRamCMONoiseModel (std and mean linear in ln t) and of the spread
    # Wan et al. (Nature 2022) measured from 1 s to 2 days (aihwkit's ReRamWan2022NoiseModel);
    # values in `emulator.presets` (RRAM_RELAXATION). 0 (every preset): off. Out of the repr
    relax_sigma: float = field(default=0.0, repr=False)  # S per e-fold of time
    relax_mean: float = field(default=0.0, repr=False)  # S per e-fold of time (< 0: decay)
    relax_t0: float = field(default=1.0, repr=False)  # s: the time scale of the log

    @property
    def relaxes(self) -> bool:
        return self.relax_sigma > 0 or self.relax_mean != 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigurationError(f"device kind must be one of {KINDS}, got {self.kind!r}")
        if not 0.0 <= self.g_min < self.g_max:
            raise ConfigurationError(
                f"need 0 <= g_min < g_max, got g_min={self.g_min:.3g} S, g_max={self.g_max:.3g} S"
            )
        if not -1.0 < self.up_down < 1.0:
            raise ConfigurationError(f"up_down must be in (-1, 1), got {self.up_down}")
        if not 0.0 <= self.stuck_fraction <= 1.0:
            raise ConfigurationError(f"stuck_fraction must be in [0, 1], got {self.stuck_fraction}")
        if self.pulse_endurance is not None:
            as_int("pulse_endurance", self.pulse_endurance, 1, 10**15)
        check_statistics(self.statistics)
        check_ir_model(self.ir_model)
        if not 0.0 <= self.wire_resistance <= MAX_WIRE_OHMS:
            raise ConfigurationError(
                f"wire_resistance must be in [0, {MAX_WIRE_OHMS:g}] ohms per cell segment, got "
                f"{self.wire_resistance}"
            )
        for bound in self.bounds():
            bound.check("device", getattr(self, bound.name))

    def bounds(self) -> tuple[Bound, ...]:
        """The physically meaningful range of each numeric parameter not checked above,
        generous (users explore) but refusing values that make the model's formulas (module
        docstring) or the board's circuit accounting meaningless. Some depend on the window."""
        window, g_max = self.g_max - self.g_min, self.g_max
        shape = "steps shrink toward the bound they approach (< 0 grows them); past 100 they vanish"
        noise = "a noise std is >= 0, and one above g_max is the state rather than noise on it"
        return (
            # ReRAM / PCM / ECRAM cells hold 1e-7..1e-3 S; line currents, IR drop and energies
            # assume uA-mA per device (10 mS at 0.25 V is already 2.5 mA per cell)
            Bound("g_max", self.g_min, MAX_G, "cells hold 1e-7..1e-3 S; currents assume uA-mA", "S", True),
            # one step across the whole window is a binary device; a larger one means no more
            Bound("dw_min", 0.0, window, "a step is > 0 and at most the window g_max - g_min", "S", True),
            # linear: 1 - gamma u (clipped at 0); exponential: exp(-gamma u). gamma < 0 grows the
            # steps toward the bound; at 100 they vanish within 1 % (linear) / 5 % of the window
            Bound("gamma", 0.0, MAX_GAMMA, shape),
            Bound("gamma_down", 0.0, MAX_GAMMA, shape),
            # a log-normal factor of mean 1, always > 0; a spread past 100 % of the step leaves
            # the nominal dw_min (what write-verify firmware steers by) describing no device
            Bound("dw_min_dtod", 0.0, 1.0, "a step spread past 100 % leaves dw_min describing no device"),
            # up_down + s N(0,1) is clipped to [-1, 1], where one direction's step is 0: past 0.5
            # over 5 % of the devices could move one way only
            Bound("up_down_dtod", 0.0, 0.5, "past 0.5 over 5 % of the devices clip at up_down = +-1"),
            # each pulse x (1 + ctoc N(0,1)): aihwkit's ReRAM fits (3.75-5, cited in
            # `emulator.presets`) already send ~40 % of pulses the wrong way; past 5 a pulse's
            # direction is a coin flip (46 % wrong at 10)
            Bound(
                "dw_min_ctoc", 0.0, MAX_CTOC, "each pulse is x (1 + ctoc N(0,1)); past 5 its sign is random"
            ),
            # bounds x (1 + s N(0,1)): aihwkit's raw-device spreads are 0.1-0.3; at 0.5, 2 % of
            # the g_max draws are already negative (and clipped to a tenth of the window)
            Bound("bounds_dtod", 0.0, 0.5, "bounds are x (1 + s N(0,1)); past 0.5 over 2 % turn negative"),
            # stds (S) of one write, one RESET landing, one read
            Bound("write_noise", 0.0, g_max, noise, "S"),
            Bound("reset_noise", 0.0, g_max, noise, "S"),
            Bound("read_noise", 0.0, g_max, noise, "S"),
            # measured PCM nu is 0.005-0.1 (Joshi et al. 2020; up to 0.1 at low G, Nandakumar et
            # al. 2019); nu >= 1 makes the conductance vanish faster than 1/t
            Bound(
                "drift_nu",
                0.0,
                1.0,
                "measured nu is 0.005-0.1; nu >= 1 vanishes faster than 1/t",
                hi_open=True,
            ),
            # the spread of nu (measured 0.008-0.045) likewise: within nu's own range
            Bound("drift_nu_dtod", 0.0, 1.0, "a spread of nu past nu's own range [0, 1)", hi_open=True),
            # drift is referred to seconds-minutes after a write (20 s for PCM); a non-volatile
            # memory retains for 10 years, so a later t0 never drifts in the device's life
            Bound("drift_t0", 0.0, MAX_DRIFT_T0, "t0 is > 0 and within a 10-year retention", "s", True),
            # a cell's pulse costs pJ (PCM RESET ~10-100 pJ); a read of 10 mS at 0.25 V for 1 us
            # is 0.6 nJ; pulses last ns-ms, a row read ns-us
            Bound(
                "pulse_energy_j", 0.0, MAX_ENERGY_J, "a pulse costs pJ, a microjoule is past any cell", "J"
            ),
            Bound("read_energy_j", 0.0, MAX_ENERGY_J, "a device read costs < 1 nJ even at 10 mS", "J"),
            Bound("pulse_time_s", 0.0, MAX_TIME_S, "programming pulses last ns-ms", "s"),
            Bound("read_time_s", 0.0, MAX_TIME_S, "a row read takes ns-us", "s"),
            # wear-out (`emulator.wear`): the window narrows from this share of the endurance on;
            # 1 keeps it whole until the device is spent, 0 would narrow it from the first pulse
            Bound(
                "wear_onset",
                0.0,
                1.0,
                "a share of the endurance, > 0 (1: no narrowing before the end)",
                lo_open=True,
            ),
            Bound("wear_stuck_high", 0.0, 1.0, "a share of the devices (those that fail stuck at g_max)"),
            # a multiple of the published fit (aihwkit's read_noise_scale); Q(G) <= 0.2 and the
            # time factor stays under 6.5 for 300 years, so past 10 the noise exceeds G itself
            Bound("noise_1f_scale", 0.0, 10.0, "a multiple of the PCM fit's 1/f noise; past 10 it exceeds G"),
            # the fit's read time (250 ns): a read lasts ns-ms
            Bound("noise_1f_t_read", 0.0, 1e-3, "the 1/f fit's read time; reads last ns-ms", "s", True),
            # per e-fold of time (ln(1 + tau / t0) is 33 after 10 years at t0 = 1 s): a spread or
            # a decay of more than the window per e-fold leaves no state after one
            Bound("relax_sigma", 0.0, window, "a relaxation spread per e-fold past the window", "S"),
            Bound("relax_mean", -window, window, "a relaxation drift per e-fold past the window", "S"),
            Bound(
                "relax_t0",
                0.0,
                MAX_DRIFT_T0,
                "the log's time scale, > 0 and within a 10-year retention",
                "s",
                True,
            ),
        )

    @property
    def g_range(self) -> float:
        """Nominal conductance range g_max - g_min (the weight scale)."""
        return self.g_max - self.g_min

    @property
    def levels(self) -> float:
        """Nominal number of steps across the range (range / dw_min)."""
        return self.g_range / self.dw_min

    @property
    def gamma_dn(self) -> float:
        return self.gamma if self.gamma_down is None else self.gamma_down

    def extra_key(self) -> str:
        """The fields of effects that are off by default and left out of the repr, as text for
        a fingerprint: '' where all of them are off."""
        key = ""
        if self.noise_1f_scale:
            key += f" 1f(scale={self.noise_1f_scale!r}, t_read={self.noise_1f_t_read!r})"
        if self.relaxes:
            key += f" relax(sigma={self.relax_sigma!r}, mean={self.relax_mean!r}, t0={self.relax_t0!r})"
        return key

    def wear_key(self) -> str:
        """The wear-out fields as text (they are left out of the repr), for a fingerprint."""
        return f"wear_onset={self.wear_onset!r}, wear_stuck_high={self.wear_stuck_high!r}"

    @property
    def drifts(self) -> bool:
        return self.drift_nu > 0 or self.drift_nu_dtod > 0 or self.statistics == "pcm"


def _window_in_float32(model: DeviceModel) -> tuple[float, float]:
    """The declared window [g_min, g_max] as float32 values: g_max rounded down (a device never
    reads a float32 step above what the board declares, which its line-current limit is
    computed from), g_min to nearest (a float32 step below it is within the window's float32
    slack, `drivers.checks.conductance_window`, and leaves the presets' devices as they were)."""
    hi = torch.tensor(model.g_max, dtype=torch.float32)
    if float(hi) > model.g_max:
        hi = torch.nextafter(hi, torch.tensor(-math.inf, dtype=torch.float32))
    return float(torch.tensor(model.g_min, dtype=torch.float32)), float(hi)


@dataclass
class DeviceParams:
    """Per-device parameters (the fabrication draw). All tensors have the tile's device shape.

    ``stuck`` devices sit at ``stuck_value`` forever (their ``nu`` is 0).
    """

    g_lo: torch.Tensor
    g_hi: torch.Tensor
    dw_up: torch.Tensor
    dw_down: torch.Tensor
    nu: torch.Tensor
    stuck: torch.Tensor  # bool
    stuck_value: torch.Tensor

    @staticmethod
    def draw(
        model: DeviceModel, shape: tuple[int, ...], fab: torch.Generator, device: torch.device
    ) -> DeviceParams:
        """Draw one chip. Every draw is taken whatever the spreads are, in a fixed order, so
        turning one spread on does not change the others for the same seed."""
        return DeviceParams.draw_chip(model, shape, fab, device)[0]

    @staticmethod
    def draw_chip(
        model: DeviceModel, shape: tuple[int, ...], fab: torch.Generator, device: torch.device
    ) -> tuple[DeviceParams, torch.Tensor]:
        """`draw`, and the uniform draw (float32, `shape`) that picks which bound a stuck
        device sits at (below 0.5: g_lo): the wear-out model (`emulator.wear`) takes the bound a
        device fails at from it, so that it needs no draw of its own."""

        def normal() -> torch.Tensor:
            return torch.randn(shape, generator=fab, device=fab.device).to(device, torch.float32)

        def uniform() -> torch.Tensor:
            return torch.rand(shape, generator=fab, device=fab.device).to(device, torch.float32)

        n_scale, n_ud, n_lo, n_hi, n_nu = normal(), normal(), normal(), normal(), normal()
        u_stuck, u_side = uniform(), uniform()

        # log-normal with mean 1 and relative std ~dw_min_dtod: a step scale is positive, and a
        # Gaussian factor would put ~0.4 % of the devices (at 0.3) below a fifth of nominal
        s = math.sqrt(math.log1p(model.dw_min_dtod**2))
        scale = model.dw_min * torch.exp(s * n_scale - 0.5 * s * s)
        ud = (model.up_down + model.up_down_dtod * n_ud).clamp(-1.0, 1.0)
        # every device's own window lies inside the declared [g_min, g_max] (the spread only
        # narrows it): the board declares g_max as the most any device conducts (a SET's
        # compliance), and its line-current limit is its longest line at g_max; a device above
        # it would take a full line of saturated devices past that limit (issue: rram devices
        # 0.5 % over g_max stopped `hil calibrate --tile-size` at the tile maximum in pulse)
        lo, hi = _window_in_float32(model)
        g_lo = (model.g_min * (1.0 + model.bounds_dtod * n_lo)).clamp(lo, hi - 0.1 * model.g_range)
        g_hi = (model.g_max * (1.0 + model.bounds_dtod * n_hi)).clamp(max=hi)
        # a device's window never collapses below a tenth of the nominal range
        g_hi = torch.maximum(g_hi, g_lo + 0.1 * model.g_range).clamp(max=hi)
        nu = (model.drift_nu + model.drift_nu_dtod * n_nu).clamp_min(0.0)
        stuck = u_stuck < model.stuck_fraction
        stuck_value = torch.where(u_side < 0.5, g_lo, g_hi)
        nu = torch.where(stuck, torch.zeros_like(nu), nu)
        params = DeviceParams(g_lo, g_hi, scale * (1.0 + ud), scale * (1.0 - ud), nu, stuck, stuck_value)
        return params, u_side

    @staticmethod
    def nominal(model: DeviceModel, shape: tuple[int, ...], device: torch.device) -> DeviceParams:
        """The nominal device everywhere: what firmware assumes before calibration."""

        def full(v: float) -> torch.Tensor:
            return torch.full(shape, v, dtype=torch.float32, device=device)

        return DeviceParams(
            g_lo=full(model.g_min),
            g_hi=full(model.g_max),
            dw_up=full(model.dw_min * (1.0 + model.up_down)),
            dw_down=full(model.dw_min * (1.0 - model.up_down)),
            nu=full(model.drift_nu),
            stuck=torch.zeros(shape, dtype=torch.bool, device=device),
            stuck_value=full(model.g_min),
        )

    def _map(self, f: Callable[[torch.Tensor], torch.Tensor]) -> DeviceParams:
        return DeviceParams(*(f(getattr(self, name)) for name in _PARAM_FIELDS))

    def index(self, idx: torch.Tensor) -> DeviceParams:
        """The parameters of the devices at flat indices `idx` (a 1-D result)."""
        return self._map(lambda t: t.reshape(-1)[idx])


_PARAM_FIELDS = tuple(f.name for f in fields(DeviceParams))


@dataclass
class PulsePlan:
    """Direction-resolved constants for a train of pulses, one direction per device.

    With ``u`` the fraction of its window a device has travelled from the bound its pulse
    moves away from (``u = x`` going up, ``1 - x`` going down), the mean step is
    ``dw * shape(u)`` with shape 1 (constant), ``1 - gamma u`` (linear, clipped at 0),
    ``1 - u`` (soft bounds) or ``exp(-gamma u)`` (exponential). Resolving the direction
    once per train keeps the per-pulse work to a handful of element-wise operations.
    """

    origin: torch.Tensor  # g_lo going up, g_hi going down
    inv_span: torch.Tensor  # +1 / (g_hi - g_lo) going up, -1 / (g_hi - g_lo) going down
    signed_dw: torch.Tensor  # +dw_up going up, -dw_down going down
    gamma: torch.Tensor | float
    g_lo: torch.Tensor
    g_hi: torch.Tensor

    @staticmethod
    def make(model: DeviceModel, up: torch.Tensor, p: DeviceParams) -> PulsePlan:
        inv = 1.0 / (p.g_hi - p.g_lo)
        gamma: torch.Tensor | float = model.gamma
        if model.gamma_dn != model.gamma:
            gamma = torch.where(up, model.gamma, model.gamma_dn)
        return PulsePlan(
            origin=torch.where(up, p.g_lo, p.g_hi),
            inv_span=torch.where(up, inv, -inv),
            signed_dw=torch.where(up, p.dw_up, -p.dw_down),
            gamma=gamma,
            g_lo=p.g_lo,
            g_hi=p.g_hi,
        )

    def head(self, n: int) -> PulsePlan:
        """Views of the first `n` devices (1-D plans)."""
        gamma = self.gamma[:n] if isinstance(self.gamma, torch.Tensor) else self.gamma
        return PulsePlan(
            self.origin[:n], self.inv_span[:n], self.signed_dw[:n], gamma, self.g_lo[:n], self.g_hi[:n]
        )

    def mean_step(self, model: DeviceModel, g: torch.Tensor) -> torch.Tensor:
        """Signed mean change (S) of one pulse at conductance `g`."""
        if model.kind == "constant":
            return self.signed_dw.expand_as(g)
        u = ((g - self.origin) * self.inv_span).clamp(0.0, 1.0)
        if model.kind == "soft_bounds":
            return self.signed_dw * (1.0 - u)
        if model.kind == "linear":
            return self.signed_dw * (1.0 - self.gamma * u).clamp_min(0.0)
        return self.signed_dw * torch.exp(-self.gamma * u)

    def apply(self, model: DeviceModel, g: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """Conductance after one pulse; `noise` is N(0,1) for the c2c variation (None: none)."""
        step = self.mean_step(model, g)
        if noise is not None and model.dw_min_ctoc > 0:
            step = step * (1.0 + model.dw_min_ctoc * noise)
        return torch.clamp(g + step, self.g_lo, self.g_hi)


def step_size(model: DeviceModel, g: torch.Tensor, up: torch.Tensor, p: DeviceParams) -> torch.Tensor:
    """Mean magnitude (S, >= 0) of one pulse at conductance `g`; `up` (bool) picks the direction."""
    return PulsePlan.make(model, up, p).mean_step(model, g).abs()


def reset_level(model: DeviceModel, p: DeviceParams, noise: torch.Tensor) -> torch.Tensor:
    """Where a one-sided (PCM) device lands after a RESET: just above its own g_lo."""
    return torch.minimum(p.g_lo + model.reset_noise * noise.abs(), p.g_hi)


def drift_factor(model: DeviceModel, elapsed: torch.Tensor, nu: torch.Tensor) -> torch.Tensor:
    """``(max(elapsed, t0) / t0) ** -nu`` (float32), for `elapsed` seconds since the last write."""
    ratio = (elapsed.clamp_min(model.drift_t0) / model.drift_t0).to(torch.float32)
    return torch.exp(-nu * torch.log(ratio))
