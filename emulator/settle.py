"""The settle engine of the emulated board: how the network relaxes to an equilibrium.

`Board` (emulator/board.py) owns the tiles, the converters, programming, the clock and the
meter; it puts the nudges through the DAC and hands the clamps and the nudge (a
`SettleNudge`, plain data in `emulator.settle_types` with `SettleResult`) to its
`SettleEngine`, which

- converts the clamps (`apply_clamp`, reusing the last settle's conversion, see below);
- keeps a *plan* per clamp set through its `SettlePlanner` (`emulator.settle_plan.Plan`: the
  matmul sources of the settle as `Term` s, views of the tiles' cached weights, refreshed in
  place after writes) and per batch size a `Workspace` (the free states as one (nodes,
  batch) buffer);
- chooses the integration steps (`SettlePlanner.step_sizes`: the asked step, and a bound from
  the coupling norm to fall back to where it stops converging);
- runs one of two loops: `_settle_analog` (the node circuits relaxing, with or without read
  and node noise: a flat list of in-place calls per step on (nodes, batch) buffers, noise
  from the engine's `NoisePool`; on the CPU a noise-free settle runs that loop as one
  TorchScript call, `emulator.settle_script`) or `_settle_mvm` (the ``mvm`` mode, where the host
  iterates the fixed point through quantised MVMs);
- stops: a noise-free settle when the batch's largest residual is within `tol`, one with
  noise (or, in mvm mode, converter steps) per sample (`drivers.settle_stop.SampleStop`: a
  sample stops once its states move no more than its noise moves them, and keeps the states
  of its stop while the rest of the batch runs on); with ``tol = 0`` neither stops early: a
  fixed step count, checked at its last step; and accounts the settle's time and array energy
  (`_account`: line power at equilibrium times the settle time, once per settle; the
  clamped lines' share is kept with the clamp; `emulator.settle_energy.settle_power`);
- leaves the network's energy per sample (`SettleResult.energy`) to be computed when read,
  where what it needs can be kept for less than computing it
  (`emulator.settle_energy.later_energy`): a training step never reads it. The meter's
  joules are computed at once.

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
clamp (`emulator.clamp_cache.ClampCache`) and reuses it when the next settle's clamps equal
the cached ones exactly (every value, against a copy of what the host sent) or are them
twice over along the batch; the DAC's conversion of the clamps is reused the same way (it
is deterministic: per-channel errors and quantisation; its safety count is counted again).
A different plan or a change of the tiles' `weights_epoch` (a write, a pulse, drift
recomputing the weights) invalidates the drive, and `SettleEngine.clear` (configure with a
new topology, reset) all of it. Nothing changes at the Device interface, so hosts over a wire get the same
saving. On noisy presets the reuse is exact too, statistics included: the emulator splits
a read into the noise-free product and read noise drawn fresh at every step from a variance
that follows the inputs (`Term.noise_var`), so what is reused is only the noise-free part
(a real board re-reads its input lines every step; here every step still gets fresh noise).
The mvm mode's per-step MVMs of the clamped sources likewise reuse the product and draw
their noise and ADC conversion anew every step. The doubled batch's product over 2B rows
may round differently from the product over B rows that the cache holds (the matmul kernel
may block differently), so results may differ from an uncached settle at float rounding.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from drivers import topology
from drivers.converters import lsb
from drivers.settle_stop import SampleStop
from drivers.topology import BIAS
from emulator import settle_energy, settle_script
from emulator.clamp_cache import ClampCache
from emulator.noise_table import NoisePool
from emulator.settle_plan import Plan, SettlePlanner, Term, Workspace, group_links
from emulator.settle_script import Product
from emulator.settle_types import SettleNudge, SettleResult

if TYPE_CHECKING:
    from emulator.board import Board


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


def _joined_products(
    plan: Plan, state: torch.Tensor, new: torch.Tensor, drive: torch.Tensor
) -> list[Product] | None:
    """One step's products as one ``addmm`` over all free nodes, through the plan's joined
    free-to-free matrix (`settle_plan.joined_coupling`), where it has one; else None (one
    product per (source, group) pair). The same sums in another order: the numbers equal
    the group-by-group products' to float rounding."""
    if plan.coupling is None:
        return None
    return [Product.into(new, drive, plan.coupling, state)]


class SettleEngine:
    """The settles of one `Board`: the plans per clamp set (`SettlePlanner`), workspaces per
    batch size, the two settle loops and their accounting. It reads the board's topology,
    tiles, clock, converters and noise generator; it does not advance the board's clock or
    meter (`Board.settle` does, from the result)."""

    def __init__(self, board: Board) -> None:
        self.board = board
        self.planner = SettlePlanner(board)
        self.reuse_clamp = True  # reuse the constant drive of the last clamp (`ClampCache`)
        # on CUDA, run a noise-free settle's steps between checks as one captured CUDA graph
        # (`_graph_steps`); False: the same steps launched one call at a time
        self.cuda_graphs = True
        # on the CPU, run a noise-free settle's whole loop as one TorchScript call
        # (`emulator.settle_script`); False: the same calls one at a time from Python
        self.scripted = True
        # a checked analog settle starts at budget.dt and falls back to the energy-descent
        # bound where its residual stops making progress (`SettlePlanner.step_sizes`); False:
        # the bound throughout
        self.bold_steps = True
        # run that loop in torch.inference_mode (the same numbers, less dispatch per call);
        # False: with autograd's dispatch, as the Python loop
        self.inference = True
        # a dense tile's step products as one addmm over all free rows through the plan's
        # joined matrix (`settle_plan.joined_coupling`); False: one per (source, group) pair.
        # Read when a workspace is made: set it before a batch size's first settle
        self.joined = True
        self._clamp_cache: ClampCache | None = None
        self.clamp_reuses = 0  # settles that reused a cached constant drive
        self._noise_pool: NoisePool | None = None
        self._current: tuple[ClampCache | None, int] = (None, 0)  # this settle's cache entry, repeats

    def clear(self) -> None:
        """Forget the plans and the cached constant drive (a new topology, or a reset)."""
        self.planner.clear()
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
            self._clamp_cache = ClampCache(raw, kept, batch, safety.violations - before)
            self._clamp_cache.exact = all(same.values())
            self._current = (self._clamp_cache, 1)
        return applied

    def _cached(self, plan: Plan) -> tuple[ClampCache | None, int]:
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

    def _keep(self, plan: Plan, **held: object) -> None:
        """Keep what a settle computed from its clamps with this settle's cache entry."""
        entry, reps = self._current
        if entry is not None and reps == 1 and entry.plan is plan:
            for name, value in held.items():
                setattr(entry, name, value)

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
        plan = self.planner.plan(key)
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
        plan: Plan,
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
        # the output noise of the read-outs, every step: one per tile that feeds a group (the
        # bias row is read with its tile's other rows, a dense tile once for all its sources)
        out_std = self._out_noise_std(plan.free)
        for g, std in out_std.items():
            const_var[g] += std**2
        # node noise and output noise: one Gaussian per node and step (the node noise alone,
        # as it was, where there is no output noise)
        node_std = {
            g: math.hypot(per.node_noise, out_std[g]) if g in out_std else per.node_noise for g in plan.free
        }
        gain, tol, act = topo.gain, budget.tol, topo.activation
        dt = self.planner.step_dt(plan, key)
        pool = (
            self._pool(batch * max(topo.groups[g] for g in plan.free))
            if plan.noisy or per.node_noise or per.out_noise
            else None
        )
        elastic = nudge.elastic
        traces: dict[str, list[torch.Tensor]] = {}
        trace_steps: list[int] = []

        def mvm_out(term: Term, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            """One MVM with its own read noise, digitised by the ADC."""
            if term.noisy:
                assert pool is not None
                y = y.clone()
                for _dst, a, b, k in term.dsts:
                    std = term.noise_var(x, k).sqrt()
                    y[:, a:b] += std * pool.draw((batch, b - a))
            return self.board._adc_mvm(y)

        # a settle with noise or converter steps stops per sample (`drivers.settle_stop`); an
        # exact one when the batch's largest residual is within tol
        # (``tol = 0``: a fixed step count, checked at the last step only, as without noise)
        quant = self._quant_floor(gain)
        stop = (
            SampleStop(torch.cat([s[g] for g in plan.free], 1).T, tol)
            if (pool is not None or quant) and not budget.fixed_steps
            else None
        )
        every = budget.check_interval

        def record(step: int) -> None:
            trace_steps.append(step)
            if stop is None:
                held = {g: s[g] for g in plan.free}
            else:  # a stopped sample's states as it holds them
                cat = stop.view(torch.cat([s[g] for g in plan.free], 1).T).T
                held = dict(zip(plan.free, cat.split([topo.groups[g] for g in plan.free], 1), strict=True))
            for g in plan.free:
                traces.setdefault(g, []).append(held[g])  # states are replaced, never written in place

        if trace:
            record(0)
        peaks: list[torch.Tensor] = []  # the DAC's peak output per step and group (safety)
        residual, converged, steps = float("inf"), False, 0
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
            check = step % every == 0 or step == budget.max_steps
            changes: list[torch.Tensor] = []
            for g in plan.free:
                u = drive[g]
                if g in elastic:
                    beta, target = elastic[g]
                    u = u + beta * (target - s[g])
                if node_std[g]:
                    assert pool is not None
                    u = u + node_std[g] * pool.draw(u.shape)
                if act.hard:
                    new = (u * gain).clamp_(0.0, 1.0) if gain != 1.0 else u.clamp(0.0, 1.0)
                else:
                    new = act.rho(u, gain)
                new = self._dac_step(new, self.board._channel[g], peaks)
                if check:
                    changes.append((new - s[g]).abs())
                s[g] = torch.lerp(s[g], new, dt) if dt != 1.0 else new
            steps = step
            running = batch
            if check and stop is None:  # one synchronisation for the residual
                residual = float(torch.stack([c.max() for c in changes]).max())
                converged = residual <= tol
            elif check:  # one for the samples still running
                assert stop is not None
                sd = torch.cat([v for v in var.values()], 1).amax(1).sqrt_().mul_(gain)
                state = torch.cat([s[g] for g in plan.free], 1).T
                running, residual = stop.check(state, sd, torch.cat(changes, 1).T, step, dt, quant)
            if trace and step % trace == 0:
                record(step)
            if check and (converged if stop is None else running == 0):
                break
        mean_steps: float = steps
        if stop is not None:  # the stopped samples' states, their steps and residuals
            state = torch.cat([s[g] for g in plan.free], 1).T.contiguous()
            stop.final(state, steps)
            s.update(zip(plan.free, state.T.split([topo.groups[g] for g in plan.free], 1), strict=True))
            mean_steps, residual, converged = stop.outcome()
        if trace and trace_steps[-1] != steps:
            record(steps)
        if peaks:
            over = torch.stack(peaks).double().mul_(per.v_read).gt_(per.v_read_max).sum()
            self.board.safety.violations += int(over)
        settle_time, energy_j = self._account(plan, s, None, mean_steps, dt, batch)
        energy = settle_energy.energy(s, plan, nudge, products, gain, act)
        stacked = {g: torch.stack(traces[g]) for g in plan.free} if trace else {}
        result = self._result(s, plan, nudge, products, (steps, converged, residual), energy,
                              (settle_time, energy_j), trace_steps, stacked)  # fmt: skip
        if stop is not None:
            result.sample_steps = stop.steps
        return result

    def _account(
        self, plan: Plan, s: dict[str, torch.Tensor], ws: Workspace | None, steps: float, dt: float,
        batch: int,
    ) -> tuple[float, float]:  # fmt: skip
        """A settle's (seconds, joules), by which `Board.settle` advances its clock and meter. The
        array's power is measured at the equilibrium, for the whole settle: the states spend
        most of the settle near it, and measuring it once keeps the per-step loop lean."""
        assert self.board.topology is not None
        per, budget = self.board.preset.periphery, self.board.topology.budget
        if self.board.topology.mode == "mvm":
            # one mvm per source group and step, one after the other; each drives only its own
            # group's lines, for one mvm time: a step's energy is the array's power (every
            # group's lines) times one mvm time, not times the step's duration
            step_s = per.mvm_time_s * (len(plan.const_terms) + len(plan.dyn_terms))
            driven_s = per.mvm_time_s
        else:
            step_s = driven_s = per.settle_step_s * dt / budget.dt
        settle_time = step_s * steps * batch
        energy_j = settle_energy.settle_power(plan, s, ws, self._current, per.v_read) * driven_s * steps
        return settle_time, energy_j

    def _result(
        self,
        s: dict[str, torch.Tensor],
        plan: Plan,
        nudge: SettleNudge,
        products: dict[int, tuple[torch.Tensor, bool]],
        outcome: tuple[int, bool, float],
        energy: torch.Tensor | Callable[[], torch.Tensor],
        cost: tuple[float, float],
        trace_steps: list[int],
        stacked: dict[str, torch.Tensor],
    ) -> SettleResult:
        """The states through the ADC, and the trace (energies evaluated after the settle)."""
        topo = self.board.topology
        assert topo is not None
        states = {g: self.board._adc_state(s[g], self.board._channel[g]) for g in plan.free}
        out_trace = None
        if stacked:
            out_trace = {
                "step": torch.tensor(trace_steps),
                "energy": settle_energy.trace_energy(
                    s, stacked, plan, nudge, products, topo.gain, topo.activation
                ),
            }
            for g in plan.free:
                out_trace[g] = self.board._adc_state(stacked[g], self.board._channel[g])
        if callable(energy):
            return SettleResult(states, *outcome, energy, *cost, out_trace)
        value = energy
        return SettleResult(states, *outcome, lambda: value, *cost, out_trace, value)

    def _workspace(self, plan: Plan, batch: int) -> Workspace:
        """The (nodes, batch) buffers of a noise-free settle and the products of one step bound
        to them, kept with the plan for the next settle of that batch size (a settle writes
        its results out of the buffers, so they are free again when it returns)."""
        state = torch.zeros(plan.n_free, batch, device=self.board.device)
        new = torch.empty(plan.n_free, batch, device=self.board.device)
        drive = torch.zeros(plan.n_free, batch, device=self.board.device)
        links = group_links(plan, state)
        products: list[Product] = []
        for r, sources in links:
            if sources:  # the first product written into the group's rows, the others added
                products.append(Product.into(new[r], drive[r], *sources[0]))
                products += [Product.add(new[r], m, x) for m, x in sources[1:]]
            else:
                products.append(Product.copy(new[r], drive[r]))
        step = (self.joined and _joined_products(plan, state, new, drive)) or products
        ws = Workspace(state, drive, plan.rows, links, new, [p.bind() for p in step], step)
        if len(plan.workspaces) >= 4:  # a few batch sizes (training, the last batch, evaluation)
            plan.workspaces.pop(next(iter(plan.workspaces)))
        plan.workspaces[batch] = ws
        return ws

    def _settle_analog(
        self,
        s: dict[str, torch.Tensor],
        nudge: SettleNudge,
        init: dict[str, torch.Tensor] | None,
        plan: Plan,
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
        allocates nothing. A noisy settle stops per sample, checked every `check_every`
        steps (`drivers.settle_stop.SampleStop`; tol adds to the noise's bound): `steps` is
        the last sample's stop, `converged` that every sample stopped before the budget ran
        out, `residual` the largest of the samples' residuals at their stops.

        With ``tol = 0`` (noisy or not) convergence is never checked: the settle runs exactly
        `max_steps` (the fixed-step recipe of the EP literature) and the residual is measured
        at the last step only."""
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
        # the steps that check convergence (every `check_every`; with tol = 0 only the last,
        # noisy or not: a fixed step count) or record the trace; the steps between them run
        # the flat list alone
        last = budget.max_steps
        every = budget.check_interval
        first_dt, safe_dt = self.planner.step_sizes(plan, key, self.bold_steps and every < last)
        dt = first_dt
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
        trace_steps: list[int] = []
        traces: dict[str, list[torch.Tensor]] = {g: [] for g in plan.free} if trace else {}
        # a noisy settle stops per sample (`drivers.settle_stop`); a noise-free one when the
        # batch's largest residual is within tol; with tol = 0 neither stops early
        stop = SampleStop(state, budget.tol) if noisy and not budget.fixed_steps else None

        def record(step: int) -> None:
            trace_steps.append(step)
            held = state if stop is None else stop.view(state)
            for g in plan.free:
                traces[g].append(held[rows[g]].T.clone())

        if trace:
            record(0)
        residual, step, running = float("inf"), 0, batch
        best, stalled, fell_back = float("inf"), 0, -1
        done = None
        if self.scripted and not (noisy or elastic or trace or state.is_cuda):
            done = settle_script.run(
                ws.steps,
                every,
                last,
                budget.tol,
                (act.kind, gain, act.width),
                new,
                state,
                (first_dt, safe_dt or 0.0),
                self.inference,
            )
        if done is not None and safe_dt is None and done[2] == done[0] < last:
            # stalled at the asked step: the rest at the bound, computed now (as below)
            safe_dt = self.planner.step_dt(plan, key)
            rest = settle_script.run(
                ws.steps, every, last - done[0], budget.tol, (act.kind, gain, act.width), new, state,
                (safe_dt, safe_dt), self.inference,
            )  # fmt: skip
            assert rest is not None  # compiled a moment ago
            done = (done[0] + rest[0], rest[1], done[0])
        if done is not None:
            step, residual, fell_back = done
            marks: list[int] = []  # the compiled loop ran them
        else:
            marks = sorted({*range(every, last, every), *(range(trace, last, trace) if trace else ()), last})
        for mark in marks:
            if not (graphed and mark - step - 1 > 1 and self._graph_steps(ws, graph_ops, mark - step - 1)):
                for _ in range(mark - step - 1):
                    for op in step_ops:
                        op()
            for op in pre:
                op()
            checked = mark % every == 0 or mark == last
            change = None
            if checked:
                change = (new - state).abs_()
                if stop is None:
                    residual = float(change.max())
            relax()
            step = mark
            if checked and stop is not None:
                assert change is not None
                sd = stds[0].amax(0).mul_(gain) if stds else torch.zeros(batch, device=state.device)
                running, residual = stop.check(state, sd, change, mark, dt)
            if trace and mark % trace == 0:
                record(mark)
            if checked and (running == 0 if stop is not None else residual <= budget.tol):
                break
            if checked and residual < best:
                best, stalled = residual, 0
            elif checked:  # no progress: after STALL_CHECKS of these, the second step size
                stalled += 1
                if stalled == topology.STALL_CHECKS and fell_back < 0:
                    if safe_dt is None:
                        safe_dt = self.planner.step_dt(plan, key)
                    if dt != safe_dt:
                        dt, fell_back = safe_dt, mark
                        relax = step_ops[-1] = partial(state.lerp_, new, dt)
                        if ws.dt is not None:  # the captured steps read it
                            ws.dt.fill_(dt)
        mean_steps: float = step
        converged = residual <= budget.tol
        if stop is not None:  # the stopped samples' states, their steps and residuals
            stop.final(state, step)
            mean_steps, residual, converged = stop.outcome()
        if trace and trace_steps[-1] != step:
            record(step)
        # the final states out of the workspace (the next settle reuses it) in one copy of the
        # (nodes, batch) buffer; each group's states are a (batch, n) view of it, batch-major in
        # memory as the buffer is (no transposing copy: an `init` or a product takes them as
        # they are)
        final = state.clone()
        for g in plan.free:
            s[g] = final[rows[g]].T
        # the settle's circuit time in steps of size 1: the steps before the fallback at the
        # first size, the rest at the second
        before = step if fell_back < 0 else fell_back
        mean_dt = (before * first_dt + (step - before) * (safe_dt or first_dt)) / max(step, 1)
        cost = self._account(plan, s, ws, mean_steps, mean_dt, batch)
        energy: torch.Tensor | Callable[[], torch.Tensor] | None = None
        if not trace:
            if plan.const_unit:
                energy = settle_energy.later_energy(self._current, s, plan, nudge, (gain, act), batch)
            else:
                energy = settle_energy.later_pair_energy(s, plan, nudge, gain, act)
        products = {}
        if energy is None and (trace or not plan.const_unit):
            products = settle_energy.const_products(s, plan)
        if energy is None:
            energy = (
                ws.energy(0.5 / gain, elastic, act)
                if plan.const_unit
                else settle_energy.energy(s, plan, nudge, products, gain, act)
            )
        stacked = {g: torch.stack(traces[g]) for g in plan.free} if trace else {}
        outcome = (step, converged, residual)
        result = self._result(s, plan, nudge, products, outcome, energy, cost, trace_steps, stacked)
        if stop is not None:
            result.sample_steps = stop.steps
        return result

    @staticmethod
    def _graph_steps(ws: Workspace, ops: list[Callable[[], object]], n: int) -> bool:
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
        self, s: dict[str, torch.Tensor], plan: Plan, ws: Workspace, batch: int
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

    def _out_noise_std(self, free: list[str]) -> dict[str, float]:
        """Per free group, the std of the output noise (`PeripheryModel.out_noise`) that the
        read-outs feeding it add to its drive in one mvm-mode step: one read-out per tile that
        drives the group (a bipartite tile's columns through a forward mvm, its rows through a
        transposed one; a dense tile once; the bias row with its tile's other rows), each
        ``out_noise x w_max``; empty without output noise."""
        per = self.board.preset.periphery
        topo = self.board.topology
        if not per.out_noise or topo is None:
            return {}
        var: dict[str, float] = {}
        for c in topo.couplings:
            for g in (set(c.rows) | set(c.cols)) - {BIAS}:
                if g in free:
                    var[g] = var.get(g, 0.0) + (c.w_max * per.out_noise) ** 2
        return {g: math.sqrt(v) for g, v in var.items()}

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
        """`Board._dac` inside a settle step: the same conversion (`Board.dac_convert`), with
        the safety check's peak |output| kept on the device (`peaks`) and checked once after
        the settle, so the step does not wait for the device."""
        y = self.board.dac_convert(x, channel)
        if y.numel():
            peaks.append(y.abs().max())
        return y

    def _quant_floor(self, gain: float) -> float:
        """What the converters' steps alone move a node between two steps of an mvm-mode
        settle: an ADC step of its drive (times the gain) and a DAC step of its state; 0 with
        exact converters."""
        per = self.board.preset.periphery
        return gain * lsb(per.adc_bits, 2 * per.mvm_range) + lsb(
            per.dac_bits, per.state_range[1] - per.state_range[0]
        )
