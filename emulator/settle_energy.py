"""The energy and power of the emulated board's settles: the network's energy per sample
(computed when read where a training step would never read it: `later_energy`,
`later_pair_energy`), the energies of a trace, and the array's power at equilibrium, from
which `SettleEngine` accounts a settle's joules."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F

from drivers.activation import Activation
from drivers.topology import BIAS
from emulator.clamp_cache import ClampCache
from emulator.settle_plan import Plan, Workspace
from emulator.settle_types import SettleNudge


def energy(
    s: dict[str, torch.Tensor],
    plan: Plan,
    nudge: SettleNudge,
    products: dict[int, tuple[torch.Tensor, bool]],
    gain: float,
    act: Activation,
) -> torch.Tensor:
    """Energy per sample, E = sum_free G(s) - Phi(s) + nudge terms, G = |s|^2 / (2 gain) for
    the hard sigmoid (`drivers.activation`). `products`
    holds ``s_src @ block`` of the clamped sources, already computed by the settle.
    `gain`, `act`: the activation the settle ran with (a deferred energy passes the one it
    settled with: the board may be reset since)."""
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


def const_products(s: dict[str, torch.Tensor], plan: Plan) -> dict[int, tuple[torch.Tensor, bool]]:
    """Per energy pair, ``s_src @ block`` of the clamped sources (for `energy`)."""
    products = {}
    for term in plan.const_terms:
        out = F.linear(s[term.src], term.matrix)
        for (_dst, a, b, _k), (pair, transposed) in zip(term.dsts, term.pairs, strict=True):
            products[pair] = (out[:, a:b], transposed)
    return products


def trace_energy(
    s: dict[str, torch.Tensor],
    stacked: dict[str, torch.Tensor],
    plan: Plan,
    nudge: SettleNudge,
    products: dict[int, tuple[torch.Tensor, bool]],
    gain: float,
    act: Activation,
) -> torch.Tensor:
    """Energies (T, B) of the recorded states, in one batched evaluation after the settle:
    the clamped groups, products and nudges are repeated over the T records."""
    t = next(iter(stacked.values())).shape[0] if stacked else 1

    def rep(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.repeat(t, 1)

    flat = {g: rep(v) for g, v in s.items() if g not in stacked}
    flat.update({g: v.reshape(-1, v.shape[-1]) for g, v in stacked.items()})
    prods = {i: (rep(p), tr) for i, (p, tr) in products.items()}
    return energy(flat, plan, nudge.repeated(t), prods, gain, act).reshape(t, -1)  # type: ignore[arg-type]


def frozen_plan(plan: Plan) -> Callable[[], Plan]:
    """A function giving a shallow copy of `plan` whose clamped products' matrices and
    energy pairs read copies of the present weights (what `energy` and
    `const_products` read), each with its own strides and offset, so products on them
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
    built: list[Plan] = []

    def frozen() -> Plan:
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
            dataclasses.replace(t, matrix=view(spot)) for t, spot in zip(plan.const_terms, terms, strict=True)
        ]
        out.energy_pairs = [
            (rg, cg, view(spot), f) for (rg, cg, _b, f), spot in zip(plan.energy_pairs, pairs, strict=True)
        ]
        out.workspaces, out.frozen, out.frozen_layout = {}, None, None
        built.append(out)
        return out

    plan.frozen = (plan.epochs, frozen)
    return frozen


def later_energy(
    current: tuple[ClampCache | None, int],
    s: dict[str, torch.Tensor],
    plan: Plan,
    nudge: SettleNudge,
    activation: tuple[float, Activation],
    batch: int,
) -> Callable[[], torch.Tensor] | None:
    """The energy of a finished analog settle (`Workspace.energy`) as a function to call
    when someone asks, or None where it must be computed now. It uses the settle's final
    states as `s` holds them (the states the settle returns: a caller that writes into
    those before reading the energy changes it), the constant drive kept
    with the clamp cache, the nudge's tensors (copies of the targets) and copies of the
    free-to-free matrices, which later writes change in place; when those copies would
    cost more than the energy itself (matrices larger than the states), or the constant
    drive is not cached, it is computed now. `current`: the settle's clamp cache entry and
    how many times over the batch repeats its clamps; `activation`: (gain, activation) of
    the settle."""
    entry, reps = current
    if entry is None or entry.plan is not plan or entry.drive is None:
        return None
    if sum(m.numel() for ms in plan.by_dst.values() for _src, m in ms) > plan.n_free * batch:
        return None
    const = entry.drive
    gain, act = activation
    by_dst = {g: [(src, m.clone()) for src, m in ms] for g, ms in plan.by_dst.items()}
    states = {g: s[g] for g in plan.free}
    currents = nudge.currents
    elastic = {g: (beta, target.clone()) for g, (beta, target) in nudge.elastic.items()}
    rows = plan.rows

    def deferred() -> torch.Tensor:
        state = torch.cat([states[g].T for g in plan.free])  # (nodes, batch), as the workspace
        drive = const if reps == 1 else torch.cat([const] * reps, dim=1)
        if currents:
            drive = drive.clone()
            for g, (beta, grad) in currents.items():
                drive[rows[g]].sub_(grad.T, alpha=beta)
        links = [(rows[g], [(m.T, state[rows[src]]) for src, m in by_dst[g]]) for g in plan.free]
        return Workspace(state, drive, rows, links).energy(0.5 / gain, elastic, act)

    return deferred


def later_pair_energy(
    s: dict[str, torch.Tensor], plan: Plan, nudge: SettleNudge, gain: float, act: Activation
) -> Callable[[], torch.Tensor]:
    """The energy of a finished analog settle whose clamped sources do not all enter with
    factor 1 (a dense tile), as a function to call when someone asks: `energy` over the
    clamped products, exactly as it would run now, on copies of the plan's matrices taken
    once per weights version (`frozen_plan`, shared by every settle of that version) and
    of the nudge's tensors. It uses the settle's final states and clamps as `s` holds them
    (see `later_energy`). `gain`, `act`: the settle's (the board may be reconfigured or
    reset before the call)."""
    frozen = frozen_plan(plan)
    states = dict(s)
    kept = nudge.copied()

    def pair_energy() -> torch.Tensor:
        held = frozen()
        return energy(states, held, kept, const_products(states, held), gain, act)

    return pair_energy


def settle_power(
    plan: Plan,
    s: dict[str, torch.Tensor],
    ws: Workspace | None,
    current: tuple[ClampCache | None, int],
    v_read: float,
) -> float:
    """Array power (W, summed over the batch) at the present node voltages: every line
    driven at its node voltage against virtual ground, sum_ij (G+ + G-) V^2. With the
    settle's `Workspace` the free groups' lines take one product; the clamped groups'
    share is kept with the cached constant drive (`ClampCache.line_power`), since it
    depends on the clamps and the weights only (`current`: the settle's entry and how many
    times over the batch repeats its clamps). `v_read`: the read voltage of a state of 1."""
    batch = next(iter(s.values())).shape[0]
    total = batch * plan.bias_conductance
    done: dict[str, slice] = {}
    if ws is not None and plan.free_lines is not None:
        total += float(ws.state.square().sum(1) @ plan.free_lines)
        done = ws.rows
    entry, reps = current
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
    return total * v_read**2
