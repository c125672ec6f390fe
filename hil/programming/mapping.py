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

from dataclasses import dataclass

import numpy as np
import torch

from drivers.base import Device, ProgramReport


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
        t = torch.as_tensor(w).detach().to("cpu", torch.float32)
        lo, hi = torch.aminmax(t) if t.numel() else (torch.zeros(()), torch.zeros(()))
        inside = -self.w_max <= float(lo) and float(hi) <= self.w_max
        clipped = 0 if inside else int((t.abs() > self.w_max).sum())
        k = self.g_range / self.w_max
        g = torch.empty(2, *t.shape)
        if self.center is not None:
            x = torch.mul(t, k).clamp_(-self.g_range, self.g_range)
            torch.mul(x, 0.5, out=g[0])
            torch.mul(x, -0.5, out=g[1])
            return g.add_(self.center).clamp_(self.g_min, self.g_max).numpy(), clipped
        # the sign picks the device; the clamp to [g_min, g_max] also clips the weight and
        # catches float32 rounding a hair outside the window
        torch.mul(t, k, out=g[0])
        torch.mul(t, -k, out=g[1])
        return g.add_(self.g_min).clamp_(self.g_min, self.g_max).numpy(), clipped

    def to_weight(self, g_plus: np.ndarray, g_minus: np.ndarray) -> np.ndarray:
        """``w_max (G+ - G-) / (g_max - g_min)``, float32."""
        gp = np.asarray(g_plus, dtype=np.float64)
        gm = np.asarray(g_minus, dtype=np.float64)
        return (self.w_max * (gp - gm) / self.g_range).astype(np.float32)


@dataclass
class StuckDevices:
    """Devices of one tile found stuck from write read-backs, each ``(2, rows, cols)``."""

    misses: np.ndarray  # int: evidence that a device did not go where it was sent
    value: np.ndarray  # float64: where a device read back when it missed
    threshold: float  # siemens: a miss is a read-back this far from the target
    confirm: int = 2  # misses that mark a device stuck (for good: a stuck target hides a recovery)

    def __post_init__(self) -> None:
        self.any_misses = bool(self.misses.any())  # kept up to date by `observe`

    @staticmethod
    def empty(shape: tuple[int, int], g_range: float) -> StuckDevices:
        return StuckDevices(np.zeros((2, *shape), np.int32), np.zeros((2, *shape)), 0.25 * g_range)

    @property
    def stuck(self) -> np.ndarray:
        return self.misses >= self.confirm

    def observe(
        self,
        target: np.ndarray,
        readback: np.ndarray | tuple[np.ndarray, np.ndarray],
        *,
        verified: bool,
        residual_max: float | None = None,
    ) -> None:
        """Count the devices that missed `target` (a write-verify's miss counts as confirmed).
        `residual_max`, the largest |read-back - target| the device reported, skips the
        per-device pass when no device missed and none has missed before (nothing changes)."""
        if residual_max is not None and residual_max <= self.threshold and not self.any_misses:
            return
        readback = np.asarray(readback, np.float64)  # (G+, G-) pairs stack to (2, rows, cols)
        off = np.abs(readback - target) > self.threshold
        was = self.stuck
        step = self.confirm if verified else 1
        self.misses = np.where(off, self.misses + step, np.where(was, self.misses, 0))
        self.value = np.where(off & ~was, readback, self.value)
        self.any_misses = bool(self.misses.any())

    def compensate(
        self, gp: np.ndarray, gm: np.ndarray, g_min: float, g_max: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """Targets with every stuck device at its own value and its partner carrying ``G+ - G-``
        (within the window; the stuck device's own target only keeps the request legal)."""
        if not self.any_misses:
            return gp, gm
        s = self.stuck
        if not s.any():
            return gp, gm
        d = gp.astype(np.float64) - gm
        p = np.where(s[0], self.value[0], np.where(s[1] & ~s[0], self.value[1] + d, gp))
        m = np.where(s[1], self.value[1], np.where(s[0] & ~s[1], self.value[0] - d, gm))
        return np.clip(p, g_min, g_max).astype(np.float32), np.clip(m, g_min, g_max).astype(np.float32)


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
    max_iters: int = 20,
) -> WriteResult:
    """Map `w` to conductance pairs and program them into `tile` through the Device."""
    m = mapping or LinearMapping.for_tile(device, tile)
    gp, gm, clipped = m.to_conductance(w)
    rep = device.program(tile, gp, gm, verify=verify, tol=tol, max_iters=max_iters)
    return WriteResult(rep, m, clipped)


def read_weights(device: Device, tile: str, mapping: LinearMapping | None = None) -> np.ndarray:
    """One (noisy) read of a tile's conductances, as weights."""
    m = mapping or LinearMapping.for_tile(device, tile)
    gp, gm = device.read_conductance(tile)
    return m.to_weight(gp, gm)
