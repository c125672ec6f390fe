"""Schemes that pulse: after a first write-verify, a change ``dW`` becomes signed pulse
counts per device, ``dG / step`` rounded.

- ``pulsed`` (`PulsedUpdates`): counts rounded stochastically (unbiased on average);
  whatever a count cannot express is simply lost (the naive way);
- ``mixed`` (`MixedPrecision`): a digital accumulator per device pair keeps the part of
  every update that was not applied and adds it to the next one (mixed precision,
  Nandakumar et al., Front. Neurosci. 2020); counts are rounded to nearest, so a pair is
  pulsed once its accumulated update is worth half a pulse (``rounding="trunc"``: a whole
  one), and stochastic rounding, which would only add noise, is not needed.

Pulsed schemes work open loop: they never read the devices during training. They keep the
conductances they expect (`g_est`, programmed targets plus the expected move of every
pulse). The step of one pulse comes from the calibration record's fitted per-device model
(`calibration.pulses_needed`) when a record is given; otherwise it is measured once per
tile: all devices are written to mid-window, pulsed ``+k`` and ``-k`` times and read, and
the median step is the nominal one (`hil.programming.steps`). A device that lands near
``g_min`` after the ``-k`` pulses is one-sided (a PCM RESET): its updates are SET pulses only
(``dW > 0`` on G+, ``dW < 0`` on G-), and its step is measured again from the RESET state;
between that step and the mid-window one the SET step is taken to shrink exponentially with
G, as PCM increments do, so updates high in the window get more pulses. Bidirectional
devices use the centered mapping (both devices of a pair around mid-window, see
`LinearMapping`), where a soft-bounds device steps about as far up as down.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from drivers.base import Device
from hil.programming.mapping import read_weights
from hil.programming.scheme import Programmed, SchemeBase, TileState, UpdateReport, _float64_copy
from hil.programming.steps import StepModel, measure_steps

ROUNDINGS: tuple[str, ...] = ("stochastic", "nearest", "trunc")


class PulsedUpdates(SchemeBase):
    """``pulsed``: open-loop pulse updates, stochastic rounding, nothing carried over.

    `max_update_pulses`: the most pulses one device gets in one update; `calibration_pulses`:
    ``k`` of the model-free step measurement; `rounding`: ``stochastic``, ``nearest`` or
    ``trunc`` (None: the scheme's default)."""

    name = "pulsed"
    pulsed = True
    default_rounding: ClassVar[str] = "stochastic"
    carries: ClassVar[bool] = False  # an accumulator keeps what the pulses did not apply

    def __init__(
        self,
        *,
        max_update_pulses: int = 32,
        calibration_pulses: int = 8,
        rounding: str | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.rounding = rounding or self.default_rounding
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        self._max_pulses = max_update_pulses
        self.calibration_pulses = calibration_pulses

    def _pulse_model(
        self, device: Device, tile: str, position: int, shape: tuple[int, int]
    ) -> tuple[StepModel | None, bool]:
        device.require("pulse")
        if self.record is not None:
            pm = self.record.tile(position, shape).pulse
            if pm is None:
                raise ValueError(f"the calibration record has no pulse model for tile {tile!r}")
            return None, bool(pm.one_sided)
        steps = measure_steps(device, tile, shape, min(self.calibration_pulses, self._pulse_limit(device)))
        return steps, steps.one_sided

    def _first_write(
        self, device: Device, tile: str, st: TileState, w: np.ndarray | torch.Tensor
    ) -> list[Programmed]:
        wn = _float64_copy(w)
        known = st.stuck.count if st.stuck is not None else 0
        res = self._write(device, tile, st, wn, kind="write", verify=True)
        if not st.written and st.steps is not None:
            res.report.energy_j += st.steps.energy_j  # the step measurement
            res.report.pulses += st.steps.pulses
            self.history[-1] = res.report.to_dict()
        out = [res]
        if st.stuck is not None and st.stuck.count > known:
            # stuck devices found by this write: write again so that their partners carry the
            # weights (pulsed schemes do not re-write on their own)
            out.append(self._write(device, tile, st, wn, kind="write", verify=True))
        st.written = True
        st.host = wn
        st.acc = np.zeros_like(wn)
        return out

    def round_counts(self, n: np.ndarray) -> np.ndarray:
        """Integer counts by `rounding`: ``stochastic`` (the default of ``pulsed``; unbiased,
        E[round(n)] = n), ``nearest`` (the default of ``mixed``: the accumulator keeps the
        rest, at most half a step) or ``trunc`` toward zero (a pair is pulsed once it owes a
        whole step; fewer pulses)."""
        if self.rounding == "trunc":
            return np.trunc(n)
        if self.rounding == "nearest":
            return np.round(n)
        return np.floor(n + self.rng.random(n.shape))

    def _update(
        self, device: Device, tile: str, st: TileState, w: np.ndarray | torch.Tensor
    ) -> list[Programmed]:
        wn = _float64_copy(w)
        m = st.mapping
        clipped = 0
        if not st.bounded:  # as the writes' mapping does: weights past +-w_max are clipped, counted
            clipped = int((np.abs(wn) > m.w_max).sum())
            if clipped:
                wn = np.clip(wn, -m.w_max, m.w_max)
        dw = wn - st.host
        req = st.acc + dw if self.carries else dw
        d_g = req * (m.g_range / m.w_max)  # change of G+ - G-
        if st.one_sided:
            dev = np.stack([np.maximum(d_g, 0.0), np.maximum(-d_g, 0.0)])
        else:
            dev = np.stack([0.5 * d_g, -0.5 * d_g])
            if st.stuck is not None and st.stuck.count:  # the partner moves for both
                s = st.stuck.stuck
                dev = np.stack([np.where(s[1], d_g, dev[0]), np.where(s[0], -d_g, dev[1])])
                dev = np.where(s, 0.0, dev)
        n = self.pulse_counts(st, dev)
        limit = self._pulse_limit(device)
        k = np.clip(self.round_counts(n), -limit, limit)
        if st.one_sided:
            k = np.maximum(k, 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            frac = np.where(n != 0, k / n, 0.0)
        # expected move of every device; a device at the edge of the window does not go past it
        moved = np.clip(st.g_est + dev * frac, m.g_min, m.g_max) - st.g_est
        applied = (moved[0] - moved[1]) * (m.w_max / m.g_range)
        counts = k.astype(np.int32)
        if counts.any():
            # a refusal (a device at its pulse endurance, a limit) leaves the tile's state as it
            # was: nothing below has changed it yet
            rep = device.pulse(tile, counts[0], counts[1])
            pulses, energy, time_s = rep.pulses, rep.energy_j, rep.time_s
        else:
            pulses, energy, time_s = 0, 0.0, 0.0
        st.updates += 1
        st.host = wn
        st.acc = req - applied if self.carries else np.zeros_like(req)
        st.g_est = st.g_est + moved
        missing = np.abs(dev - moved)
        half_step = 0.5 * self._nominal_step(st)
        report = UpdateReport(
            tile, st.g_est[0].astype(np.float32), st.g_est[1].astype(np.float32), 0, pulses,
            float(missing.max()) if missing.size else 0.0, float((missing <= half_step).mean()),
            energy, time_s, 0, scheme=self.name, kind="pulse", step=st.updates,
            requested=float(np.abs(req).sum()), applied=float(np.abs(applied).sum()),
            remainder=float(np.abs(st.acc).sum()), devices_pulsed=int((counts != 0).sum()),
        )  # fmt: skip
        self.history.append(report.to_dict())
        return [Programmed(report, clipped, lambda: read_weights(device, tile, m))]

    def _nominal_step(self, st: TileState) -> float:
        if st.steps is not None:
            return st.steps.dw_up
        assert self.record is not None
        pm = self.record.tile(st.position, st.g_est.shape[1:]).pulse
        assert pm is not None
        return float(np.nanmedian(np.where(pm.valid, pm.dw_up, np.nan)))


class MixedPrecision(PulsedUpdates):
    """``mixed``: pulse updates with a digital accumulator per pair, rounded to nearest."""

    name = "mixed"
    default_rounding = "nearest"
    carries = True
