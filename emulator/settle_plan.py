"""Settle plans: what a settle of the emulated board needs, built once per clamp set and
refreshed in place after writes (`SettlePlanner`), and the buffers of one batch size
(`Workspace`).

A `Plan` holds the settle's matmul sources as `Term` s (views of the tiles' cached weights,
or scaled, masked or joined copies with the calls that recompute them in place), the energy
pairs, the line conductances (for the array's power) and a bound on the free-to-free
coupling norm, from which `SettlePlanner.step_dt` chooses an analog settle's integration
step. The settle loops themselves are in `emulator.settle`, the energy and power in
`emulator.settle_energy`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from itertools import pairwise
from typing import TYPE_CHECKING, NamedTuple

import torch

from drivers.activation import HARD_SIGMOID, Activation
from drivers.numerics import power_norm
from drivers.topology import BIAS

if TYPE_CHECKING:
    from emulator.array import TileArray
    from emulator.board import Board
    from emulator.settle_script import Product


def _read_noise_k(tile: TileArray, w_max: float) -> float:
    """A line's read-noise variance coefficient (`Term.noise_var`) for a coupling of `w_max` on
    `tile`: ``2 (w_max sigma / span)^2`` (two devices per cell), sigma the tile's one read-noise
    figure in its present state (`TileArray.read_noise_rms`: the model's `read_noise`, or pcm's
    state-dependent RMS, as an mvm takes it) times what its wires let through
    (`TileArray.noise_atten`); 0 where the devices read without noise."""
    m = tile.model
    if m.read_noise == 0:
        return 0.0
    return 2 * (w_max * (tile.read_noise_rms() * tile.noise_atten) / (m.g_max - m.g_min)) ** 2


def _renoise(term: Term, i: int, tile: TileArray, w_max: float) -> None:
    """Destination `i` of `term`: its read-noise coefficient at the tile's present state
    (`_read_noise_k`), after a write changed it."""
    dst, a, b, _k = term.dsts[i]
    term.dsts[i] = (dst, a, b, _read_noise_k(tile, w_max))


class _Piece(NamedTuple):
    """One block of a coupling as a matmul source of a destination group, while a plan is built:
    its tile and the coupling's w_max give its read-noise coefficient (`_read_noise_k`)."""

    dst: str
    block: torch.Tensor
    noise_k: float
    pair: tuple[int, bool]  # (index into Plan.energy_pairs, block is transposed)
    tile: TileArray
    w_max: float


@dataclass
class Term:
    """One matmul source in the settle: ``s_src @ matrix`` split over destination groups."""

    src: str
    matrix: torch.Tensor  # (sum of dst sizes, n_src): F.linear layout, the fastest for thin outputs
    dsts: list[tuple[str, int, int, float]]  # (group, start, stop, read-noise variance coefficient)
    noisy: bool  # any coefficient > 0
    pairs: list[tuple[int, bool]]  # per dst: (index into Plan.energy_pairs, block is transposed)

    def noise_var(self, x: torch.Tensor, k: float) -> torch.Tensor:
        """Read-noise variance (batch, 1) of one output line of ``x @ matrix``: each of the two
        devices per cell reads with std sigma, so var = 2 sigma^2 (w_max / span)^2 sum_i x_i^2."""
        return x.pow(2).sum(1, keepdim=True) * k


@dataclass
class Plan:
    """What a settle needs, built once per (topology, clamp set, weights version)."""

    free: list[str]
    const_terms: list[Term]  # sources that are clamped (incl. bias)
    dyn_terms: list[Term]  # sources that are free
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
    # (n_free, n_free): every free-to-free coupling as one contiguous matrix in the buffer's row
    # order, where each free source drives every free group (`joined_coupling`), else None
    coupling: torch.Tensor | None = None

    # in-place recomputations of the plan's tensors that are not views of the tiles' weights
    # (scaled or masked copies, joined matrices), in the order they depend on each other
    refreshers: list[Callable[[], object]] = field(default_factory=list)
    epochs: tuple[int, ...] = ()  # the tiles' `weights_epoch` the plan's tensors hold
    workspaces: dict[int, Workspace] = field(default_factory=dict)  # per batch size
    # (epochs, a copy of the plan's energy tensors at those weights) for deferred energies
    frozen: tuple[tuple[int, ...], Callable[[], Plan]] | None = None
    # what `settle_energy.frozen_plan` copies: one tensor per storage, each energy tensor's place in them
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


def copy_joined(out: torch.Tensor, blocks: list[torch.Tensor]) -> None:
    """Refresh a source's joined matrix ``cat(blocks, 1).T`` in place."""
    out.copy_(torch.cat(blocks, dim=1).T)


def joined_coupling(plan: Plan) -> tuple[torch.Tensor, Callable[[], object]] | None:
    """The free-to-free couplings as one contiguous (n_free, n_free) matrix, columns in the
    buffer's row order, and the call that refreshes it in place; None unless the free sources
    cover the buffer's rows one after another and each drives every free group in row order
    (a dense tile with its clamped groups set apart).

    A noise-free settle step is then one ``addmm`` over all free nodes instead of one per
    source: on the main job's network (132 free nodes, batch 32, sources of 64, 64 and 4
    nodes) 8.4 against 11.1 us (2026-12-05, Intel Xeon, one torch thread), the joined call
    running the AVX-512 GEMM near its peak. Its sums run over the sources in another order,
    so its numbers equal the source-by-source ones to float rounding, not bit for bit."""
    rows = plan.rows
    terms = sorted(plan.dyn_terms, key=lambda t: rows[t.src].start)
    if len(terms) < 2:
        return None
    spans = [rows[t.src] for t in terms]
    if spans[0].start != 0 or spans[-1].stop != plan.n_free:
        return None
    if any(a.stop != b.start for a, b in pairwise(spans)):
        return None
    order = [(g, rows[g].start, rows[g].stop) for g in plan.free]
    if any([(dst, a, b) for dst, a, b, _k in t.dsts] != order for t in terms):
        return None
    blocks = [t.matrix for t in terms]
    joined = torch.cat(blocks, dim=1).contiguous()
    return joined, partial(torch.cat, blocks, 1, out=joined)


@dataclass
class Workspace:
    """The free states of an analog settle as one (nodes, batch) buffer, one row block per
    free group (`rows`), with the constant drive (clamped products, bias, injected currents)
    in the same layout and, per free group, its rows and the (matrix (n_dst, n_src), source
    state rows) pairs that drive it. A noise-free settle also keeps `new` (the next states)
    and the step's products bound to the buffers (`SettleEngine._workspace`)."""

    state: torch.Tensor
    drive: torch.Tensor
    rows: dict[str, slice]
    links: list[tuple[slice, list[tuple[torch.Tensor, torch.Tensor]]]]
    new: torch.Tensor | None = None
    products: list[Callable[[], object]] = field(default_factory=list)
    steps: list[Product] = field(default_factory=list)  # `products` as data, for the compiled loop
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
        """The energy of `emulator.settle_energy.energy` in fewer operations, for analog settles whose clamped
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


def group_links(
    plan: Plan, state: torch.Tensor
) -> list[tuple[slice, list[tuple[torch.Tensor, torch.Tensor]]]]:
    """Per free group: its rows and the (matrix (n_dst, n_src), source rows of `state`) pairs
    that drive it (the plan's (n_src, n_dst) blocks, transposed back: contiguous rows)."""
    rows = plan.rows
    return [(rows[g], [(m.T, state[rows[src]]) for src, m in plan.by_dst[g]]) for g in plan.free]


class SettlePlanner:
    """The plans of one `Board`'s settles, per clamp set, and the coupling-norm bookkeeping
    of the integration step. It reads the board's topology, tiles and clock."""

    def __init__(self, board: Board) -> None:
        self.board = board
        self.plans: dict[frozenset[str], tuple[tuple[torch.Tensor, ...], Plan]] = {}
        # per clamp set: the last coupling-norm figure and the free-to-free matrices it was for
        self._norm_refs: dict[frozenset[str], tuple[float, list[torch.Tensor]]] = {}

    def clear(self) -> None:
        """Forget the plans (a new topology, or a reset)."""
        self.plans.clear()

    def plan(self, clamped: frozenset[str]) -> Plan:
        """The settle plan for a clamp set. Its tensors are views of the tiles' cached weights,
        which the tiles update in place (`TileArray.weights`): after a write (a new
        `weights_epoch`) the plan is refreshed, not rebuilt (its copies recomputed in place,
        line conductances and the coupling-norm bound taken again); a tile that hands back
        another tensor (a new topology) makes a new plan."""
        assert self.board.topology is not None
        tiles = [self.board._tiles[c.tile] for c in self.board.topology.couplings]
        sources = tuple(t.weights(self.board.clock) for t in tiles)
        epochs = tuple(t.weights_epoch for t in tiles)
        cached = self.plans.get(clamped)
        if cached is not None and all(a is b for a, b in zip(cached[0], sources, strict=True)):
            plan = cached[1]
            if plan.epochs != epochs:
                for refresh in plan.refreshers:
                    refresh()
                plan.set_lines(self.line_conductance())
                plan.norm_fresh = False
                plan.coupling_norm = self._norm_bound(clamped, plan)
                plan.epochs = epochs
            return plan
        topo = self.board.topology
        pieces: dict[str, list[_Piece]] = {}
        energy_pairs: list[tuple[str, str, torch.Tensor, float]] = []
        refreshers: list[Callable[[], object]] = []
        for c in topo.couplings:
            w = self.board._tiles[c.tile].weights(self.board.clock)
            if c.w_max != 1.0:
                scaled = w * c.w_max
                refreshers.append(partial(torch.mul, w, c.w_max, out=scaled))
                w = scaled
            tile = self.board._tiles[c.tile]
            # each of the two devices of a cell reads with the tile's read-noise figure, which
            # the wires attenuate as they attenuate the signal (`_read_noise_k`)
            noise_k = _read_noise_k(tile, c.w_max)
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
                        pair = (len(energy_pairs), False)
                        pieces.setdefault(rg, []).append(_Piece(cg, block, noise_k, pair, tile, c.w_max))
                    if c.kind == "bipartite" and rg != BIAS and rg not in clamped:
                        pair = (len(energy_pairs), True)
                        pieces.setdefault(cg, []).append(_Piece(rg, block.T, noise_k, pair, tile, c.w_max))
                    factor = 0.5 if (c.kind == "dense" and rg != BIAS) else 1.0
                    energy_pairs.append((rg, cg, block, factor))
                    c0 += cn
                r0 += rn
        const_terms, dyn_terms = [], []
        for src, items in pieces.items():
            blocks = [item.block for item in items]
            if len(blocks) == 1:
                matrix = blocks[0].T
            else:
                matrix = torch.cat(blocks, dim=1).T.contiguous()
                refreshers.append(partial(copy_joined, matrix, blocks))
            dsts, start = [], 0
            for item in items:
                dsts.append((item.dst, start, start + item.block.shape[1], item.noise_k))
                start += item.block.shape[1]
            noisy = any(item.noise_k > 0 for item in items)
            term = Term(src, matrix, dsts, noisy, [item.pair for item in items])
            for i, item in enumerate(items):
                mod = item.tile.model
                # the figure changes with a write where the wires or the devices' state set it
                if mod.read_noise > 0 and (mod.wire_resistance > 0 or mod.statistics != "constant"):
                    refreshers.append(partial(_renoise, term, i, item.tile, item.w_max))
            (const_terms if (src == BIAS or src in clamped) else dyn_terms).append(term)
        free = [g for g in topo.groups if g not in clamped]
        plan = Plan(free, const_terms, dyn_terms, energy_pairs, self.line_conductance())
        plan.refreshers, plan.epochs = refreshers, epochs
        plan.coupling_norm = self._norm_bound(clamped, plan)
        plan.by_dst = {g: [] for g in free}
        for g in free:
            plan.rows[g] = slice(plan.n_free, plan.n_free + topo.groups[g])
            plan.n_free += topo.groups[g]
        for term in dyn_terms:
            for dst, a, b, _k in term.dsts:
                plan.by_dst[dst].append((term.src, term.matrix[a:b].T))
        coupling = joined_coupling(plan)
        if coupling is not None:  # refreshed after the sources' own matrices
            plan.coupling = coupling[0]
            plan.refreshers.append(coupling[1])
        self.plans[clamped] = (sources, plan)
        return plan

    def _norm_bound(self, clamped: frozenset[str], plan: Plan) -> float:
        """An upper bound on the coupling norm of a new plan without a power iteration: the
        last figure for this clamp set plus the Frobenius norm of the change of the
        free-to-free matrices since then (``|A + D| <= |A| + |D|_F``), with the same 10 %
        margin. Training changes weights by little per step, so this stays tight for many
        steps; `step_dt` runs the power iteration (`_coupling_norm`) only when the bound would
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

    def _fresh_norm(self, clamped: frozenset[str], plan: Plan) -> float:
        """Power-iterate the plan's coupling norm and make it the reference later bounds
        start from."""
        plan.coupling_norm = self._coupling_norm(plan)
        plan.norm_fresh = True
        # copies: the plan's matrices are views that later writes update in place
        self._norm_refs[clamped] = (plan.coupling_norm, [t.matrix.clone() for t in plan.dyn_terms])
        return plan.coupling_norm

    def _coupling_norm(self, plan: Plan) -> float:
        """Power-iteration estimate of the norm of the map the free groups apply to each other
        (their drive on one another), with a 10 % margin. It bounds how fast an analog settle
        may be integrated: see `step_dt`. The map is assembled as one matrix, so each
        iteration is one matrix-vector product; the iteration starts from a fixed random
        vector and stops once the estimate has settled."""
        if not plan.dyn_terms:
            return 0.0
        op = self.coupling_operator(plan)
        n = op.shape[0]
        # the same start vector every time: the estimate (and the settle step it sets) is a
        # function of the weights alone, not of the settles this process ran before, so a run
        # resumed in a fresh process settles as the uninterrupted run did
        gen = torch.Generator(device=self.board.device).manual_seed(0)
        v = torch.randn(1, n, generator=gen, device=self.board.device)
        # at least 4 iterations; more while the estimate still rises by over 1 % (a slow
        # spectral gap)
        return power_norm(lambda x: x @ op, v, iters=40, margin=1.1, stop=1.01, eps=1e-30)[0]

    def coupling_operator(self, plan: Plan) -> torch.Tensor:
        """The map the free groups apply to each other as one (n, n) matrix over the free
        nodes in the plan's order, in the row-vector convention (their drive on each other is
        ``s_free @ op``): source rows, destination columns."""
        assert self.board.topology is not None
        sizes = self.board.topology.groups
        offset, n = {}, 0
        for g in plan.free:
            offset[g] = n
            n += sizes[g]
        op = torch.zeros(n, n, device=self.board.device)
        for term in plan.dyn_terms:
            r0 = offset[term.src]
            # destinations whose rows follow on in the term's matrix and in the free order go
            # in as one block (a dense tile's source: all of them, one call)
            spans: list[list[int]] = []  # [first column, first matrix row, end matrix row]
            for dst, a, b, _k in term.dsts:
                if spans and spans[-1][2] == a and spans[-1][0] + (a - spans[-1][1]) == offset[dst]:
                    spans[-1][2] = b
                else:
                    spans.append([offset[dst], a, b])
            for c0, a, b in spans:
                op[r0 : r0 + sizes[term.src], c0 : c0 + b - a] += term.matrix[a:b].T
        return op

    def line_conductance(self) -> dict[str, torch.Tensor]:
        """Per node group, the total conductance its lines see over all tiles (for power)."""
        assert self.board.topology is not None
        topo = self.board.topology
        out: dict[str, torch.Tensor] = {}
        for c in topo.couplings:
            per_row, per_col = self.board._tiles[c.tile].line_sums(self.board.clock)
            sides = [(c.rows, per_row)] + ([(c.cols, per_col)] if c.kind == "bipartite" else [])
            for groups, total in sides:
                sizes = [topo.size(grp) for grp in groups]
                parts = torch.split(total, sizes) if len(groups) > 1 else (total,)
                for grp, part in zip(groups, parts, strict=True):
                    out[grp] = part if grp not in out else out[grp] + part
        return out

    def step_sizes(self, plan: Plan, key: frozenset[str], checked: bool) -> tuple[float, float | None]:
        """An analog settle's two integration steps: the first, and the one it falls back to
        once `drivers.topology.STALL_CHECKS` checks in a row have made no new smallest residual
        (None: `step_dt`, computed when the settle falls back; after a write it may need a
        power iteration, which most settles then never pay).

        The fallback is `step_dt`, small enough for energy descent from any state. That bound
        takes every node at full gain; the states a settle visits have most nodes on a rail
        (gain 0), so a larger step usually converges as well, in fewer steps: the main job's
        decoding settles, capped at 0.39-0.5, converge at 0.8 in half the steps. A settle
        that checks its convergence before its last step (`checked`) therefore starts at
        budget.dt and falls back where the residual stops making progress (an overshooting
        step oscillates or grows); one that does not check runs `step_dt` throughout. Both
        steps reach fixed points of the same network; where it has several, a larger step may
        reach another one (tests/test_settle_step.py)."""
        assert self.board.topology is not None
        if checked:
            return self.board.topology.budget.dt, None
        safe = self.step_dt(plan, key)
        return safe, safe

    def step_dt(self, plan: Plan, key: frozenset[str]) -> float:
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
