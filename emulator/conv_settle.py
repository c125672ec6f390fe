"""The settle of networks with conv couplings (`drivers.topology`, `drivers.conv`) on the
emulated board.

A conv tile holds one kernel and is read once per position of its input map (im2col, as
in-memory computing chips run convolutions): the board cannot relax such a coupling in one
analog step over the whole map, so every settle step reads the tile at every position,
forwards (the destination's drive ``pool(conv(x) + b)``) and transposed (the source's drive
``conv_transpose(unpool(y))``), with the pooling in the periphery: a winner-take-all per
window for a max-pool, a summing node divided by the window's size for an average-pool.
Fully connected couplings of the same network (a classifier head) settle as in
`emulator.settle`. The node circuits integrate ``s <- s + dt (rho(u) - s)`` on the drive u.

Physics, as for the other tiles: the weights are the tiles' (drift, IR drop, stuck devices
included); each read of a tile adds read noise to every output line with variance
``2 (w_max sigma / span)^2 |input|^2`` (the input of one position's read is its patch; of a
transposed read, the routed destination states), drawn per step from the board's noise table;
node noise on every free node; clamps through the DAC (`Board.settle`), states through the
ADC at the end.

Convergence: every `check_every` steps the largest state change is compared with `tol`; on a
noisy board every sample stops on its own, by the rule of the board's other settles
(`drivers.settle_stop.SampleStop`, with the sample's largest read + node noise per step).
With ``tol = 0`` neither stops early: a fixed step count, checked at its last step.

Accounting: a step's time is the analog step (``settle_step_s``, when the network has fully
connected couplings between free groups) plus one ``mvm_time_s`` per tile read (positions of
every conv coupling with a free destination, and again with a free source); the product of a
clamped source is read once per settle. Joules: the reads' array energy, ``sum (G+ + G-) V^2``
over the driven lines per read, at the equilibrium states, times the read time, for every
read of the settle; the fully connected lines' power times the analog time. Per sample, as
the board runs samples one after the other.

Energy per sample: ``E = sum_free |s|^2 / (2 gain) - Phi(s) + nudge`` with the conv terms
of `drivers.conv`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from drivers import conv
from drivers.errors import ConfigurationError
from drivers.numerics import power_norm
from drivers.settle_stop import SampleStop
from drivers.topology import BIAS, Coupling, Topology
from emulator.noise_table import NoisePool
from emulator.settle_types import SettleNudge, SettleResult

if TYPE_CHECKING:
    from emulator.board import Board


@dataclass
class _Link:
    """One coupling as the settle uses it: weights (scaled by w_max, dense diagonal masked),
    its read-noise coefficient, the tile's line conductances (sum of G+ + G- per row line and
    per column line) and, for a conv, its geometry."""

    c: Coupling
    w: torch.Tensor
    noise_k: float
    g_rows: torch.Tensor
    g_cols: torch.Tensor
    geom: conv.ConvGeometry | None = None
    shared: bool = False  # `w` is the tile's cached weights, which a later write updates in place

    def frozen(self) -> _Link:
        """This link with weights a later write cannot change (a copy where `w` is shared)."""
        return dataclasses.replace(self, w=self.w.clone(), shared=False) if self.shared else self


class ConvSettle:
    """The settles of a `Board` whose topology has conv couplings (`Board.settle` picks it)."""

    def __init__(self, board: Board) -> None:
        self.board = board
        self._pool: NoisePool | None = None
        self._norm: tuple[tuple[int, ...], float] | None = None  # (tiles' weights epochs, norm)

    # ------------------------------------------------------------------------ the network
    def _links(self) -> list[_Link]:
        board = self.board
        topo = board.topology
        assert topo is not None
        out = []
        for c in topo.couplings:
            tile = board._tiles[c.tile]
            cached = w = tile.weights(board.clock)
            if c.w_max != 1.0:
                w = w * c.w_max
            if c.kind == "dense":
                n = w.shape[1]
                w = torch.cat([w[:n] * (1 - torch.eye(n, device=w.device)), w[n:]])
            m = tile.model
            # the tile's read-noise figure in its present state (pcm: state-dependent), which the
            # wires attenuate as they attenuate the signal (`emulator.settle_plan._read_noise_k`)
            sigma = tile.read_noise_rms() * tile.noise_atten if m.read_noise > 0 else 0.0
            k = 2 * (c.w_max * sigma / (m.g_max - m.g_min)) ** 2
            per_row, per_col = tile.line_sums(board.clock)
            geom = conv.ConvGeometry.of(topo, c) if c.kind == "conv" else None
            out.append(_Link(c, w, k, per_row, per_col, geom, w is cached))
        return out

    def _draw(self, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        assert self._pool is not None
        return self._pool.draw(shape)

    def _step_drive(
        self,
        links: list[_Link],
        s: dict[str, torch.Tensor],
        free: list[str],
        held: dict[str, tuple[torch.Tensor, torch.Tensor]],
        noisy: bool,
    ) -> dict[str, torch.Tensor]:
        """The drive of every free group at states `s` (every group, the bias included), read
        noise and node noise added when `noisy`. `held`: per conv tile whose source is clamped,
        its noise-free pre-activations and their pooling (read once per settle)."""
        topo = self.board.topology
        assert topo is not None
        u: dict[str, torch.Tensor] = {}
        var: dict[str, torch.Tensor] = {}

        def add(g: str, d: torch.Tensor, v: torch.Tensor | None) -> None:
            u[g] = u[g] + d if g in u else d
            if v is not None:
                var[g] = var[g] + v if g in var else v

        for unit in _units(links):
            self._conv_drive(unit, s, free, held, noisy, add)
        for link in links:
            c = link.c
            if c.kind == "conv":
                continue
            x = conv.joined(s, c.rows)
            cols = [topo.size(g) for g in c.cols]
            if any(g in free for g in c.cols):
                y = x @ link.w
                v = x.square().sum(1, keepdim=True) * link.noise_k if noisy and link.noise_k else None
                for g, part in zip(c.cols, torch.split(y, cols, 1), strict=True):
                    if g in free:
                        add(g, part, v)
            if c.kind == "bipartite" and any(g in free for g in c.rows):
                y = conv.joined(s, c.cols)
                back = y @ link.w.T
                v = y.square().sum(1, keepdim=True) * link.noise_k if noisy and link.noise_k else None
                rows = [topo.size(g) for g in c.rows]
                for g, part in zip(c.rows, torch.split(back, rows, 1), strict=True):
                    if g in free:
                        add(g, part, v)
        batch = s[BIAS].shape[0]
        for g in free:
            if g not in u:
                u[g] = torch.zeros(batch, topo.groups[g], device=s[BIAS].device)
        if noisy:
            node_var = self.board.preset.periphery.node_noise**2
            for g in free:
                v = var.get(g)
                if v is None and not node_var:
                    continue
                std = node_var**0.5 if v is None else torch.sqrt(v + node_var)
                u[g] = u[g] + std * self._draw(u[g].shape)
        return u

    def _conv_drive(
        self,
        unit: list[_Link],
        s: dict[str, torch.Tensor],
        free: list[str],
        held: dict[str, tuple[torch.Tensor, torch.Tensor | None]],
        noisy: bool,
        add: Callable[[str, torch.Tensor, torch.Tensor | None], None],
    ) -> None:
        """A conv unit's drives (`drivers.conv.units`: one conv tile, or the row tiles of a
        pool group, whose pre-activations the destination's node-side pool sums): every tile
        read at every position (read noise on each position's output lines, then the pooling),
        and transposed at every position with the destination's states routed to the pooling
        winners. `held`: per tile whose source is clamped, its noise-free pre-activations and,
        for the unit's first tile when every source is clamped, the unit's pooled drive."""
        g = unit[0].geom
        assert g is not None
        topo = self.board.topology
        assert topo is not None
        b = unit[0].c.cols
        idx = None
        if any(d in free for d in b):
            read_noise = noisy and any(lk.noise_k for lk in unit)
            whole = held.get(unit[0].c.tile, (None, None))[1]
            if whole is not None and not read_noise:
                y = whole  # clamped sources read without noise: the same every step
            else:
                pre = sum(
                    (held[lk.c.tile][0] if lk.c.tile in held else self._pre(lk, s) for lk in unit[1:]),
                    held[unit[0].c.tile][0] if unit[0].c.tile in held else self._pre(unit[0], s),
                )
                y, idx = conv.pool(pre, g)
                if read_noise:
                    # the read noise rides on the value passed on (each tile's read its own); the
                    # pooling comparators pick their winner from the time-averaged (noise-free)
                    # pre-activations
                    read = pre
                    for lk in unit:
                        if lk.noise_k:
                            sq = conv.patch_norms(s[lk.c.rows[0]], lk.geom)  # type: ignore[arg-type]
                            read = read + torch.sqrt(sq * lk.noise_k) * self._draw(pre.shape)
                    y = conv.pool_at(read, g, idx)
            for d, part in conv.split(y, topo, b):
                if d in free:
                    add(d, part, None)
        y_dst = conv.joined(s, b)
        for lk in unit:
            a, gm = lk.c.rows[0], lk.geom
            assert gm is not None
            if a not in free:
                continue
            if idx is None:  # else the comparators' winners of this step's (noisy) read
                idx = _unit_winners(unit, s)
            back = conv.backward(y_dst, lk.w, gm, idx)
            v = None
            if noisy and lk.noise_k:
                routed = conv.unpool(y_dst, gm, idx).square().sum(1, keepdim=True)
                ones = torch.ones(1, 1, gm.kernel, gm.kernel, device=back.device)
                per_node = F.conv_transpose2d(routed, ones, padding=gm.padding) * lk.noise_k
                v = per_node.expand(-1, gm.c_in, -1, -1).reshape(back.shape)
            add(a, back, v)

    @staticmethod
    def _pre(link: _Link, s: dict[str, torch.Tensor]) -> torch.Tensor:
        assert link.geom is not None
        return conv.pre_activation(s[link.c.rows[0]], link.w, link.geom)

    # ------------------------------------------------------------------------------ settle
    def settle(
        self,
        clamp: dict[str, torch.Tensor],
        nudge: SettleNudge,
        init: dict[str, torch.Tensor] | None,
        trace: int,
    ) -> SettleResult:
        """Relax from the clamps and the nudge as the DAC applied them (see the module doc)."""
        board = self.board
        topo = board.topology
        assert topo is not None
        if topo.mode != "analog":
            raise ConfigurationError(
                "a network with conv couplings settles in analog mode on the emulated board; for a "
                "board that only multiplies, settle it on the host (EBBlock settle='host')"
            )
        for c in topo.couplings:
            if c.kind == "conv" and any(g in clamp for g in c.cols) and c.rows[0] not in clamp:
                dst = " + ".join(map(repr, c.cols))
                raise ConfigurationError(
                    f"conv tile {c.tile!r}: its destination {dst} is clamped and its source "
                    f"{c.rows[0]!r} free; clamp the source too, or nudge the destination"
                )
        batch = next(iter(clamp.values())).shape[0]
        dev = board.device
        links = self._links()
        free = [g for g in topo.groups if g not in clamp]
        s: dict[str, torch.Tensor] = {BIAS: torch.ones(batch, 1, device=dev), **clamp}
        for g in free:
            x0 = (init or {}).get(g)
            s[g] = torch.zeros(batch, topo.groups[g], device=dev) if x0 is None else x0.clone()
        noisy = bool(board.preset.periphery.node_noise) or any(link.noise_k for link in links)
        if noisy:
            size = max(
                [batch * topo.groups[g] for g in free]
                + [batch * lk.geom.c_out * lk.geom.positions for lk in links if lk.geom is not None]
            )
            if self._pool is None or self._pool.block < size:
                self._pool = NoisePool(board.noise, size, dev)
            else:
                self._pool.refresh(size)
        held: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for unit in _units(links):
            for lk in unit:
                if lk.c.rows[0] in clamp:
                    held[lk.c.tile] = (self._pre(lk, s), None)
            if all(lk.c.tile in held for lk in unit):
                pre = sum((held[lk.c.tile][0] for lk in unit[1:]), held[unit[0].c.tile][0])
                held[unit[0].c.tile] = (held[unit[0].c.tile][0], conv.pool(pre, unit[0].geom)[0])  # type: ignore[arg-type]
        budget, gain = topo.budget, topo.gain
        dt = min(budget.dt, 1.8 / (1.0 + gain * self._coupling_norm(links, s, free)))
        elastic, currents = nudge.elastic, nudge.currents
        traces: dict[str, list[torch.Tensor]] = {g: [] for g in free} if trace else {}
        trace_steps: list[int] = []

        sizes = [topo.groups[g] for g in free]

        def joined() -> torch.Tensor:  # the free states as one (nodes, batch) tensor
            return torch.cat([s[g] for g in free], 1).T

        # a noisy settle stops per sample (`drivers.settle_stop`); a noise-free one when the
        # batch's largest change is within tol
        stop = SampleStop(joined(), budget.tol) if noisy and free and not budget.fixed_steps else None

        def record(step: int) -> None:
            trace_steps.append(step)
            if stop is None:
                for g in free:
                    traces[g].append(s[g].clone())
                return
            for g, part in zip(free, stop.view(joined()).T.split(sizes, 1), strict=True):
                traces[g].append(part.clone())

        if trace:
            record(0)
        check_every = budget.check_interval
        residual, step, running = float("inf"), 0, batch
        converged = False
        while step < budget.max_steps:
            u = self._step_drive(links, s, free, held, noisy)
            for g, (beta, target) in elastic.items():
                u[g] = u[g] + beta * (target - s[g])
            for g, (beta, grad) in currents.items():
                u[g] = u[g] - beta * grad
            new = {g: topo.activation.rho(u[g], gain) for g in free}
            step += 1
            checked = step % check_every == 0 or step == budget.max_steps
            change = None
            if checked and stop is None:
                residual = max(float((new[g] - s[g]).abs().max()) for g in free) if free else 0.0
                converged = residual <= budget.tol
            elif checked:
                change = torch.cat([(new[g] - s[g]).abs() for g in free], 1).T
                sd = self._noise_sd(links, s).mul_(gain)
            for g in free:  # s + dt (new - s), in place on the step's own tensors: the same roundings
                s[g].add_(new[g].sub_(s[g]).mul_(dt))
            if stop is not None and change is not None:
                running, residual = stop.check(joined(), sd, change, step, dt)
            if trace and step % trace == 0:
                record(step)
            if checked and (converged if stop is None else running == 0):
                break
        mean_steps: float = step
        if stop is not None:  # the stopped samples' states, their steps and residuals
            state = joined().contiguous()
            stop.final(state, step)
            s.update(zip(free, state.T.split(sizes, 1), strict=True))
            mean_steps, residual, converged = stop.outcome()
        if trace and trace_steps[-1] != step:
            record(step)
        seconds, joules = self._account(links, s, free, held, mean_steps, dt, batch)
        states = {g: board._adc_state(s[g], board._channel[g]) for g in free}
        final = dict(s)
        out_trace = None
        if trace:
            stacked = {g: torch.stack(traces[g]) for g in free}
            t = len(trace_steps)
            energies = [
                _energy(topo, links, {**final, **{g: stacked[g][i] for g in free}}, free, nudge)
                for i in range(t)
            ]
            out_trace = {"step": torch.tensor(trace_steps), "energy": torch.stack(energies)}
            for g in free:
                out_trace[g] = board._adc_state(stacked[g], board._channel[g])
        outcome = (step, converged, residual)
        sample_steps = None if stop is None else stop.steps
        if trace:
            value = _energy(topo, links, final, free, nudge)
            return SettleResult(
                states, *outcome, lambda: value, seconds, joules, out_trace, value, sample_steps=sample_steps
            )
        energy = _later_energy(topo, links, final, free, nudge)
        return SettleResult(states, *outcome, energy, seconds, joules, sample_steps=sample_steps)

    def _noise_sd(self, links: list[_Link], s: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per sample (batch,), the largest read + node noise std of a drive at states `s`: the
        noise one step adds to a node's target, before the gain (`drivers.settle_stop`)."""
        batch = next(iter(s.values())).shape[0]
        var = self.board.preset.periphery.node_noise**2
        worst = torch.zeros(batch, device=self.board.device)
        for link in links:
            if not link.noise_k:
                continue
            c = link.c
            if c.kind == "conv":
                assert link.geom is not None
                x = s[c.rows[0]]
                worst = torch.maximum(worst, conv.patch_norms(x, link.geom).flatten(1).amax(1) * link.noise_k)
                continue
            x = conv.joined(s, c.rows)
            worst = torch.maximum(worst, x.square().sum(1) * link.noise_k)
        return worst.add_(var).sqrt_()

    def _coupling_norm(self, links: list[_Link], s: dict[str, torch.Tensor], free: list[str]) -> float:
        """A power-iteration estimate of the norm of the free groups' drive on one another
        (pooling winners at a random state), with a 10 % margin: the step is cut to
        ``1.8 / (1 + gain norm)`` where it would overshoot, as in `emulator.settle`. Kept per
        weights version of the tiles."""
        board = self.board
        topo = board.topology
        assert topo is not None
        epochs = (*(board._tiles[lk.c.tile].weights_epoch for lk in links), len(free))
        if self._norm is not None and self._norm[0] == epochs:
            return self._norm[1]
        gen = torch.Generator(device=board.device).manual_seed(0)
        one = {g: v[:1] for g, v in s.items()}
        v = {g: torch.rand(1, topo.groups[g], generator=gen, device=board.device) for g in free}

        def drive(v: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            # the free-to-free drive alone: clamped states and the bias at 0
            st = {g: torch.zeros_like(x) for g, x in one.items()}
            st.update(v)
            return self._step_drive(links, st, free, {}, noisy=False)

        # as `emulator.settle_plan`: at least 4 iterations, more while the estimate rises by 1 %
        norm = power_norm(drive, v, iters=40, margin=1.1, stop=1.01, eps=1e-30)[0]
        self._norm = (epochs, norm)
        return norm

    def _account(
        self,
        links: list[_Link],
        s: dict[str, torch.Tensor],
        free: list[str],
        held: dict[str, tuple[torch.Tensor, torch.Tensor | None]],
        steps: float,
        dt: float,
        batch: int,
    ) -> tuple[float, float]:
        """(seconds, joules) of the settle: see the module doc."""
        board = self.board
        topo = board.topology
        assert topo is not None
        per = board.preset.periphery
        v2 = per.v_read**2
        analog = any(lk.c.kind != "conv" and any(g in free for g in lk.c.rows + lk.c.cols) for lk in links)
        reads_per_step, once, read_j, analog_w = 0, 0, 0.0, 0.0
        winners = {lk.c.tile: _unit_winners(u, s) for u in _units(links) for lk in u if lk.c.rows[0] in free}
        for link in links:
            c = link.c
            if c.kind == "conv":
                g = link.geom
                assert g is not None
                a, b = c.rows[0], c.cols
                x = s[a]
                if any(d in free for d in b):
                    fwd = float(conv.patch_totals(x.square(), g) @ link.g_rows[: g.kernel_rows])
                    fwd += batch * g.positions * float(link.g_rows[g.kernel_rows :].sum())  # the bias line
                    if c.tile in held:
                        once += g.positions
                        read_j += fwd * per.mvm_time_s
                    else:
                        reads_per_step += g.positions
                        read_j += fwd * per.mvm_time_s * steps
                if a in free:
                    routed = conv.unpool(conv.joined(s, b), g, winners[c.tile]).square().sum((2, 3))
                    reads_per_step += g.positions
                    read_j += float(routed.sum(0) @ link.g_cols) * per.mvm_time_s * steps
                continue
            x = conv.joined(s, c.rows)
            analog_w += float(x.square().sum(0) @ link.g_rows)
            if c.kind == "bipartite":
                y = conv.joined(s, c.cols)
                analog_w += float(y.square().sum(0) @ link.g_cols)
        analog_s = per.settle_step_s * dt / topo.budget.dt if analog else 0.0
        step_s = analog_s + reads_per_step * per.mvm_time_s
        seconds = (step_s * steps + once * per.mvm_time_s) * batch
        joules = (read_j + analog_w * analog_s * steps) * v2
        return seconds, joules


def _later_energy(
    topo: Topology, links: list[_Link], s: dict[str, torch.Tensor], free: list[str], nudge: SettleNudge
) -> Callable[[], torch.Tensor]:
    """`_energy` of a finished settle as a function to call when someone asks (a training
    step never does), on what a later settle or write cannot change: the weights copied
    where the links share the tiles' cached tensors, the nudge's tensors copied. It uses
    the final states as `s` holds them (the settle's results: a caller that writes into
    those before reading the energy changes it)."""
    held, kept, states = [lk.frozen() for lk in links], nudge.copied(), dict(s)
    return lambda: _energy(topo, held, states, free, kept)


def _energy(
    topo: Topology, links: list[_Link], s: dict[str, torch.Tensor], free: list[str], nudge: SettleNudge
) -> torch.Tensor:
    """``E = sum_free G(s) - Phi(s) + nudge`` per sample (``G = |s|^2 / (2 gain)`` for the hard
    sigmoid, `drivers.activation`)."""
    zero = torch.zeros(s[BIAS].shape[0], device=s[BIAS].device)
    if topo.activation.hard:
        e = sum((s[g].square().sum(1) for g in free), zero) / (2 * topo.gain)
    else:
        e = sum((topo.activation.leak(s[g], topo.gain).sum(1) for g in free), zero)
    for unit in _units(links):
        xs, ws, gs = [s[lk.c.rows[0]] for lk in unit], [lk.w for lk in unit], [lk.geom for lk in unit]
        e = e - conv.unit_phi(xs, conv.joined(s, unit[0].c.cols), ws, gs)  # type: ignore[arg-type]
    for link in links:
        c = link.c
        if c.kind == "conv":
            continue
        x = conv.joined(s, c.rows)
        if c.kind == "dense":
            n = link.w.shape[1]
            e = e - 0.5 * ((x[:, :n] @ link.w[:n]) * x[:, :n]).sum(1)
            if link.w.shape[0] > n:
                e = e - (x[:, :n] * link.w[n]).sum(1)
        else:
            y = conv.joined(s, c.cols)
            e = e - ((x @ link.w) * y).sum(1)
    return nudge.add_energy(e, s)


def _units(links: list[_Link]) -> list[list[_Link]]:
    """The conv links as units that pool together (`drivers.conv.units`)."""
    out: list[list[_Link]] = []
    at: dict[str, int] = {}
    for lk in links:
        if lk.geom is None:
            continue
        group = lk.c.pool_group
        if group and group in at:
            out[at[group]].append(lk)
            continue
        if group:
            at[group] = len(out)
        out.append([lk])
    return out


def _unit_winners(unit: list[_Link], s: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The pooling winners of a unit at states `s` (noise-free pre-activations)."""
    xs, ws, gs = [s[lk.c.rows[0]] for lk in unit], [lk.w for lk in unit], [lk.geom for lk in unit]
    return conv.unit_winners(xs, ws, gs)  # type: ignore[arg-type]
