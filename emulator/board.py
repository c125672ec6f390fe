"""The emulated board: tiles, node circuits, periphery, a simulated clock and a safety monitor.

Works on torch tensors on one torch device (CPU or CUDA, same code). Everything random
comes from generators seeded by the board's seed, so a board is deterministic per seed:
the fabrication draws of physical tile k come from ``seed`` and ``k`` alone (the same chip
every time), the noise of reads, writes and settles from one noise stream.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F

from drivers import seeds
from drivers.base import Identity, Limits
from drivers.checks import check_batch, check_settings, check_topology, check_verify, check_wait
from drivers.errors import ConfigurationError, LimitViolation
from drivers.scalars import INT32_MAX, as_int
from drivers.topology import BIAS, Coupling, Topology
from emulator.array import TileArray
from emulator.periphery import ChannelErrors, quantize
from emulator.presets import BoardPreset


def _lsb(bits: int | None, span: float) -> float:
    return span / ((1 << bits) - 1) if bits else span / 255


_COUNT_DTYPES = frozenset(
    {torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64}
    | {torch.float16, torch.bfloat16, torch.float32, torch.float64}
)


def _peak_count(counts: torch.Tensor) -> int | float:
    """Largest |count| of a tensor of whole pulse counts, from its min and max as Python
    numbers (``abs`` of the most negative int32 stays negative); other dtypes are refused."""
    if not isinstance(counts, torch.Tensor):
        raise ConfigurationError(f"pulse counts must be a tensor, got {type(counts).__name__}")
    if counts.dtype not in _COUNT_DTYPES:
        raise ConfigurationError(f"pulse counts must be whole numbers, got dtype {counts.dtype}")
    if not counts.numel():
        return 0
    lo_t, hi_t = torch.aminmax(counts)
    if counts.is_floating_point():
        lo, hi = float(lo_t), float(hi_t)
        if not (math.isfinite(lo) and math.isfinite(hi)) or not bool(torch.equal(counts, counts.floor())):
            raise ConfigurationError("pulse counts must be whole numbers")
        return max(-lo, hi)
    return max(-int(lo_t), int(hi_t))


@dataclass
class SafetyMonitor:
    """Counts refused requests and, as a last line of defence, out-of-limit conditions that
    reached the array (which the checks in front of it should make impossible)."""

    refused: int = 0
    violations: int = 0

    def refuse(self, exc: LimitViolation) -> LimitViolation:
        self.refused += 1
        return exc


class NoisePool:
    """Standard normal noise for the steps of one settle.

    Fresh ``torch.randn`` for every node at every step would cost more than the settle's
    matmuls; instead each settle draws `blocks` fresh blocks and every request reads a
    window at a random offset. Every value is exactly N(0, 1) and pools are independent
    across settles; within a settle, steps reuse pool values at random shifts (the
    noise-table technique of hardware noise generators), which leaves no correlation
    between a node's noise at two steps unless two offsets coincide (probability
    1 / (blocks * size) per pair)."""

    def __init__(self, gen: torch.Generator, size: int, device: torch.device, blocks: int = 8) -> None:
        self.size = size * blocks
        self.values = torch.randn(self.size + size, generator=gen, device=gen.device).to(device)
        seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device))
        self.rng = random.Random(seed)

    def draw(self, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        n = 1
        for d in shape:
            n *= d
        offset = self.rng.randrange(self.size)
        return self.values[offset : offset + n].view(shape)


@dataclass
class SettleResult:
    states: dict[str, torch.Tensor]
    steps: int
    converged: bool
    residual: float
    energy: torch.Tensor
    settle_time_s: float
    energy_j: float
    trace: dict[str, torch.Tensor] | None = None


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

    def energy(self, half_inv_gain: float, elastic: dict[str, tuple[float, torch.Tensor]]) -> torch.Tensor:
        """The energy of `Board._energy` in fewer operations, for analog settles whose clamped
        sources all enter with factor 1: the constant drive gives those terms and the nudge
        currents, and the free-to-free terms are half of ``sum_g s_g . drive_g`` (each
        bipartite pair drives both ways; a dense tile's pairs carry the factor 1/2), so
        ``E = sum_g s_g . (s_g / 2gain - const_g - drive_g / 2)``, one product over all free
        nodes."""
        t = self.state * half_inv_gain
        t.sub_(self.drive)
        for r, sources in self.links:
            for m, x in sources:
                t[r].addmm_(m, x, alpha=-0.5)
        e = torch.linalg.vecdot(t, self.state, dim=0)
        for g, (beta, target) in elastic.items():
            e = e + 0.5 * beta * (self.state[self.rows[g]].T - target).square().sum(1)
        return e


def _links(plan: _Plan, state: torch.Tensor) -> list[tuple[slice, list[tuple[torch.Tensor, torch.Tensor]]]]:
    """Per free group: its rows and the (matrix (n_dst, n_src), source rows of `state`) pairs
    that drive it (the plan's (n_src, n_dst) blocks, transposed back: contiguous rows)."""
    rows = plan.rows
    return [(rows[g], [(m.T, state[rows[src]]) for src, m in plan.by_dst[g]]) for g in plan.free]


class Board:
    def __init__(self, preset: BoardPreset, seed: int = 0, device: str | torch.device = "cpu") -> None:
        self.preset = preset
        self.seed = as_int("board seed", seed, 0, (1 << 128) - 1)
        self.device = torch.device(device)
        self.clock = 0.0
        self.safety = SafetyMonitor()
        self.topology: Topology | None = None
        self._groups: dict[str, int] = {}  # the configured groups, as they were at configure
        self._physical: dict[int, TileArray] = {}
        self._tiles: dict[str, TileArray] = {}
        self._plans: dict[frozenset[str], tuple[tuple[torch.Tensor, ...], _Plan]] = {}
        self._power_vectors: dict[frozenset[str], torch.Tensor] = {}
        # per clamp set: the last coupling-norm figure and the free-to-free matrices it was for
        self._norm_refs: dict[frozenset[str], tuple[float, list[torch.Tensor]]] = {}
        self.noise = seeds.torch_generator(self.seed, "board.noise", device=self.device)
        per = preset.periphery
        truth = seeds.torch_generator(self.seed, "board.truth", device=self.device)
        lo, hi = per.state_range
        self.dac_errors = ChannelErrors.draw(
            per.channels, per.gain_error, per.offset_error * _lsb(per.dac_bits, hi - lo), truth, self.device
        )
        self.adc_errors = ChannelErrors.draw(
            per.channels, per.gain_error, per.offset_error * _lsb(per.adc_bits, hi - lo), truth, self.device
        )
        self.mvm_errors = ChannelErrors.draw(
            per.channels,
            per.gain_error,
            per.offset_error * _lsb(per.adc_bits, 2 * per.mvm_range),
            truth,
            self.device,
        )
        self.energy_j = 0.0
        self.mvm_calls = 0  # `mvm` operations run since power-on (the meter's count)

    # ---------------------------------------------------------------- configuration

    @property
    def limits(self) -> Limits:
        per, m = self.preset.periphery, self.preset.device
        return Limits(
            v_read=per.v_read,
            v_read_max=per.v_read_max,
            g_min=m.g_min,
            g_max=m.g_max,
            dac_bits=per.dac_bits,
            adc_bits=per.adc_bits,
            adc_range=per.state_range,
            tile_rows_max=per.tile_rows_max,
            tile_cols_max=per.tile_cols_max,
            max_tiles=per.max_tiles,
            max_settle_steps=per.max_settle_steps,
            max_pulses=per.max_pulses,
            settle_step_s=per.settle_step_s,
        )

    @property
    def identity(self) -> Identity:
        from importlib.metadata import PackageNotFoundError, version

        try:
            firmware = version("xbar-hil")
        except PackageNotFoundError:
            firmware = "dev"
        return Identity("xbar-hil", f"emulator-{self.preset.name}", f"EMU-{self.seed:08d}", firmware)

    def configure(self, topology: Topology) -> None:
        old = self.topology
        if old is not None and topology.couplings is old.couplings and topology.groups == self._groups:
            # the same network with another budget, gain or mode (an EBBlock switching between
            # its free and nudge budgets): tiles, channels and plans stay as they are
            try:
                check_settings(topology, self.limits)
            except LimitViolation as exc:
                raise self.safety.refuse(exc) from None
            self.topology = topology
            return
        try:
            check_topology(topology, self.limits)
        except LimitViolation as exc:
            raise self.safety.refuse(exc) from None
        total = sum(topology.groups.values())
        if total > self.preset.periphery.channels:
            raise ConfigurationError(
                f"topology has {total} nodes; the board has {self.preset.periphery.channels} channels"
            )
        tiles: dict[str, TileArray] = {}
        for k, c in enumerate(topology.couplings):
            shape = topology.tile_shape(c.tile)
            phys = self._physical.get(k)
            if phys is None or phys.shape != shape:
                fab = seeds.torch_generator(self.seed, "board.fabrication", k, device=self.device)
                phys = TileArray(shape[0], shape[1], self.preset.device, fab, self.device)
                self._physical[k] = phys
            tiles[c.tile] = phys
        if old is None or (old.groups, old.couplings) != (topology.groups, topology.couplings):
            self._plans.clear()  # a new budget, gain or mode keeps the plans: they do not depend on them
        self.topology = topology
        self._groups = dict(topology.groups)
        self._tiles = tiles
        offsets, start = {}, 0
        for g, n in topology.groups.items():
            offsets[g] = start
            start += n
        self._channel = offsets

    def tile(self, name: str) -> TileArray:
        if self.topology is None:
            raise ConfigurationError("the board has no topology yet; call configure(topology) first")
        try:
            return self._tiles[name]
        except KeyError:
            raise ConfigurationError(f"unknown tile {name!r}; known: {sorted(self._tiles)}") from None

    def reset(self) -> None:
        """Power-on state: configuration cleared. Conductances are non-volatile and stay."""
        self.topology = None
        self._tiles = {}
        self._plans.clear()

    def wait(self, seconds: float) -> None:
        try:
            seconds = check_wait(self.limits, seconds)
        except LimitViolation as exc:
            raise self.safety.refuse(exc) from None
        self.clock += seconds

    # ---------------------------------------------------------------- converters

    def _dac(self, x: torch.Tensor, channel: int) -> torch.Tensor:
        per = self.preset.periphery
        lo, hi = per.state_range
        y = quantize(self.dac_errors.apply(x, channel), per.dac_bits, lo, hi)
        if y.numel():
            y_lo, y_hi = torch.aminmax(y)
            if max(-float(y_lo), float(y_hi)) * per.v_read > per.v_read_max:
                self.safety.violations += 1
        return y

    def _adc_state(self, x: torch.Tensor, channel: int) -> torch.Tensor:
        per = self.preset.periphery
        lo, hi = per.state_range
        return quantize(self.adc_errors.apply(x, channel), per.adc_bits, lo, hi)

    def _adc_mvm(self, y: torch.Tensor) -> torch.Tensor:
        per = self.preset.periphery
        return quantize(self.mvm_errors.apply(y), per.adc_bits, -per.mvm_range, per.mvm_range)

    # ---------------------------------------------------------------- array operations

    def _weights(self, c: Coupling) -> torch.Tensor:
        """The coupling's weights; with ``w_max = 1`` the tile's cached tensor itself (which
        the tile updates in place: use it at once)."""
        w = self._tiles[c.tile].weights(self.clock)
        return w if c.w_max == 1.0 else w * c.w_max

    def program(
        self,
        name: str,
        g_plus: torch.Tensor,
        g_minus: torch.Tensor,
        *,
        verify: bool,
        tol: float | None,
        max_iters: int,
    ) -> dict[str, object]:
        tile = self.tile(name)
        try:
            tol, max_iters = check_verify(self.limits, tol, max_iters)
        except LimitViolation as exc:
            raise self.safety.refuse(exc) from None
        m = self.preset.device
        tol = 0.02 * (m.g_max - m.g_min) if tol is None else tol
        target = tile.stack_targets(g_plus, g_minus, "program")
        if verify:
            st = tile.program_verify(g_plus, g_minus, tol, max_iters, self.clock, self.noise)
            iterations, within = st.iterations, st.within_tol
        else:
            st = tile.write_stacked(target, self.clock, self.noise)
            iterations = 0
        self.clock += st.time_s
        self.energy_j += st.energy_j
        read = tile.read_stacked(self.clock, self.noise)
        residual = (read - target).abs_().max()
        if not verify:
            true = tile.state(self.clock)
            err = residual if true is read else (true - target).abs_().max()
            # every device within tol when the largest error is; else count them
            within = 1.0 if float(err) <= tol else float(((true - target).abs_() <= tol).float().mean())
        rp, rm = read[0], read[1]
        return {
            "g_plus": rp,
            "g_minus": rm,
            "iterations": iterations,
            "pulses": int(st.pulses),
            "residual_max": float(residual),
            "within_tol": float(within),
            "energy_j": float(st.energy_j),
            "time_s": float(st.time_s),
        }

    def pulse(self, name: str, counts_plus: torch.Tensor, counts_minus: torch.Tensor) -> dict[str, object]:
        tile = self.tile(name)
        bound = min(self.preset.periphery.max_pulses, INT32_MAX)
        peak = max(_peak_count(counts_plus), _peak_count(counts_minus))
        if peak > bound:
            raise self.safety.refuse(LimitViolation("pulses per device", float(peak), bound))
        st = tile.pulse(counts_plus, counts_minus, self.clock, self.noise)
        self.clock += st.time_s
        self.energy_j += st.energy_j
        return {"pulses": int(st.pulses), "energy_j": float(st.energy_j), "time_s": float(st.time_s)}

    def read_conductance(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        tile = self.tile(name)
        self.clock += self.preset.periphery.mvm_time_s
        return tile.read(self.clock, self.noise)

    def _check_batch(self, name: str, batch: int) -> None:
        try:
            check_batch(name, batch, self.limits)
        except LimitViolation as exc:
            raise self.safety.refuse(exc) from None

    def mvm(self, name: str, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        assert self.topology is not None
        self._check_batch(f"mvm input to {name!r}", int(x.shape[0]))
        c = self.topology.coupling(name)
        tile = self.tile(name)
        w = self._weights(c)
        xd = self._dac(x, 0)
        y = xd @ (w.T if transpose else w)
        scale = c.w_max * tile.mvm_noise_std(xd)  # (B,)
        if float(scale.abs().max()) > 0:
            y = y + scale[:, None] * torch.randn(y.shape, generator=self.noise, device=self.device)
        per = self.preset.periphery
        self.clock += per.mvm_time_s * x.shape[0]
        self.energy_j += self._read_energy(tile, xd, transpose) * per.mvm_time_s
        self.mvm_calls += 1
        return self._adc_mvm(y)

    def _read_energy(self, tile: TileArray, v: torch.Tensor, transpose: bool) -> float:
        """Joules per second of one read: sum_ij (G+ + G-) V_i^2 over the batch."""
        gp, gm = tile.conductances(self.clock)
        gsum = (gp + gm).sum(0 if transpose else 1)
        return float(((v * self.preset.periphery.v_read) ** 2 @ gsum).sum())

    # ---------------------------------------------------------------- settle

    def _plan(self, clamped: frozenset[str]) -> _Plan:
        """The settle plan for a clamp set. Its tensors are views of the tiles' cached weights,
        which the tiles update in place (`TileArray.weights`): after a write (a new
        `weights_epoch`) the plan is refreshed, not rebuilt (its copies recomputed in place,
        line conductances and the coupling-norm bound taken again); a tile that hands back
        another tensor (a new topology) makes a new plan."""
        assert self.topology is not None
        tiles = [self._tiles[c.tile] for c in self.topology.couplings]
        sources = tuple(t.weights(self.clock) for t in tiles)
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
        topo = self.topology
        pieces: dict[str, list[tuple[str, torch.Tensor, float, tuple[int, bool]]]] = {}
        energy_pairs: list[tuple[str, str, torch.Tensor, float]] = []
        refreshers: list[Callable[[], object]] = []
        for c in topo.couplings:
            w = self._tiles[c.tile].weights(self.clock)
            if c.w_max != 1.0:
                scaled = w * c.w_max
                refreshers.append(partial(torch.mul, w, c.w_max, out=scaled))
                w = scaled
            tile = self._tiles[c.tile]
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
                        mask = 1 - torch.eye(rn, device=self.device)
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
        assert self.topology is not None
        if not plan.dyn_terms:
            return 0.0
        sizes = self.topology.groups
        offset, n = {}, 0
        for g in plan.free:
            offset[g] = n
            n += sizes[g]
        op = torch.zeros(n, n, device=self.device)  # row-vector convention: drive = v @ op
        for term in plan.dyn_terms:
            r0 = offset[term.src]
            for dst, a, b, _k in term.dsts:
                c0 = offset[dst]
                op[r0 : r0 + sizes[term.src], c0 : c0 + b - a] += term.matrix[a:b].T
        key = frozenset(plan.free)
        v = self._power_vectors.get(key)
        if v is None or v.shape[1] != n:
            gen = torch.Generator(device=self.device).manual_seed(0)
            v = torch.randn(1, n, generator=gen, device=self.device)
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
        assert self.topology is not None
        topo = self.topology
        out: dict[str, torch.Tensor] = {}
        for c in topo.couplings:
            g = self._tiles[c.tile].state(self.clock)  # (2, rows, cols): G+ and G-
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
        nudge: dict[str, tuple[float, torch.Tensor | None, torch.Tensor | None]],
        products: dict[int, tuple[torch.Tensor, bool]],
    ) -> torch.Tensor:
        """Energy per sample, E = sum_free |s|^2 / (2 gain) - Phi(s) + nudge terms. `products`
        holds ``s_src @ block`` of the clamped sources, already computed by the settle."""
        assert self.topology is not None
        gain = self.topology.gain
        batch = next(iter(s.values())).shape[0]
        e = torch.zeros(batch, device=self.device)
        for g in plan.free:
            e = e + (s[g] ** 2).sum(1) / (2 * gain)
        for i, (rg, cg, block, factor) in enumerate(plan.energy_pairs):
            if i in products:
                product, transposed = products[i]  # s_rg @ block, or s_cg @ block.T
                e = e - factor * (product * (s[rg] if transposed else s[cg])).sum(1)
            else:
                e = e - factor * ((s[rg] @ block) * s[cg]).sum(1)
        for g, (beta, target, grad) in nudge.items():
            if target is not None:
                e = e + 0.5 * beta * ((s[g] - target) ** 2).sum(1)
            if grad is not None:
                e = e + beta * (grad * s[g]).sum(1)
        return e

    def settle(
        self,
        clamp: dict[str, torch.Tensor],
        nudge: dict[str, tuple[float, torch.Tensor | None, torch.Tensor | None]] | None = None,
        init: dict[str, torch.Tensor] | None = None,
        trace: int = 0,
    ) -> SettleResult:
        """Relax the network. `nudge` maps a group to (beta, target, grad); `trace` records
        every `trace` steps (0: no trace). Inputs were checked by the caller.

        `analog` mode integrates ds = dt (rho(u) - s) with the node circuits in continuous
        time: the clamped sources' products are computed once (fresh read noise is added every
        step) and the ADC digitises only the final states. `mvm` mode is the host iterating
        the fixed point through the board's MVMs: every source group's product goes through
        the ADC every step and the new states through the DAC.
        """
        if self.topology is None:
            raise ConfigurationError("the board has no topology yet; call configure(topology) first")
        topo = self.topology
        per = self.preset.periphery
        budget = topo.budget
        batch = next(iter(clamp.values())).shape[0]
        self._check_batch("settle clamp", int(batch))
        key = frozenset(clamp)
        plan = self._plan(key)
        dev = self.device
        mvm_mode = topo.mode == "mvm"
        # Clamps and nudge targets go through the DAC once; the bias node is a constant 1.
        s: dict[str, torch.Tensor] = {BIAS: torch.ones(batch, 1, device=dev)}
        for g, x in clamp.items():
            s[g] = self._dac(x, self._channel[g])
        nud: dict[str, tuple[float, torch.Tensor | None, torch.Tensor | None]] = {}
        for g, (beta, target, grad) in (nudge or {}).items():
            t = None if target is None else self._dac(target, self._channel[g])
            gr = None
            if grad is not None:
                # The injection DAC is auto-ranged to the current it must carry this settle.
                span = float(grad.abs().max()) or 1.0
                gr = quantize(grad, per.dac_bits, -span, span)
            nud[g] = (beta, t, gr)
        if not mvm_mode and not plan.noisy and not per.node_noise:
            return self._settle_quiet(s, nud, init, plan, key, batch, trace)
        for g in plan.free:
            x0 = init.get(g) if init else None
            s[g] = torch.zeros(batch, topo.groups[g], device=dev) if x0 is None else x0
        # Drive that does not depend on the free states: constant sources (analog mode) and
        # injected nudge currents. In analog mode the read noise of all sources and the node
        # noise sum on each node line: one Gaussian draw per group and step, whose variance
        # has a constant part and a part that follows the free sources' states.
        base: dict[str, torch.Tensor] = {}
        const_var = {g: torch.full((batch, 1), per.node_noise**2, device=dev) for g in plan.free}
        mvm_const: list[tuple[_Term, torch.Tensor]] = []
        products: dict[int, tuple[torch.Tensor, bool]] = {}
        for term in plan.const_terms:
            out = F.linear(s[term.src], term.matrix)
            for (dst, a, b, k), (pair, transposed) in zip(term.dsts, term.pairs, strict=True):
                products[pair] = (out[:, a:b], transposed)
                if k:
                    const_var[dst] += term.noise_var(s[term.src], k)
                if not mvm_mode:
                    base[dst] = out[:, a:b] if dst not in base else base[dst] + out[:, a:b]
            if mvm_mode:
                mvm_const.append((term, out))
        for g in plan.free:
            if g not in base:
                base[g] = torch.zeros(batch, topo.groups[g], device=dev)
        for g, (beta, _t, gr) in nud.items():
            if gr is not None:
                base[g] = base[g] - beta * gr
        # per free group: does noise reach its line?
        noisy = {g: bool(float(v.max()) > 0) for g, v in const_var.items()}
        for term in plan.dyn_terms:
            for dst, _a, _b, k in term.dsts:
                noisy[dst] = noisy[dst] or k > 0
        gain, tol = topo.gain, budget.tol
        dt = self._step_dt(plan, key)
        pool = (
            NoisePool(self.noise, max(batch * n for n in topo.groups.values()), dev)
            if any(noisy.values()) or plan.noisy
            else None
        )
        elastic = {g: (beta, t) for g, (beta, t, _gr) in nud.items() if t is not None}
        traces: dict[str, list[torch.Tensor]] = {}
        trace_steps: list[int] = []

        def record(step: int) -> None:
            trace_steps.append(step)
            for g in plan.free:
                traces.setdefault(g, []).append(s[g])  # states are replaced, never written in place

        def mvm_out(term: _Term, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            """mvm mode: one MVM with its own read noise, digitised by the ADC."""
            if term.noisy:
                y = y.clone()
                for _dst, a, b, k in term.dsts:
                    std = term.noise_var(x, k).sqrt()
                    y[:, a:b] += std * pool.draw((batch, b - a))
            return self._adc_mvm(y)

        if trace:
            record(0)
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
                y = F.linear(x, term.matrix)
                if mvm_mode:
                    y = mvm_out(term, x, y)
                for dst, a, b, k in term.dsts:
                    drive[dst] = drive[dst] + y[:, a:b]
                    if k:
                        var[dst] = var[dst] + term.noise_var(x, k)
            check = step % budget.check_every == 0 or step == budget.max_steps
            res = 0.0
            for g in plan.free:
                u = drive[g]
                if g in elastic:
                    beta, target = elastic[g]
                    u = u + beta * (target - s[g])
                if mvm_mode:
                    if per.node_noise:
                        u = u + per.node_noise * pool.draw(u.shape)
                elif noisy[g]:
                    u = u + var[g].sqrt() * pool.draw(u.shape)
                new = (u * gain).clamp_(0.0, 1.0) if gain != 1.0 else u.clamp(0.0, 1.0)
                if mvm_mode:
                    new = self._dac(new, self._channel[g])
                if check:
                    res = max(res, float((new - s[g]).abs().max()))
                s[g] = torch.lerp(s[g], new, dt) if dt != 1.0 else new
            steps = step
            if check:
                residual = res
                floor = self._noise_floor(var, mvm_mode, gain)
            if trace and step % trace == 0:
                record(step)
            if check and residual <= tol + floor:
                converged = True
                break
        if trace and trace_steps[-1] != steps:
            record(steps)
        ws = None
        if not mvm_mode:  # the per-group states and constant drive as (nodes, batch) buffers
            state = torch.cat([s[g] for g in plan.free], dim=1).T
            drive = torch.cat([base[g] for g in plan.free], dim=1).T
            ws = _Workspace(state, drive, plan.rows, _links(plan, state))
        settle_time, energy_j = self._account(plan, s, ws, steps, dt, batch)
        if ws is not None and plan.const_unit:
            energy = ws.energy(0.5 / gain, elastic)
        else:
            energy = self._energy(s, plan, nud, products)
        stacked = {g: torch.stack(traces[g]) for g in plan.free} if trace else {}
        return self._result(s, plan, nud, products, (steps, converged, residual), energy,
                            (settle_time, energy_j), trace_steps, stacked)  # fmt: skip

    def _step_dt(self, plan: _Plan, key: frozenset[str]) -> float:
        """The integration step of an analog settle: budget.dt, or less where the couplings are
        strong enough for a step of dt to overshoot (energy descent needs dt < 2 / (1 + gain
        |W|)); each step then stands for that much less circuit time. mvm settles iterate the
        fixed point at budget.dt."""
        assert self.topology is not None
        topo = self.topology
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
        """Advance the clock and the energy meter by a settle; return (seconds, joules). The
        array's power is measured at the equilibrium, for the whole settle: the states spend
        most of the settle near it, and measuring it once keeps the per-step loop lean."""
        assert self.topology is not None
        per, budget = self.preset.periphery, self.topology.budget
        if self.topology.mode == "mvm":
            step_s = per.mvm_time_s * (len(plan.const_terms) + len(plan.dyn_terms))
        else:
            step_s = per.settle_step_s * dt / budget.dt
        settle_time = step_s * steps * batch
        energy_j = self._settle_power(plan, s, ws) * step_s * steps
        self.clock += settle_time
        self.energy_j += energy_j
        return settle_time, energy_j

    def _result(
        self,
        s: dict[str, torch.Tensor],
        plan: _Plan,
        nud: dict[str, tuple[float, torch.Tensor | None, torch.Tensor | None]],
        products: dict[int, tuple[torch.Tensor, bool]],
        outcome: tuple[int, bool, float],
        energy: torch.Tensor,
        cost: tuple[float, float],
        trace_steps: list[int],
        stacked: dict[str, torch.Tensor],
    ) -> SettleResult:
        """The states through the ADC, and the trace (energies evaluated after the settle)."""
        states = {g: self._adc_state(s[g], self._channel[g]) for g in plan.free}
        out_trace = None
        if stacked:
            out_trace = {
                "step": torch.tensor(trace_steps),
                "energy": self._trace_energy(s, stacked, plan, nud, products),
            }
            for g in plan.free:
                out_trace[g] = self._adc_state(stacked[g], self._channel[g])
        return SettleResult(states, *outcome, energy, *cost, out_trace)

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
        state = torch.zeros(plan.n_free, batch, device=self.device)
        new = torch.empty(plan.n_free, batch, device=self.device)
        drive = torch.zeros(plan.n_free, batch, device=self.device)
        links = _links(plan, state)
        products: list[Callable[[], object]] = []
        for r, sources in links:
            if sources:  # the first product written into the group's rows, the others added
                products.append(partial(torch.addmm, drive[r], *sources[0], out=new[r]))
                products += [partial(new[r].addmm_, m, x) for m, x in sources[1:]]
            else:
                products.append(partial(new[r].copy_, drive[r]))
        ws = _Workspace(state, drive, plan.rows, links, new, products)
        if len(plan.workspaces) >= 4:  # a few batch sizes (training, the last batch, evaluation)
            plan.workspaces.pop(next(iter(plan.workspaces)))
        plan.workspaces[batch] = ws
        return ws

    def _settle_quiet(
        self,
        s: dict[str, torch.Tensor],
        nud: dict[str, tuple[float, torch.Tensor | None, torch.Tensor | None]],
        init: dict[str, torch.Tensor] | None,
        plan: _Plan,
        key: frozenset[str],
        batch: int,
        trace: int,
    ) -> SettleResult:
        """The analog settle without noise (the ideal preset, or noise switched off).

        The free groups' states live in one (nodes, batch) buffer, one contiguous row block
        per group (`plan.rows`), and so do the new states each step and the constant drive
        (clamped sources, bias, injected currents): a step is one matrix product per (source,
        destination) pair written straight into the destination's rows, then one clamp and
        one relaxation over all groups at once (4 torch calls per step for a layered network
        of two free groups, against 6 for per-group (batch, nodes) states; about half the time
        per step at every batch size).

        With ``tol = 0`` convergence is never checked: the settle runs exactly `max_steps`
        (the fixed-step recipe of the EP literature) and the residual is measured at the
        last step only."""
        assert self.topology is not None
        budget, gain = self.topology.budget, self.topology.gain
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
        drive.zero_()  # the constant drive
        for term in plan.const_terms:
            for dst, a, b, _k in term.dsts:
                if term.src == BIAS:
                    drive[rows[dst]].add_(term.matrix[a:b])  # (n, 1): the same for every sample
                else:
                    drive[rows[dst]].addmm_(term.matrix[a:b], s[term.src].T)
        elastic = {}
        for g, (beta, target, grad) in nud.items():
            if grad is not None:
                drive[rows[g]].sub_(grad.T, alpha=beta)
            if target is not None:
                elastic[g] = (beta, target)
        dt = self._step_dt(plan, key)
        # one step as a flat list of bound calls: the workspace's products, the elastic pulls,
        # then gain and clamp over all groups
        pre = list(ws.products)
        for g, (beta, target) in elastic.items():
            r = rows[g]
            pre.append(partial(new[r].add_, (beta * target).T.contiguous()))
            pre.append(partial(new[r].add_, state[r], alpha=-beta))
        if gain != 1.0:
            pre.append(partial(new.mul_, gain))
        pre.append(partial(new.clamp_, 0.0, 1.0))
        relax = partial(state.lerp_, new, dt)
        step_ops = [*pre, relax]
        # the steps that check convergence (every `check_every`; with tol = 0 only the last)
        # or record the trace; the steps between them run the flat list alone
        last = budget.max_steps
        every = budget.check_every if budget.tol > 0 else last
        marks = sorted({*range(every, last, every), *(range(trace, last, trace) if trace else ()), last})
        trace_steps: list[int] = []
        traces: dict[str, list[torch.Tensor]] = {g: [] for g in plan.free} if trace else {}

        def record(step: int) -> None:
            trace_steps.append(step)
            for g in plan.free:
                traces[g].append(state[rows[g]].T.clone())

        if trace:
            record(0)
        residual, step = float("inf"), 0
        for mark in marks:
            for _ in range(mark - step - 1):
                for op in step_ops:
                    op()
            for op in pre:
                op()
            checked = mark % every == 0 or mark == last
            if checked:
                residual = float((new - state).abs_().max())
            relax()
            step = mark
            if trace and mark % trace == 0:
                record(mark)
            if checked and residual <= budget.tol:
                break
        if trace and trace_steps[-1] != step:
            record(step)
        for g in plan.free:
            s[g] = state[rows[g]].T.contiguous()
        cost = self._account(plan, s, ws, step, dt, batch)
        products = self._const_products(s, plan) if trace or not plan.const_unit else {}
        energy = ws.energy(0.5 / gain, elastic) if plan.const_unit else self._energy(s, plan, nud, products)
        stacked = {g: torch.stack(traces[g]) for g in plan.free} if trace else {}
        outcome = (step, residual <= budget.tol, residual)
        return self._result(s, plan, nud, products, outcome, energy, cost, trace_steps, stacked)

    def _noise_floor(self, var: dict[str, torch.Tensor], mvm_mode: bool, gain: float) -> float:
        """The step-to-step change of the node states that noise and quantisation alone cause
        at equilibrium: a settle counts as converged when its residual is within `tol` of it.
        Six standard deviations: the residual is a maximum over every node of the batch."""
        sigma = max((float(v.max()) for v in var.values()), default=0.0) ** 0.5
        floor = 6.0 * gain * sigma
        if mvm_mode:
            per = self.preset.periphery
            floor += gain * (_lsb(per.adc_bits, 2 * per.mvm_range) if per.adc_bits else 0.0)
            floor += _lsb(per.dac_bits, per.state_range[1] - per.state_range[0]) if per.dac_bits else 0.0
        return floor

    def _trace_energy(
        self,
        s: dict[str, torch.Tensor],
        stacked: dict[str, torch.Tensor],
        plan: _Plan,
        nudge: dict[str, tuple[float, torch.Tensor | None, torch.Tensor | None]],
        products: dict[int, tuple[torch.Tensor, bool]],
    ) -> torch.Tensor:
        """Energies (T, B) of the recorded states, in one batched evaluation after the settle:
        the clamped groups, products and nudges are repeated over the T records."""
        t = next(iter(stacked.values())).shape[0] if stacked else 1

        def rep(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.repeat(t, 1)

        flat = {g: rep(v) for g, v in s.items() if g not in stacked}
        flat.update({g: v.reshape(-1, v.shape[-1]) for g, v in stacked.items()})
        nud = {g: (beta, rep(tg), rep(gr)) for g, (beta, tg, gr) in nudge.items()}
        prods = {i: (rep(p), tr) for i, (p, tr) in products.items()}
        return self._energy(flat, plan, nud, prods).reshape(t, -1)  # type: ignore[arg-type]

    def _settle_power(self, plan: _Plan, s: dict[str, torch.Tensor], ws: _Workspace | None = None) -> float:
        """Array power (W, summed over the batch) at the present node voltages: every line
        driven at its node voltage against virtual ground, sum_ij (G+ + G-) V^2. With the
        settle's `_Workspace` the free groups' lines take one product."""
        batch = next(iter(s.values())).shape[0]
        total = batch * plan.bias_conductance
        done: dict[str, slice] = {}
        if ws is not None and plan.free_lines is not None:
            total += float(ws.state.square().sum(1) @ plan.free_lines)
            done = ws.rows
        for group, gsum in plan.line_conductance.items():
            if group != BIAS and group not in done:
                total += float(s[group].square().sum(0) @ gsum)
        return total * self.preset.periphery.v_read**2

    # ---------------------------------------------------------------- reliability state
    # Class-level defaults (immutable), set per instance on first change: the epoch counts
    # restarts, so a host learns of a reset it did not ask for; `transaction` is the open
    # programming sequence, kept (as if in non-volatile memory) across restarts.
    epoch: int = 0
    transaction: str | None = None

    def restart(self) -> None:
        """A reset as the host sees it: configuration lost (`reset`), conductances kept
        (non-volatile), the epoch advanced."""
        self.reset()
        self.epoch += 1

    def begin_transaction(self, tag: str) -> None:
        if not tag or len(tag) > 256:
            raise ConfigurationError(f"a transaction tag is 1 to 256 characters, got {len(tag)}")
        self.transaction = tag

    def commit_transaction(self, tag: str) -> None:
        if self.transaction is None:
            return  # nothing open: a retried commit
        if self.transaction != tag:
            raise ConfigurationError(
                f"cannot commit transaction {tag!r}: the open one is {self.transaction!r}"
            )
        self.transaction = None
