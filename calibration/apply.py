"""Apply a calibration record on the host side: pure numpy, no device access.

Converters (per channel, see `calibration.record.CHANNEL_MAP` for the numbering):

- `dac_requests`: the values to request so that the DAC outputs the values you mean
  (clamps, nudge targets, mvm inputs): the inverse of the measured ``out = g x + o``;
- `correct_readings`: true node states from state-ADC readings, ``(r - o) / g``;
- `correct_mvm`: true ``x @ W`` from mvm read-outs, ``(y - o) / g``.

Channels the record marks invalid pass through unchanged (treated as ideal); asking for a
channel beyond the calibrated range raises `CalibrationError` (calibrate more channels).
Readings on a converter's rails are saturated and cannot be corrected: they map to the
rail's corrected value.

Devices (per physical tile: position in the topology's couplings and shape):

- `conductance_targets`: move requested (G+, G-) targets into each device's measured
  window, keep the pair's difference (the weight) when one device is stuck by moving its
  partner, and flag the cells whose weight no target can reach;
- `weights_to_conductances`: the same, starting from weights (the linear mapping of
  `hil.programming.LinearMapping` with the sign on one device of the pair);
- `pulses_needed`: expected number of pulses that move each device from its present
  conductance to a target under the fitted per-device pulse model.

`Corrections` binds a record to a topology and offers all of the above by group and tile name;
the path through a converter bank the record lacks passes uncorrected.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from calibration.record import CalibrationError, CalibrationRecord, ChannelCal, PulseModel, TileCalibration
from drivers import Limits, Nudge, Topology


def channel_offsets(topology: Topology) -> dict[str, int]:
    """First node channel of every group: the groups' nodes numbered in declared order."""
    out, start = {}, 0
    for group, size in topology.groups.items():
        out[group] = start
        start += size
    return out


def _transfer(cal: ChannelCal, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    if start < 0 or start + n > cal.channels:
        raise CalibrationError(
            f"{cal.bank} channels {start}..{start + n - 1} asked for; the record calibrates "
            f"0..{cal.channels - 1}: re-run the session with more channels "
            f"(`hil calibrate URI --out RECORD --overwrite --channels {start + n}`)"
        )
    ok = cal.valid[start : start + n]
    gain = np.where(ok, cal.gain[start : start + n], 1.0)
    offset = np.where(ok, cal.offset[start : start + n], 0.0)
    return gain, offset


def dac_requests(record: CalibrationRecord, values: np.ndarray, start: int = 0) -> np.ndarray:
    """Requests for DAC channels ``start..`` (last axis) that make them output `values`."""
    values = np.asarray(values, dtype=np.float64)
    gain, offset = _transfer(record.bank("dac"), start, values.shape[-1])
    return ((values - offset) / gain).astype(np.float32)


def correct_readings(record: CalibrationRecord, readings: np.ndarray, start: int = 0) -> np.ndarray:
    """True node states from state-ADC readings of channels ``start..`` (last axis)."""
    readings = np.asarray(readings, dtype=np.float64)
    gain, offset = _transfer(record.bank("adc"), start, readings.shape[-1])
    return ((readings - offset) / gain).astype(np.float32)


def correct_mvm(record: CalibrationRecord, outputs: np.ndarray, start: int = 0) -> np.ndarray:
    """True products from mvm read-outs of output lines ``start..`` (last axis)."""
    outputs = np.asarray(outputs, dtype=np.float64)
    gain, offset = _transfer(record.bank("mvm"), start, outputs.shape[-1])
    return ((outputs - offset) / gain).astype(np.float32)


# ------------------------------------------------------------------------------ devices


@dataclass
class Targets:
    """Conductance targets adjusted to the measured devices, shape (rows, cols) each."""

    g_plus: np.ndarray
    g_minus: np.ndarray
    unreachable: np.ndarray  # bool: the requested difference G+ - G- cannot be reached
    compensated: int  # cells with one stuck device whose partner carries the weight alone
    expected_difference: np.ndarray  # G+ - G- the devices will hold (stuck values included)


def _windows(tile: TileCalibration, limits: Limits) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-device usable window (within the nominal programming limits), stuck mask and value."""
    shape = (2, *tile.shape)
    lo = np.full(shape, limits.g_min)
    hi = np.full(shape, limits.g_max)
    pm: PulseModel | None = tile.pulse
    if pm is not None:
        ok = pm.valid & np.isfinite(pm.g_lo) & np.isfinite(pm.g_hi)
        lo = np.where(ok, np.maximum(pm.g_lo, limits.g_min), lo)
        hi = np.where(ok, np.minimum(pm.g_hi, limits.g_max), hi)
    stuck = np.zeros(shape, bool)
    value = np.zeros(shape)
    if tile.stuck is not None:
        stuck = tile.stuck.stuck.astype(bool)
        value = tile.stuck.value.astype(np.float64)
    return lo, hi, stuck, value


def conductance_targets(
    record: CalibrationRecord,
    position: int,
    g_plus: np.ndarray,
    g_minus: np.ndarray,
    limits: Limits,
) -> Targets:
    """Adjust requested targets of the tile at `position` to its measured devices.

    Working pairs: both targets shift by the same amount (the difference is kept) into the
    devices' own windows; if no shift fits, the pair goes to the extreme of its windows in
    the requested direction and is flagged. A stuck device keeps its stuck value (its target
    is set there, so write-verify does not chase it) and its partner is placed to keep the
    difference."""
    gp = np.asarray(g_plus, dtype=np.float64)
    gm = np.asarray(g_minus, dtype=np.float64)
    tile = record.tile(position, gp.shape)
    lo, hi, stuck, value = _windows(tile, limits)
    diff = gp - gm
    sp, sm = stuck[0], stuck[1]
    # shift t that puts both devices inside their windows, closest to 0
    t_lo = np.maximum(lo[0] - gp, lo[1] - gm)
    t_hi = np.minimum(hi[0] - gp, hi[1] - gm)
    t = np.clip(0.0, t_lo, t_hi)
    fits = t_lo <= t_hi
    out_p = np.where(fits, gp + t, np.where(diff >= 0, hi[0], lo[0]))
    out_m = np.where(fits, gm + t, np.where(diff >= 0, lo[1], hi[1]))
    unreachable = ~fits
    # one device stuck: the partner carries the difference
    only_p = sp & ~sm
    only_m = sm & ~sp
    want_m = value[0] - diff
    want_p = value[1] + diff
    out_m = np.where(only_p, np.clip(want_m, lo[1], hi[1]), out_m)
    out_p = np.where(only_m, np.clip(want_p, lo[0], hi[0]), out_p)
    real_p = np.where(sp, value[0], out_p)
    real_m = np.where(sm, value[1], out_m)
    tol = 1e-3 * (limits.g_max - limits.g_min)
    unreachable = np.where(sp | sm, np.abs((real_p - real_m) - diff) > tol, unreachable)
    out_p = np.where(sp, np.clip(value[0], limits.g_min, limits.g_max), out_p)
    out_m = np.where(sm, np.clip(value[1], limits.g_min, limits.g_max), out_m)
    return Targets(
        g_plus=out_p.astype(np.float32),
        g_minus=out_m.astype(np.float32),
        unreachable=unreachable,
        compensated=int((only_p | only_m).sum()),
        expected_difference=(real_p - real_m).astype(np.float32),
    )


def weights_to_conductances(
    record: CalibrationRecord, position: int, weights: np.ndarray, w_max: float, limits: Limits
) -> Targets:
    """Targets for ``W = w_max (G+ - G-) / (g_max - g_min)`` on the tile at `position`."""
    span = limits.g_max - limits.g_min
    d = np.clip(np.asarray(weights, dtype=np.float64) / w_max, -1.0, 1.0) * span
    gp = limits.g_min + np.maximum(d, 0.0)
    gm = limits.g_min + np.maximum(-d, 0.0)
    return conductance_targets(record, position, gp, gm, limits)


def _pulses_along(
    kind: str, gamma: float, u0: np.ndarray, u1: np.ndarray, dw_over_span: np.ndarray
) -> np.ndarray:
    """Pulses from position u0 to u1 > u0 (fractions of the window from the origin bound),
    integrating du / (dw/span f(u)) in the continuous limit."""
    with np.errstate(divide="ignore", invalid="ignore"):
        if kind == "constant" or (kind in ("linear", "exponential") and abs(gamma) < 1e-9):
            return (u1 - u0) / dw_over_span
        if kind in ("soft_bounds", "linear"):
            g = 1.0 if kind == "soft_bounds" else gamma
            inside = (1.0 - g * u1) > 0
            n = np.log((1.0 - g * u0) / (1.0 - g * u1)) / (g * dw_over_span)
            return np.where(inside, n, np.inf)
        if kind == "exponential":
            return (np.exp(gamma * u1) - np.exp(gamma * u0)) / (gamma * dw_over_span)
    raise CalibrationError(f"unknown pulse-response kind {kind!r}")


def pulses_needed(
    record: CalibrationRecord, position: int, g_now: np.ndarray, g_target: np.ndarray
) -> np.ndarray:
    """Expected signed pulse counts, shape (2, rows, cols), that move each device from `g_now`
    to `g_target` under its fitted model (mean steps; the caller rounds, stochastically if it
    likes, and caps at the board's `max_pulses`). Devices without a fit use the tile's mean
    step; stuck devices get 0; a target beyond a device's reach gives +-inf. On one-sided
    devices a decrease is -1 (one RESET to near g_lo; then climb with a second call)."""
    g_now = np.asarray(g_now, dtype=np.float64)
    g_target = np.asarray(g_target, dtype=np.float64)
    tile = record.tile(position, g_now.shape[1:])
    pm = tile.pulse
    if pm is None:
        raise CalibrationError(f"the record has no pulse-response fit for tile position {position}")
    span = pm.g_hi - pm.g_lo
    ok = pm.valid
    mean_up = float(np.nanmean(np.where(ok, pm.dw_up, np.nan)))
    up_dw = np.where(ok & np.isfinite(pm.dw_up), pm.dw_up, mean_up)
    x0 = np.clip((g_now - pm.g_lo) / span, 0.0, 1.0)
    x1 = np.clip((g_target - pm.g_lo) / span, 0.0, 1.0)
    up = x1 >= x0
    n_up = _pulses_along(pm.kind, pm.gamma_up, x0, x1, up_dw / span)
    if pm.one_sided:
        n = np.where(up, n_up, -1.0)
    else:
        mean_dn = float(np.nanmean(np.where(ok, pm.dw_down, np.nan)))
        dn_dw = np.where(ok & np.isfinite(pm.dw_down), pm.dw_down, mean_dn)
        n_dn = _pulses_along(pm.kind, pm.gamma_down, 1.0 - x0, 1.0 - x1, dn_dw / span)
        n = np.where(up, n_up, -n_dn)
    if tile.stuck is not None:
        n = np.where(tile.stuck.stuck, 0.0, n)
    return n


# ------------------------------------------------------------------------------ by name


@dataclass(frozen=True)
class Corrections:
    """A record bound to a topology: corrections by group and tile name.

    Typical use in the host stack::

        corr = Corrections(record, topology)
        eq = device.settle(corr.clamp(clamp), nudge=corr.nudge(nudge))
        states = corr.states(eq.states, skip=clamp)
        targets = corr.weights("W0", w, limits)
    """

    record: CalibrationRecord
    topology: Topology

    def _start(self, group: str) -> int:
        return channel_offsets(self.topology)[group]

    def corrects(self, bank: str) -> bool:
        """Whether the record calibrated converter bank `bank` (``dac``, ``adc``, ``mvm``). The
        path through a bank it lacks passes as it is: a session on a board that does not settle
        cannot measure ``dac``, ``adc`` or ``mvm``, and its record still corrects programming
        (`CalibratedDevice.configure` says which paths go uncorrected)."""
        return bank in self.record.converters

    def clamp(self, clamp: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.corrects("dac"):
            return clamp
        return {g: dac_requests(self.record, x, self._start(g)) for g, x in clamp.items()}

    def nudge(self, nudge: dict[str, Nudge] | None) -> dict[str, Nudge] | None:
        """Targets go through the group's DAC channels; injected gradients do not (the
        injection DAC is auto-ranged, with no per-channel trim to correct)."""
        if nudge is None or not self.corrects("dac"):
            return nudge
        return {
            g: Nudge(
                n.beta,
                None if n.target is None else dac_requests(self.record, n.target, self._start(g)),
                n.grad,
            )
            for g, n in nudge.items()
        }

    def states(self, states: dict[str, np.ndarray], skip: Iterable[str] = ()) -> dict[str, np.ndarray]:
        """Correct read-out states; groups in `skip` (the clamped ones) are returned as they are."""
        if not self.corrects("adc"):
            return states
        skipped = set(skip)
        return {
            g: s if g in skipped else correct_readings(self.record, s, self._start(g))
            for g, s in states.items()
        }

    def mvm_inputs(self, x: np.ndarray) -> np.ndarray:
        return self._covered("dac", x, dac_requests)

    def mvm_outputs(self, y: np.ndarray) -> np.ndarray:
        return self._covered("mvm", y, correct_mvm)

    def _covered(
        self, bank: str, a: np.ndarray, correct: Callable[[CalibrationRecord, np.ndarray, int], np.ndarray]
    ) -> np.ndarray:
        """`a`'s lines corrected through `bank` as far as the record measured it; lines beyond
        pass as they are. An mvm reaches max(rows, cols) lines of every tile, which can exceed
        the lines the record's mvm routine measured (those of its first tile);
        `CalibratedDevice.mvm` says so once."""
        cal = self.record.converters.get(bank)
        if cal is None:
            return a
        a = np.asarray(a)
        n = a.shape[-1]
        if n <= cal.channels:
            return correct(self.record, a, 0)
        out = np.array(a, dtype=np.float32)
        out[..., : cal.channels] = correct(self.record, a[..., : cal.channels], 0)
        return out

    def position(self, tile: str) -> int:
        names = [c.tile for c in self.topology.couplings]
        if tile not in names:
            raise CalibrationError(f"unknown tile {tile!r}; known: {names}")
        return names.index(tile)

    def weights(self, tile: str, w: np.ndarray, limits: Limits) -> Targets:
        c = self.topology.coupling(tile)
        return weights_to_conductances(self.record, self.position(tile), w, c.w_max, limits)
