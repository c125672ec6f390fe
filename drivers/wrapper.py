"""`DeviceWrapper`: a Device that forwards every operation to another one.

Subclass it and override only what the wrapper changes (a calibration record applied on the
way in and out, a fixed read-out for a benchmark, ...); the lock is the inner device's, so
both names guard the same transactions.
"""

from __future__ import annotations

import numpy as np

from drivers.base import (
    BoardOwner,
    BoardStatus,
    Device,
    DeviceInfo,
    Equilibrium,
    Meter,
    Nudge,
    ProgramReport,
    PulseReport,
    SafetyCounters,
    Wear,
)
from drivers.topology import Topology


class DeviceWrapper(Device):
    def __init__(self, inner: Device) -> None:
        super().__init__()
        self.inner = inner
        self.lock = inner.lock

    @property
    def info(self) -> DeviceInfo:
        return self.inner.info

    @property
    def topology(self) -> Topology | None:
        return self.inner.topology

    def configure(self, topology: Topology) -> None:
        self.inner.configure(topology)

    def program(
        self,
        tile: str,
        g_plus: np.ndarray,
        g_minus: np.ndarray,
        *,
        verify: bool = False,
        tol: float | None = None,
        max_iters: int | None = None,
    ) -> ProgramReport:
        return self.inner.program(tile, g_plus, g_minus, verify=verify, tol=tol, max_iters=max_iters)

    def pulse(self, tile: str, counts_plus: np.ndarray, counts_minus: np.ndarray) -> PulseReport:
        return self.inner.pulse(tile, counts_plus, counts_minus)

    def read_conductance(self, tile: str) -> tuple[np.ndarray, np.ndarray]:
        return self.inner.read_conductance(tile)

    def mvm(self, tile: str, x: np.ndarray, *, transpose: bool = False) -> np.ndarray:
        return self.inner.mvm(tile, x, transpose=transpose)

    def settle(
        self,
        clamp: dict[str, np.ndarray],
        nudge: dict[str, Nudge] | None = None,
        init: dict[str, np.ndarray] | None = None,
        trace: bool | int = False,
    ) -> Equilibrium:
        return self.inner.settle(clamp, nudge, init, trace)

    def wait(self, seconds: float) -> None:
        self.inner.wait(seconds)

    def safety(self) -> SafetyCounters:
        return self.inner.safety()

    def meter(self) -> Meter | None:
        return self.inner.meter()

    def wear(self) -> Wear | None:
        return self.inner.wear()

    def owner(self) -> BoardOwner | None:
        return self.inner.owner()

    def reset(self) -> None:
        self.inner.reset()

    def status(self) -> BoardStatus:
        return self.inner.status()

    def begin(self, tag: str) -> None:
        self.inner.begin(tag)

    def commit(self, tag: str) -> None:
        self.inner.commit(tag)

    def safe_state(self) -> None:
        self.inner.safe_state()

    def close(self) -> None:
        self.inner.close()

    def close_link(self) -> None:
        self.inner.close_link()
