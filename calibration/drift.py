"""A quick drift check: is the record still true of the board?

It re-measures a sample of what the session measured, with the same routines and fewer
samples, and compares: state-ADC, DAC and mvm-ADC gain and offset on a few channels at both
ends of the calibrated range, the read noise, and the stuck-device map of each recorded
tile. A quantity has drifted when its change exceeds its tolerance by more than three
combined standard errors (record and re-measurement): tolerances are half the precision the
calibration promises (0.25 % of gain, 0.5 LSB of offset), a read noise off by 25 %, and new
stuck devices on more than 0.1 % of a tile. The record's age counts too when `max_age_s`
is given. The check reconfigures and reprograms the board: configure your topology and
program your weights afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from calibration.adc import measure_adc
from calibration.conductance import find_stuck
from calibration.converters import ConverterOptions
from calibration.dac import measure_dac
from calibration.measure import Progress, board_budget, no_progress, read_stats, tile_topology
from calibration.mvm import measure_mvm
from calibration.record import CalibrationRecord, ChannelCal
from drivers import Device, seeds

GAIN_TOL = 0.0025
OFFSET_TOL_LSB = 0.5
READ_NOISE_TOL = 0.25
NEW_STUCK_TOL = 0.001


@dataclass
class DriftReport:
    recalibrate: bool
    reasons: list[str]
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    # a partial record (`CalibrationRecord.partial`): the routines its session was to run and
    # never finished, which no check covers, and where it stopped (None: between routines)
    unmeasured: tuple[str, ...] = ()
    stopped_in: str | None = None

    def __str__(self) -> str:
        held = "calibration still holds"
        if self.unmeasured:
            where = "between routines" if self.stopped_in is None else f"in {self.stopped_in}"
            held += (
                f" for what the record measured; the record is partial (its session stopped {where}): "
                f"{', '.join(self.unmeasured)} never measured, so nothing of theirs is corrected or "
                "checked (run `hil calibrate` again with --overwrite for a whole record)"
            )
        head = "re-calibrate: " + "; ".join(self.reasons) if self.recalibrate else held
        lines = [head]
        for name, c in self.checks.items():
            state = "DRIFTED" if c.get("drifted") else "not checked" if c.get("skipped") else "ok"
            lines.append(f"  {name}: {state} {c.get('detail', '')}")
        return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _sample(channels: int, per_end: int) -> np.ndarray:
    ends = np.concatenate((np.arange(per_end), np.arange(channels - per_end, channels)))
    return np.unique(np.clip(ends, 0, channels - 1))


def _compare(old: ChannelCal, new: ChannelCal, channels: np.ndarray) -> dict[str, Any]:
    ch = channels[(channels < new.channels) & old.valid[channels] & new.valid[channels]]
    dg = new.gain[ch] - old.gain[ch]
    do = new.offset[ch] - old.offset[ch]
    sg = np.hypot(old.gain_se[ch], new.gain_se[ch])
    so = np.hypot(old.offset_se[ch], new.offset_se[ch])
    rel_g = np.abs(dg) / old.gain[ch]  # relative gain change per channel
    bad_g = rel_g > GAIN_TOL + 3.0 * sg / old.gain[ch]
    bad_o = np.abs(do) > OFFSET_TOL_LSB * old.lsb + 3.0 * so
    bad = ch[bad_g | bad_o]
    out: dict[str, Any] = {
        "drifted": bool(bad.size),
        "channels_checked": ch.tolist(),
        "channels_drifted": bad.tolist(),
        "max_gain_change": float("nan"),
        "max_offset_change_lsb": float("nan"),
        "detail": "no channel to compare",
    }
    if not ch.size:
        return out
    k = int(np.argmax(rel_g))  # the channel of the largest gain change, and its allowance
    j = int(np.argmax(np.abs(do)))  # ... of the largest offset change
    allowed = (GAIN_TOL + 3.0 * sg[k] / old.gain[ch][k]) * 100
    allowed_o = OFFSET_TOL_LSB + 3.0 * so[j] / old.lsb
    out["max_gain_change"] = float(rel_g[k])
    out["max_offset_change_lsb"] = float(abs(do[j]) / old.lsb)
    out["detail"] = (
        f"max gain change {out['max_gain_change'] * 100:.3f} % (allowed {allowed:.3f} %: "
        f"{GAIN_TOL * 100:g} % + 3 standard errors), max offset change "
        f"{out['max_offset_change_lsb']:.2f} LSB (allowed {allowed_o:.2f})"
        + (f", drifted channels {bad.tolist()}" if bad.size else "")
    )
    return out


def drift_check(
    device: Device,
    record: CalibrationRecord,
    *,
    per_end: int = 4,
    max_age_s: float | None = None,
    progress: Progress = no_progress,
) -> DriftReport:
    """Re-measure a sample and say whether the board has drifted away from `record`."""
    record.check_board(device.info)
    seed = seeds.derive(record.session.get("seed", 0), "calibration.drift")  # not the session's levels
    # a quick re-measurement, compared with the record within its own standard errors: no
    # precision requirement of its own (its channels are not applied, only compared)
    quick = ConverterOptions(
        levels=16, repeats=32, samples=512, reads=512, seed=seed, gain_tol=None, offset_tol_lsb=None
    )
    checks: dict[str, dict[str, Any]] = {}
    reasons: list[str] = []
    # the converter routines clamp and read nodes through a settle: a board that does not
    # settle cannot re-measure them (a record made when it could, or on a board that can)
    settles = "settle" in device.info.capabilities
    if not settles:
        for bank in (b for b in ("adc", "dac", "mvm") if b in record.converters):
            checks[bank] = {"drifted": False, "skipped": True, "detail": "(the board does not settle)"}
    elif "adc" in record.converters:
        old = record.converters["adc"]
        ch = _sample(old.channels, per_end)
        checks["adc"] = _compare(old, measure_adc(device, ch, quick), ch)
        progress("drift", 1, 5)
    if settles and "dac" in record.converters and "adc" in record.converters:
        old = record.converters["dac"]
        ch = _sample(old.channels, per_end)
        checks["dac"] = _compare(old, measure_dac(device, ch, record.converters["adc"], quick), ch)
        progress("drift", 2, 5)
    if settles and "mvm" in record.converters and "dac" in record.converters:
        old = record.converters["mvm"]
        n = min(2 * per_end, old.channels)
        new = measure_mvm(device, (n, n), record.converters["dac"], quick)
        checks["mvm"] = _compare(old, new, np.arange(n))
        progress("drift", 3, 5)
    maps = [t for t in record.tiles.values() if t.gmap is not None]
    if maps:
        lim = device.info.limits
        # a 16 x 16 tile of read-noise samples, or the largest the board holds (a board with
        # smaller tiles refused the configure, with a hint to split a layer the check never had)
        n = min(16, lim.tile_rows_max, lim.tile_cols_max)
        device.configure(tile_topology([(n, n)], board_budget(device), lim))
        g = np.full((n, n), lim.g_min + 0.5 * (lim.g_max - lim.g_min), np.float32)
        device.program("T0", g, g)
        st = read_stats(device, "T0", 32)
        now = float(np.sqrt(np.mean(st.std**2)))
        then = float(np.mean([t.gmap.read_noise for t in maps if t.gmap is not None]))
        se = now / np.sqrt(2.0 * st.std.size * 31)
        drifted = abs(now / then - 1.0) > READ_NOISE_TOL + 3.0 * se / then
        checks["read_noise"] = {
            "drifted": bool(drifted),
            "recorded": then,
            "measured": now,
            "detail": f"{now * 1e6:.4f} uS now, {then * 1e6:.4f} uS recorded "
            f"(allowed +-{READ_NOISE_TOL:.0%})",
        }
        progress("drift", 4, 5)
    positions = sorted(record.tiles)
    if positions and positions == list(range(len(positions))):
        shapes = [record.tiles[p].shape for p in positions]
        device.configure(tile_topology(shapes, board_budget(device), device.info.limits))
        for p in positions:
            tile = record.tiles[p]
            if tile.stuck is None:
                continue
            new = find_stuck(device, f"T{p}", tile.shape).stuck & ~tile.stuck.stuck.astype(bool)
            frac = float(new.mean())
            checks[f"stuck[{p}]"] = {
                "drifted": frac > NEW_STUCK_TOL,
                "new_stuck": int(new.sum()),
                "recorded_stuck": tile.stuck.count,
                "detail": f"{int(new.sum())} newly stuck devices ({frac * 100:.3f} %), "
                f"{tile.stuck.count} recorded",
            }
    progress("drift", 5, 5)
    for name, c in checks.items():
        if c["drifted"]:
            reasons.append(f"{name} drifted ({c['detail']})")
    if max_age_s is not None:
        age = (datetime.now(UTC) - datetime.fromisoformat(record.created)).total_seconds()
        checks["age"] = {
            "drifted": age > max_age_s,
            "age_s": age,
            "detail": f"record is {_duration(age)} old",
        }
        if age > max_age_s:
            reasons.append(f"the record is {_duration(age)} old (limit {_duration(max_age_s)})")
    unmeasured: tuple[str, ...] = ()
    if record.partial:
        planned = record.session.get("options", {}).get("routines", [])
        unmeasured = tuple(str(r) for r in planned if r not in record.routines)
    stopped = record.session.get("stopped_in")
    return DriftReport(bool(reasons), reasons, checks, unmeasured, None if stopped is None else str(stopped))
