"""The host-iterated settle: the equilibrium of a network on a board that only multiplies.

Most crossbar chips program, read and multiply; very few relax to an equilibrium by
themselves. `HostSettle` runs the settle on the host and lets the board do every product:

- per step, one `Device.mvm` call per coupling and direction whose destination holds free
  nodes, for the whole batch (a bipartite tile drives its column groups with ``s_rows @ W``
  and its row groups with ``s_cols @ W.T``, the transposed read of the same crossbar; a dense
  tile drives all its groups with ``[s, 1] @ W``);
- a conv tile (`drivers.conv`) is read once per position of its input map, forwards and
  transposed, as rows of one `mvm` call (split into calls of at most `Limits.max_batch`
  rows): the patches of every position give the destination's pre-activations, which the
  host max-pools; the destination's states, routed back to the pooling winners, go through
  the transposed reads and are summed back onto the source map; the tiles of a pool group
  (`drivers.conv.units`) are read one after the other and their pre-activations summed
  before the one pooling, whose winners route every member's transposed read;
- every product goes to the board in requests of at most `Limits.max_batch` rows, so a settle
  may hold more samples than one request (up to `drivers.checks.MAX_SETTLE_VALUES` values);
- a product whose sources are all clamped (the input layer and the bias, usually the widest
  tile) is constant during the settle: it is read once per settle, not every step;
- the activation (the topology's `drivers.activation.Activation`, e.g. ``clamp(gain u, 0, 1)``),
  the nudge ``beta (target - s) - beta grad`` and the
  relaxation ``s <- s + dt (rho(u) - s)`` are applied on the host;
- `update` orders a step: ``"synchronous"`` drives every free group from the states at the
  step's start (as a board that relaxes does); ``"alternating"`` updates the half of a layered
  network's groups next to the inputs first and the other half from its new states (the
  asynchronous fixed-point iteration of the EP codebases: at dt 1 each half-step is the
  lowest energy given the other half, so no damping is needed, and the same reads per step).

The budget means what it means on a board (`drivers.SettleBudget`): at most `max_steps`
steps; every `check_every` steps the largest state change is compared with `tol` (on a
deterministic board: the batch stops as one, when its largest change is within `tol`, or
within `tol` of the converters' floor and no smaller than at the previous check); ``tol = 0``
runs exactly `max_steps`. On a noisy board every sample stops on its own, by the rule of the
emulator's settles (`drivers.settle_stop.SampleStop`: its states' movement from the check
half-way back against the movement its own noise gives them, two checks in a row; a stopped
sample keeps its states while the batch runs on), so a sample's result does not depend on
the samples that share its settle. (A batch-wide test had stopped the nudged phases of a dense
VAE on an MVM-only rram board a few steps after they started: -ELBO 43.9 after 2 epochs
against 16.3 with the board's own settle; with a no-progress condition 16.6.)

The noise is measured, not assumed, at the state being judged: at each convergence check
every per-step product is read twice, and the step takes their mean. Per sample, the mean
square of the two reads' difference over its outputs (the largest over the products, averaged
over the settle's checks: one pair of reads is a noisy estimate) gives its read noise, times
the gain and the square root of the fan-in the noise of its nodes' targets; the largest
difference over the batch sets `HostSettleStats.noise_floor` (`HostSettle._floor`). Where the
two reads are equal (a deterministic board) the settle stops reading twice: at a check where
some free state is not 0 (with all at 0 and no bias, no current flows: a noisy board reads
equal products too), and only while no check has found noise (once noisy, always probed).
To that floor, and to every sample's stop, come the converters' steps, as the board's own
mvm-mode settle counts them (`HostSettle._quant`): a DAC step of the states and, times the
gain, a step of the mvm read-out, whose range the limits do not declare: its step is measured
from the reads (`HostSettle._read_step`, `HostSettleStats.read_step`). Without it a drive on a
code boundary flipping between two codes (a one-step limit cycle) never stopped.

Accounting: settle time and array energy are what the board's meter (`Device.meter`) counted
over the settle's calls; a board without a meter gets the host's wall time and NaN joules.
With `reference` (a callable returning the pure-torch network with the weights as read back
from the board, as `EBBlock.device_weights` does) the host also gives per-sample energies,
subtracts the read-back diagonal of dense tiles (which a crossbar cannot disconnect when it
only multiplies) and shortens `dt` where the couplings are strong enough for a step of `dt`
to overshoot (``dt < 1.8 / (1 + gain |A|)``). As on the analog board, a synchronous settle
that checks its convergence starts at the asked `dt` and falls back to that bound once
`drivers.topology.STALL_CHECKS` checks in a row have made no new smallest residual
(docs/emulator.md): most settles converge at the asked step in fewer steps, and every step
saved is `stats.per_step` mvm round trips to the board.

Compute device: the iteration speaks `Device.mvm`'s numpy and runs on the CPU whatever the
block's compute device (`hil.compute`); the reference network may live on that device (its
diagonals come back to the CPU once per settle, its energies when asked), and the block moves
the states it returns there for the gradients.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from drivers import (
    BIAS,
    ConfigurationError,
    Coupling,
    Device,
    Equilibrium,
    Limits,
    LimitViolation,
    Nudge,
    Topology,
    conv,
    topology,
)
from drivers.batches import chunks, mvm_in_chunks
from drivers.checks import (
    MAX_SETTLE_VALUES,
    check_settle,
    check_trace,
    check_trace_values,
    require_topology,
)
from drivers.converters import lsb
from drivers.numerics import denormals_flushed, power_norm
from drivers.settle_stop import SampleStop
from hil.reference import DHN


@dataclass
class _Term:
    """One product per step (or per settle, `constant`): ``x @ W`` or ``x @ W.T`` of a tile."""

    tile: str
    transpose: bool
    sources: tuple[str, ...]  # the groups concatenated into x (the bias as a column of ones)
    dsts: list[tuple[str, int, int]]  # free destination groups and their columns in the output
    constant: bool  # every source is clamped (or the bias)
    diagonal: bool = False  # a dense tile: its read-back diagonal is taken out of the drive
    geom: conv.ConvGeometry | None = None  # a conv tile: read at every position
    # the forward read of a pool group: its tiles' reads (this term's first), summed before pooling
    members: tuple[_Term, ...] = ()


@dataclass
class HostSettleStats:
    """What the last settle cost on the wire."""

    mvm_calls: int = 0  # every Device.mvm call, the noise probes and the constant products included
    per_step: int = 0  # mvm calls in each step
    per_settle: int = 0  # mvm calls once per settle (the constant products)
    probe_calls: int = 0  # second reads at convergence checks (noise probes)
    noise_floor: float = 0.0  # residual below which the states only move by noise
    # False while the settle runs, and for good after one that did not end (an error, Ctrl-C):
    # the counters are then what it had cost when it stopped
    finished: bool = False
    read_step: float = 0.0  # the mvm read-out's step as the settle's reads showed it (`_read_step`)


def _terms(topo: Topology, clamped: frozenset[str]) -> list[_Term]:
    out = []

    def free_dsts(groups: tuple[str, ...]) -> list[tuple[str, int, int]]:
        dsts, start = [], 0
        for g in groups:
            n = topo.size(g)
            if g != BIAS and g not in clamped:
                dsts.append((g, start, start + n))
            start += n
        return dsts

    def fixed(groups: tuple[str, ...]) -> bool:
        return all(g == BIAS or g in clamped for g in groups)

    groups = {u[0].tile: u for u in conv.units(topo) if len(u) > 1}
    later = {c.tile for u in groups.values() for c in u[1:]}  # read in their group's first term
    for c in topo.couplings:
        if c.kind == "conv":
            g = conv.ConvGeometry.of(topo, c)
            a, b = c.rows[0], c.cols  # one source map; one or more destination maps of one size
            dst = free_dsts(b)
            if dst and c.tile not in later:  # the forward read first: the transposed one routes
                # by its winners
                members = tuple(
                    _Term(m.tile, False, m.rows, [], fixed(m.rows), geom=conv.ConvGeometry.of(topo, m))
                    for m in groups.get(c.tile, ())
                )
                constant = all(m.constant for m in members) and fixed(c.rows)
                out.append(_Term(c.tile, False, c.rows, dst, constant, geom=g, members=members))
            if a not in clamped:
                if any(d in clamped for d in b):
                    raise ConfigurationError(
                        f"conv tile {c.tile!r}: its destination {' + '.join(map(repr, b))} is clamped and "
                        f"its source {a!r} free; clamp the source too, or nudge the destination"
                    )
                out.append(_Term(c.tile, True, b, [(a, 0, topo.size(a))], False, geom=g))
            continue
        if c.kind == "dense":
            dsts = free_dsts(c.cols)
            if dsts:
                out.append(_Term(c.tile, False, c.rows, dsts, False, diagonal=True))
            continue
        fwd = free_dsts(c.cols)
        if fwd:
            out.append(_Term(c.tile, False, c.rows, fwd, fixed(c.rows)))
        bwd = free_dsts(c.rows)
        if bwd:
            out.append(_Term(c.tile, True, c.cols, bwd, fixed(c.cols)))
    return out


HostUpdate = Literal["synchronous", "alternating"]
HOST_UPDATES: tuple[str, ...] = ("synchronous", "alternating")


def check_host_update(value: object) -> HostUpdate:
    """`value` if it names an update order (`HOST_UPDATES`), else a clear error."""
    if value not in HOST_UPDATES:
        raise ConfigurationError(f"host_update must be one of {HOST_UPDATES}, got {value!r}")
    return value  # type: ignore[return-value]


def _two_colouring(topo: Topology, clamped: frozenset[str]) -> tuple[list[str], list[str]]:
    """The free groups in two halves such that no coupling joins two groups of one half (a
    layered network's even and odd layers), the half next to the clamped inputs first: what an
    alternating update needs to be exact (every group of a half is updated from groups of the
    other half only). Refused, naming the coupling, where no such split exists (a dense tile,
    which couples a group with itself, or an odd cycle of couplings)."""
    links: dict[str, set[str]] = {g: set() for g in topo.groups if g != BIAS}
    for c in topo.couplings:
        rows, cols = [g for g in c.rows if g != BIAS], [g for g in c.cols if g != BIAS]
        if c.kind == "dense":
            raise ConfigurationError(
                f"host_update='alternating' needs couplings between distinct groups only; dense tile "
                f"{c.tile!r} couples its nodes with one another: use host_update='synchronous' "
                "(config key ep.host_update)"
            )
        for a in rows:
            for b in cols:
                links[a].add(b)
                links[b].add(a)
    free = [g for g in topo.groups if g != BIAS and g not in clamped]
    colour: dict[str, int] = {}
    starts = [g for g in free if links[g] & clamped] + free
    for root in starts:
        if root in colour:
            continue
        colour[root] = 0
        front = [root]
        while front:
            nxt = []
            for a in front:
                for b in sorted(links[a] - clamped, key=free.index):
                    if b not in colour:
                        colour[b] = 1 - colour[a]
                        nxt.append(b)
                    elif colour[b] == colour[a]:
                        raise ConfigurationError(
                            f"host_update='alternating' needs the free groups in two halves with no "
                            f"coupling inside a half; {a!r} and {b!r} would share one (an odd cycle of "
                            "couplings): use host_update='synchronous' (config key ep.host_update)"
                        )
            front = nxt
    return [g for g in free if colour[g] == 0], [g for g in free if colour[g] == 1]


# values of one conv read's rows or outputs (samples x positions x tile lines) the host holds at
# once (`conv_chunk`): the bound on one settle's states (256 MiB of float32). A read's rows are
# the patches of every position, C_in k^2 (+1) values each, so a map's reads hold up to
# k^2 x (positions / map size) times its states (225 x for a 15 x 15 kernel): built for the
# whole batch at once, a settle the checks allow (2730 samples of a 1-4-1 channel 64 x 64
# network with 15 x 15 kernels) needed 40 GB of patches on the host
CONV_READ_VALUES = MAX_SETTLE_VALUES


def conv_chunk(members: tuple[_Term, ...]) -> int:
    """The samples of a conv read (the tiles of one pool unit, `members`) the host handles at
    once: at most `CONV_READ_VALUES` values in the rows, the outputs and the pre-pooling maps
    of one tile's read, and at least one sample."""
    per_sample = 0
    for m in members:
        g = m.geom
        assert g is not None
        per_sample = max(per_sample, g.positions * max(g.rows, g.c_out))
    return max(1, CONV_READ_VALUES // max(per_sample, 1))


def _along_batch(parts: list[torch.Tensor]) -> torch.Tensor:
    """The chunks of a conv read joined along the batch; one chunk (every read of a network
    within `CONV_READ_VALUES`, the common case, once per product and step) as it is, uncopied."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


STATE_TOP = 1.0  # the largest node state every activation gives (`drivers.activation`), and the bias


def check_state_voltage(limits: Limits) -> None:
    """Refuse, before any settle, a board whose read-voltage limit refuses mvm inputs of 1.0:
    the host-iterated settle sends the node states (up to the activation's top, 1.0) and the
    bias (1.0) as mvm inputs, so such a board would refuse its first settle's first product,
    mid-training."""
    if np.float32(STATE_TOP) <= limits.clamp_max:
        return
    raise LimitViolation(
        "read-voltage limit on the host-iterated settle's mvm inputs",
        STATE_TOP * limits.v_read,
        limits.v_read_max,
        f"The host-iterated settle drives the board's mvm with node states up to {STATE_TOP:g} (the "
        f"activation's top) and the bias {STATE_TOP:g}, i.e. {STATE_TOP:g} x v_read {limits.v_read:g} V; "
        f"this board's v_read_max allows states up to clamp_max {limits.clamp_max:.4g} only, so its "
        "first settle would be refused. The firmware declares what state 1.0 means: declare v_read "
        f"as the read voltage of state 1.0 it can drive (at most v_read_max {limits.v_read_max:g} V), "
        "or settle on a board that relaxes by itself (capability 'settle')",
    )


class HostSettle:
    """A settle function with the signature of `Device.settle`, iterated on the host through
    the board's `mvm` (see the module docstring). `stats` describes the last settle."""

    def __init__(
        self,
        device: Device,
        *,
        reference: Callable[[], DHN] | None = None,
        probe_noise: bool = True,
        update: HostUpdate = "synchronous",
        bold_steps: bool = True,
    ) -> None:
        check_state_voltage(device.info.limits)
        self.device = device
        self.reference = reference
        self.probe_noise = probe_noise
        # a checked synchronous settle starts at budget.dt and falls back to the bound where it
        # stalls (the module docstring); False: the bound throughout
        self.bold_steps = bold_steps
        self.update = update  # checked by the setter
        self.stats = HostSettleStats()
        self._terms: dict[tuple[tuple[Coupling, ...], frozenset[str]], list[_Term]] = {}
        self._norms: dict[tuple[frozenset[str], tuple[int, ...]], float] = {}
        self._vectors: dict[frozenset[str], torch.Tensor] = {}

    @property
    def update(self) -> HostUpdate:
        """How a step updates the free groups: ``"synchronous"`` or ``"alternating"``."""
        return self._update

    @update.setter
    def update(self, value: HostUpdate) -> None:
        self._update = check_host_update(value)

    # ------------------------------------------------------------------------ the iteration
    def __call__(
        self,
        clamp: dict[str, np.ndarray],
        nudge: dict[str, Nudge] | None = None,
        init: dict[str, np.ndarray] | None = None,
        trace: bool | int = False,
    ) -> Equilibrium:
        # the trace interval as a board's settle checks it (an integer, never truncated, within
        # max_settle_steps), before the arrays (its conversion may run the caller's code) and
        # outside the flushed mode (where a subnormal float's text reads 0.0)
        every = check_trace(self.device.info.limits, trace)
        # states decaying at a clamp go subnormal; numpy's loops follow the thread's mode too
        with denormals_flushed():
            return self._iterate(clamp, nudge, init, every)

    def _iterate(
        self,
        clamp: dict[str, np.ndarray],
        nudge: dict[str, Nudge] | None,
        init: dict[str, np.ndarray] | None,
        every: int,
    ) -> Equilibrium:
        dev = self.device
        topo = require_topology(dev.topology)
        limits = dev.info.limits
        # the settle runs here: the board's max_batch bounds each mvm request (products are
        # split into requests of at most that many rows), not the batch; the bound on one
        # settle's values still holds
        unbounded = dataclasses.replace(limits, max_batch=MAX_SETTLE_VALUES)
        cl, nd, ini, batch = check_settle(topo, unbounded, clamp, nudge, init, maps=False)
        check_trace_values(topo, cl, batch, every, limits)  # the records a board would keep, bounded alike
        budget, gain, act = topo.budget, topo.gain, topo.activation
        clamped = frozenset(cl)
        key = (topo.couplings, clamped)  # the couplings themselves: an id could be reused
        terms = self._terms.get(key)
        if terms is None:
            if len(self._terms) >= 8:
                self._terms.pop(next(iter(self._terms)))
            terms = self._terms[key] = _terms(topo, clamped)
        free = [g for g in topo.groups if g not in cl]
        s: dict[str, np.ndarray] = dict(cl)
        for g in free:
            x0 = ini.get(g)
            s[g] = np.zeros((batch, topo.groups[g]), np.float32) if x0 is None else x0.copy()
        ones = np.ones((batch, 1), np.float32)
        ref = self.reference() if self.reference is not None else None
        diag = self._diagonals(topo, ref)

        meter = dev.meter()
        wall = time.perf_counter()
        stats = self.stats = HostSettleStats()  # from now on: a settle broken off leaves its own
        probe = self.probe_noise and not budget.fixed_steps

        winners: dict[str, torch.Tensor | None] = {}  # per conv tile, its last forward read's

        def mvm(term: _Term, rows: np.ndarray) -> np.ndarray:
            stats.mvm_calls += len(chunks(rows.shape[0], limits.max_batch))
            return mvm_in_chunks(dev, term.tile, rows, transpose=term.transpose, most=limits.max_batch)

        def product(term: _Term) -> np.ndarray:
            if term.geom is not None:
                return conv_product(term, term.geom)
            x = [ones if g == BIAS else s[g] for g in term.sources]
            xs = np.concatenate(x, axis=1) if len(x) > 1 else x[0]
            return mvm(term, xs)

        def conv_product(term: _Term, g: conv.ConvGeometry) -> np.ndarray:
            # a few samples at a time (`conv_chunk`): a read's rows are the positions' patches,
            # positions x rows values per sample, up to hundreds of times the sample's states
            members = term.members or (term,)
            step = conv_chunk(members)
            if not term.transpose:  # every position's patch, then the pooling on the host
                ys: list[torch.Tensor] = []
                idxs: list[torch.Tensor] = []
                for lo in range(0, max(batch, 1), step):
                    pre = None
                    for m in members:
                        assert m.geom is not None
                        src = torch.from_numpy(s[m.sources[0]][lo : lo + step])
                        part = conv.from_positions(
                            torch.from_numpy(mvm(m, conv.patches(src, m.geom).numpy())), m.geom
                        )
                        pre = part if pre is None else pre + part
                    assert pre is not None
                    y, idx = conv.pool(pre, g)
                    ys.append(y)
                    if idx is not None:
                        idxs.append(idx)
                idx_all = _along_batch(idxs) if idxs else None
                for m in members:
                    winners[m.tile] = idx_all
                return _along_batch(ys).numpy()
            y_dst = conv.joined({d: torch.from_numpy(s[d]) for d in term.sources}, term.sources)
            won = winners.get(term.tile)
            outs = []
            for lo in range(0, max(batch, 1), step):
                routed = conv.unpool(y_dst[lo : lo + step], g, None if won is None else won[lo : lo + step])
                out = mvm(term, np.ascontiguousarray(conv.to_positions(routed).numpy()))
                outs.append(conv.fold_patches(torch.from_numpy(out), g))
            return _along_batch(outs).numpy()

        # the constant drive: clamped products (read once), injected currents
        const = {g: np.zeros((batch, topo.groups[g]), np.float32) for g in free}
        for g, n in nd.items():
            if n.grad is not None:
                const[g] -= np.float32(n.beta) * n.grad
        elastic = {g: (np.float32(n.beta), n.target) for g, n in nd.items() if n.target is not None}
        dynamic = []
        for term in terms:
            if term.constant:
                y = product(term)
                stats.per_settle += len(term.members) or 1
                for g, a, b in term.dsts:
                    const[g] += y[:, a:b]
            else:
                dynamic.append(term)
        stats.per_step = sum(len(t.members) or 1 for t in dynamic)
        # one step: every free group from the same states (synchronous), or the half next to
        # the inputs first and then the other half from its new states (alternating)
        halves = [free] if self.update == "synchronous" else list(_two_colouring(topo, clamped))
        phases = [(h, [t for t in dynamic if t.dsts[0][0] in h]) for h in halves]
        # a layered step with dt 1 sets each half to its minimiser given the other half: no
        # overshoot to guard against, unlike a synchronous step (`_dt`). A synchronous settle
        # that checks its convergence starts at budget.dt and falls back to `_dt` after
        # STALL_CHECKS checks without a new smallest residual, as the analog board does
        # (docs/emulator.md): fewer steps, so fewer mvm round trips
        fan_in = max((sum(1 for t in dynamic for d in t.dsts if d[0] == g) for g in free), default=0)
        check_every = budget.check_interval
        bold = self.bold_steps and self.update == "synchronous" and check_every < budget.max_steps
        dt = self._dt(topo, clamped, free, ref) if self.update == "synchronous" and not bold else budget.dt
        best, stalled = math.inf, 0

        if len(phases) > 1:
            # the halves' terms hold one tile's two reads apart, so the first half's transposed
            # reads of a pooled conv tile come before any forward read of this settle; their pool
            # groups are read forwards once first, for the winners (the second half's find them
            # from the first half's forward reads)
            forwards = [t for t in dynamic if t.geom is not None and not t.transpose]
            forward_of = {m.tile: t for t in forwards for m in (t.members or (t,))}
            for term in phases[0][1]:
                fwd = forward_of.get(term.tile)
                pooled = term.geom is not None and term.geom.has_winners
                if term.transpose and pooled and fwd is not None and term.tile not in winners:
                    product(fwd)
        sizes = [topo.groups[g] for g in free]

        def joined() -> torch.Tensor:  # the free states as one (nodes, batch) view
            return torch.from_numpy(np.concatenate([s[g] for g in free], 1)).T

        # on a noisy board (the probes' two reads differ) every sample stops on its own
        # (`drivers.settle_stop`, as the emulator's settles do); on a deterministic one the
        # batch stops as one
        stop = SampleStop(joined(), budget.tol) if probe and free else None
        noisy = False
        spreads = np.zeros(batch, np.float64)  # the probes' spreads summed over the checks
        probes = 0

        def held() -> dict[str, np.ndarray]:
            if stop is None or not noisy:
                return {g: s[g].copy() for g in free}
            parts = stop.view(joined()).T.split(sizes, 1)
            return {g: p.numpy().copy() for g, p in zip(free, parts, strict=True)}

        records: list[tuple[int, dict[str, np.ndarray]]] = []
        if every:
            records.append((0, held()))
        residual, converged, steps = math.inf, False, 0
        for step in range(1, budget.max_steps + 1):
            check = step % check_every == 0 or step == budget.max_steps
            # free states all 0: products of free states alone carry no current, so two equal
            # reads say nothing of the board's noise (a bias term's would: one probe more)
            idle = check and probe and not noisy and not any(s[g].any() for g in free)
            jump, res = 0.0, 0.0
            # per sample: the largest mean square of the two reads' difference over the terms
            # (its read noise), and the largest state change of the step
            spread = np.zeros(batch, np.float64)
            change = np.zeros(batch, np.float32)
            for half, half_terms in phases:
                u = {g: const[g].copy() for g in half}
                for term in half_terms:
                    y = product(term)
                    if check and limits.adc_bits is not None:
                        stats.read_step = self._read_step(stats.read_step, y)
                    if check and probe:  # a second read of the same product: the noise at this state
                        y2 = product(term)
                        stats.probe_calls += 1
                        if limits.adc_bits is not None:
                            stats.read_step = self._read_step(stats.read_step, y2, np.abs(y - y2))
                        jump = max(jump, self._noise(y, y2))
                        if y.size:
                            spread = np.maximum(spread, np.square(y - y2, dtype=np.float64).mean(1))
                        y = (y + y2) * np.float32(0.5)
                    for g, a, b in term.dsts:
                        u[g] += y[:, a:b]
                for g, d in diag.items():
                    if g in u:
                        u[g] -= s[g] * d
                for g, (beta, target) in elastic.items():
                    if g in u:
                        u[g] += beta * (target - s[g])
                for g in u:
                    if act.hard:
                        new = np.clip(u[g] * np.float32(gain), 0.0, 1.0)
                    else:
                        new = act.rho(torch.from_numpy(u[g]), gain).numpy()
                    if check:
                        moved = np.abs(new - s[g]).max(1) if new.size else np.zeros(batch, np.float32)
                        change = np.maximum(change, moved)
                        res = max(res, float(moved.max(initial=0.0)))
                    s[g] = new if dt == 1.0 else s[g] + np.float32(dt) * (new - s[g])
            if check:
                quant = self._quant(gain, stats.read_step, limits)
            if check and probe:
                stats.noise_floor = self._floor(jump, fan_in, gain) + quant
                noisy = noisy or jump > 0
                # two equal reads where current flows, on a board never seen noisy: a deterministic
                # board, no need to read twice again (a noisy board's reads can be equal by chance)
                probe = noisy or idle
            steps = step
            running = batch
            if check and stop is not None and noisy:
                # a read's noise per output (two reads differ by sqrt(2) of it; the mean over
                # this settle's checks: one pair of reads is a noisy estimate), summed over the
                # node's fan-in, times the gain: the noise one step adds to a node's target
                spreads += spread
                probes += 1
                var = spreads / probes / 2 * max(fan_in, 1)
                sd = torch.from_numpy((gain * np.sqrt(var)).astype(np.float32))
                running, res = stop.check(joined(), sd, torch.from_numpy(change)[None], step, dt, quant)
            if every and step % every == 0:
                records.append((step, held()))
            if check and stop is not None and noisy:
                residual = res
                if running == 0:
                    break
                best, stalled = (res, 0) if res < best else (best, stalled + 1)
                if bold and stalled == topology.STALL_CHECKS:
                    dt = self._dt(topo, clamped, free, ref)
            elif check:
                # a deterministic board's floor, after its probes stopped: the converters' steps
                stats.noise_floor = max(stats.noise_floor, quant)
                settled = residual <= res  # no progress since the last check
                residual = res
                if budget.tol > 0 and (
                    residual <= budget.tol or (residual <= budget.tol + stats.noise_floor and settled)
                ):
                    converged = True
                    break
                best, stalled = (res, 0) if res < best else (best, stalled + 1)
                if bold and stalled == topology.STALL_CHECKS:
                    dt = self._dt(topo, clamped, free, ref)
        if budget.tol == 0:
            converged = residual <= stats.noise_floor
        if stop is not None and noisy:  # the stopped samples' states, and their residuals
            state = joined().contiguous()
            stop.final(state, steps)
            s.update({g: p.numpy() for g, p in zip(free, state.T.split(sizes, 1), strict=True)})
            _mean, residual, converged = stop.outcome()
        if every and records[-1][0] != steps:
            records.append((steps, held()))

        wall = time.perf_counter() - wall
        after = dev.meter() if meter is not None else None
        if meter is not None and after is not None:
            settle_time, energy_j = after.clock_s - meter.clock_s, after.energy_j - meter.energy_j
        else:
            settle_time, energy_j = wall, math.nan
        stats.finished = True
        energy = None if ref is None else self._energy(ref, s, clamped, nd)
        out_trace = None
        if every:
            out_trace = {"step": np.array([r[0] for r in records], np.int64)}
            stacked = {g: np.stack([r[1][g] for r in records]) for g in free}
            if ref is None:
                out_trace["energy"] = np.full((len(records), batch), np.nan, np.float32)
            else:
                out_trace["energy"] = np.stack(
                    [self._energy(ref, {**cl, **r[1]}, clamped, nd) for r in records]
                )
            out_trace.update(stacked)
        return Equilibrium(
            states={g: np.ascontiguousarray(v, np.float32) for g, v in s.items()},
            steps=steps,
            converged=converged,
            residual=residual,
            energy=energy,
            settle_time_s=float(settle_time),
            energy_j=float(energy_j),
            trace=out_trace,
        )

    # ------------------------------------------------------------------------ helpers
    @staticmethod
    def _noise(y1: np.ndarray, y2: np.ndarray) -> float:
        """The largest change between two reads of the same product: read noise, and the ADC
        steps it flips, bound how far one term of a node's drive moves between two steps when
        nothing else moves. Measured at every check, not once per settle: the noise of a
        product grows with its input, which changes as a settle leaves its zero start."""
        return float(np.abs(y1 - y2).max()) if y1.size else 0.0

    @staticmethod
    def _floor(jump: float, fan_in: int, gain: float) -> float:
        """The residual ``max |rho(u) - s|`` below which read noise alone can move the states: a
        node's drive terms each jump by up to `jump` between two steps when nothing else moves
        (`fan_in` independent terms: the square root of their number times that), times the
        gain (the converters' steps, `_quant`, are added to it). A tighter figure (a relaxing
        node averages its targets, ``jump / (2 - dt)`` for a 2-cycle) left most settles of a
        6-bit rram board running to their step budget without a better result, so the floor
        keeps the whole jump."""
        return gain * jump * math.sqrt(max(fan_in, 1))

    @staticmethod
    def _quant(gain: float, read_step: float, limits: Limits) -> float:
        """What the converters' steps alone move a node between two steps, as the board's own
        mvm-mode settle counts them (`emulator.settle`'s ``_quant_floor``): a step of the mvm
        read-out on its drive, times the gain (a node whose drive sits on a code boundary flips
        between two codes: a limit cycle of one step), and a DAC step of its state. The limits
        do not declare the mvm read-out's range, so its step is the one the reads showed
        (`_read_step`); 0 with an ideal ADC."""
        return gain * read_step + lsb(limits.dac_bits, limits.adc_range[1] - limits.adc_range[0])

    @staticmethod
    def _read_step(seen: float, y: np.ndarray, diff: np.ndarray | None = None) -> float:
        """The mvm read-out's step measured from a read `y` (batch, outputs), folded into the
        smallest one `seen` so far (0.0: none yet): per output, the smallest gap between two
        distinct values the batch read (one channel's codes: a calibration record's per-channel
        gain and offset keep a channel's codes evenly spaced, not the channels' together), and
        the smallest nonzero difference `diff` of two reads of the same product (read noise
        flips codes: a multiple of the step). Each is a whole number of steps, one where the
        outputs are dense enough: the smallest over a settle's reads is the step, or larger
        where they are sparse (a batch of a few samples), never smaller."""
        parts = []
        if y.ndim == 2 and y.shape[0] > 1:
            gaps = np.diff(np.sort(y, axis=0), axis=0)
            parts.append(gaps)
        if diff is not None:
            parts.append(diff)
        tiny = 1e-6 * max(1.0, float(np.abs(y).max(initial=0.0)))
        best = seen or math.inf
        for a in parts:
            a = a[a > tiny]
            if a.size:
                best = min(best, float(a.min()))
        return 0.0 if best == math.inf else best

    @staticmethod
    def _diagonals(topo: Topology, ref: DHN | None) -> dict[str, np.ndarray]:
        """Per free group of a dense tile, the read-back diagonal of its weights (1, n)."""
        out: dict[str, np.ndarray] = {}
        if ref is None:
            return out
        for c in topo.couplings:
            if c.kind != "dense":
                continue
            d = torch.diagonal(ref.weights[c.tile].detach()).to("cpu", torch.float32).numpy()
            start = 0
            for g in c.cols:
                n = topo.size(g)
                out[g] = d[None, start : start + n]
                start += n
        return out

    def _dt(self, topo: Topology, clamped: frozenset[str], free: list[str], ref: DHN | None) -> float:
        """budget.dt, or less where a step of dt would overshoot (as the analog board does)."""
        dt = topo.budget.dt
        if ref is None or not free:
            return dt
        key = (clamped, tuple(p._version for p in ref.weights.values()))
        norm = self._norms.get(key)
        if norm is None:
            with torch.no_grad():
                if ref.has_conv():
                    norm = self._drive_norm(ref, free)
                else:
                    norm = self._spectral_norm(ref.coupling_matrix(free).to(torch.float64), clamped)
            self._norms.clear()
            self._norms[key] = norm
        return min(dt, 1.8 / (1.0 + topo.gain * norm)) if norm > 0 else dt

    def _spectral_norm(self, a: torch.Tensor, clamped: frozenset[str], iters: int = 30) -> float:
        """|A|_2 of the symmetric free-to-free coupling matrix by power iteration, started from
        the last settle's vector of this clamp set (the weights move little between training
        steps, so a few iterations suffice), with a 5 % margin against under-estimating (an
        SVD of a 266 x 266 matrix took 10 ms, a third of a settle)."""
        if not a.numel():
            return 0.0
        v = self._vectors.get(clamped)
        if v is None or v.shape[0] != a.shape[0]:
            v = torch.ones(a.shape[0], dtype=a.dtype, device=a.device)
        norm, v = power_norm(lambda x: a @ x, v, iters=iters, margin=1.05)
        if norm:  # a zero map gives no vector to start from
            self._vectors[clamped] = v
        return norm

    @staticmethod
    def _drive_norm(ref: DHN, free: list[str], iters: int = 30) -> float:
        """The norm of the free groups' drive on one another where it is no fixed matrix (conv
        couplings: the pooling winners move with the states), by power iteration on the drive
        itself from a fixed random start, with the same 5 % margin."""
        w = next(iter(ref.weights.values()))
        gen = torch.Generator().manual_seed(0)
        v = {g: torch.rand(1, ref.size(g), generator=gen, dtype=w.dtype).to(w.device) for g in free}

        def drive(v: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return ref.drive(v, targets=set(free), sources=set(free), bias=False)

        return power_norm(drive, v, iters=iters, margin=1.05)[0]

    @staticmethod
    def _energy(
        ref: DHN, s: dict[str, np.ndarray], clamped: frozenset[str], nudge: dict[str, Nudge]
    ) -> np.ndarray:
        with torch.no_grad():
            dev = next(iter(ref.weights.values())).device  # the reference may live on a compute device
            st = {g: torch.from_numpy(np.ascontiguousarray(v)).to(dev, ref.dtype) for g, v in s.items()}
            return ref.energy(st, set(clamped), nudge).to("cpu", torch.float32).numpy()
