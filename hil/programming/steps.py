"""The pulse response of a tile when no calibration record gives it: a nominal step model.

`measure_steps` runs at setup, before the first write (it leaves the tile in an arbitrary
state); `probe_steps` measures a tile in the state it is in, for a refresh by tuning
(`hil.programming.tune`), which then corrects what the probe pulses moved.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from drivers.base import Device


@dataclass
class StepModel:
    """Nominal pulse response of one tile, when no calibration record gives it.

    On one-sided devices the up step is measured twice, climbing from RESET (`dw_up`, at
    about `g_up`) and from mid-window (`dw_mid`, at `g_mid`); `up_step` interpolates the two
    exponentially (PCM SET increments shrink about exponentially with G, Nandakumar et al.,
    J. Appl. Phys. 2018). Elsewhere the step is taken as constant.
    """

    dw_up: float  # siemens per potentiating pulse
    dw_down: float  # siemens per depressing pulse (nan on one-sided devices)
    one_sided: bool
    energy_j: float = 0.0  # spent measuring it
    pulses: int = 0
    g_up: float = float("nan")
    dw_mid: float = float("nan")
    g_mid: float = float("nan")

    def up_step(self, g: np.ndarray) -> np.ndarray:
        """Mean step (siemens) of one potentiating pulse at conductances `g`."""
        g = np.asarray(g, dtype=np.float64)
        usable = np.isfinite(self.dw_mid) and 0 < self.dw_mid < self.dw_up and self.g_mid > self.g_up
        if not usable:
            return np.full(g.shape, self.dw_up)
        rate = np.log(self.dw_up / self.dw_mid) / (self.g_mid - self.g_up)
        return np.clip(self.dw_up * np.exp(-rate * (g - self.g_up)), 0.02 * self.dw_up, self.dw_up)


def measure_steps(device: Device, tile: str, shape: tuple[int, int], k: int = 8) -> StepModel:
    """Model-free nominal pulse step of a tile: write every device to mid-window, pulse ``+k``,
    read, pulse ``-k``, read; medians over the devices. A tile whose devices fall near
    ``g_min`` after the ``-k`` pulses is one-sided; its step is then measured again by ``+k``
    pulses from that RESET state. Leaves the tile in an arbitrary state (program it next)."""
    lim = device.info.limits
    mid = np.full(shape, 0.5 * (lim.g_min + lim.g_max), np.float32)
    rep = device.program(tile, mid, mid)
    energy, pulses = rep.energy_j, rep.pulses

    def read() -> np.ndarray:
        a, b = device.read_conductance(tile), device.read_conductance(tile)
        return 0.5 * (np.stack(a).astype(np.float64) + np.stack(b))

    def burst(n: int) -> None:
        nonlocal energy, pulses
        c = np.full(shape, n, np.int32)
        r = device.pulse(tile, c, c)
        energy += r.energy_j
        pulses += r.pulses

    r0 = read()
    burst(k)
    r1 = read()
    burst(-k)
    r2 = read()
    dw_up = float(np.median(r1 - r0)) / k
    one_sided = float(np.median(r2 - lim.g_min)) < 0.25 * float(np.median(r0 - lim.g_min))
    if one_sided:
        burst(k)
        r3 = read()
        low = float(np.median(r3 - r2)) / k
        return StepModel(
            low, float("nan"), True, energy, pulses, g_up=float(np.median(0.5 * (r2 + r3))),
            dw_mid=max(dw_up, 1e-15), g_mid=float(np.median(0.5 * (r0 + r1))),
        )  # fmt: skip
    dw_down = float(np.median(r1 - r2)) / k
    return StepModel(max(dw_up, 1e-15), max(dw_down, 1e-15), False, energy, pulses)


def probe_steps(device: Device, tile: str, *, reads: int = 8, k: int = 2, probes: int = 32) -> StepModel:
    """Step model of a tile measured in the state it is in (no calibration, no setup).

    Every device below 80 % of the window gets ``+k`` pulses; averaged reads before and after
    give one step per device, and medians over conductance bins an exponential fit of the
    step against G (a constant where the step does not fall with G). Then the `probes`
    pulsed devices highest in the window get one negative pulse: a drop far beyond their
    step (to near ``g_min``) is a RESET, and the tile is one-sided; otherwise every pulsed
    device goes back down by ``k`` pulses, which measures the down step. Moves the weights by
    a few steps: for a caller that corrects them next (a refresh by tuning). `reads` is at
    most `MAX_TUNE_READS`, `k` at most `MAX_PROBE_PULSES`; `probes` at least 1 (the tile's
    size bounds it).
    """
    from hil.programming.tune import MAX_PROBE_PULSES, MAX_TUNE_READS, check_count, mean_read

    reads = check_count(
        "probe reads", reads, 1, MAX_TUNE_READS, "average at most MAX_TUNE_READS reads per check, at least 1"
    )
    k = check_count("probe k", k, 1, MAX_PROBE_PULSES, "probe with 1 to MAX_PROBE_PULSES pulses per device")
    probes = check_count("probes", probes, 1, 2**31 - 1, "probe at least one device")

    lim = device.info.limits
    g_range = lim.g_max - lim.g_min
    energy, pulses = 0.0, 0

    def pulse(c: np.ndarray) -> None:
        nonlocal energy, pulses
        c = c.astype(np.int32)
        rep = device.pulse(tile, c[0], c[1])
        energy += rep.energy_j
        pulses += rep.pulses

    g0, _ = mean_read(device, tile, reads)
    up = g0 < lim.g_min + 0.8 * g_range
    pulse(np.where(up, k, 0))
    g1, _ = mean_read(device, tile, reads)
    step = (g1 - g0) / k
    # binned by the conductance a device started from: binned by where it ended (or by the
    # midpoint), devices with large steps would crowd the upper bins and bend the fit upward
    g_at = g0
    # the probe: a negative pulse on the pulsed devices highest in the window
    flat = np.flatnonzero(up)
    idx = flat[np.argsort(g1.reshape(-1)[flat])[-probes:]]
    probe = np.zeros(g0.size)
    probe[idx] = -1
    pulse(probe.reshape(g0.shape))
    g2, _ = mean_read(device, tile, reads)
    drop = float(np.median(g1.reshape(-1)[idx] - g2.reshape(-1)[idx]))
    one_sided = drop > 3.0 * max(float(np.median(step.reshape(-1)[idx])), 1e-15)
    ok = up & (step > 0)
    g_ok, s_ok = g_at[ok], step[ok]
    lo, hi = (float(q) for q in np.quantile(g_ok, [0.1, 0.9]))
    edges = np.unique(np.quantile(g_ok, np.linspace(0.0, 1.0, 11)))
    bins = np.clip(np.searchsorted(edges, g_ok, side="right") - 1, 0, len(edges) - 2)
    gb = np.array([np.median(g_ok[bins == b]) for b in np.unique(bins)])
    sb = np.array([np.median(s_ok[bins == b]) for b in np.unique(bins)])
    slope, icpt = np.polyfit(gb, np.log(sb), 1) if len(gb) > 1 else (0.0, float(np.log(np.median(s_ok))))
    if slope >= 0 or hi <= lo:
        dw_lo, dw_hi = float(np.median(s_ok)), float("nan")
    else:
        dw_lo, dw_hi = float(np.exp(icpt + slope * lo)), float(np.exp(icpt + slope * hi))
    if one_sided:
        return StepModel(dw_lo, float("nan"), True, energy, pulses, g_up=lo, dw_mid=dw_hi, g_mid=hi)
    back = np.where(up, -k, 0).reshape(-1)
    back[idx] += 1  # the probes already took one step down
    pulse(back.reshape(g0.shape))
    g3, _ = mean_read(device, tile, reads)
    rest = up.copy().reshape(-1)
    rest[idx] = False
    rest = rest.reshape(g0.shape)
    dw_down = float(np.median((g1 - g3)[rest])) / k
    return StepModel(float(np.median(s_ok)), max(dw_down, 1e-15), False, energy, pulses)
