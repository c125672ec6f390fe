"""The settle engine of the emulated board: how the network relaxes to an equilibrium.

`Board` (emulator/board.py) owns the tiles, the converters, programming, the clock and the
meter; it puts the nudges through the DAC and hands the clamps and the nudge (a
`SettleNudge`) to its `SettleEngine`, which

- converts the clamps (`apply_clamp`, reusing the last settle's conversion, see below);
- keeps a *plan* per clamp set (`_Plan`: the matmul sources of the settle as `_Term` s,
  views of the tiles' cached weights, refreshed in place after writes) and per batch size a
  `_Workspace` (the free states as one (nodes, batch) buffer);
- chooses the integration step (`SettleEngine._step_dt`, from a bound on the coupling norm);
- runs one of two loops: `_settle_analog` (the node circuits relaxing, with or without read
  and node noise: a flat list of in-place calls per step on (nodes, batch) buffers, noise
  from the engine's `NoisePool`) or `_settle_mvm` (the ``mvm`` mode, where the host
  iterates the fixed point through quantised MVMs);
- stops at the noise floor (`_noise_floor`) and accounts the settle's time and array energy
  (`_account`: line power at equilibrium times the settle time, once per settle; the
  clamped lines' share is kept with the clamp);
- leaves the network's energy per sample (`SettleResult.energy`) to be computed when read,
  where what it needs can be kept for less than computing it (`_later_energy`): a training
  step never reads it. The meter's joules are computed at once.

No step synchronises with the device or converts to numpy: the loops are flat lists of
in-place calls on preallocated buffers, noise is read from the pool at offsets drawn on the
host, and only convergence checks (every `check_every` steps) read a value back
(tests/test_settle_sync.py counts them).

Everything random comes from the board's noise generator, so settles stay deterministic per
board seed.

The input product once per batch. The clamped groups' drive (``x @ W`` of a 784-wide input,
plus the bias) is constant during a settle, and an EP step settles the same clamps three
times: free, then the nudged phases, often as one settle over the batch twice over
(``[x; x]``, `hil.estimator.settle_both`). The engine keeps the constant drive of the last
clamp (`_ClampCache`) and reuses it when the next settle's clamps equal the cached ones
exactly (every value, against a copy of what the host sent) or are them twice over along
the batch; the DAC's conversion of the clamps is reused the same way (it is deterministic:
per-channel errors and quantisation; its safety count is counted again). A different plan
or a change of the tiles' `weights_epoch` (a write, a pulse, drift recomputing the
weights) invalidates the drive, and `SettleEngine.clear` (configure with a new topology,
reset) all of it. Nothing changes at the Device interface, so hosts over a wire get the same
saving. On noisy presets the reuse is exact too, statistics included: the emulator splits
a read into the noise-free product and read noise drawn fresh at every step from a variance
that follows the inputs (`_Term.noise_var`), so what is reused is only the noise-free part
(a real board re-reads its input lines every step; here every step still gets fresh noise).
The mvm mode's per-step MVMs of the clamped sources likewise reuse the product and draw
their noise and ADC conversion anew every step. The doubled batch's product over 2B rows
may round differently from the product over B rows that the cache holds (the matmul kernel
may block differently), so results may differ from an uncached settle at float rounding.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from drivers.activation import HARD_SIGMOID, Activation
from drivers.topology import BIAS
from emulator.noise_table import NoisePool
from emulator.periphery import lsb, quantize

if TYPE_CHECKING:
    from emulator.board import Board


@dataclass
class SettleNudge:
    """The nudge of one settle as the node circuits get it (targets after the DAC, currents
    after the auto-ranged injection DAC): per group ``(beta, target, grad)``, an elastic pull
    ``beta (target - s)`` (target not None) and an injected current ``-beta grad`` (grad not
    None), i.e. the cost ``beta (1/2 |s - target|^2 + grad . s)`` added to the energy."""

    groups: dict[str, tuple[float, torch.Tensor | None, torch.Tensor | None]] = field(default_factory=dict)

    @property
    def elastic(self) -> dict[str, tuple[float, torch.Tensor]]:
        """Per group with a target: (beta, target)."""
        return {g: (beta, t) for g, (beta, t, _gr) in self.groups.items() if t is not None}

    @property
    def currents(self) -> dict[str, tuple[float, torch.Tensor]]:
        """Per group with an injected current: (beta, grad) (the current is ``-beta grad``)."""
        return {g: (beta, gr) for g, (beta, _t, gr) in self.groups.items() if gr is not None}

    def add_energy(self, e: torch.Tensor, s: dict[str, torch.Tensor]) -> torch.Tensor:
        """`e` plus the nudge's terms of the energy per sample at the states `s`."""
        for g, (beta, target, grad) in self.groups.items():
            if target is not None:
                e = e + 0.5 * beta * ((s[g] - target) ** 2).sum(1)
            if grad is not None:
                e = e + beta * (grad * s[g]).sum(1)
        return e

    def repeated(self, t: int) -> SettleNudge:
        """The nudge with every tensor repeated `t` times along the batch (trace energies)."""

        def rep(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.repeat(t, 1)

        return SettleNudge({g: (beta, rep(tg), rep(gr)) for g, (beta, tg, gr) in self.groups.items()})


@dataclass
class SettleResult:
    """A settle's outcome. The energy per sample is computed when first read (`energy`) from
    what the settle kept for it (`energy_of`): a training step never reads it."""

    states: dict[str, torch.Tensor]
    steps: int
    converged: bool
    residual: float
    energy_of: Callable[[], torch.Tensor]
    settle_time_s: float
    energy_j: float
    trace: dict[str, torch.Tensor] | None = None
    _energy: torch.Tensor | None = field(default=None, repr=False)

    @property
    def energy(self) -> torch.Tensor:
        if self._energy is None:
            self._energy = self.energy_of()
        return self._energy

    @property
    def energy_pending(self) -> bool:
        """The energy has not been computed yet."""
        return self._energy is None


@dataclass
class _Term:
    """One matmul source in the settle: ``s_src @ matrix`` split over destination groups."""

    src: str
    matrix: torch.Tensor  # (sum of dst sizes, n_src): F.linear layout, the fastest for thin outputs
    dsts: list[tuple[str, int, int, float]]  # (group, start, stop, read-noise variance coefficient)
    noisy: bool  # any coefficient > 0
    pairs: list[tuple[int, bool]]  # per dst: (index into _Plan.energy_pairs, block is transposed)

    def noise_var(self, x: torch.Tensor, k: float) -> torch.Tensor:
        """Read-noise variance (batch, 1) of one output line of ``x @ matrix``: each of the two
        devices per cell reads with std sigma, so var = 2 sigma^2 (w_max / span)^2 sum_i x_i^2."""
        return x.pow(2).sum(1, keepdim=True) * k


@dataclass
class _Plan:
    """What a settle needs, built once per (topology, clamp set, weights version)."""

    free: list[str]
    const_terms: list[_Term]  # sources that are clamped (incl. bias)
    dyn_terms: list[_Term]  # sources that are free
    energy_pairs: list[tuple[str, str, torch.Tensor, float]] = field(default_factory=list)
    line_conductance: dict[str, torch.Tensor] = field(default_factory=dict)  # group: sum of G per line
    coupling_norm: float = 0.0  # estimate (or bound) of the spectral norm of the free-to-free couplings
    norm_fresh: bool = False  # coupling_norm comes from a power iteration on these weights
    # per free group, its free sources and the (n_src, n_dst) matrix each drives it through
    by_dst: dict[str, list[tuple[str, torch.Tensor]]] = field(default_factory=dict)
    noisy: bool = False  # any matmul source reads with noise
    # every clamped source enters the energy with factor 1 (bipartite couplings, bias rows):
    # then the analog settle's constant drive gives the clamped part of the energy directly
    const_unit: bool = False
    dyn_pairs: list[int] = field(default_factory=list)  # energy pairs between free groups

    bias_conductance: float = 0.0  # sum of G on the bias lines (the bias node is always at 1)
    free_lines: torch.Tensor | None = None  # line conductance of the free groups, in plan order
    rows: dict[str, slice] = field(default_factory=dict)  # free group: its rows in a (nodes, batch) buffer
    n_free: int = 0  # free nodes

    # in-place recomputations of the plan's tensors that are not views of the tiles' weights
    # (scaled or masked copies, joined matrices), in the order they depend on each other
    refreshers: list[Callable[[], object]] = field(default_factory=list)
    epochs: tuple[int, ...] = ()  # the tiles' `weights_epoch` the plan's tensors hold
    workspaces: dict[int, _Workspace] = field(default_factory=dict)  # per batch size
    # (epochs, a copy of the plan's energy tensors at those weights) for deferred energies
    frozen: tuple[tuple[int, ...], Callable[[], _Plan]] | None = None
    # what `SettleEngine._frozen` copies: one tensor per storage, each energy tensor's place in them
    frozen_layout: tuple[list[torch.Tensor], list, list] | None = None

    def __post_init__(self) -> None:
        self.set_lines(self.line_conductance)
        terms = self.const_terms + self.dyn_terms
        self.noisy = any(t.noisy for t in terms)
        const = {p for t in self.const_terms for p, _tr in t.pairs}
        self.const_unit = all(self.energy_pairs[p][3] == 1.0 for p in const)
        free = set(self.free)
        self.dyn_pairs = [
            i for i, (rg, cg, _b, _f) in enumerate(self.energy_pairs) if rg in free and cg in free
        ]

    def set_lines(self, line_conductance: dict[str, torch.Tensor]) -> None:
        self.line_conductance = line_conductance
        bias = line_conductance.get(BIAS)
        self.bias_conductance = 0.0 if bias is None else float(bias.sum())
        if self.free and all(g in line_conductance for g in self.free):
            self.free_lines = torch.cat([line_conductance[g] for g in self.free])


def _capture(state: torch.Tensor, ops: list[Callable[[], object]], n: int) -> torch.cuda.CUDAGraph | None:
    """`n` steps of `ops` captured as a CUDA graph (see `SettleEngine._graph_steps`), or None,
    with a warning, where capturing fails. Thread-local capture: another thread (another board
    on the same GPU) may launch its own work meanwhile."""
    saved = state.clone()
    current = torch.cuda.current_stream(state.device)
    side = torch.cuda.Stream(device=state.device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        for op in ops:
            op()
    current.wait_stream(side)
    state.copy_(saved)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            for _ in range(n):
                for op in ops:
                    op()
    except RuntimeError as exc:
        warnings.warn(
            f"a settle's steps could not be captured as a CUDA graph ({exc}); they run call by call",
            RuntimeWarning,
            stacklevel=3,
        )
        state.copy_(saved)
        return None
    return graph


def _add_noise(dst: torch.Tensor, std: torch.Tensor, pool: NoisePool, rows: int, batch: int) -> None:
    """One noisy group's noise of one settle step: ``dst += std * N(0, 1)``, a window of the
    pool (`dst`, `std`: views of the workspace, made once per settle)."""
    dst.addcmul_(std, pool.draw_rows(rows, batch))


def _copy_joined(out: torch.Tensor, blocks: list[torch.Tensor]) -> None:
    """Refresh a source's joined matrix ``cat(blocks, 1).T`` in place."""
    out.copy_(torch.cat(blocks, dim=1).T)


@dataclass
class _Workspace:
    """The free states of an analog settle as one (nodes, batch) buffer, one row block per
    free group (`rows`), with the constant drive (clamped products, bias, injected currents)
    in the same layout and, per free group, its rows and the (matrix (n_dst, n_src), source
    state rows) pairs that drive it. A noise-free settle also keeps `new` (the next states)
    and the step's products bound to the buffers (`Board._workspace`)."""

    state: torch.Tensor
    drive: torch.Tensor
    rows: dict[str, slice]
    links: list[tuple[slice, list[tuple[torch.Tensor, torch.Tensor]]]]
    new: torch.Tensor | None = None
    products: list[Callable[[], object]] = field(default_factory=list)
    # CUDA: the integration step as a device scalar the captured steps read, and the captured
    # runs of steps by (steps, calls per step) (`SettleEngine._graph_steps`)
    dt: torch.Tensor | None = None
    graphs: dict[tuple[int, int], torch.cuda.CUDAGraph | None] = field(default_factory=dict)

    def energy(
        self,
        half_inv_gain: float,
        elastic: dict[str, tuple[float, torch.Tensor]],
        act: Activation = HARD_SIGMOID,
    ) -> torch.Tensor:
        """The energy of `Board._energy` in fewer operations, for analog settles whose clamped
        sources all enter with factor 1: the constant drive gives those terms and the nudge
        currents, and the free-to-free terms are half of ``sum_g s_g . drive_g`` (each
        bipartite pair drives both ways; a dense tile's pairs carry the factor 1/2), so
        ``E = sum_g s_g . (s_g / 2gain - const_g - drive_g / 2)``, one product over all free
        nodes. Another activation than the hard sigmoid adds its node terms ``sum G(s)``
        (`drivers.activation`) in place of ``|s|^2 / 2gain``."""
        t = self.state * half_inv_gain if act.hard else -self.drive
        if act.hard:
            t.sub_(self.drive)
        for r, sources in self.links:
            for m, x in sources:
                t[r].addmm_(m, x, alpha=-0.5)
        e = torch.linalg.vecdot(t, self.state, dim=0)
        if not act.hard:
            e = e + act.leak(self.state, 0.5 / half_inv_gain).sum(0)
        for g, (beta, target) in elastic.items():
            e = e + 0.5 * beta * (self.state[self.rows[g]].T - target).square().sum(1)
        return e


def _links(plan: _Plan, state: torch.Tensor) -> list[tuple[slice, list[tuple[torch.Tensor, torch.Tensor]]]]:
    """Per free group: its rows and the (matrix (n_dst, n_src), source rows of `state`) pairs
    that drive it (the plan's (n_src, n_dst) blocks, transposed back: contiguous rows)."""
    rows = plan.rows
    return [(rows[g], [(m.T, state[rows[src]]) for src, m in plan.by_dst[g]]) for g in plan.free]


def _joined_products(
    plan: _Plan,
    state: torch.Tensor,
    new: torch.Tensor,
    drive: torch.Tensor,
    per_group: list[Callable[[], object]],
) -> list[Callable[[], object]] | None:
    """One step's products source by source over all free rows at once, where that gives
    the very numbers of the group-by-group products (`per_group`), else None.

    Where every free source drives every free group (a dense tile) and its joined matrix
    (`_Term.matrix`, one row block per free group, in the buffer's row order) is contiguous,
    the products of a step are one ``addmm`` per source over all free rows instead of one
    per (source, group) pair: 3 calls instead of 9 for three free groups, about half the
    time of a small settle's step. Each output element is still the same dot product over
    the same source, added in the same order of sources; whether the BLAS computes it with
    the same rounding when the output has more rows depends on the kernel it picks for the
    shapes (on MKL: the same for 64- and 4-row blocks, not for 12- or 2-row ones), so it is
    checked once here, on these very buffers and matrices, against `per_group` with probe
    states: the joined calls are used only where the two agree bit for bit."""
    terms, rows = plan.dyn_terms, plan.rows
    if len(plan.free) < 2 or not terms:
        return None
    order = [t.src for t in terms]
    if any([src for src, _m in plan.by_dst[g]] != order for g in plan.free):
        return None
    for t in terms:
        spans = [(dst, a, b) for dst, a, b, _k in t.dsts]
        if spans != [(g, rows[g].start, rows[g].stop) for g in plan.free]:
            return None
        if t.matrix.shape[0] != plan.n_free or not t.matrix.is_contiguous():
            return None
    joined: list[Callable[[], object]] = [
        partial(torch.addmm, drive, terms[0].matrix, state[rows[terms[0].src]], out=new)
    ]
    joined += [partial(new.addmm_, t.matrix, state[rows[t.src]]) for t in terms[1:]]
    gen = torch.Generator().manual_seed(0)  # a probe of its own: the board's generators untouched
    same = True
    for _ in range(2):
        state.copy_(torch.rand(state.shape, generator=gen).to(state.device))
        drive.copy_(torch.rand(drive.shape, generator=gen).to(drive.device))
        for op in per_group:
            op()
        want = new.clone()
        for op in joined:
            op()
        same = same and bool(torch.equal(new, want))
    state.zero_()
    drive.zero_()
    return joined if same else None


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exactly equal tensors (shape and every value): the first row first (different clamps
    differ there almost always), then all of them; on the CPU through numpy, several times
    faster than `torch.equal` there."""
    if a.shape != b.shape:
        return False
    if a.device.type != "cpu" or a.requires_grad or b.requires_grad:
        return bool(torch.equal(a[:1], b[:1])) and bool(torch.equal(a, b))
    x, y = a.numpy(), b.numpy()
    return bool(np.array_equal(x[:1], y[:1])) and bool(np.array_equal(x, y))


@dataclass
class _ClampCache:
    """The last clamp (see the module docstring, "The input product once per batch"): the
    clamps as the host sent them (`raw`, copies) and as the DAC applied them (`applied`, with
    the safety violations that conversion counted), and what the settles of one plan
    computed from them, valid while the plan and the tiles' `weights_epoch` s are those of
    `plan` and `epochs`: `drive`, the (nodes, batch) constant drive of an analog settle;
    `outs`, per constant term its product ``F.linear(s_src, matrix)`` (batch, n_out), for an
    mvm-mode settle; the clamped lines' power and the constant noise variance."""

    raw: dict[str, torch.Tensor]
    applied: dict[str, torch.Tensor]
    batch: int
    violations: int = 0
    plan: _Plan | None = None
    epochs: tuple[int, ...] = ()
    drive: torch.Tensor | None = None
    outs: list[torch.Tensor] | None = None
    line_power: float | None = None  # the clamped groups' share of `_settle_power` (W)
    noise_var: dict[str, torch.Tensor] | None = None  # per free group, its constant noise variance (1, batch)
    exact: bool = False  # the DAC handed every clamp back unchanged (`applied` is `raw`)

    def repeats(self, clamp: dict[str, torch.Tensor], batch: int) -> int:
        """How many times over `clamp` repeats the cached clamps along the batch: 1 (the same
        clamps), 2 (the batch twice over, ``[x; x]``, as `settle_both` sends it), or 0 (no
        reuse). Exact comparisons (`_same_values`), once per settle."""
        if clamp.keys() != self.raw.keys():
            return 0
        n = self.batch
        if batch == n:
            return 1 if all(_same_values(clamp[g], c) for g, c in self.raw.items()) else 0
        if batch == 2 * n:
            same = all(
                _same_values(clamp[g][:n], c) and _same_values(clamp[g][n:], c) for g, c in self.raw.items()
            )
            return 2 if same else 0
        return 0

    def bind(self, plan: _Plan) -> None:
        """Hold what settles of `plan` at its present weights compute (forgetting the rest)."""
        self.plan, self.epochs = plan, plan.epochs
        self.drive = self.outs = self.line_power = self.noise_var = None


class SettleEngine:
    """The settles of one `Board`: plans per clamp set, workspaces per batch size, the
    coupling-norm bookkeeping of the step size, the two settle loops and their accounting.
    It reads the board's topology, tiles, clock, converters and noise generator; it does
    not advance the board's clock or meter (`Board.settle` does, from the result)."""

    def __init__(self, board: Board) -> None:
        self.board = board
        self._plans: dict[frozenset[str], tuple[tuple[torch.Tensor, ...], _Plan]] = {}
        self._power_vectors: dict[frozenset[str], torch.Tensor] = {}
        # per clamp set: the last coupling-norm figure and the free-to-free matrices it was for
        self._norm_refs: dict[frozenset[str], tuple[float, list[torch.Tensor]]] = {}
        self.reuse_clamp = True  # reuse the constant drive of the last clamp (`_ClampCache`)
        # on CUDA, run a noise-free settle's steps between checks as one captured CUDA graph
        # (`_graph_steps`); False: the same steps launched one call at a time
        self.cuda_graphs = True
        self._clamp_cache: _ClampCache | None = None
        self.clamp_reuses = 0  # settles that reused a cached constant drive
        self._noise_pool: NoisePool | None = None
        self._current: tuple[_ClampCache | None, int] = (None, 0)  # this settle's cache entry, repeats

    def clear(self) -> None:
        """Forget the plans and the cached constant drive (a new topology, or a reset)."""
        self._plans.clear()
        self._clamp_cache = None

    def apply_clamp(self, clamp: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The clamps through the DAC (`Board._dac`), or, when they equal the last settle's
        clamps or are them twice over, that settle's conversion (and its safety count) again."""
        batch = next(iter(clamp.values())).shape[0]
        c = self._clamp_cache
        reps = c.repeats(clamp, batch) if c is not None and self.reuse_clamp else 0
        if c is not None and reps:
            self.board.safety.violations += c.violations
            self._current = (c, reps)
            if c.exact:  # the conversion is the identity: the clamps (equal to it, checked) themselves
                return dict(clamp)
            return {g: a if reps == 1 else torch.cat([a] * reps) for g, a in c.applied.items()}
        safety = self.board.safety
        before = safety.violations
        applied = {g: self.board._dac(x, self.board._channel[g]) for g, x in clamp.items()}
        self._current = (None, 0)
        if self.reuse_clamp:
            raw = {g: x.clone() for g, x in clamp.items()}
            # an exact DAC hands its input back: keep the copy, not the caller's array
            same = {g: a is clamp[g] or a.data_ptr() == clamp[g].data_ptr() for g, a in applied.items()}
            kept = {g: raw[g] if same[g] else a for g, a in applied.items()}
            self._clamp_cache = _ClampCache(raw, kept, batch, safety.violations - before)
            self._clamp_cache.exact = all(same.values())
            self._current = (self._clamp_cache, 1)
        return applied

    def _cached(self, plan: _Plan) -> tuple[_ClampCache | None, int]:
        """This settle's cache entry and how many times over the batch repeats its clamps,
        when the entry holds what this plan computed at the present weights; else (None, 0)
        (and the entry is bound to this plan, for `_keep`)."""
        entry, reps = self._current
        if entry is None:
            return None, 0
        if entry.plan is plan and entry.epochs == plan.epochs:
            return entry, reps
        if reps == 1:
            entry.bind(plan)
        return None, 0

    def _keep(self, plan: _Plan, **held: object) -> None:
        """Keep what a settle computed from its clamps with this settle's cache entry."""
        entry, reps = self._current
        if entry is not None and reps == 1 and entry.plan is plan:
            for name, value in held.items():
                setattr(entry, name, value)

    def _plan(self, clamped: frozenset[str]) -> _Plan:
        """The settle plan for a clamp set. Its tensors are views of the tiles' cached weights,
        which the tiles update in place (`TileArray.weights`): after a write (a new
        `weights_epoch`) the plan is refreshed, not rebuilt (its copies recomputed in place,
        line conductances and the coupling-norm bound taken again); a tile that hands back
        another tensor (a new topology) makes a new plan."""
        assert self.board.topology is not None
        tiles = [self.board._tiles[c.tile] for c in self.board.topology.couplings]
        sources = tuple(t.weights(self.board.clock) for t in tiles)
        epochs = tuple(t.weights_epoch for t in tiles)
        cached = self._plans.get(clamped)
        if cached is not None and all(a is b for a, b in zip(cached[0], sources, strict=True)):
            plan = cached[1]
            if plan.epochs != epochs:
                for refresh in plan.refreshers:
                    refresh()
                plan.set_lines(self._line_conductance())
                plan.norm_fresh = False
                plan.coupling_norm = self._norm_bound(clamped, plan)
                plan.epochs = epochs
            return plan
        topo = self.board.topology
        pieces: dict[str, list[tuple[str, torch.Tensor, float, tuple[int, bool]]]] = {}
        energy_pairs: list[tuple[str, str, torch.Tensor, float]] = []
        refreshers: list[Callable[[], object]] = []
        for c in topo.couplings:
            w = self.board._tiles[c.tile].weights(self.board.clock)
            if c.w_max != 1.0:
                scaled = w * c.w_max
                refreshers.append(partial(torch.mul, w, c.w_max, out=scaled))
                w = scaled
            tile = self.board._tiles[c.tile]
            m = tile.model
            noise_k = 2 * (c.w_max * m.read_noise / (m.g_max - m.g_min)) ** 2
            r0 = 0
            for rg in c.rows:
                rn = topo.size(rg)
                c0 = 0
                for cg in c.cols:
                    cn = topo.size(cg)
                    block = w[r0 : r0 + rn, c0 : c0 + cn]
                    if c.kind == "dense" and rg == cg:  # the diagonal is disconnected
                        mask = 1 - torch.eye(rn, device=self.board.device)
                        masked = block * mask
                        refreshers.append(partial(torch.mul, block, mask, out=masked))
                        block = masked
                    if cg not in clamped:
                        pieces.setdefault(rg, []).append((cg, block, noise_k, (len(energy_pairs), False)))
                    if c.kind == "bipartite" and rg != BIAS and rg not in clamped:
                        pieces.setdefault(cg, []).append((rg, block.T, noise_k, (len(energy_pairs), True)))
                    factor = 0.5 if (c.kind == "dense" and rg != BIAS) else 1.0
                    energy_pairs.append((rg, cg, block, factor))
                    c0 += cn
                r0 += rn
        const_terms, dyn_terms = [], []
        for src, items in pieces.items():
            blocks = [b for _, b, _, _ in items]
            if len(blocks) == 1:
                matrix = blocks[0].T
            else:
                matrix = torch.cat(blocks, dim=1).T.contiguous()
                refreshers.append(partial(_copy_joined, matrix, blocks))
            dsts, start = [], 0
            for dst, b, k, _pair in items:
                dsts.append((dst, start, start + b.shape[1], k))
                start += b.shape[1]
            term = _Term(src, matrix, dsts, any(k > 0 for _, _, k, _ in items), [p for *_, p in items])
            (const_terms if (src == BIAS or src in clamped) else dyn_terms).append(term)
        free = [g for g in topo.groups if g not in clamped]
        plan = _Plan(free, const_terms, dyn_terms, energy_pairs, self._line_conductance())
        plan.refreshers, plan.epochs = refreshers, epochs
        plan.coupling_norm = self._norm_bound(clamped, plan)
        plan.by_dst = {g: [] for g in free}
        for g in free:
            plan.rows[g] = slice(plan.n_free, plan.n_free + topo.groups[g])
            plan.n_free += topo.groups[g]
        for term in dyn_terms:
            for dst, a, b, _k in term.dsts:
                plan.by_dst[dst].append((term.src, term.matrix[a:b].T))
        self._plans[clamped] = (sources, plan)
        return plan

    def _norm_bound(self, clamped: frozenset[str], plan: _Plan) -> float:
        """An upper bound on the coupling norm of a new plan without a power iteration: the
        last figure for this clamp set plus the Frobenius norm of the change of the
        free-to-free matrices since then (``|A + D| <= |A| + |D|_F``), with the same 10 %
        margin. Training changes weights by little per step, so this stays tight for many
        steps; `settle` runs the power iteration (`_coupling_norm`) only when the bound would
        shrink its step."""
        matrices = [t.matrix for t in plan.dyn_terms]
        ref = self._norm_refs.get(clamped)
        if ref is None or [m.shape for m in ref[1]] != [m.shape for m in matrices]:
            return self._fresh_norm(clamped, plan)
        # a bipartite pair's two matrices are one block and its transpose: one norm for both
        change, seen = 0.0, {}
        for m, o in zip(matrices, ref[1], strict=True):
            key = (m.data_ptr(), m.numel())
            if key not in seen:
                seen[key] = float(torch.linalg.matrix_norm(m - o)) ** 2
            change += seen[key]
        norm = ref[0] + 1.1 * change**0.5
        # copies: the plan's matrices are views that later writes update in place
        self._norm_refs[clamped] = (norm, [m.clone() for m in matrices])
        return norm

    def _fresh_norm(self, clamped: frozenset[str], plan: _Plan) -> float:
        """Power-iterate the plan's coupling norm and make it the reference later bounds
        start from."""
        plan.coupling_norm = self._coupling_norm(plan)
        plan.norm_fresh = True
        # copies: the plan's matrices are views that later writes update in place
        self._norm_refs[clamped] = (plan.coupling_norm, [t.matrix.clone() for t in plan.dyn_terms])
        return plan.coupling_norm

    def _coupling_norm(self, plan: _Plan) -> float:
        """Power-iteration estimate of the norm of the map the free groups apply to each other
        (their drive on one another), with a 10 % margin. It bounds how fast an analog settle
        may be integrated: see `Board.settle`. The map is assembled as one matrix, so each
        iteration is one matrix-vector product; the iteration starts from the previous
        plan's vector and stops once the estimate has settled."""
        assert self.board.topology is not None
        if not plan.dyn_terms:
            return 0.0
        sizes = self.board.topology.groups
        offset, n = {}, 0
        for g in plan.free:
            offset[g] = n
            n += sizes[g]
        op = torch.zeros(n, n, device=self.board.device)  # row-vector convention: drive = v @ op
        for term in plan.dyn_terms:
            r0 = offset[term.src]
            for dst, a, b, _k in term.dsts:
                c0 = offset[dst]
                op[r0 : r0 + sizes[term.src], c0 : c0 + b - a] += term.matrix[a:b].T
        key = frozenset(plan.free)
        v = self._power_vectors.get(key)
        if v is None or v.shape[1] != n:
            gen = torch.Generator(device=self.board.device).manual_seed(0)
            v = torch.randn(1, n, generator=gen, device=self.board.device)
        # at least 4 iterations; more while the estimate still rises by over 1 % (a start
        # vector from other weights, or a slow spectral gap)
        norm = 0.0
        for i in range(40):
            v = v / (torch.linalg.vector_norm(v) + 1e-30)
            v = v @ op
            last, norm = norm, float(torch.linalg.vector_norm(v))
            if i >= 3 and norm <= 1.01 * last:
                break
        self._power_vectors[key] = v
        return 1.1 * norm

    def _line_conductance(self) -> dict[str, torch.Tensor]:
        """Per node group, the total conductance its lines see over all tiles (for power)."""
        assert self.board.topology is not None
        topo = self.board.topology
        out: dict[str, torch.Tensor] = {}
        for c in topo.couplings:
            g = self.board._tiles[c.tile].state(self.board.clock)  # (2, rows, cols): G+ and G-
            sides = [(c.rows, g.sum((0, 2)))] + ([(c.cols, g.sum((0, 1)))] if c.kind == "bipartite" else [])
            for groups, total in sides:
                sizes = [topo.size(grp) for grp in groups]
                parts = torch.split(total, sizes) if len(groups) > 1 else (total,)
                for grp, part in zip(groups, parts, strict=True):
                    out[grp] = part if grp not in out else out[grp] + part
        return out

    def _energy(
        self,
        s: dict[str, torch.Tensor],
        plan: _Plan,
        nudge: SettleNudge,
        products: dict[int, tuple[torch.Tensor, bool]],
        gain: float | None = None,
        act: Activation | None = None,
    ) -> torch.Tensor:
        """Energy per sample, E = sum_free G(s) - Phi(s) + nudge terms, G = |s|^2 / (2 gain) for
        the hard sigmoid (`drivers.activation`). `products`
        holds ``s_src @ block`` of the clamped sources, already computed by the settle.
        `gain`, `act`: the activation of the settle (None: the board's topology's now; a
        deferred energy passes the one it settled with, the board may be reset since)."""
        if gain is None or act is None:
            assert self.board.topology is not None
            gain = self.board.topology.gain if gain is None else gain
            act = self.board.topology.activation if act is None else act
        first = next(iter(s.values()))
        e = torch.zeros(first.shape[0], device=first.device)
        for g in plan.free:
            e = e + ((s[g] ** 2).sum(1) / (2 * gain) if act.hard else act.leak(s[g], gain).sum(1))
        for i, (rg, cg, block, factor) in enumerate(plan.energy_pairs):
            if i in products:
                product, transposed = products[i]  # s_rg @ block, or s_cg @ block.T
                e = e - factor * (product * (s[rg] if transposed else s[cg])).sum(1)
            else:
                e = e - factor * ((s[rg] @ block) * s[cg]).sum(1)
        return nudge.add_energy(e, s)

    def settle(
        self,
        clamp: dict[str, torch.Tensor],
        nudge: SettleNudge,
        init: dict[str, torch.Tensor] | None,
        trace: int,
    ) -> SettleResult:
        """Relax the network from the clamps and nudge as the DAC applied them (`Board.settle`);
        `trace` records every `trace` steps (0: no trace). Inputs were checked by the caller.

        `analog` mode integrates ds = dt (rho(u) - s) with the node circuits in continuous
        time: the clamped sources' products are computed once (fresh read noise is added every
        step) and the ADC digitises only the final states. `mvm` mode is the host iterating
        the fixed point through the board's MVMs: every source group's product goes through
        the ADC every step and the new states through the DAC.
        """
        topo = self.board.topology
        assert topo is not None
        batch = next(iter(clamp.values())).shape[0]
        key = frozenset(clamp)
        plan = self._plan(key)
        dev = self.board.device
        mvm_mode = topo.mode == "mvm"
        # the bias node is a constant 1
        s: dict[str, torch.Tensor] = {BIAS: torch.ones(batch, 1, device=dev), **clamp}
        if not mvm_mode:
            return self._settle_analog(s, nudge, init, plan, key, batch, trace)
        return self._settle_mvm(s, nudge, init, plan, key, batch, trace)

    def _settle_mvm(
        self,
        s: dict[str, torch.Tensor],
        nudge: SettleNudge,
        init: dict[str, torch.Tensor] | None,
        plan: _Plan,
        key: frozenset[str],
        batch: int,
        trace: int,
    ) -> SettleResult:
        """The ``mvm`` mode (see `settle`): every step, every source's product goes through an
        MVM with its own read noise and the ADC, node noise is added, and the new states go
        through the DAC."""
        topo = self.board.topology
        assert topo is not None
        per = self.board.preset.periphery
        budget = topo.budget
        dev = self.board.device
        for g in plan.free:
            x0 = init.get(g) if init else None
            s[g] = torch.zeros(batch, topo.groups[g], device=dev) if x0 is None else x0.contiguous()
        # the injected nudge currents; the read noise variance of the clamped sources (for the
        # noise floor) and their noise-free products, reused from the last settle of these
        # clamps (each step still draws its own read noise and ADC conversion)
        base = {g: torch.zeros(batch, topo.groups[g], device=dev) for g in plan.free}
        for g, (beta, gr) in nudge.currents.items():
            base[g] = base[g] - beta * gr
        const_var = {g: torch.full((batch, 1), per.node_noise**2, device=dev) for g in plan.free}
        products: dict[int, tuple[torch.Tensor, bool]] = {}
        cached, reps = self._cached(plan)
        if cached is not None and cached.outs is not None:
            self.clamp_reuses += 1
            outs = cached.outs if reps == 1 else [torch.cat([o] * reps) for o in cached.outs]
        else:
            outs = [F.linear(s[term.src], term.matrix) for term in plan.const_terms]
            self._keep(plan, outs=outs)
        mvm_const = list(zip(plan.const_terms, outs, strict=True))
        for term, out in mvm_const:
            for (dst, a, b, k), (pair, transposed) in zip(term.dsts, term.pairs, strict=True):
                products[pair] = (out[:, a:b], transposed)
                if k:
                    const_var[dst] += term.noise_var(s[term.src], k)
        gain, tol, act = topo.gain, budget.tol, topo.activation
        dt = self._step_dt(plan, key)
        pool = (
            self._pool(batch * max(topo.groups[g] for g in plan.free))
            if plan.noisy or per.node_noise
            else None
        )
        elastic = nudge.elastic
        traces: dict[str, list[torch.Tensor]] = {}
        trace_steps: list[int] = []

        def record(step: int) -> None:
            trace_steps.append(step)
            for g in plan.free:
                traces.setdefault(g, []).append(s[g])  # states are replaced, never written in place

        def mvm_out(term: _Term, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            """One MVM with its own read noise, digitised by the ADC."""
            if term.noisy:
                assert pool is not None
                y = y.clone()
                for _dst, a, b, k in term.dsts:
                    std = term.noise_var(x, k).sqrt()
                    y[:, a:b] += std * pool.draw((batch, b - a))
            return self.board._adc_mvm(y)

        if trace:
            record(0)
        peaks: list[torch.Tensor] = []  # the DAC's peak output per step and group (safety)
        residual, converged, steps, floor = float("inf"), False, 0, 0.0
        for step in range(1, budget.max_steps + 1):
            drive = dict(base)
            var = dict(const_var)
            for term, out in mvm_const:
                y = mvm_out(term, s[term.src], out)
                for dst, a, b, _k in term.dsts:
                    drive[dst] = drive[dst] + y[:, a:b]
            for term in plan.dyn_terms:
                x = s[term.src]
                y = mvm_out(term, x, F.linear(x, term.matrix))
                for dst, a, b, k in term.dsts:
                    drive[dst] = drive[dst] + y[:, a:b]
                    if k:
                        var[dst] = var[dst] + term.noise_var(x, k)
            check = step % budget.check_every == 0 or step == budget.max_steps
            changes: list[torch.Tensor] = []
            for g in plan.free:
                u = drive[g]
                if g in elastic:
                    beta, target = elastic[g]
                    u = u + beta * (target - s[g])
                if per.node_noise:
                    assert pool is not None
                    u = u + per.node_noise * pool.draw(u.shape)
                if act.hard:
                    new = (u * gain).clamp_(0.0, 1.0) if gain != 1.0 else u.clamp(0.0, 1.0)
                else:
                    new = act.rho(u, gain)
                new = self._dac_step(new, self.board._channel[g], peaks)
                if check:
                    changes.append((new - s[g]).abs().max())
                s[g] = torch.lerp(s[g], new, dt) if dt != 1.0 else new
            steps = step
            if check:  # one synchronisation for the residual, one for the noise floor
                residual = float(torch.stack(changes).max())
                floor = self._noise_floor(var, True, gain)
            if trace and step % trace == 0:
                record(step)
            if check and residual <= tol + floor:
                converged = True
                break
        if trace and trace_steps[-1] != steps:
            record(steps)
        if peaks:
            over = torch.stack(peaks).double().mul_(per.v_read).gt_(per.v_read_max).sum()
            self.board.safety.violations += int(over)
        settle_time, energy_j = self._account(plan, s, None, steps, dt, batch)
        energy = self._energy(s, plan, nudge, products)
        stacked = {g: torch.stack(traces[g]) for g in plan.free} if trace else {}
        return self._result(s, plan, nudge, products, (steps, converged, residual), energy,
                            (settle_time, energy_j), trace_steps, stacked)  # fmt: skip

    def _step_dt(self, plan: _Plan, key: frozenset[str]) -> float:
        """The integration step of an analog settle: budget.dt, or less where the couplings are
        strong enough for a step of dt to overshoot (energy descent needs dt < 2 / (1 + gain
        |W|)); each step then stands for that much less circuit time. mvm settles iterate the
        fixed point at budget.dt."""
        assert self.board.topology is not None
        topo = self.board.topology
        dt = topo.budget.dt
        if topo.mode != "mvm" and plan.coupling_norm > 0:
            if 1.8 / (1.0 + topo.gain * plan.coupling_norm) < dt and not plan.norm_fresh:
                self._fresh_norm(key, plan)  # the bound is too loose to decide
            dt = min(dt, 1.8 / (1.0 + topo.gain * plan.coupling_norm))
        return dt

    def _account(
        self, plan: _Plan, s: dict[str, torch.Tensor], ws: _Workspace | None, steps: int, dt: float,
        batch: int,
    ) -> tuple[float, float]:  # fmt: skip
        """A settle's (seconds, joules), by which `Board.settle` advances its clock and meter. The
        array's power is measured at the equilibrium, for the whole settle: the states spend
        most of the settle near it, and measuring it once keeps the per-step loop lean."""
        assert self.board.topology is not None
        per, budget = self.board.preset.periphery, self.board.topology.budget
        if self.board.topology.mode == "mvm":
            step_s = per.mvm_time_s * (len(plan.const_terms) + len(plan.dyn_terms))
        else:
            step_s = per.settle_step_s * dt / budget.dt
        settle_time = step_s * steps * batch
        energy_j = self._settle_power(plan, s, ws) * step_s * steps
        return settle_time, energy_j

    def _result(
        self,
        s: dict[str, torch.Tensor],
        plan: _Plan,
        nudge: SettleNudge,
        products: dict[int, tuple[torch.Tensor, bool]],
        outcome: tuple[int, bool, float],
        energy: torch.Tensor | Callable[[], torch.Tensor],
        cost: tuple[float, float],
        trace_steps: list[int],
        stacked: dict[str, torch.Tensor],
    ) -> SettleResult:
        """The states through the ADC, and the trace (energies evaluated after the settle)."""
        states = {g: self.board._adc_state(s[g], self.board._channel[g]) for g in plan.free}
        out_trace = None
        if stacked:
            out_trace = {
                "step": torch.tensor(trace_steps),
                "energy": self._trace_energy(s, stacked, plan, nudge, products),
            }
            for g in plan.free:
                out_trace[g] = self.board._adc_state(stacked[g], self.board._channel[g])
        if callable(energy):
            return SettleResult(states, *outcome, energy, *cost, out_trace)
        value = energy
        return SettleResult(states, *outcome, lambda: value, *cost, out_trace, value)

    def _later_energy(
        self, s: dict[str, torch.Tensor], plan: _Plan, gain: float, nudge: SettleNudge, batch: int
    ) -> Callable[[], torch.Tensor] | None:
        """The energy of a finished analog settle (`_Workspace.energy`) as a function to call
        when someone asks, or None where it must be computed now. It uses the settle's final
        states as `s` holds them (the states the settle returns: a caller that writes into
        those before reading the energy changes it), the constant drive kept
        with the clamp cache, the nudge's tensors (copies of the targets) and copies of the
        free-to-free matrices, which later writes change in place; when those copies would
        cost more than the energy itself (matrices larger than the states), or the constant
        drive is not cached, it is computed now."""
        entry, reps = self._current
        if entry is None or entry.plan is not plan or entry.drive is None:
            return None
        if sum(m.numel() for ms in plan.by_dst.values() for _src, m in ms) > plan.n_free * batch:
            return None
        const = entry.drive
        assert self.board.topology is not None
        act = self.board.topology.activation  # the board may be reconfigured before the call
        by_dst = {g: [(src, m.clone()) for src, m in ms] for g, ms in plan.by_dst.items()}
        states = {g: s[g] for g in plan.free}
        currents = nudge.currents
        elastic = {g: (beta, target.clone()) for g, (beta, target) in nudge.elastic.items()}
        rows = plan.rows

        def energy() -> torch.Tensor:
            state = torch.cat([states[g].T for g in plan.free])  # (nodes, batch), as the workspace
            drive = const if reps == 1 else torch.cat([const] * reps, dim=1)
            if currents:
                drive = drive.clone()
                for g, (beta, grad) in currents.items():
                    drive[rows[g]].sub_(grad.T, alpha=beta)
            links = [(rows[g], [(m.T, state[rows[src]]) for src, m in by_dst[g]]) for g in plan.free]
            return _Workspace(state, drive, rows, links).energy(0.5 / gain, elastic, act)

        return energy

    def _later_pair_energy(
        self, s: dict[str, torch.Tensor], plan: _Plan, nudge: SettleNudge
    ) -> Callable[[], torch.Tensor]:
        """The energy of a finished analog settle whose clamped sources do not all enter with
        factor 1 (a dense tile), as a function to call when someone asks: `_energy` over the
        clamped products, exactly as it would run now, on copies of the plan's matrices taken
        once per weights version (`_frozen`, shared by every settle of that version) and of
        the nudge's tensors. It uses the settle's final states and clamps as `s` holds them
        (see `_later_energy`)."""
        frozen = self._frozen(plan)
        assert self.board.topology is not None
        gain = self.board.topology.gain  # the board may be reconfigured or reset before the call
        act = self.board.topology.activation
        states = dict(s)
        groups = {
            g: (beta, None if t is None else t.clone(), None if gr is None else gr.clone())
            for g, (beta, t, gr) in nudge.groups.items()
        }

        def energy() -> torch.Tensor:
            held = frozen()
            products = self._const_products(states, held)
            return self._energy(states, held, SettleNudge(groups), products, gain, act)

        return energy

    def _frozen(self, plan: _Plan) -> Callable[[], _Plan]:
        """A function giving a shallow copy of `plan` whose clamped products' matrices and
        energy pairs read copies of the present weights (what `_energy` and
        `_const_products` read), each with its own strides and offset, so products on them
        run exactly as on the plan's. The copies are taken now, one per storage the plan's
        tensors view (a few), and kept with the plan until its weights change; the views
        are made only when an energy is read."""
        held = plan.frozen
        if held is not None and held[0] == plan.epochs:
            return held[1]
        if plan.frozen_layout is None:  # per plan: which storages, and each tensor's place in them
            owners: list[torch.Tensor] = []
            index: dict[int, int] = {}

            def place(t: torch.Tensor) -> tuple[int, torch.Size, tuple[int, ...], int]:
                key = t.untyped_storage().data_ptr()
                if key not in index:
                    index[key] = len(owners)
                    owners.append(t)
                return index[key], t.shape, t.stride(), t.storage_offset()

            terms = [place(t.matrix) for t in plan.const_terms]
            pairs = [place(b) for _rg, _cg, b, _f in plan.energy_pairs]
            plan.frozen_layout = (owners, terms, pairs)
        owners, terms, pairs = plan.frozen_layout
        copies = [t.untyped_storage().clone() for t in owners]
        built: list[_Plan] = []

        def frozen() -> _Plan:
            if built:
                return built[0]
            bases = [
                torch.empty(0, dtype=t.dtype, device=t.device).set_(c)
                for t, c in zip(owners, copies, strict=True)
            ]

            def view(spot: tuple[int, torch.Size, tuple[int, ...], int]) -> torch.Tensor:
                i, shape, stride, offset = spot
                return bases[i].as_strided(shape, stride, offset)

            out = copy.copy(plan)
            out.const_terms = [
                dataclasses.replace(t, matrix=view(spot))
                for t, spot in zip(plan.const_terms, terms, strict=True)
            ]
            out.energy_pairs = [
                (rg, cg, view(spot), f)
                for (rg, cg, _b, f), spot in zip(plan.energy_pairs, pairs, strict=True)
            ]
            out.workspaces, out.frozen, out.frozen_layout = {}, None, None
            built.append(out)
            return out

        plan.frozen = (plan.epochs, frozen)
        return frozen

    def _const_products(
        self, s: dict[str, torch.Tensor], plan: _Plan
    ) -> dict[int, tuple[torch.Tensor, bool]]:
        """Per energy pair, ``s_src @ block`` of the clamped sources (for `_energy`)."""
        products = {}
        for term in plan.const_terms:
            out = F.linear(s[term.src], term.matrix)
            for (_dst, a, b, _k), (pair, transposed) in zip(term.dsts, term.pairs, strict=True):
                products[pair] = (out[:, a:b], transposed)
        return products

    def _workspace(self, plan: _Plan, batch: int) -> _Workspace:
        """The (nodes, batch) buffers of a noise-free settle and the products of one step bound
        to them, kept with the plan for the next settle of that batch size (a settle writes
        its results out of the buffers, so they are free again when it returns)."""
        state = torch.zeros(plan.n_free, batch, device=self.board.device)
        new = torch.empty(plan.n_free, batch, device=self.board.device)
        drive = torch.zeros(plan.n_free, batch, device=self.board.device)
        links = _links(plan, state)
        products: list[Callable[[], object]] = []
        for r, sources in links:
            if sources:  # the first product written into the group's rows, the others added
                products.append(partial(torch.addmm, drive[r], *sources[0], out=new[r]))
                products += [partial(new[r].addmm_, m, x) for m, x in sources[1:]]
            else:
                products.append(partial(new[r].copy_, drive[r]))
        joined = _joined_products(plan, state, new, drive, products)
        ws = _Workspace(state, drive, plan.rows, links, new, joined or products)
        if len(plan.workspaces) >= 4:  # a few batch sizes (training, the last batch, evaluation)
            plan.workspaces.pop(next(iter(plan.workspaces)))
        plan.workspaces[batch] = ws
        return ws

    def _settle_analog(
        self,
        s: dict[str, torch.Tensor],
        nudge: SettleNudge,
        init: dict[str, torch.Tensor] | None,
        plan: _Plan,
        key: frozenset[str],
        batch: int,
        trace: int,
    ) -> SettleResult:
        """The analog settle, with or without read and node noise.

        The free groups' states live in one (nodes, batch) buffer, one contiguous row block
        per group (`plan.rows`), and so do the new states each step and the constant drive
        (clamped sources, bias, injected currents): a step is one matrix product per (source,
        destination) pair written straight into the destination's rows, then one clamp and
        one relaxation over all groups at once (4 torch calls per step for a layered network
        of two free groups, against 6 for per-group (batch, nodes) states; about half the time
        per step at every batch size).

        Noise (`_noise_ops`): the read noise of every source on a node line and the node
        noise sum to one Gaussian per node and step, added to the line's drive before the
        gain, with a variance per sample that has a constant part (node noise, clamped
        sources, bias) and a part that follows the free sources' states; the draws are
        windows of the engine's `NoisePool`, added in place (``addcmul_``), and the step
        allocates nothing. A noisy settle counts as converged within `tol` of its noise
        floor (`_noise_floor`), checked every `check_every` steps.

        Without noise and with ``tol = 0`` convergence is never checked: the settle runs
        exactly `max_steps` (the fixed-step recipe of the EP literature) and the residual is
        measured at the last step only."""
        assert self.board.topology is not None
        budget, gain = self.board.topology.budget, self.board.topology.gain
        act = self.board.topology.activation
        noisy = plan.noisy or bool(self.board.preset.periphery.node_noise)
        rows = plan.rows
        ws = plan.workspaces.get(batch)
        if ws is None:
            ws = self._workspace(plan, batch)
        state, new, drive = ws.state, ws.new, ws.drive
        assert new is not None
        if init and any(g in init for g in plan.free):
            for g in plan.free:
                x0 = init.get(g)
                if x0 is None:
                    state[rows[g]].zero_()
                else:
                    state[rows[g]].copy_(x0.T)
        else:
            state.zero_()
        # the constant drive (clamped sources, bias): reused from the last settle of these clamps
        cached, reps = self._cached(plan)
        if cached is not None and cached.drive is not None:
            self.clamp_reuses += 1
            n = cached.batch
            for k in range(reps):
                drive[:, k * n : (k + 1) * n].copy_(cached.drive)
        else:
            drive.zero_()
            for term in plan.const_terms:
                for dst, a, b, _k in term.dsts:
                    if term.src == BIAS:
                        drive[rows[dst]].add_(term.matrix[a:b])  # (n, 1): the same for every sample
                    else:
                        drive[rows[dst]].addmm_(term.matrix[a:b], s[term.src].T)
            self._keep(plan, drive=drive.clone())
        for g, (beta, grad) in nudge.currents.items():
            drive[rows[g]].sub_(grad.T, alpha=beta)
        elastic = nudge.elastic
        dt = self._step_dt(plan, key)
        # one step as a flat list of bound calls: the workspace's products, the elastic pulls,
        # then gain and clamp (the activation) over all groups
        pre = list(ws.products)
        for g, (beta, target) in elastic.items():
            r = rows[g]
            pre.append(partial(new[r].add_, (beta * target).T.contiguous()))
            pre.append(partial(new[r].add_, state[r], alpha=-beta))
        stds: list[torch.Tensor] = []
        if noisy:
            noise_ops, stds = self._noise_ops(s, plan, ws, batch)
            pre += noise_ops
        if not act.hard:
            pre.append(partial(act.rho_, new, gain))
        else:
            if gain != 1.0:
                pre.append(partial(new.mul_, gain))
            pre.append(partial(new.clamp_, 0.0, 1.0))
        relax = partial(state.lerp_, new, dt)
        step_ops = [*pre, relax]
        graphed = self.cuda_graphs and state.is_cuda and not noisy and not elastic
        if graphed:  # the step reads dt from the device, so one capture serves every dt
            if ws.dt is None:
                ws.dt = torch.empty((), device=state.device)
            ws.dt.fill_(dt)
            graph_ops = [*pre, partial(state.lerp_, new, ws.dt)]
        # the steps that check convergence (every `check_every`; with tol = 0 only the last)
        # or record the trace; the steps between them run the flat list alone
        last = budget.max_steps
        every = budget.check_every if budget.tol > 0 or noisy else last
        marks = sorted({*range(every, last, every), *(range(trace, last, trace) if trace else ()), last})
        trace_steps: list[int] = []
        traces: dict[str, list[torch.Tensor]] = {g: [] for g in plan.free} if trace else {}

        def record(step: int) -> None:
            trace_steps.append(step)
            for g in plan.free:
                traces[g].append(state[rows[g]].T.clone())

        if trace:
            record(0)
        residual, step, floor = float("inf"), 0, 0.0
        for mark in marks:
            if not (graphed and mark - step - 1 > 1 and self._graph_steps(ws, graph_ops, mark - step - 1)):
                for _ in range(mark - step - 1):
                    for op in step_ops:
                        op()
            for op in pre:
                op()
            checked = mark % every == 0 or mark == last
            if checked:
                residual = float((new - state).abs_().max())
                if stds:
                    floor = 6.0 * gain * float(stds[0].max())
            relax()
            step = mark
            if trace and mark % trace == 0:
                record(mark)
            if checked and residual <= budget.tol + floor:
                break
        if trace and trace_steps[-1] != step:
            record(step)
        # the final states out of the workspace (the next settle reuses it) in one copy of the
        # (nodes, batch) buffer; each group's states are a (batch, n) view of it, batch-major in
        # memory as the buffer is (no transposing copy: an `init` or a product takes them as
        # they are)
        final = state.clone()
        for g in plan.free:
            s[g] = final[rows[g]].T
        cost = self._account(plan, s, ws, step, dt, batch)
        energy: torch.Tensor | Callable[[], torch.Tensor] | None = None
        if not trace:
            if plan.const_unit:
                energy = self._later_energy(s, plan, gain, nudge, batch)
            else:
                energy = self._later_pair_energy(s, plan, nudge)
        products = self._const_products(s, plan) if energy is None and (trace or not plan.const_unit) else {}
        if energy is None:
            energy = (
                ws.energy(0.5 / gain, elastic, act)
                if plan.const_unit
                else self._energy(s, plan, nudge, products)
            )
        stacked = {g: torch.stack(traces[g]) for g in plan.free} if trace else {}
        outcome = (step, residual <= budget.tol + floor, residual)
        return self._result(s, plan, nudge, products, outcome, energy, cost, trace_steps, stacked)

    @staticmethod
    def _graph_steps(ws: _Workspace, ops: list[Callable[[], object]], n: int) -> bool:
        """`n` steps of `ops` (the workspace's in-place calls: products, activation, the
        relaxation reading ``ws.dt``) as one CUDA graph replay: a settle on a GPU is bound by
        launching its small kernels one by one (about 5 per step), and a replay launches them
        all at once. Captured the first time per (n, calls per step) and kept with the
        workspace; the calls write into the workspace's buffers and read the plan's matrices,
        which writes refresh in place, so a replay computes what the eager loop would. The
        capture is preceded by one warm-up step on a side stream (CUDA libraries allocate
        their workspaces there, as capture requires), whose change of the states is undone.
        False where the capture failed (warned once): the caller runs the steps call by call."""
        key = (n, len(ops))
        if key not in ws.graphs:
            ws.graphs[key] = _capture(ws.state, ops, n)
        graph = ws.graphs[key]
        if graph is not None:
            graph.replay()
        return graph is not None

    def _noise_ops(
        self, s: dict[str, torch.Tensor], plan: _Plan, ws: _Workspace, batch: int
    ) -> tuple[list[Callable[[], object]], list[torch.Tensor]]:
        """The noise of one analog step as calls on preallocated buffers, and the buffer of
        the per-sample standard deviations ((noisy groups, batch), valid after the step's
        noise: for the noise floor). Per noisy free group g, ``var_g = const_g + sum_src k
        |s_src|^2`` over its free sources: for all groups at once one square of the states
        and one product ``const + K @ s^2`` (K: the coefficients k on the sources' rows);
        then ``new_g += sqrt(var_g) * N(0, 1)`` with a window of the pool."""
        node_var = self.board.preset.periphery.node_noise**2
        rows, state, new = plan.rows, ws.state, ws.new
        assert new is not None
        dev = state.device
        entry, reps = self._current  # the constant part depends on the clamps only
        if entry is not None and entry.plan is plan and entry.noise_var is not None:
            const = {g: v if reps == 1 else torch.cat([v] * reps, 1) for g, v in entry.noise_var.items()}
        else:
            const = {g: torch.full((1, batch), node_var, device=dev) for g in plan.free}
            for term in plan.const_terms:
                for dst, _a, _b, k in term.dsts:
                    if k:
                        const[dst] += term.noise_var(s[term.src], k).T
            if entry is not None and entry.plan is plan and reps == 1:
                entry.noise_var = const
        coeff = {g: torch.zeros(1, plan.n_free, device=dev) for g in plan.free}
        for term in plan.dyn_terms:
            for dst, _a, _b, k in term.dsts:
                if k:
                    coeff[dst][:, rows[term.src]] += k
        noisy = [g for g in plan.free if bool(coeff[g].any()) or bool(const[g].max() > 0)]
        if not noisy:
            return [], []
        c = torch.cat([const[g] for g in noisy])  # (groups, batch)
        kmat = torch.cat([coeff[g] for g in noisy])  # (groups, nodes)
        sq = torch.empty_like(state)
        std = torch.empty(len(noisy), batch, device=dev)
        pool = self._pool(batch * max(rows[g].stop - rows[g].start for g in noisy))
        ops: list[Callable[[], object]] = [
            partial(torch.mul, state, state, out=sq),
            partial(torch.addmm, c, kmat, sq, out=std),
            std.sqrt_,
        ]
        for i, g in enumerate(noisy):
            r = rows[g]
            ops.append(partial(_add_noise, new[r], std[i : i + 1], pool, r.stop - r.start, batch))
        return ops, [std]

    def _pool(self, size: int) -> NoisePool:
        """The engine's noise pool, with windows of at least `size` values (this settle's
        largest), `size` values of it drawn anew for this settle."""
        pool = self._noise_pool
        if pool is None or pool.block < size:
            pool = self._noise_pool = NoisePool(self.board.noise, size, self.board.device)
        else:
            pool.refresh(size)
        return pool

    def _dac_step(self, x: torch.Tensor, channel: int, peaks: list[torch.Tensor]) -> torch.Tensor:
        """`Board._dac` inside a settle step: the same conversion, with the safety check's
        peak |output| kept on the device (`peaks`) and checked once after the settle, so the
        step does not wait for the device."""
        per = self.board.preset.periphery
        lo, hi = per.state_range
        y = quantize(self.board.dac_errors.apply(x, channel), per.dac_bits, lo, hi)
        if y.numel():
            peaks.append(y.abs().max())
        return y

    def _noise_floor(self, var: dict[str, torch.Tensor], mvm_mode: bool, gain: float) -> float:
        """The step-to-step change of the node states that noise and quantisation alone cause
        at equilibrium: a settle counts as converged when its residual is within `tol` of it.
        Six standard deviations: the residual is a maximum over every node of the batch."""
        sigma = float(torch.stack([v.max() for v in var.values()]).max()) ** 0.5 if var else 0.0
        floor = 6.0 * gain * sigma
        if mvm_mode:
            per = self.board.preset.periphery
            floor += gain * (lsb(per.adc_bits, 2 * per.mvm_range) if per.adc_bits else 0.0)
            floor += lsb(per.dac_bits, per.state_range[1] - per.state_range[0]) if per.dac_bits else 0.0
        return floor

    def _trace_energy(
        self,
        s: dict[str, torch.Tensor],
        stacked: dict[str, torch.Tensor],
        plan: _Plan,
        nudge: SettleNudge,
        products: dict[int, tuple[torch.Tensor, bool]],
    ) -> torch.Tensor:
        """Energies (T, B) of the recorded states, in one batched evaluation after the settle:
        the clamped groups, products and nudges are repeated over the T records."""
        t = next(iter(stacked.values())).shape[0] if stacked else 1

        def rep(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.repeat(t, 1)

        flat = {g: rep(v) for g, v in s.items() if g not in stacked}
        flat.update({g: v.reshape(-1, v.shape[-1]) for g, v in stacked.items()})
        prods = {i: (rep(p), tr) for i, (p, tr) in products.items()}
        return self._energy(flat, plan, nudge.repeated(t), prods).reshape(t, -1)  # type: ignore[arg-type]

    def _settle_power(self, plan: _Plan, s: dict[str, torch.Tensor], ws: _Workspace | None = None) -> float:
        """Array power (W, summed over the batch) at the present node voltages: every line
        driven at its node voltage against virtual ground, sum_ij (G+ + G-) V^2. With the
        settle's `_Workspace` the free groups' lines take one product; the clamped groups'
        share is kept with the cached constant drive (`_ClampCache.line_power`), since it
        depends on the clamps and the weights only."""
        batch = next(iter(s.values())).shape[0]
        total = batch * plan.bias_conductance
        done: dict[str, slice] = {}
        if ws is not None and plan.free_lines is not None:
            total += float(ws.state.square().sum(1) @ plan.free_lines)
            done = ws.rows
        entry, reps = self._current
        if entry is None or entry.plan is not plan:
            entry, reps = None, 1
        clamped = 0.0
        for group, gsum in plan.line_conductance.items():
            if group == BIAS or group in done:
                continue
            if entry is None or group not in entry.raw:
                total += float(s[group].square().sum(0) @ gsum)
            elif entry.line_power is None:  # the clamped rows once, repeated `reps` times
                clamped += float(s[group][: entry.batch].square().sum(0) @ gsum)
        if entry is not None:
            if entry.line_power is None:
                entry.line_power = clamped
            total += reps * entry.line_power
        return total * self.board.preset.periphery.v_read**2
