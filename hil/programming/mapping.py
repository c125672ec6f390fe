"""Weights <-> conductance pairs, and writing weights to a Device.

The Device convention (`drivers.base`): ``W = w_max (G+ - G-) / (g_max - g_min)``, so one
differential pair represents weights in ``[-w_max, w_max]``. The default mapping here is
the plain linear one: the sign decides which device of the pair carries the weight, the
other sits at ``g_min``:

    G+ = g_min + max(W, 0) / w_max * (g_max - g_min)
    G- = g_min + max(-W, 0) / w_max * (g_max - g_min)

With ``center`` set, both devices sit around that common-mode conductance instead,
``G+- = center +- (W / w_max) (g_max - g_min) / 2``: the same weight, but every device starts
mid-window, where a bidirectional soft-bounds device steps about as far up as down, which
pulsed updates need (`hil.programming.schemes`).

Weights outside ``[-w_max, w_max]`` are clipped (and counted).

Stuck devices: a calibration record names them (`calibration.conductance_targets` then lets
the partner carry the weight). Without one, `StuckDevices` finds them from the read-backs of
writes (a device that misses its target by a quarter of the range, twice, or once after a
write-verify) and `StuckDevices.compensate` gives the pair's partner the whole difference:
``G- = G+_stuck - dG`` or ``G+ = G-_stuck + dG``. A stuck-high device otherwise adds a full
``+-w_max`` to its weight, which can saturate a hard-sigmoid unit for good (no EP gradient
flows through a clamped node).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from drivers.base import Device, ProgramReport

Array = np.ndarray | torch.Tensor


class ClippedWeightsWarning(UserWarning):
    """`write_weights` clipped weights outside ``+-w_max`` (the tile's coupling) to it."""


@dataclass(frozen=True)
class LinearMapping:
    """The default weight <-> conductance-pair mapping for one tile."""

    w_max: float
    g_min: float
    g_max: float
    center: float | None = None  # common-mode conductance of both devices (None: one-sided)

    @staticmethod
    def for_tile(device: Device, tile: str, *, centered: bool = False) -> LinearMapping:
        topo = device.topology
        if topo is None:
            raise ValueError("the device has no topology; configure it before mapping weights")
        lim = device.info.limits
        center = 0.5 * (lim.g_min + lim.g_max) if centered else None
        return LinearMapping(topo.coupling(tile).w_max, lim.g_min, lim.g_max, center)

    @property
    def g_range(self) -> float:
        return self.g_max - self.g_min

    def to_conductance(self, w: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray, int]:
        """Return (G+, G-, number of weights clipped to +-w_max), float32 siemens."""
        g, clipped = self.to_conductance_pair(w)
        return g[0], g[1], clipped

    def to_conductance_pair(self, w: np.ndarray | torch.Tensor) -> tuple[np.ndarray, int]:
        """`to_conductance` as one (2, rows, cols) array: G+ then G-."""
        g, clipped = self.conductance_tensor(w)
        return g.cpu().numpy(), clipped

    def conductance_tensor(
        self, w: np.ndarray | torch.Tensor, out: torch.Tensor | None = None, *, bounded: bool = False
    ) -> tuple[torch.Tensor, int]:
        """`to_conductance_pair` as a float32 tensor on the device of `w` (a numpy `w`: on the
        CPU, sharing its memory when it is float32), written into `out` when given (a
        (2, rows, cols) float32 tensor there; a scheme reuses one per tile, so a write
        allocates nothing of the tile's size). No float64 copy is made. `bounded`: the caller
        has clipped `w` to +-w_max already, so the range check (and count) is skipped."""
        t = torch.as_tensor(w).detach()
        if t.dtype != torch.float32:
            t = t.to(torch.float32)
        clipped = 0
        if not bounded and t.numel():
            lo, hi = torch.aminmax(t)
            if not (-self.w_max <= float(lo) and float(hi) <= self.w_max):
                clipped = int((t.abs() > self.w_max).sum())
        k = self.g_range / self.w_max
        shape = (2, *t.shape)
        if out is None or out.shape != shape or out.device != t.device or out.dtype != torch.float32:
            out = torch.empty(shape, device=t.device)
        g = out
        if self.center is not None:
            x = torch.mul(t, k).clamp_(-self.g_range, self.g_range)
            torch.mul(x, 0.5, out=g[0])
            torch.mul(x, -0.5, out=g[1])
            return g.add_(self.center).clamp_(self.g_min, self.g_max), clipped
        # the sign picks the device; the clamp to [g_min, g_max] also clips the weight and
        # catches float32 rounding a hair outside the window
        torch.mul(t, k, out=g[0])
        torch.mul(t, -k, out=g[1])
        return g.add_(self.g_min).clamp_(self.g_min, self.g_max), clipped

    def to_weight(self, g_plus: np.ndarray | torch.Tensor, g_minus: np.ndarray | torch.Tensor) -> np.ndarray:
        """``w_max (G+ - G-) / (g_max - g_min)``, float32 (computed in the inputs' precision:
        float32 read-backs stay float32)."""
        return self.weight_tensor(g_plus, g_minus).cpu().numpy()

    def weight_tensor(self, g_plus: Array, g_minus: Array, out: torch.Tensor | None = None) -> torch.Tensor:
        """`to_weight` as a float32 tensor on the inputs' device, written into `out` when given."""
        gp, gm = torch.as_tensor(g_plus), torch.as_tensor(g_minus)
        if gp.dtype == torch.float64 or gm.dtype == torch.float64:
            w = torch.sub(gp.double(), gm.double()).mul_(self.w_max).div_(self.g_range).to(torch.float32)
            return w if out is None else out.copy_(w)
        gp, gm = gp.to(torch.float32), gm.to(torch.float32)
        w = torch.sub(gp, gm) if out is None else torch.sub(gp, gm, out=out)
        return w.mul_(self.w_max / self.g_range)


@dataclass
class StuckDevices:
    """Devices of one tile found stuck from write read-backs, as tensors ``(2, rows, cols)``
    on the device of the targets they are checked against (the CPU by default)."""

    misses: torch.Tensor  # int32: evidence that a device did not go where it was sent
    value: torch.Tensor  # float32: where a device read back when it missed (a read-back, exact)
    threshold: float  # siemens: a miss is a read-back this far from the target
    confirm: int = 2  # misses that mark a device stuck (for good: a stuck target hides a recovery)

    def __post_init__(self) -> None:
        self.misses = torch.as_tensor(self.misses, dtype=torch.int32)
        self.value = torch.as_tensor(self.value, dtype=torch.float32, device=self.misses.device)
        self._refresh()

    def _refresh(self) -> None:
        """Flags and the stuck pairs' indices, kept up to date by `observe`."""
        m = self.misses
        self.any_misses = bool(m.any())  # some device has missed (stuck or not yet confirmed)
        # unconfirmed misses: the next write that sees no miss resets them
        self.pending = self.any_misses and bool(((m > 0) & (m < self.confirm)).any())
        mask = m >= self.confirm
        self.mask = mask  # the stuck devices, (2, rows, cols) bool tensor
        self.count = int(mask.sum()) if self.any_misses else 0
        # flat indices of the cells (pairs) with a stuck device, and which of the two is stuck
        cells = mask.any(0).reshape(-1).nonzero().squeeze(1) if self.count else None
        self._cells = cells
        if cells is not None:
            flat = mask.reshape(2, -1)
            self._s = (flat[0, cells], flat[1, cells])
            value = self.value.reshape(2, -1)
            self._v = (value[0, cells].double(), value[1, cells].double())

    @staticmethod
    def empty(shape: tuple[int, int], g_range: float, device: torch.device | str = "cpu") -> StuckDevices:
        z = torch.zeros((2, *shape), dtype=torch.int32, device=device)
        return StuckDevices(z, torch.zeros((2, *shape), device=device), 0.25 * g_range)

    @property
    def stuck(self) -> np.ndarray:
        """The stuck devices as a numpy bool array (2, rows, cols)."""
        return self.mask.cpu().numpy()

    def observe(
        self,
        target: np.ndarray | torch.Tensor,
        readback: Array | tuple[Array, Array],
        *,
        verified: bool,
        residual_max: float | None = None,
    ) -> None:
        """Count the devices that missed `target` (a write-verify's miss counts as confirmed).
        `residual_max`, the largest |read-back - target| the device reported, skips the
        per-device pass when no device missed and none has an unconfirmed miss to reset
        (nothing would change). The test runs in float32 on the tensors' device."""
        if residual_max is not None and residual_max <= self.threshold and not self.pending:
            return
        dev = self.misses.device
        tgt = torch.as_tensor(target).to(dev, torch.float32)
        if isinstance(readback, tuple):
            read = torch.stack([torch.as_tensor(r).to(dev, torch.float32) for r in readback])
        else:
            read = torch.as_tensor(readback).to(dev, torch.float32)
        off = torch.sub(read, tgt).abs_() > self.threshold
        was = self.mask
        step = self.confirm if verified else 1
        self.misses = torch.where(off, self.misses + step, torch.where(was, self.misses, 0))
        self.value = torch.where(off & ~was, read, self.value)
        self._refresh()

    def compensate(
        self, gp: np.ndarray, gm: np.ndarray, g_min: float, g_max: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """Targets with every stuck device at its own value and its partner carrying ``G+ - G-``
        (within the window; the stuck device's own target only keeps the request legal)."""
        if not self.count:
            return gp, gm
        g = torch.stack((torch.as_tensor(gp), torch.as_tensor(gm))).to(self.misses.device, torch.float32)
        self.compensate_(g, g_min, g_max)
        out = g.cpu().numpy()
        return out[0], out[1]

    def compensate_(self, g: torch.Tensor, g_min: float, g_max: float) -> torch.Tensor:
        """`compensate` in place on a (2, rows, cols) float32 target tensor; only the pairs
        with a stuck device change, computed in float64 as the partner's difference is."""
        if not self.count or self._cells is None:
            return g
        if self._cells.device != g.device:  # targets mapped on another device than the evidence
            self._cells = self._cells.to(g.device)
            self._s = (self._s[0].to(g.device), self._s[1].to(g.device))
            self._v = (self._v[0].to(g.device), self._v[1].to(g.device))
        cells = self._cells
        flat = g.reshape(2, -1)
        gp, gm = flat[0, cells], flat[1, cells]
        s0, s1 = self._s
        v0, v1 = self._v
        d = gp.double() - gm.double()
        p = torch.where(s0, v0, torch.where(s1 & ~s0, v1 + d, gp.double()))
        m = torch.where(s1, v1, torch.where(s0 & ~s1, v0 - d, gm.double()))
        flat[0, cells] = p.clamp_(g_min, g_max).to(torch.float32)
        flat[1, cells] = m.clamp_(g_min, g_max).to(torch.float32)
        return g


@dataclass
class WriteResult:
    """What a weight write did: the device's report, the mapping used, clipping."""

    report: ProgramReport
    mapping: LinearMapping
    clipped: int  # weights that were outside +-w_max

    @property
    def achieved(self) -> np.ndarray:
        """The weights of the read-back conductances."""
        return self.mapping.to_weight(self.report.g_plus, self.report.g_minus)


def write_weights(
    device: Device,
    tile: str,
    w: np.ndarray | torch.Tensor,
    *,
    mapping: LinearMapping | None = None,
    verify: bool = False,
    tol: float | None = None,
    max_iters: int | None = None,
) -> WriteResult:
    """Map `w` to conductance pairs and program them into `tile` through the Device. Weights
    outside ``+-w_max`` are clipped to it: counted in `WriteResult.clipped` and warned of
    (`ClippedWeightsWarning`; training clips and counts on its own, `EBBlock.clipped`)."""
    m = mapping or LinearMapping.for_tile(device, tile)
    gp, gm, clipped = m.to_conductance(w)
    rep = device.program(tile, gp, gm, verify=verify, tol=tol, max_iters=max_iters)
    if clipped:
        warnings.warn(
            f"write_weights({tile!r}): {clipped} of {int(np.prod(np.shape(w)))} weights lay outside "
            f"+-w_max = +-{m.w_max:g} and were written clipped to it; scale the weights into that "
            "range, or give the tile's coupling a larger w_max in the topology (a weight is "
            "w_max (G+ - G-) / (g_max - g_min)). WriteResult.clipped counts them",
            ClippedWeightsWarning,
            stacklevel=2,
        )
    return WriteResult(rep, m, clipped)


def read_weights(device: Device, tile: str, mapping: LinearMapping | None = None) -> np.ndarray:
    """One (noisy) read of a tile's conductances, as weights."""
    m = mapping or LinearMapping.for_tile(device, tile)
    gp, gm = device.read_conductance(tile)
    return m.to_weight(gp, gm)
