"""The emulator demo: program a layered network on a board, settle free and nudged, report.

This is what `hil demo` runs; it exercises every Device operation a training loop uses and
prints what a lab user checks first on a new board: convergence, energies, settle time,
joules and the safety counters.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from drivers import Nudge, SettleBudget, Topology
from hil.boards import open_board
from hil.config import ConfigError
from hil.data import load_digits
from hil.ep import settle_path
from hil.host_settle import HostSettle
from hil.programming import write_weights


@dataclass
class PhaseReport:
    name: str
    steps: int
    converged: bool
    energy: float  # mean board energy at the equilibrium
    settle_time_s: float
    energy_j: float
    wall_s: float


@dataclass
class DemoReport:
    identity: str
    cells: int
    # tile, iterations, pulses, within_tol, gave_up (None: the board did not report it)
    programming: list[tuple[str, int, int, float, int | None]]
    phases: list[PhaseReport]
    refused: int
    violations: int
    settle: str = "board"  # where the settles ran: the board, or the host through its mvm


def run_demo(
    uri: str = "emulator://?preset=rram&seed=0",
    sizes: tuple[int, ...] = (64, 256, 10),
    batch: int = 64,
    beta: float = 0.2,
    seed: int = 0,
    settle: str = "auto",
) -> DemoReport:
    data = load_digits()
    given = ",".join(map(str, sizes))
    if len(sizes) < 2 or sizes[0] != data.features or sizes[-1] != data.classes:
        raise ValueError(
            f"--sizes {given}: the layers run from the digits' {data.features} pixels to their "
            f"{data.classes} classes, e.g. --sizes {data.features},256,{data.classes}"
        )
    if min(sizes) < 1:
        raise ValueError(f"--sizes {given}: every layer needs at least one node")
    rng = np.random.default_rng(seed)
    x = data.x_test[:batch].numpy()
    target = np.eye(data.classes, dtype=np.float32)[data.y_test[:batch].numpy()]
    with open_board(uri) as dev:  # a layer wider than the board's tiles spans several (as in hil train)
        limits = dev.info.limits
        if batch > limits.max_batch:  # refused before anything is programmed, naming the option
            raise ConfigError(
                f"--batch {batch}: the board at {uri} declares max_batch {limits.max_batch} (samples a "
                f"request); pass --batch {limits.max_batch} or fewer"
            )
        if abs(beta) > limits.max_beta:
            raise ConfigError(
                f"--beta {beta:g}: the board at {uri} declares max_beta {limits.max_beta:g} (the largest "
                f"nudge it takes); pass --beta {limits.max_beta:g} or less"
            )
        # within the steps the board declares
        budget = SettleBudget(max_steps=200, tol=1e-3, dt=0.5).capped(limits.max_settle_steps)
        # gain 1 and w_max 1, or the board's max_gain / max_w_max where it declares less
        gain, w_max = limits.unit_scales
        topology = Topology.layered(list(sizes), budget=budget, gain=gain, w_max=w_max)
        path = settle_path(dev, settle)
        minimiser = dev.settle if path == "board" else HostSettle(dev)
        dev.configure(topology)
        programming = []
        for c in topology.couplings:
            rows, cols = topology.tile_shape(c.tile)
            w = rng.normal(0.0, 1.0 / np.sqrt(rows), (rows, cols)).astype(np.float32)
            rep = write_weights(dev, c.tile, w, verify="program_verify" in dev.info.capabilities).report
            programming.append((c.tile, rep.iterations, rep.pulses, rep.within_tol, rep.gave_up))
        phases = []
        free = None
        for name, nudge in (
            ("free", None),
            (f"nudged +{beta:g}", {f"s{len(sizes) - 1}": Nudge(beta, target=target)}),
            (f"nudged -{beta:g}", {f"s{len(sizes) - 1}": Nudge(-beta, target=target)}),
        ):
            t0 = time.perf_counter()
            eq = minimiser({"s0": x}, nudge=nudge, init=None if free is None else free.states)
            wall = time.perf_counter() - t0
            free = free or eq
            energy = float(np.mean(eq.energy)) if eq.energy is not None else float("nan")
            phases.append(
                PhaseReport(name, eq.steps, eq.converged, energy, eq.settle_time_s, eq.energy_j, wall)
            )
        safety = dev.safety()
        return DemoReport(
            dev.info.identity.idn(),
            topology.cells(),
            programming,
            phases,
            safety.refused,
            safety.violations,
            path,
        )
