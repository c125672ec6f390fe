"""Board presets: one device technology plus its periphery.

The numbers are rounded, order-of-magnitude values from the cited device literature and
from the device fits shipped with IBM's aihwkit; they are not a fit to any one chip. Where
a value is a choice made for this emulator (rather than a published number) the comment
says so. The nominal window [g_min, g_max] of each preset is the window the board
guarantees (every working device saturates at or just inside it: ``bounds_dtod`` of 1-2 %,
a spread that only narrows a device's window, never takes it past the declared ends), so a
weight mapping may use all of it; aihwkit's much larger bound spreads (``w_max_dtod``
0.1-0.3) describe raw devices before such a window is chosen, and can be restored with
``bounds_dtod``. To vary a preset, ``dataclasses.replace(PRESETS["rram"].device, wire_resistance=2.0)``.

Conventions (see `emulator.devices`): ``dw_min`` is the step a pulse takes from the bound
it moves away from; for ``soft_bounds`` the mid-range step is ``dw_min / 2`` (aihwkit quotes
its ``dw_min`` at mid-range, on a weight range of 2).
"""

from __future__ import annotations

from dataclasses import dataclass

from drivers.errors import ConfigurationError
from emulator.devices import DeviceModel
from emulator.periphery import PeripheryModel


@dataclass(frozen=True)
class BoardPreset:
    name: str
    device: DeviceModel
    periphery: PeripheryModel
    description: str = ""


# Ideal: a constant-step device with 10,000 levels (like aihwkit's IdealizedPresetDevice,
# Gokmen & Vlasov, Front. Neurosci. 2016, without its variations), no noise of any kind,
# no drift, no faults, ideal converters. Window and costs as the rram preset, so energy
# numbers stay comparable.
IDEAL_DEVICE = DeviceModel(
    kind="constant",
    g_min=1e-6,
    g_max=10e-6,
    dw_min=0.9e-9,  # range / 10,000
    pulse_energy_j=2e-12,
    pulse_time_s=50e-9,
    read_time_s=1e-6,
)

# RRAM (HfOx / TaOx filamentary, 1T1R). Sources:
# - window 1-10 uS with ~100 usable levels and gradual, soft-bounded pulse response:
#   Prezioso et al., Nature 521, 61 (2015) (Al2O3/TiO2-x crossbar); Yao et al., Nature 577,
#   641 (2020) (TaOx/HfOx 1T1R arrays programmed by write-verify);
# - soft bounds, d2d step spread 0.3, up/down d2d spread 0.05: aihwkit's
#   ReRamSBPresetDevice / ReRamESPresetDevice, fits to Gong et al., Nat. Commun. 9, 2102
#   (2018); the ES fit has up_down 0.26, we take 0.2;
# - c2c noise: the aihwkit fits use a very large c2c std (3.75-5 x dw_min) for stochastic
#   pulse trains; we choose 0.5 per pulse, since this preset models write-verify use. Its form
#   differs too: ReRamSBPresetDevice's is additive (mult_noise=False: dw_min x 3.75 x N(0,1) at
#   any state, so a device at its bound still diffuses), ours multiplies the soft-bounded step
#   (`emulator.devices`), so it vanishes at the bounds with the step;
# - write noise 0.25 uS (~2.8 % of the range, "a few %") and read noise 0.03 uS (~0.3 %
#   of the range, ~0.6 % of a mid-range G; 1/f and RTN): our choices, within the ranges
#   reported for such arrays;
# - 0.5 % stuck devices (forming failures, stuck filaments): our choice, typical of the
#   yields reported for research arrays;
# - pulse: ~2 V x 20 uA x 50 ns = 2 pJ;
# - wire resistance 2.12 ohms per cell segment: NeuroSim's (Chen, Peng & Yu, IEEE TCAD 37,
#   3067 (2018); DNN+NeuroSim `Param.cpp`) copper wire of 40 nm width (aspect ratio 1.9,
#   resistivity 4.03e-8 ohm m) across a 1T1R cell of 4 F = 160 nm: 4.03e-8 x 160e-9 /
#   (1.9 x (40e-9)^2) = 2.12 ohm; IR drop through the attenuation model (`emulator.ir_drop`).
RRAM_DEVICE = DeviceModel(
    kind="soft_bounds",
    g_min=1e-6,
    g_max=10e-6,
    dw_min=0.14e-6,  # 64 steps of dw_min, ~128 mid-range steps across the window
    up_down=0.2,
    dw_min_dtod=0.3,
    up_down_dtod=0.05,
    dw_min_ctoc=0.5,
    bounds_dtod=0.01,
    write_noise=0.25e-6,
    read_noise=0.03e-6,
    stuck_fraction=0.005,
    wire_resistance=2.12,
    pulse_energy_j=2e-12,
    pulse_time_s=50e-9,
    read_time_s=1e-6,
    read_energy_j=0.2 * 0.2 * 5e-6 * 1e-6,  # V_read^2 G t_read
)

# PCM (GST mushroom cells). Sources:
# - window 0-25 uS, drift G0 (t/t0)^-nu with t0 = 20 s: Joshi et al., Nat. Commun. 11, 2473
#   (2020); programming noise, drift exponent and read noise as functions of the state
#   (`statistics="pcm"`, `emulator.statistics`): Nandakumar et al., ICECS 2019, the fit of
#   aihwkit's PCMLikeNoiseModel (g_max 25 uS). The figures below are that model's values at
#   mid-window (12.5 uS): programming noise 0.95 uS (0.26 uS at G = 0, 1.06 uS at 25 uS),
#   drift nu 0.049 +- 0.008 (up to 0.1 +- 0.045 at low G);
# - read noise 0.15 uS at mid-window (our choice of scale, ~1.2 % of G; its dependence on G,
#   as G^0.35 over most of the window, from the same fit's 1/f term);
# - gradual SET only, exponentially shrinking increments, large c2c noise (0.6 x dw_min),
#   d2d 0.2, abrupt RESET landing ~0.25 uS above g_min (aihwkit: reset 0.01 +- 0.02 of a
#   weight range of 2): Nandakumar et al., J. Appl. Phys. 124, 152135 (2018) and
#   aihwkit's PCMPresetDevice (fit to Nandakumar et al., Front. Neurosci. 2020);
#   first-SET increment 1.0 uS and gamma 3 (our choice: ~0.2 uS mid-range steps, ~80
#   pulses from RESET to 80 % of the window);
# - pulse energy ~10 pJ for a SET pulse of ~100 ns (Burr et al., Adv. Phys. X 2, 89 (2017));
# - wire resistance 0.35 ohms per cell segment: aihwkit's IR-drop default for its PCM
#   inference studies (IBM/aihwkit `src/aihwkit/simulator/parameters/io.py`, ir_drop_g_ratio
#   = 1 / (0.35 ohm x 5 uS), "0.35 Ohm wire resistance"); IR drop through the attenuation
#   model (`emulator.ir_drop`).
PCM_DEVICE = DeviceModel(
    kind="exponential",
    g_min=0.0,
    g_max=25e-6,
    dw_min=1e-6,
    gamma=3.0,
    dw_min_dtod=0.2,
    up_down_dtod=0.0,
    dw_min_ctoc=0.6,
    bounds_dtod=0.02,
    write_noise=0.953e-6,
    reset_noise=0.25e-6,
    read_noise=0.15e-6,
    drift_nu=0.049,
    drift_nu_dtod=0.008,
    drift_t0=20.0,
    statistics="pcm",
    stuck_fraction=0.003,
    wire_resistance=0.35,
    one_sided=True,
    pulse_energy_j=10e-12,
    pulse_time_s=100e-9,
    read_time_s=250e-9,
    read_energy_j=0.2 * 0.2 * 12e-6 * 250e-9,
)


# ECRAM (Li-ion / protonic electrochemical RAM). Sources:
# - ~1000 near-linear states, linear-step shape, d2d 0.1, c2c 0.3: aihwkit's
#   EcRamPresetDevice, a fit to Tang et al., IEDM 2018 ("ECRAM as scalable synaptic cell
#   for high-speed, low-power neuromorphic computing"): dw_min 0.002 on a weight range of 2
#   over [w_min, w_max] = [-0.8276, 1.1724] (its symmetry point at w = 0, 41.4 % of the
#   window), gamma_up 0.1153 and gamma_down 0.5085 referred to w = 0 and scaled by the
#   bound each step moves towards (aihwkit: step_up = s (1 - gamma_up w / w_max),
#   step_down = s (1 + gamma_down w / |w_min|)). This emulator refers a step to the bound it
#   moves away from (`emulator.devices`: step = dw_min (1 +- up_down) (1 - gamma u), u the
#   fraction of the window travelled from that bound). Converted (`from_aihwkit_linear_step`):
#   up step s a_up (1 - g_up u) with a_up = 1 + gamma_up |w_min| / w_max = 1.0814 and
#   g_up = 2 gamma_up / (w_max a_up) = 0.1819; down step s a_dn (1 - g_dn u) with
#   a_dn = 1 + gamma_down w_max / |w_min| = 1.7204 and g_dn = 2 gamma_down / (|w_min| a_dn)
#   = 0.7143; dw_min = s (a_up + a_dn) / 2 = 1.4009 s, up_down = (a_up - a_dn) / (a_up +
#   a_dn) = -0.2281. The symmetry point stays at 41.4 % of the window (taking aihwkit's
#   gammas as they were put it at 82 %);
# - nanosecond pulses: Onen et al., Science 377, 539 (2022) (5 ns protonic programming);
# - window: we use 1-5 uS (the order of the reported channel conductances; scale it for a
#   given device), low write (0.5 % of range) and read (0.1 % of range) noise, 0.1 % stuck;
#   pulse energy 1 pJ (order of magnitude; the gate charge per pulse is tiny, the driver
#   dominates): our choices.
def from_aihwkit_linear_step(
    dw_min: float, w_min: float, w_max: float, gamma_up: float, gamma_down: float, g_range: float
) -> dict[str, float]:
    """`DeviceModel` step fields (``dw_min`` in S, ``up_down``, ``gamma``, ``gamma_down``) of
    an aihwkit LinearStepDevice with ``mean_bound_reference`` (its steps
    ``s (1 - gamma_up w / w_max)`` up and ``s (1 + gamma_down w / |w_min|)`` down, s =
    `dw_min` on the weight range ``w_max - w_min``), for a window of `g_range` siemens: the
    same mean step at every point of the window (see the ECRAM comment above)."""
    span = w_max - w_min
    s = dw_min / span * g_range
    a_up = 1.0 + gamma_up * (-w_min) / w_max
    a_dn = 1.0 + gamma_down * w_max / (-w_min)
    return {
        "dw_min": s * (a_up + a_dn) / 2.0,
        "up_down": (a_up - a_dn) / (a_up + a_dn),
        "gamma": gamma_up * span / w_max / a_up,
        "gamma_down": gamma_down * span / (-w_min) / a_dn,
    }


# aihwkit's EcRamPresetDevice (Tang et al., IEDM 2018) on a 4 uS window
_ECRAM_STEPS = from_aihwkit_linear_step(0.002, -0.8276, 1.1724, 0.1153, 0.5085, 4e-6)

ECRAM_DEVICE = DeviceModel(
    kind="linear",
    g_min=1e-6,
    g_max=5e-6,
    **_ECRAM_STEPS,
    dw_min_dtod=0.1,
    up_down_dtod=0.01,
    dw_min_ctoc=0.3,
    bounds_dtod=0.01,
    write_noise=0.02e-6,
    read_noise=0.004e-6,
    stuck_fraction=0.001,
    pulse_energy_j=1e-12,
    pulse_time_s=5e-9,
    read_time_s=1e-6,
    read_energy_j=0.2 * 0.2 * 3e-6 * 1e-6,
)

# Opt-in effects (no preset turns them on, so the presets' numbers stay as they were; add them
# with ``dataclasses.replace(RRAM_DEVICE, **RRAM_RELAXATION)`` or in a URI,
# ``emulator://?preset=rram&relax_sigma=6.6e-08``; docs/emulator.md, "Against aihwkit"):
# - RRAM conductance relaxation: the spread of a programmed state grows with log time. Wan et
#   al., Nature 608, 504 (2022) (NeuRRAM), as aihwkit's ReRamWan2022NoiseModel fits it (a
#   polynomial in G / g_max, g_max 40 uS, at 1 s, 1 day and 2 days): at mid-window 2.02 uS at 1 s
#   and 3.91 uS at 1 day, a growth of sqrt(3.91^2 - 2.02^2) = 3.35 uS over ln(86400 s / 1 s) =
#   11.4 e-folds, 0.294 uS per e-fold on 40 uS; on this preset's 9 uS window 0.066 uS per e-fold
#   (0.75 uS after a day; the fit does not grow from 1 to 2 days, where the log law overshoots by
#   ~5 %). No mean decay (the fit has none; aihwkit's ReRamCMONoiseModel has -0.089 uS per
#   e-fold, on CMO/HfOx devices);
RRAM_RELAXATION: dict[str, float] = {"relax_sigma": 0.066e-6, "relax_mean": 0.0, "relax_t0": 1.0}
# - PCM accumulated 1/f noise: the fit itself (aihwkit's PCMLikeNoiseModel, read_noise_scale 1,
#   t_read 250 ns; Nandakumar et al., ICECS 2019), ``Q(G) G sqrt(ln((t + t_read) / (2 t_read)))``:
#   at mid-window 0.72 uS 20 s after programming, 0.84 uS after 1e4 s.
PCM_1F_NOISE: dict[str, float] = {"noise_1f_scale": 1.0, "noise_1f_t_read": 250e-9}

# Periphery: 8-bit DAC / 8-bit ADC (9-bit ADC for ecram), within the 7-8 bit DACs and 8-9 bit
# ADCs usual in analog in-memory computing designs (our choice of one point in that range,
# not a fit to a chip), with a 1 % per-channel gain error, half an LSB offset and a node
# noise of 0.2 % of the state range (our choices: "small" errors that a loop-back
# calibration must find). No mvm output noise (`out_noise`, opt-in): aihwkit's default
# IOParameters.out_noise is 0.06 in the same units (about 1.3 LSB of its 9-bit ADC over +-12),
# ``emulator://?preset=rram&out_noise=0.06`` gives it.
_PERIPHERY = PeripheryModel(dac_bits=8, adc_bits=8, gain_error=0.01, offset_error=0.5, node_noise=0.002)

PRESETS: dict[str, BoardPreset] = {
    "ideal": BoardPreset(
        "ideal", IDEAL_DEVICE, PeripheryModel().ideal(), "constant-step device, no noise, ideal converters"
    ),
    "rram": BoardPreset("rram", RRAM_DEVICE, _PERIPHERY, "HfOx/TaOx-like RRAM, soft bounds"),
    "pcm": BoardPreset("pcm", PCM_DEVICE, _PERIPHERY, "GST PCM, one-sided SET, drift nu ~ 0.05"),
    "ecram": BoardPreset(
        "ecram",
        ECRAM_DEVICE,
        PeripheryModel(dac_bits=8, adc_bits=9, gain_error=0.005, offset_error=0.5, node_noise=0.001),
        "ECRAM, ~1000 near-linear symmetric levels, low noise",
    ),
}


def get_preset(name: str) -> BoardPreset:
    """The preset called `name`; ConfigurationError naming the known ones otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigurationError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}") from None
