"""Programming schemes: how a change of the host weights reaches the devices.

An `EBBlock` keeps full-precision weights on the host and hands every changed tile to its
scheme (`ProgrammingScheme.program`). The schemes differ in what happens on the board:

- ``ideal``: every change is a direct write of the whole tile (the old behaviour; a write
  costs one pulse per device and lands with the device's write noise);
- ``verify``: every change is a write-verify of the whole tile (closed loop, to `tol`);
- ``pulsed``: the first write is a write-verify; after it, a change ``dW`` becomes signed
  pulse counts per device, ``dG / step`` rounded stochastically (unbiased on average), and
  whatever a count cannot express is simply lost (the naive way);
- ``mixed``: as ``pulsed``, but a digital accumulator per device pair keeps the part of
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

Refresh (any scheme): every `refresh_every` updates, or on demand when `drift` says the
conductances decayed by more than `drift_tol`, the tile is brought back to the weights it is
meant to hold (`target`: the host weights minus what the accumulator still owes, or what
`commit` adopted). Two ways (`refresh_mode`): ``tune`` (the default where the Device can
pulse) corrects the pairs from the state they are in, closed loop with averaged reads
(`hil.programming.tune`); ``verify`` re-writes every device with the Device's write-verify.
On pcm after one simulated day tuning keeps the network within a fraction of a point of its
accuracy right after training, where a re-write lost 1-2 points: a re-write draws new
programming errors at the precision of one verify read (~0.25 uS), which the network never
saw, and a re-mapping also undoes how training compensated stuck devices with their
partners. When a one-sided tile has more than 1 % of its devices near saturation the
refresh is always a re-write (``verify``): that lowers the pairs' common mode.

Every call returns an `UpdateReport` (a `ProgramReport` with the scheme's fields added); the
scheme also keeps the JSON-ready `to_dict()` of every report in `history`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from calibration import CalibrationRecord, conductance_targets, pulses_needed
from drivers import seeds
from drivers.base import Device, ProgramReport
from hil.programming.mapping import LinearMapping, StuckDevices, read_weights
from hil.programming.steps import StepModel, measure_steps, probe_steps
from hil.programming.tune import tune_pairs

SCHEMES: tuple[str, ...] = ("ideal", "verify", "pulsed", "mixed")
ROUNDINGS: tuple[str, ...] = ("stochastic", "nearest", "trunc")
REFRESH_MODES: tuple[str, ...] = ("verify", "tune")


@dataclass
class UpdateReport(ProgramReport):
    """What one programming call did to one tile.

    ``kind``: ``write`` (the whole tile programmed), ``pulse`` (an incremental update) or
    ``refresh`` (a write-verify against drift or saturation). For pulse updates ``g_plus`` /
    ``g_minus`` are the conductances the scheme expects (no read), ``iterations`` is 0 and
    ``residual_max`` is the largest conductance change asked for but not applied (siemens).
    ``requested``, ``applied`` and ``remainder`` are sums of ``|dW|`` over the tile in weight
    units: asked for by this update (plus, for ``mixed``, what the accumulator carried in),
    expected to be moved by the pulses, and left in the accumulator.
    """

    scheme: str = "ideal"
    kind: str = "write"
    step: int = 0  # the scheme's update counter for this tile
    requested: float = 0.0
    applied: float = 0.0
    remainder: float = 0.0
    devices_pulsed: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The scalar fields, JSON-ready (no conductance arrays)."""
        return {
            "tile": self.tile,
            "scheme": self.scheme,
            "kind": self.kind,
            "step": int(self.step),
            "iterations": int(self.iterations),
            "pulses": int(self.pulses),
            "residual_max": float(self.residual_max),
            "within_tol": float(self.within_tol),
            "energy_j": float(self.energy_j),
            "time_s": float(self.time_s),
            "requested": float(self.requested),
            "applied": float(self.applied),
            "remainder": float(self.remainder),
            "devices_pulsed": int(self.devices_pulsed),
        }


@dataclass
class Programmed:
    """An `UpdateReport` plus how to get the weights the device now holds (`achieved`): from
    the read-back of a write, or, after pulses, from one read of the tile made on demand."""

    report: UpdateReport
    clipped: int
    reader: Callable[[], np.ndarray]

    @property
    def achieved(self) -> np.ndarray:
        return self.reader()


@dataclass
class TileState:
    mapping: LinearMapping
    position: int  # index of the tile in the topology's couplings (calibration records)
    host: np.ndarray  # host weights at the last call (float64)
    acc: np.ndarray  # weight change owed to the devices (mixed), float64
    g_est: np.ndarray  # (2, rows, cols) conductances the scheme expects (float64)
    one_sided: bool
    steps: StepModel | None = None
    updates: int = 0
    written: bool = False
    stuck: StuckDevices | None = None  # found from read-backs (None with a calibration record)


class ProgrammingScheme:
    """One scheme, bound to one Device (one per EBBlock). `name` picks the behaviour.

    `record`: a calibration record of the board (pulse model, per-device windows, stuck
    devices); `tol`: write-verify tolerance in siemens (None: the Device's default, 2 % of the
    range); `refresh_tol`: the tolerance of a refresh as a fraction of the conductance range
    of a ``verify`` refresh (None: `tol`; on pcm 1 % made it worse: more one-sided devices end
    the verify budget freshly RESET); `refresh_every`: refresh every N updates of a tile (0:
    never periodically); `refresh_mode`: ``tune`` or ``verify`` (None: ``tune`` when the Device
    can pulse); `tune_tol` (fraction of the range), `tune_reads` (reads averaged per check),
    `tune_iters`: the tuning loop's tolerance on ``G+ - G-``, averaging and budget;
    `drift_tol`: relative conductance decay that `refresh_if_drifted` acts on;
    `max_update_pulses`: the most pulses one device gets in one update;
    `calibration_pulses`: ``k`` of the model-free step measurement.
    """

    def __init__(
        self,
        name: str = "ideal",
        *,
        record: CalibrationRecord | None = None,
        tol: float | None = None,
        max_iters: int = 20,
        refresh_tol: float | None = None,
        refresh_every: int = 0,
        refresh_mode: str | None = None,
        tune_tol: float = 0.004,
        tune_reads: int = 16,
        tune_iters: int = 40,
        drift_tol: float = 0.05,
        max_update_pulses: int = 32,
        calibration_pulses: int = 8,
        rounding: str | None = None,
        seed: int = 0,
    ) -> None:
        if name not in SCHEMES:
            raise ValueError(f"programming scheme must be one of {SCHEMES}, got {name!r}")
        if refresh_every < 0:
            raise ValueError(f"refresh_every must be >= 0, got {refresh_every}")
        if refresh_mode is not None and refresh_mode not in REFRESH_MODES:
            raise ValueError(f"refresh_mode must be one of {REFRESH_MODES}, got {refresh_mode!r}")
        self.name = name
        self.rounding = rounding or ("nearest" if name == "mixed" else "stochastic")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        self.record = record
        self.tol = tol
        self.refresh_tol = refresh_tol
        self.max_iters = max_iters
        self.refresh_every = refresh_every
        self.refresh_mode = refresh_mode
        self.tune_tol = tune_tol
        self.tune_reads = tune_reads
        self.tune_iters = tune_iters
        self.drift_tol = drift_tol
        self.max_update_pulses = max_update_pulses
        self.calibration_pulses = calibration_pulses
        self.rng = seeds.numpy_rng(seed, "programming")
        self.tiles: dict[str, TileState] = {}
        self.history: list[dict[str, Any]] = []

    @property
    def pulsed(self) -> bool:
        return self.name in ("pulsed", "mixed")

    # ------------------------------------------------------------------------------ setup
    def mapping(self, device: Device, tile: str) -> LinearMapping:
        """The weight <-> conductance mapping this scheme uses for `tile` (measures the pulse
        response first, for pulsed schemes without a record)."""
        return self._state(device, tile).mapping

    def _state(self, device: Device, tile: str) -> TileState:
        st = self.tiles.get(tile)
        if st is not None:
            return st
        topo = device.topology
        if topo is None:
            raise ValueError("configure the device before programming weights")
        position = [c.tile for c in topo.couplings].index(tile)
        shape = topo.tile_shape(tile)
        steps = None
        one_sided = False
        if self.pulsed:
            device.require("pulse")
            if self.record is not None:
                pm = self.record.tile(position, shape).pulse
                if pm is None:
                    raise ValueError(f"the calibration record has no pulse model for tile {tile!r}")
                one_sided = bool(pm.one_sided)
            else:
                steps = measure_steps(device, tile, shape, self.calibration_pulses)
                one_sided = steps.one_sided
        mapping = LinearMapping.for_tile(device, tile, centered=self.pulsed and not one_sided)
        zeros = np.zeros(shape)
        st = TileState(mapping, position, zeros, zeros.copy(), np.zeros((2, *shape)), one_sided, steps)
        if self.record is None:
            st.stuck = StuckDevices.empty(shape, mapping.g_range)
        self.tiles[tile] = st
        return st

    # ------------------------------------------------------------------------------ entry
    def program(
        self, device: Device, tile: str, w: np.ndarray | torch.Tensor, *, force: bool = False
    ) -> list[Programmed]:
        """Bring `tile` to the host weights `w`: a whole-tile write the first time (or with
        `force`), then the scheme's update, plus a refresh when one is due. Returns one
        result per device operation, in order."""
        st = self._state(device, tile)
        wn = np.array(torch.as_tensor(w).detach().cpu().numpy(), dtype=np.float64)  # a copy
        if force or not st.written:
            verify = self.name != "ideal"
            known = int(st.stuck.stuck.sum()) if st.stuck is not None else 0
            res = self._write(device, tile, st, wn, kind="write", verify=verify)
            if not st.written and st.steps is not None:
                res.report.energy_j += st.steps.energy_j  # the step measurement
                res.report.pulses += st.steps.pulses
                self.history[-1] = res.report.to_dict()
            out = [res]
            if self.pulsed and st.stuck is not None and int(st.stuck.stuck.sum()) > known:
                # stuck devices found by this write: write again so that their partners carry
                # the weights (pulsed schemes do not re-write on their own)
                out.append(self._write(device, tile, st, wn, kind="write", verify=verify))
            st.written = True
            st.host = wn
            st.acc = np.zeros_like(wn)
            return out
        if self.pulsed:
            out = [self._pulse(device, tile, st, wn)]
        else:
            st.updates += 1
            # the float32 weights themselves: their conductances are those of `wn`
            w32 = torch.as_tensor(w).detach()
            out = [self._write(device, tile, st, w32, kind="write", verify=self.name == "verify")]
            st.host = wn
        periodic = bool(self.refresh_every) and st.updates % self.refresh_every == 0
        saturated = st.one_sided and self.pulsed and self._saturated(st) > 0.01
        if periodic or saturated:
            # saturation needs the common mode lowered: a re-write, not a tuning from the state
            out.append(self.refresh(device, tile, mode="verify" if saturated else None))
        return out

    def target(self, tile: str) -> np.ndarray:
        """The weights the device is meant to hold: host weights minus what is still owed."""
        st = self.tiles[tile]
        return st.host - st.acc

    # ------------------------------------------------------------------------------ writes
    def _targets(self, device: Device, st: TileState, w: np.ndarray | torch.Tensor) -> tuple[np.ndarray, int]:
        """The (G+, G-) targets of weights `w` as one (2, rows, cols) float32 array."""
        g, clipped = st.mapping.to_conductance_pair(w)
        if self.record is not None:
            t = conductance_targets(self.record, st.position, g[0], g[1], device.info.limits)
            g = np.stack((t.g_plus, t.g_minus))
        elif st.stuck is not None and st.stuck.any_misses:
            g = np.stack(st.stuck.compensate(g[0], g[1], st.mapping.g_min, st.mapping.g_max))
        return g, clipped

    def _write(
        self, device: Device, tile: str, st: TileState, w: np.ndarray | torch.Tensor, *, kind: str,
        verify: bool,
    ) -> Programmed:  # fmt: skip
        g, clipped = self._targets(device, st, w)
        tol = self.tol
        if kind == "refresh" and self.refresh_tol is not None:
            tol = self.refresh_tol * st.mapping.g_range
        rep = device.program(tile, g[0], g[1], verify=verify, tol=tol, max_iters=self.max_iters)
        st.g_est = g.astype(np.float64)
        if st.stuck is not None:
            st.stuck.observe(
                st.g_est, (rep.g_plus, rep.g_minus), verified=verify, residual_max=rep.residual_max
            )
        report = UpdateReport(
            rep.tile, rep.g_plus, rep.g_minus, rep.iterations, rep.pulses, rep.residual_max,
            rep.within_tol, rep.energy_j, rep.time_s, scheme=self.name, kind=kind, step=st.updates,
        )  # fmt: skip
        self.history.append(report.to_dict())
        mapping = st.mapping
        return Programmed(report, clipped, lambda: mapping.to_weight(rep.g_plus, rep.g_minus))

    def refresh(self, device: Device, tile: str, mode: str | None = None) -> Programmed:
        """Bring `tile` back to the weights it is meant to hold (`target`): a write-verify of
        fresh targets (``verify``) or a closed-loop tuning of the pairs from the state they
        are in (``tune``, `hil.programming.tune`); `mode` None: the scheme's `refresh_mode`."""
        st = self._state(device, tile)
        mode = mode or self.refresh_mode
        if mode is None:
            mode = "tune" if "pulse" in device.info.capabilities else "verify"
        if mode == "verify":
            return self._write(device, tile, st, self.target(tile), kind="refresh", verify=True)
        if mode != "tune":
            raise ValueError(f"refresh mode must be one of {REFRESH_MODES}, got {mode!r}")
        return self._tune(device, tile, st)

    def _tune(self, device: Device, tile: str, st: TileState) -> Programmed:
        m = st.mapping
        probe = None
        if st.steps is None and self.record is None:  # a scheme that has not pulsed this tile yet
            probe = st.steps = probe_steps(device, tile, reads=self.tune_reads)
            st.one_sided = probe.one_sided
        target = self.target(tile) * (m.g_range / m.w_max)
        res = tune_pairs(
            device, tile, target, lambda g, dev: self.pulse_counts(st, dev, g), one_sided=st.one_sided,
            g_min=m.g_min, g_max=m.g_max, tol=self.tune_tol * m.g_range, reads=self.tune_reads,
            max_iters=self.tune_iters, max_pulses=self.max_update_pulses,
        )  # fmt: skip
        st.g_est = res.g
        gp, gm = res.g[0].astype(np.float32), res.g[1].astype(np.float32)
        report = UpdateReport(
            tile, gp, gm, res.iterations, res.pulses + (probe.pulses if probe else 0), res.residual_max,
            res.within_tol, res.energy_j + (probe.energy_j if probe else 0.0), res.time_s, scheme=self.name,
            kind="refresh", step=st.updates,
        )  # fmt: skip
        self.history.append(
            report.to_dict()
            | {"mode": "tune", "reads": res.reads, "resets": res.resets, "gave_up": res.gave_up}
        )
        return Programmed(report, 0, lambda: m.to_weight(gp, gm))

    # ------------------------------------------------------------------------------ pulses
    def pulse_counts(self, st: TileState, dev: np.ndarray, g: np.ndarray | None = None) -> np.ndarray:
        """Expected (real-valued) signed pulse counts that move each device from `g` (default:
        the conductances the scheme expects, `g_est`) by `dev` siemens."""
        g = st.g_est if g is None else g
        if self.record is not None:
            lim_lo, lim_hi = st.mapping.g_min, st.mapping.g_max
            goal = np.clip(g + dev, lim_lo, lim_hi)
            n = pulses_needed(self.record, st.position, g, goal)
            n = np.where(np.isfinite(n), n, np.sign(dev) * self.max_update_pulses)
            return np.where(dev == 0, 0.0, np.nan_to_num(n))
        assert st.steps is not None
        if st.one_sided:
            return dev / st.steps.up_step(g)  # decreases are not pulsed on one-sided tiles
        return np.where(dev >= 0, dev / st.steps.dw_up, dev / st.steps.dw_down)

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

    def _pulse(self, device: Device, tile: str, st: TileState, w: np.ndarray) -> Programmed:
        st.updates += 1
        m = st.mapping
        dw = w - st.host
        st.host = w
        req = st.acc + dw if self.name == "mixed" else dw
        d_g = req * (m.g_range / m.w_max)  # change of G+ - G-
        if st.one_sided:
            dev = np.stack([np.maximum(d_g, 0.0), np.maximum(-d_g, 0.0)])
        else:
            dev = np.stack([0.5 * d_g, -0.5 * d_g])
            if st.stuck is not None and st.stuck.stuck.any():  # the partner moves for both
                s = st.stuck.stuck
                dev = np.stack([np.where(s[1], d_g, dev[0]), np.where(s[0], -d_g, dev[1])])
                dev = np.where(s, 0.0, dev)
        n = self.pulse_counts(st, dev)
        k = np.clip(self.round_counts(n), -self.max_update_pulses, self.max_update_pulses)
        if st.one_sided:
            k = np.maximum(k, 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            frac = np.where(n != 0, k / n, 0.0)
        # expected move of every device; a device at the edge of the window does not go past it
        moved = np.clip(st.g_est + dev * frac, m.g_min, m.g_max) - st.g_est
        applied = (moved[0] - moved[1]) * (m.w_max / m.g_range)
        st.acc = req - applied if self.name == "mixed" else np.zeros_like(req)
        counts = k.astype(np.int32)
        if counts.any():
            rep = device.pulse(tile, counts[0], counts[1])
            pulses, energy, time_s = rep.pulses, rep.energy_j, rep.time_s
        else:
            pulses, energy, time_s = 0, 0.0, 0.0
        st.g_est = st.g_est + moved
        missing = np.abs(dev - moved)
        half_step = 0.5 * self._nominal_step(st)
        report = UpdateReport(
            tile, st.g_est[0].astype(np.float32), st.g_est[1].astype(np.float32), 0, pulses,
            float(missing.max()) if missing.size else 0.0, float((missing <= half_step).mean()),
            energy, time_s, scheme=self.name, kind="pulse", step=st.updates,
            requested=float(np.abs(req).sum()), applied=float(np.abs(applied).sum()),
            remainder=float(np.abs(st.acc).sum()), devices_pulsed=int((counts != 0).sum()),
        )  # fmt: skip
        self.history.append(report.to_dict())
        return Programmed(report, 0, lambda: read_weights(device, tile, m))

    def _nominal_step(self, st: TileState) -> float:
        if st.steps is not None:
            return st.steps.dw_up
        assert self.record is not None
        pm = self.record.tile(st.position, st.g_est.shape[1:]).pulse
        assert pm is not None
        return float(np.nanmedian(np.where(pm.valid, pm.dw_up, np.nan)))

    @staticmethod
    def _saturated(st: TileState) -> float:
        m = st.mapping
        return float((st.g_est > m.g_min + 0.95 * m.g_range).mean())

    def commit(self, device: Device, tile: str, reads: int = 4) -> np.ndarray:
        """Adopt what the devices of `tile` hold now (the mean of `reads` reads) as the weights
        they are meant to hold, and return them. After open-loop pulsed training the devices
        differ from the host weights by the pulse noise the network has learned around; a
        later `refresh` restores the committed weights rather than the host's."""
        st = self.tiles[tile]
        g = np.zeros_like(st.g_est)
        for _ in range(reads):
            gp, gm = device.read_conductance(tile)
            g += np.stack([gp, gm])
        st.g_est = g / reads
        w = st.mapping.to_weight(st.g_est[0], st.g_est[1]).astype(np.float64)
        st.acc = st.host - w
        return w

    # ------------------------------------------------------------------------------ drift
    def drift(self, device: Device, tile: str, reads: int = 2) -> float:
        """Relative decay of the tile's conductances since they were programmed:
        ``1 - mean(G_read - g_min) / mean(G_expected - g_min)`` (positive: decayed). Pulse
        noise averages out over a tile; power-law drift lowers every device alike."""
        st = self.tiles[tile]
        acc = np.zeros_like(st.g_est)
        for _ in range(reads):
            gp, gm = device.read_conductance(tile)
            acc += np.stack([gp, gm])
        g = acc / reads - st.mapping.g_min
        expected = float((st.g_est - st.mapping.g_min).mean())
        return 1.0 - float(g.mean()) / expected if expected > 0 else 0.0

    def refresh_if_drifted(self, device: Device, tile: str) -> Programmed | None:
        """Refresh `tile` when `drift` exceeds `drift_tol`; None when it does not."""
        if abs(self.drift(device, tile)) <= self.drift_tol:
            return None
        return self.refresh(device, tile)

    def totals(self) -> dict[str, float]:
        """Sums over `history`: pulses, energy, time, and counts of updates and refreshes."""
        h = self.history
        return {
            "pulses": float(sum(r["pulses"] for r in h)),
            "energy_j": float(sum(r["energy_j"] for r in h)),
            "time_s": float(sum(r["time_s"] for r in h)),
            "updates": float(sum(r["kind"] != "refresh" for r in h)),
            "refreshes": float(sum(r["kind"] == "refresh" for r in h)),
        }


def make_scheme(
    name: str | ProgrammingScheme | None = None, *, verify: bool = False, **kw: Any
) -> ProgrammingScheme:
    """A scheme from its name (None: ``verify`` if `verify` else ``ideal``); a scheme passes
    through unchanged."""
    if isinstance(name, ProgrammingScheme):
        return name
    if name is None:
        name = "verify" if verify else "ideal"
    return ProgrammingScheme(name, **kw)
