"""What every programming scheme shares: the protocol an `EBBlock` programs through, the
report types, the per-tile state, the refresh policy, and `SchemeBase`, which holds the
parts common to all schemes (first write, refresh by write-verify or by tuning, commit,
drift). A scheme is a small subclass that says how an update after the first write
reaches the devices (`hil.programming.writes`, `hil.programming.pulsed`); the names are
listed in `hil.programming.schemes`.

Refresh (any scheme): every `refresh_every` updates, or on demand when `drift` says the
conductances decayed by more than `drift_tol`, the tile is brought back to the weights it is
meant to hold (`target`: the host weights minus what the accumulator still owes, or what
`commit` adopted). Two ways (`mode`): ``tune`` (the default where the Device can pulse)
corrects the pairs from the state they are in, closed loop with averaged reads
(`hil.programming.tune`); ``verify`` re-writes every device with the Device's write-verify.
On pcm after one simulated day tuning keeps the network within a fraction of a point of its
accuracy right after training, where a re-write lost 1-2 points: a re-write draws new
programming errors at the precision of one verify read (~0.25 uS), which the network never
saw, and a re-mapping also undoes how training compensated stuck devices with their
partners. When a one-sided tile has more than 1 % of its devices near saturation the
refresh is always a re-write (``verify``): that lowers the pairs' common mode.

Every call returns `Programmed` results whose `UpdateReport` is a `ProgramReport` with the
scheme's fields added; the scheme also keeps the JSON-ready `to_dict()` of every report in
`history`.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

from calibration import CalibrationRecord, conductance_targets, pulses_needed
from drivers import seeds
from drivers.base import Device, ProgramReport, board_of
from drivers.numerics import to_numpy
from hil.programming.mapping import LinearMapping, StuckDevices
from hil.programming.steps import StepModel, probe_steps
from hil.programming.tune import MAX_TUNE_ITERS, MAX_TUNE_READS, check_count, check_positive, tune_pairs

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

    ``gave_up`` (from `ProgramReport`): the devices the closed loop stopped correcting because
    they did not move (stuck or worn); for a ``tune`` refresh, the pairs tuning gave up on;
    None when the board did not report it. ``verified``: how many devices (``tune``: pairs)
    that closed loop worked on (0 for a write without verify and for pulses), the share's
    denominator: ``gave_up / verified``.
    """

    scheme: str = "ideal"
    kind: str = "write"
    step: int = 0  # the scheme's update counter for this tile
    requested: float = 0.0
    applied: float = 0.0
    remainder: float = 0.0
    devices_pulsed: int = 0
    verified: int = 0

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
            "gave_up": None if self.gave_up is None else int(self.gave_up),
            "verified": int(self.verified),
        }


@dataclass
class Programmed:
    """An `UpdateReport` plus how to get the weights the device now holds (`achieved`): from
    the read-back of a write, or, after pulses, from one read of the tile made on demand."""

    report: UpdateReport
    clipped: int
    reader: Callable[[], np.ndarray | torch.Tensor]

    @property
    def achieved(self) -> np.ndarray | torch.Tensor:
        """The weights (a tensor on the board's device after a write through a tensor path)."""
        return self.reader()


@dataclass
class TileState:
    mapping: LinearMapping
    position: int  # index of the tile in the topology's couplings (calibration records)
    # host weights at the last call (write schemes: a tensor as given, on its device; pulsed
    # schemes: float64 numpy)
    host: np.ndarray | torch.Tensor
    acc: np.ndarray  # weight change owed to the devices (mixed), float64
    # (2, rows, cols) conductances the scheme expects: for write schemes the float32 targets of
    # the last write themselves (one of `targets`, a tensor), float64 numpy for pulsed schemes
    g_est: np.ndarray | torch.Tensor
    one_sided: bool
    steps: StepModel | None = None
    updates: int = 0
    written: bool = False
    stuck: StuckDevices | None = None  # found from read-backs (None with a calibration record)
    # two (2, rows, cols) float32 target buffers used in turn, so a write allocates nothing of
    # the tile's size and `g_est` (the last targets) is never the buffer being filled
    targets: list[torch.Tensor | None] = field(default_factory=lambda: [None, None])
    turn: int = 0  # the buffer the next write fills
    bounded: bool = False  # the weights of the current `program` call are within +-w_max


@dataclass(frozen=True)
class RefreshPolicy:
    """When and how a scheme brings a tile back to its weights.

    `every`: refresh every N updates of a tile (0: never periodically); `mode`: ``tune`` or
    ``verify`` (None: ``tune`` when the Device can pulse); `tol`: the tolerance of a
    ``verify`` refresh as a fraction of the conductance range (None: the scheme's write
    tolerance; on pcm 1 % made it worse: more one-sided devices end the verify budget freshly
    RESET); `tune_tol` (fraction of the range), `tune_reads` (reads averaged per check),
    `tune_iters`: the tuning loop's tolerance on ``G+ - G-``, averaging and budget;
    `drift_tol`: relative conductance decay that `refresh_if_drifted` acts on.

    The tuning's work is bounded: `tune_iters` at most `MAX_TUNE_ITERS` rounds, `tune_reads`
    at most `MAX_TUNE_READS` reads per check (`hil.programming.tune`); `tune_tol` must be
    finite and in (0, 1] (a NaN tolerance is never met: every round would run)."""

    every: int = 0
    mode: str | None = None
    tol: float | None = None
    tune_tol: float = 0.004
    tune_reads: int = 16
    tune_iters: int = 40
    drift_tol: float = 0.05

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError(f"refresh_every must be >= 0, got {self.every}")
        if self.mode is not None and self.mode not in REFRESH_MODES:
            raise ValueError(f"refresh_mode must be one of {REFRESH_MODES}, got {self.mode!r}")
        check_positive("tune_tol", self.tune_tol, 1.0, "give it as a fraction of the conductance range")
        check_count(
            "tune_reads",
            self.tune_reads,
            1,
            MAX_TUNE_READS,
            "average at most MAX_TUNE_READS reads per check, at least 1",
        )
        check_count(
            "tune_iters",
            self.tune_iters,
            0,
            MAX_TUNE_ITERS,
            "give the tuning at most MAX_TUNE_ITERS rounds (0: read only)",
        )
        if self.tol is not None:
            check_positive("refresh_tol", self.tol, 1.0, "give it as a fraction of the conductance range")
        d = self.drift_tol
        if isinstance(d, bool) or not isinstance(d, numbers.Real) or not (math.isfinite(d) and d >= 0):
            raise ValueError(
                f"drift_tol must be a finite relative decay >= 0, got {d!r}; a NaN refreshes at every check"
            )


class ProgrammingScheme(Protocol):
    """How an `EBBlock`'s host weight changes reach one Device's tiles."""

    name: str
    history: list[dict[str, Any]]

    def mapping(self, device: Device, tile: str) -> LinearMapping: ...

    def program(
        self,
        device: Device,
        tile: str,
        w: np.ndarray | torch.Tensor,
        *,
        force: bool = False,
        bounded: bool = False,
    ) -> list[Programmed]: ...

    def target(self, tile: str) -> np.ndarray: ...

    def refresh(self, device: Device, tile: str, mode: str | None = None) -> Programmed: ...

    def refresh_if_drifted(self, device: Device, tile: str) -> Programmed | None: ...

    def commit(self, device: Device, tile: str, reads: int = 4) -> np.ndarray: ...

    def drift(self, device: Device, tile: str, reads: int = 2) -> float: ...

    def totals(self) -> dict[str, float]: ...


class SchemeBase(ABC):
    """The parts every scheme shares, bound to one Device (one scheme per EBBlock).

    `record`: a calibration record of the board (pulse model, per-device windows, stuck
    devices); `tol`: write-verify tolerance in siemens (None: the Device's default, 2 % of the
    range); `max_iters`: the write-verify budget; `refresh`: the `RefreshPolicy`; `seed`: the
    scheme's generator (`drivers.seeds` stream ``programming``).

    A subclass sets `name`, whether its first write is verified (`verify_first`) and whether
    it pulses (`pulsed`: it then measures the pulse response of a tile before the first
    write), and implements `_update`."""

    name: ClassVar[str]
    verify_first: ClassVar[bool] = True
    pulsed: ClassVar[bool] = False
    _max_pulses: int = 32  # the most pulses one device gets in one update or tuning round

    def _pulse_limit(self, device: Device) -> int:
        """Pulses one device gets in one call: the scheme's bound, or the board's own
        (`Limits.max_pulses`) where that is lower: a board declaring 8 refused the scheme's 32
        with a LimitViolation, where the scheme clips and reports the shortfall."""
        return max(1, min(self._max_pulses, device.info.limits.max_pulses))

    def __init__(
        self,
        *,
        record: CalibrationRecord | None = None,
        tol: float | None = None,
        max_iters: int | None = None,
        refresh: RefreshPolicy | None = None,
        seed: int = 0,
    ) -> None:
        self.record = record
        self.tol = tol
        self.max_iters = max_iters
        self.refresh_policy = refresh or RefreshPolicy()
        self.rng = seeds.numpy_rng(seed, "programming")
        self.tiles: dict[str, TileState] = {}  # by tile name: the tiles of `device`
        self.history: list[dict[str, Any]] = []
        self.device: Device | None = None  # the Device whose tiles `tiles` holds (the first used)

    @property
    def refresh_mode(self) -> str | None:
        return self.refresh_policy.mode

    # ------------------------------------------------------------------------------ setup
    def mapping(self, device: Device, tile: str) -> LinearMapping:
        """The weight <-> conductance mapping this scheme uses for `tile` (measures the pulse
        response first, for pulsed schemes without a record)."""
        return self._state(device, tile).mapping

    def _pulse_model(
        self, device: Device, tile: str, position: int, shape: tuple[int, int]
    ) -> tuple[StepModel | None, bool]:
        """(measured steps, one-sided) of a tile; schemes that do not pulse need neither."""
        return None, False

    def _bind(self, device: Device, tile: str) -> None:
        """Refuse a second Device: the per-tile state is keyed by tile name, and two boards (or
        two blocks' views of one shared board) name their tiles alike, so a second Device would
        be programmed with the first one's mapping, written flag and stuck devices (its first
        write taken as done: an open-loop pulse update of a tile never written)."""
        if self.device is None:
            self.device = device
            return
        if device is not self.device:
            same = board_of(device) is board_of(self.device)
            other = (
                "another Device of the same board (a wrapper, another block's view)"
                if same
                else "another Device"
            )
            raise ValueError(
                f"this {self.name!r} programming scheme already holds the state of the tiles of "
                f"{_describe(self.device)} (mapping, written flag, stuck devices, by tile name); it was "
                f"asked to program tile {tile!r} of {other}, {_describe(device)}, which it would have "
                "taken for the first one's tile of that name. One scheme serves one Device: make one "
                "scheme per block (make_scheme(...) for each, or pass the scheme's name, as the "
                "trainers do)"
            )

    def _state(self, device: Device, tile: str) -> TileState:
        self._bind(device, tile)
        st = self.tiles.get(tile)
        if st is not None:
            return st
        topo = device.topology
        if topo is None:
            raise ValueError("configure the device before programming weights")
        position = [c.tile for c in topo.couplings].index(tile)
        shape = topo.tile_shape(tile)
        steps, one_sided = self._pulse_model(device, tile, position, shape)
        mapping = LinearMapping.for_tile(device, tile, centered=self.pulsed and not one_sided)
        zeros = np.zeros(shape)
        st = TileState(mapping, position, zeros, zeros.copy(), np.zeros((2, *shape)), one_sided, steps)
        if self.record is None:
            st.stuck = StuckDevices.empty(shape, mapping.g_range)
        self.tiles[tile] = st
        return st

    # ------------------------------------------------------------------------------ entry
    def program(
        self,
        device: Device,
        tile: str,
        w: np.ndarray | torch.Tensor,
        *,
        force: bool = False,
        bounded: bool = False,
    ) -> list[Programmed]:
        """Bring `tile` to the host weights `w`: a whole-tile write the first time (or with
        `force`), then the scheme's update, plus a refresh when one is due. Returns one
        result per device operation, in order. `bounded`: the caller has clipped `w` to
        +-w_max (an `EBBlock` does), so the mapping does not check the range again."""
        st = self._state(device, tile)
        st.bounded = bounded
        if force or not st.written:
            return self._first_write(device, tile, st, w)
        out = self._update(device, tile, st, w)
        every = self.refresh_policy.every
        periodic = bool(every) and st.updates % every == 0
        saturated = st.one_sided and self.pulsed and self._saturated(st) > 0.01
        if periodic or saturated:
            # saturation needs the common mode lowered: a re-write, not a tuning from the state
            out.append(self.refresh(device, tile, mode="verify" if saturated else None))
        return out

    def _first_write(
        self, device: Device, tile: str, st: TileState, w: np.ndarray | torch.Tensor
    ) -> list[Programmed]:
        res = self._write(device, tile, st, w, kind="write", verify=self.verify_first)
        st.written = True
        _keep_host(st, w)
        st.acc = np.zeros(st.host.shape)
        return [res]

    @abstractmethod
    def _update(
        self, device: Device, tile: str, st: TileState, w: np.ndarray | torch.Tensor
    ) -> list[Programmed]:
        """How a change of the host weights after the first write reaches the devices."""

    def target(self, tile: str) -> np.ndarray:
        """The weights the device is meant to hold: host weights minus what is still owed."""
        st = self.tiles[tile]
        return to_numpy(st.host, dtype=None) - st.acc

    # ------------------------------------------------------------------------------ writes
    def _targets(
        self, device: Device, st: TileState, w: np.ndarray | torch.Tensor
    ) -> tuple[torch.Tensor | np.ndarray, int]:
        """The (G+, G-) targets of weights `w` as one (2, rows, cols) float32 tensor, mapped on
        the device of `w` into one of the tile's two buffers, with stuck devices compensated
        in place (a calibration record's targets: a numpy array, as it gives them)."""
        k = st.turn
        st.turn ^= 1
        g, clipped = st.mapping.conductance_tensor(w, out=st.targets[k], bounded=st.bounded)
        st.bounded = False  # for this call's weights only (a refresh maps the target)
        st.targets[k] = g
        if self.record is not None:
            gn = g.cpu().numpy()
            t = conductance_targets(self.record, st.position, gn[0], gn[1], device.info.limits)
            return np.stack((t.g_plus, t.g_minus)), clipped
        if st.stuck is not None and st.stuck.count:
            st.stuck.compensate_(g, st.mapping.g_min, st.mapping.g_max)
        return g, clipped

    def _write(
        self, device: Device, tile: str, st: TileState, w: np.ndarray | torch.Tensor, *, kind: str,
        verify: bool,
    ) -> Programmed:  # fmt: skip
        g, clipped = self._targets(device, st, w)
        tol = self.tol
        if kind == "refresh" and self.refresh_policy.tol is not None:
            tol = self.refresh_policy.tol * st.mapping.g_range
        # stacked targets: a board with a tensor path (the in-process emulator) takes the tensor
        # where it is, with no host copy; others get numpy (`Device.program_stacked`)
        rep = device.program_stacked(tile, g, verify=verify, tol=tol, max_iters=self.max_iters)
        # pulsed schemes add float64 moves to it; write schemes keep the targets as they are
        st.g_est = to_numpy(g, dtype=None).astype(np.float64) if self.pulsed else g
        if st.stuck is not None:
            read = (rep.g_plus, rep.g_minus)
            st.stuck.observe(g, read, verified=verify, residual_max=rep.residual_max)
        report = UpdateReport(
            rep.tile, rep.g_plus, rep.g_minus, rep.iterations, rep.pulses, rep.residual_max,
            rep.within_tol, rep.energy_j, rep.time_s, rep.gave_up, scheme=self.name, kind=kind,
            step=st.updates, verified=int(np.prod(g.shape)) if verify else 0,  # g: (2, rows, cols)
        )  # fmt: skip
        self.history.append(report.to_dict())
        mapping = st.mapping
        return Programmed(report, clipped, lambda: mapping.weight_tensor(rep.g_plus, rep.g_minus))

    # ------------------------------------------------------------------------------ refresh
    def refresh(self, device: Device, tile: str, mode: str | None = None) -> Programmed:
        """Bring `tile` back to the weights it is meant to hold (`target`): a write-verify of
        fresh targets (``verify``) or a closed-loop tuning of the pairs from the state they
        are in (``tune``, `hil.programming.tune`); `mode` None: the policy's mode."""
        st = self._state(device, tile)
        mode = mode or self.refresh_policy.mode
        if mode is None:
            mode = "tune" if "pulse" in device.info.capabilities else "verify"
        if mode == "verify":
            return self._write(device, tile, st, self.target(tile), kind="refresh", verify=True)
        if mode != "tune":
            raise ValueError(f"refresh mode must be one of {REFRESH_MODES}, got {mode!r}")
        return self._tune(device, tile, st)

    def pulse_counts(self, st: TileState, dev: np.ndarray, g: np.ndarray | None = None) -> np.ndarray:
        """Expected (real-valued) signed pulse counts that move each device from `g` (default:
        the conductances the scheme expects, `g_est`) by `dev` siemens (what tuning pulses)."""
        g = to_numpy(st.g_est, dtype=None) if g is None else g
        if self.record is not None:
            goal = np.clip(g + dev, st.mapping.g_min, st.mapping.g_max)
            n = pulses_needed(self.record, st.position, g, goal)
            n = np.where(np.isfinite(n), n, np.sign(dev) * self._max_pulses)
            return np.where(dev == 0, 0.0, np.nan_to_num(n))
        assert st.steps is not None
        if st.one_sided:
            return dev / st.steps.up_step(g)  # decreases are not pulsed on one-sided tiles
        return np.where(dev >= 0, dev / st.steps.dw_up, dev / st.steps.dw_down)

    def _tune(self, device: Device, tile: str, st: TileState) -> Programmed:
        m = st.mapping
        p = self.refresh_policy
        probe = None
        if st.steps is None and self.record is None:  # a scheme that has not pulsed this tile yet
            probe = st.steps = probe_steps(device, tile, reads=p.tune_reads)
            st.one_sided = probe.one_sided
        target = np.asarray(self.target(tile), np.float64) * (m.g_range / m.w_max)
        res = tune_pairs(
            device, tile, target, lambda g, dev: self.pulse_counts(st, dev, g), one_sided=st.one_sided,
            g_min=m.g_min, g_max=m.g_max, tol=p.tune_tol * m.g_range, reads=p.tune_reads,
            max_iters=p.tune_iters, max_pulses=self._pulse_limit(device),
        )  # fmt: skip
        st.g_est = res.g
        gp, gm = res.g[0].astype(np.float32), res.g[1].astype(np.float32)
        report = UpdateReport(
            tile, gp, gm, res.iterations, res.pulses + (probe.pulses if probe else 0), res.residual_max,
            res.within_tol, res.energy_j + (probe.energy_j if probe else 0.0), res.time_s, res.gave_up,
            scheme=self.name, kind="refresh", step=st.updates, verified=int(gp.size),
        )  # fmt: skip
        self.history.append(report.to_dict() | {"mode": "tune", "reads": res.reads, "resets": res.resets})
        return Programmed(report, 0, lambda: m.to_weight(gp, gm))

    @staticmethod
    def _saturated(st: TileState) -> float:
        m = st.mapping
        return float((to_numpy(st.g_est, dtype=np.float64) > m.g_min + 0.95 * m.g_range).mean())

    def commit(self, device: Device, tile: str, reads: int = 4) -> np.ndarray:
        """Adopt what the devices of `tile` hold now (the mean of `reads` reads) as the weights
        they are meant to hold, and return them. After open-loop pulsed training the devices
        differ from the host weights by the pulse noise the network has learned around; a
        later `refresh` restores the committed weights rather than the host's, as long as no
        update is programmed in between (the next update starts from the host weights again:
        `mixed` pays the committed difference back with pulses, `pulsed` drops it)."""
        self._bind(device, tile)
        st = self.tiles[tile]
        g = np.zeros(st.g_est.shape)
        for _ in range(reads):
            gp, gm = device.read_conductance(tile)
            g += np.stack([gp, gm])
        st.g_est = g / reads
        w = st.mapping.to_weight(st.g_est[0], st.g_est[1]).astype(np.float64)
        st.acc = to_numpy(st.host, dtype=None) - w
        return w

    # ------------------------------------------------------------------------------ drift
    def drift(self, device: Device, tile: str, reads: int = 2) -> float:
        """Relative decay of the tile's conductances since they were programmed:
        ``1 - mean(G_read - g_min) / mean(G_expected - g_min)`` (positive: decayed). Pulse
        noise averages out over a tile; power-law drift lowers every device alike."""
        self._bind(device, tile)
        st = self.tiles[tile]
        acc = np.zeros(st.g_est.shape)
        for _ in range(reads):
            gp, gm = device.read_conductance(tile)
            acc += np.stack([gp, gm])
        g = acc / reads - st.mapping.g_min
        expected = float((to_numpy(st.g_est, dtype=np.float64) - st.mapping.g_min).mean())
        return 1.0 - float(g.mean()) / expected if expected > 0 else 0.0

    def refresh_if_drifted(self, device: Device, tile: str) -> Programmed | None:
        """Refresh `tile` when `drift` exceeds the policy's `drift_tol`; None when it does not."""
        if abs(self.drift(device, tile)) <= self.refresh_policy.drift_tol:
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


def _describe(device: Device) -> str:
    """A Device in a refusal: its class and the identity of its board."""
    ident = device.info.identity
    return f"{type(device).__name__} {ident.model!r} serial {ident.serial or '(none)'!r}"


def _float64_copy(w: np.ndarray | torch.Tensor) -> np.ndarray:
    return np.array(torch.as_tensor(w).detach().cpu().numpy(), dtype=np.float64)


def _keep_host(st: TileState, w: np.ndarray | torch.Tensor) -> None:
    """Keep a copy of `w` in its own dtype (float32 parameters stay float32) in `st.host`, a
    tensor on the device of `w` (no host copy per write: `target` and `commit` bring it to
    the host when they are asked), copied into the one already there when it fits (no
    allocation per write)."""
    t = torch.as_tensor(w).detach()
    h = st.host
    if isinstance(h, torch.Tensor) and h.shape == t.shape and h.dtype == t.dtype and h.device == t.device:
        h.copy_(t)
    else:
        st.host = t.clone()
