"""Pure-torch reference Deep Hopfield Network: the digital baseline and the gradient reference.

It uses exactly the conventions of the Device interface (`drivers.base`, `drivers.topology`):

- node states in [0, 1]; activation ``rho(u)``, the topology's `drivers.activation.Activation`
  (the hard sigmoid ``clamp(gain * u, 0, 1)`` by default);
- a bipartite tile ``W`` (rows x cols) drives its column groups with ``s_rows @ W`` and its
  row groups with ``s_cols @ W.T``; the reserved group ``bias`` is one node held at 1, so a
  bias is one more row of a tile;
- a dense tile (N + optional bias row) x N drives its groups with ``s_rows @ W``, diagonal
  disconnected;
- ``Phi = sum_bipartite s_rows^T W s_cols + sum_dense (1/2 s^T W s + b^T s)``;
- energy ``E = sum_free G(s) - Phi + beta * l`` with ``G' = rho^{-1}`` (``|s|^2 / (2 gain)``
  for the hard sigmoid) and the nudge's cost
  ``l = 1/2 |s - target|^2 + grad . s``, so a nudge adds ``beta (target - s) - beta grad``
  to the drive, as on a board;
- the settle integrates ``s <- (1 - dt) s + dt rho(drive)`` (dt = 1: the plain fixed-point
  iteration) under `Topology.budget`.

With ``symmetric=True`` (the default) the N x N part of a dense tile is used as
``(W + W^T) / 2``: the drive is then exactly dPhi/ds, and gradients with respect to the raw
matrix are those EP estimates (``dPhi/dW_ij = s_i s_j / 2``). With ``symmetric=False`` it
behaves like a crossbar, whose W_ij and W_ji are two devices.

Gradients of a loss of the free equilibrium s* are given by

- implicit differentiation (`DHN.vjp`, `DHN.forward`): at the fixed point
  ``s = rho(s A + c)`` with ``D = diag(rho'(drive))`` (zero on saturated hard-sigmoid units), the adjoint
  ``v`` solves ``(I - A D) v = dL/ds`` and ``dL/dc = D v``, which autograd carries to the
  weights and to the clamped inputs. The fixed point is first polished by semismooth Newton
  steps so the result is exact to float precision;
- backpropagation through time through the settle iterations (`DHN.settle_bptt`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from drivers import conv
from drivers.activation import HARD_SIGMOID, Activation
from drivers.base import Equilibrium, Nudge
from drivers.numerics import denormals_flushed
from drivers.topology import BIAS, Coupling, SettleBudget, Topology

States = dict[str, Tensor]


def rho(u: Tensor, gain: float, act: Activation = HARD_SIGMOID) -> Tensor:
    """The board's activation (`drivers.activation`; by default ``clamp(gain * u, 0, 1)``)."""
    return act.rho(u, gain)


def rho_prime(u: Tensor, gain: float, act: Activation = HARD_SIGMOID) -> Tensor:
    """Derivative of `rho` (for the hard sigmoid: ``gain`` where the unit is not saturated, else 0)."""
    return act.rho_prime(u, gain)


@dataclass
class RefEquilibrium:
    states: States  # every group: free ones settled, clamped ones as given
    steps: int
    converged: bool
    residual: float
    newton_steps: int = 0


def _as_tensor(x: Tensor | np.ndarray | None, like: Tensor) -> Tensor | None:
    if x is None:
        return None
    return torch.as_tensor(x).to(dtype=like.dtype, device=like.device)


def _nudge_drive(n: Nudge, s: Tensor) -> Tensor:
    """The extra drive a nudge adds: ``beta (target - s) - beta grad``."""
    out = torch.zeros_like(s)
    tgt = _as_tensor(n.target, s)
    grd = _as_tensor(n.grad, s)
    if tgt is not None:
        out = out + n.beta * (tgt - s)
    if grd is not None:
        out = out - n.beta * grd
    return out


def _nudge_cost(n: Nudge, s: Tensor) -> Tensor:
    """``l = 1/2 |s - target|^2 + grad . s`` per sample."""
    out = torch.zeros(s.shape[0], dtype=s.dtype, device=s.device)
    tgt = _as_tensor(n.target, s)
    grd = _as_tensor(n.grad, s)
    if tgt is not None:
        out = out + 0.5 * ((s - tgt) ** 2).sum(-1)
    if grd is not None:
        out = out + (grd * s).sum(-1)
    return out


class DHN(nn.Module):
    """A reference DHN on a `Topology`: weights are ``nn.Parameter`` per tile, (rows, cols)."""

    def __init__(
        self,
        topology: Topology,
        weights: Mapping[str, Tensor | np.ndarray] | None = None,
        *,
        symmetric: bool = True,
        dtype: torch.dtype = torch.float64,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.topology = topology
        self.symmetric = symmetric
        self.weights = nn.ParameterDict()
        for c in topology.couplings:
            shape = topology.tile_shape(c.tile)
            if weights is not None and c.tile in weights:
                w = torch.as_tensor(weights[c.tile]).detach().clone().to(dtype)
                if tuple(w.shape) != shape:
                    raise ValueError(
                        f"tile {c.tile!r}: weights have shape {tuple(w.shape)}, expected {shape}"
                    )
            else:
                w = torch.randn(shape, generator=generator, dtype=dtype) / math.sqrt(shape[0])
            self.weights[c.tile] = nn.Parameter(w)
        self._masks: dict[str, Tensor] = {}
        # per dense tile: (its weights tensor, their version and storage, the effective
        # matrix), reused while the tensor is neither written nor moved (`_dense_matrix`)
        self._dense: dict[str, tuple[Tensor, int, int, Tensor]] = {}

    # ----------------------------------------------------------------------------------- basics
    @property
    def gain(self) -> float:
        return self.topology.gain

    @property
    def activation(self) -> Activation:
        return self.topology.activation

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.weights.values())).dtype

    def size(self, group: str) -> int:
        return self.topology.size(group)

    def _cat(self, groups: tuple[str, ...], states: Mapping[str, Tensor], batch: int, like: Tensor) -> Tensor:
        parts = []
        for g in groups:
            if g == BIAS:
                parts.append(torch.ones(batch, 1, dtype=like.dtype, device=like.device))
            elif g in states:
                parts.append(states[g])
            else:
                parts.append(torch.zeros(batch, self.size(g), dtype=like.dtype, device=like.device))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def _dense_matrix(self, c: Coupling) -> Tensor:
        """The effective N x N (+ bias row) matrix of a dense tile: diagonal removed,
        symmetrised when `symmetric`. Without autograd it is kept until the weights are
        written (a new version) or moved (new storage): EP reads it for dPhi/dx of both
        nudged phases of each block at the same weights (4 times per step of the VAE), 5
        torch calls each time."""
        w = self.weights[c.tile]
        tracked = w.requires_grad and torch.is_grad_enabled()
        held = self._dense.get(c.tile)
        if (
            not tracked
            and held is not None
            and held[0] is w
            and held[1] == w._version
            and held[2] == w.data_ptr()
        ):
            return held[3]
        n = w.shape[1]
        key = f"{c.tile}:{n}:{w.dtype}:{w.device}"
        if key not in self._masks:
            self._masks[key] = 1.0 - torch.eye(n, dtype=w.dtype, device=w.device)
        mask = self._masks[key]
        core = w[:n]
        core = 0.5 * (core + core.T) * mask if self.symmetric else core * mask
        out = torch.cat([core, w[n:]], dim=0) if w.shape[0] > n else core
        if not tracked:
            self._dense[c.tile] = (w, w._version, w.data_ptr(), out)
        return out

    def effective_weights(self) -> dict[str, Tensor]:
        """The matrices the drive uses (dense tiles symmetrised / diagonal removed)."""
        out = {}
        for c in self.topology.couplings:
            out[c.tile] = self._dense_matrix(c) if c.kind == "dense" else self.weights[c.tile]
        return out

    def _split_add(self, acc: States, groups: tuple[str, ...], d: Tensor, only: set[str] | None) -> None:
        start = 0
        for g in groups:
            n = self.size(g)
            if g != BIAS and (only is None or g in only):
                part = d[:, start : start + n]
                acc[g] = acc[g] + part if g in acc else part
            start += n

    def drive(
        self,
        states: Mapping[str, Tensor],
        *,
        targets: set[str] | None = None,
        sources: set[str] | None = None,
        bias: bool = True,
    ) -> States:
        """dPhi/ds for the groups in `targets` (default: all), from the states of the groups in
        `sources` (default: all given) plus, with `bias`, the bias rows."""
        any_state = next(iter(states.values()))
        batch = any_state.shape[0]
        src = {g: s for g, s in states.items() if sources is None or g in sources}
        out: States = {}
        units = {u[0].tile: u for u in conv.units(self.topology)}  # pool groups sum before pooling
        for c in self.topology.couplings:
            row_groups = tuple(g for g in c.rows if g != BIAS or bias)
            if not row_groups:
                continue  # a tile of the bias row alone (a calibration tile), bias left out
            if c.kind == "conv":
                if c.tile in units:
                    self._conv_drive(units[c.tile], states, src, out, targets, bias, any_state)
                continue
            if c.kind == "dense":
                w = self._dense_matrix(c)
                n = w.shape[1]
                if not bias and w.shape[0] > n:
                    w = w[:n]
                if targets is not None and not any(g in targets for g in c.cols):
                    continue
                s_rows = self._cat(row_groups, src, batch, any_state)
                self._split_add(out, c.cols, s_rows @ w, targets)
                continue
            w = self.weights[c.tile]
            if not bias and BIAS in c.rows:
                keep = torch.cat(
                    [torch.full((self.size(g),), g != BIAS, dtype=torch.bool) for g in c.rows]
                ).to(w.device)
                w = w[keep]
            if targets is None or any(g in targets for g in c.cols):
                s_rows = self._cat(row_groups, src, batch, any_state)
                self._split_add(out, c.cols, s_rows @ w, targets)
            if targets is None or any(g in targets for g in row_groups):
                s_cols = self._cat(c.cols, src, batch, any_state)
                self._split_add(out, row_groups, s_cols @ w.T, targets)
        for g in targets if targets is not None else self.topology.groups:
            if g not in out:
                out[g] = torch.zeros(batch, self.size(g), dtype=any_state.dtype, device=any_state.device)
        return out

    def _conv_drive(
        self,
        unit: tuple[Coupling, ...],
        states: Mapping[str, Tensor],
        src: Mapping[str, Tensor],
        out: States,
        targets: set[str] | None,
        bias: bool,
        like: Tensor,
    ) -> None:
        """A conv unit's share of `drive` (one conv coupling, or the tiles of a pool group,
        `drivers.conv.units`): ``pool(sum_m conv(x_m) + b)`` on its destination map and
        ``conv_transpose(unpool(y))`` through every tile on its source map, the pooling winners
        taken at the sources' states in `states` (given or not as sources)."""
        geoms = [conv.ConvGeometry.of(self.topology, c) for c in unit]
        ws = [self.weights[c.tile] for c in unit]
        b = unit[0].cols  # one destination map, or several of one size (their channels joined)
        batch = like.shape[0]
        x_states = []
        for c in unit:
            x_state = states.get(c.rows[0])
            if x_state is None:
                x_state = torch.zeros(batch, self.size(c.rows[0]), dtype=like.dtype, device=like.device)
            x_states.append(x_state)
        idx = conv.unit_winners([x.detach() for x in x_states], [w.detach() for w in ws], geoms)
        wanted = targets is None or any(d in targets for d in b)
        if wanted and (any(c.rows[0] in src for c in unit) or bias):
            xs = [
                src[c.rows[0]] if c.rows[0] in src else torch.zeros_like(x)
                for c, x in zip(unit, x_states, strict=True)
            ]
            y = conv.pool_at(conv.unit_pre(xs, ws, geoms, bias=bias), geoms[0], idx)
            for d, part in conv.split(y, self.topology, b):
                if targets is None or d in targets:
                    out[d] = out[d] + part if d in out else part
        if not any(d in src for d in b):
            return
        y_src = conv.joined(
            {d: src[d] if d in src else torch.zeros(batch, self.size(d), dtype=like.dtype, device=like.device)
             for d in b},
            b,
        )  # fmt: skip
        for c, g, w in zip(unit, geoms, ws, strict=True):
            a = c.rows[0]
            if targets is None or a in targets:
                d = conv.backward(y_src, w, g, idx)
                out[a] = out[a] + d if a in out else d

    def has_conv(self) -> bool:
        return any(c.kind == "conv" for c in self.topology.couplings)

    def phi(self, states: Mapping[str, Tensor]) -> Tensor:
        """The primitive function Phi per sample, shape (B,)."""
        any_state = next(iter(states.values()))
        batch = any_state.shape[0]
        total = torch.zeros(batch, dtype=any_state.dtype, device=any_state.device)
        for unit in conv.units(self.topology):
            xs, y = [states[c.rows[0]] for c in unit], conv.joined(states, unit[0].cols)
            geoms = [conv.ConvGeometry.of(self.topology, c) for c in unit]
            total = total + conv.unit_phi(xs, y, [self.weights[c.tile] for c in unit], geoms)
        for c in self.topology.couplings:
            if c.kind == "conv":
                continue
            s_rows = self._cat(c.rows, states, batch, any_state)
            if c.kind == "dense":
                w = self._dense_matrix(c)
                n = w.shape[1]
                s = s_rows[:, :n]
                total = total + 0.5 * ((s @ w[:n]) * s).sum(-1)
                if w.shape[0] > n:
                    total = total + (s * w[n]).sum(-1)
            else:
                s_cols = self._cat(c.cols, states, batch, any_state)
                total = total + ((s_rows @ self.weights[c.tile]) * s_cols).sum(-1)
        return total

    def energy(
        self, states: Mapping[str, Tensor], clamped: set[str], nudge: Mapping[str, Nudge] | None = None
    ) -> Tensor:
        """``E = sum_free G(s) - Phi + beta l`` per sample (``G = |s|^2/(2 gain)`` for the hard sigmoid)."""
        e = -self.phi(states)
        act = self.activation
        for g, s in states.items():
            if g not in clamped:
                e = e + (0.5 * (s**2).sum(-1) / self.gain if act.hard else act.leak(s, self.gain).sum(-1))
        for g, n in (nudge or {}).items():
            e = e + n.beta * _nudge_cost(n, states[g])
        return e

    def free_groups(self, clamp: Mapping[str, Tensor]) -> list[str]:
        unknown = set(clamp) - set(self.topology.groups)
        if unknown:
            raise ValueError(
                f"clamped groups {sorted(unknown)} are not in the topology {sorted(self.topology.groups)}"
            )
        for c in self.topology.couplings:
            if c.kind == "conv" and any(d in clamp for d in c.cols) and c.rows[0] not in clamp:
                dst = " + ".join(map(repr, c.cols))
                raise ValueError(
                    f"conv tile {c.tile!r}: its destination {dst} is clamped and its source "
                    f"{c.rows[0]!r} free; the pooling winners would move with the free source, so "
                    "the clamped drive is not constant: clamp the source too, or nudge the destination"
                )
        return [g for g in self.topology.groups if g not in clamp]

    def _prepare(self, clamp: Mapping[str, Tensor | np.ndarray]) -> States:
        w = next(iter(self.weights.values()))
        return {g: torch.as_tensor(x).to(dtype=w.dtype, device=w.device) for g, x in clamp.items()}

    # ----------------------------------------------------------------------------------- settle
    def _step(
        self,
        s_free: States,
        clamp: States,
        c_ext: States,
        nudge: Mapping[str, Nudge] | None,
        dt: float,
        free: list[str],
    ) -> States:
        d = self.drive(s_free, targets=set(free), sources=set(free), bias=False)
        new: States = {}
        for g in free:
            u = d[g] + c_ext[g]
            if nudge and g in nudge:
                u = u + _nudge_drive(nudge[g], s_free[g])
            r = rho(u, self.gain, self.activation)
            new[g] = r if dt == 1.0 else s_free[g] + dt * (r - s_free[g])
        return new

    def _external(self, clamp: States, free: list[str], batch: int) -> States:
        """The constant drive of the free groups from the clamped groups and the biases."""
        w = next(iter(self.weights.values()))
        zeros = {g: torch.zeros(batch, self.size(g), dtype=w.dtype, device=w.device) for g in free}
        return self.drive({**clamp, **zeros}, targets=set(free), sources=set(clamp), bias=True)

    def _init(self, init: Mapping[str, Tensor] | None, free: list[str], batch: int) -> States:
        w = next(iter(self.weights.values()))
        out = {}
        for g in free:
            if init is not None and g in init:
                out[g] = torch.as_tensor(init[g]).to(dtype=w.dtype, device=w.device).clone()
            else:
                out[g] = torch.zeros(batch, self.size(g), dtype=w.dtype, device=w.device)
        return out

    @torch.no_grad()
    def settle(
        self,
        clamp: Mapping[str, Tensor | np.ndarray],
        nudge: Mapping[str, Nudge] | None = None,
        init: Mapping[str, Tensor] | None = None,
        *,
        budget: SettleBudget | None = None,
        newton: bool = False,
    ) -> RefEquilibrium:
        """Relax to the (nudged) fixed point with the `clamp` groups held.

        `budget` defaults to `topology.budget`. With `newton`, finish with semismooth Newton
        steps on the active set, which gives the fixed point to float precision."""
        b = budget or self.topology.budget
        cl = self._prepare(clamp)
        free = self.free_groups(cl)
        if not cl:
            raise ValueError("settle needs at least one clamped group (the input)")
        batch = next(iter(cl.values())).shape[0]
        c_ext = self._external(cl, free, batch)
        s = self._init(init, free, batch)
        steps, residual, converged = 0, math.inf, False
        with denormals_flushed():  # states decaying at a clamp go subnormal (drivers.numerics)
            while steps < b.max_steps:
                new = self._step(s, cl, c_ext, nudge, b.dt, free)
                steps += 1
                if steps % b.check_every == 0 or steps == b.max_steps:
                    residual = max(float((new[g] - s[g]).abs().max()) for g in free) if free else 0.0
                    if residual < b.tol:
                        s = new
                        converged = True
                        break
                s = new
        n_newton = 0
        if newton:
            s, n_newton, ok = self._newton(s, cl, c_ext, nudge, free)
            if ok:
                converged, residual = True, 0.0
        return RefEquilibrium({**cl, **s}, steps, converged, residual, n_newton)

    def settle_bptt(
        self,
        clamp: Mapping[str, Tensor],
        steps: int,
        nudge: Mapping[str, Nudge] | None = None,
        init: Mapping[str, Tensor] | None = None,
        dt: float | None = None,
    ) -> States:
        """`steps` settle iterations with the autograd graph kept (backprop through time)."""
        cl = dict(clamp)
        free = self.free_groups(cl)
        batch = next(iter(cl.values())).shape[0]
        c_ext = self._external(cl, free, batch)
        s = self._init(init, free, batch)
        step_dt = self.topology.budget.dt if dt is None else dt
        for _ in range(steps):
            s = self._step(s, cl, c_ext, nudge, step_dt, free)
        return {**cl, **s}

    # ------------------------------------------------------------------------- linear algebra
    def free_index(self, free: list[str]) -> dict[str, slice]:
        out, start = {}, 0
        for g in free:
            out[g] = slice(start, start + self.size(g))
            start += self.size(g)
        return out

    def coupling_matrix(self, free: list[str]) -> Tensor:
        """A with ``drive_free = s_free @ A + c``: the free-free couplings, (N, N)."""
        idx = self.free_index(free)
        n = sum(self.size(g) for g in free)
        w0 = next(iter(self.weights.values()))
        a = torch.zeros(n, n, dtype=w0.dtype, device=w0.device)
        for c in self.topology.couplings:
            if c.kind == "dense":
                w = self._dense_matrix(c)
                offs = self.free_index(list(c.cols))
                for gi in c.cols:
                    for gj in c.cols:
                        if gi in idx and gj in idx:
                            a[idx[gi], idx[gj]] += w[offs[gi], offs[gj]]
                continue
            w = self.weights[c.tile]
            roffs = self.free_index(list(c.rows))
            coffs = self.free_index(list(c.cols))
            for gr in c.rows:
                for gc in c.cols:
                    if gr in idx and gc in idx:
                        block = w[roffs[gr], coffs[gc]]
                        a[idx[gr], idx[gc]] += block
                        a[idx[gc], idx[gr]] += block.T
        return a

    def local_matrix(self, free: list[str], states: Mapping[str, Tensor]) -> Tensor:
        """A of ``drive_free = s_free @ A + c`` around `states`: `coupling_matrix` (N, N) when
        no coupling is a conv, else one matrix per sample (B, N, N): a pooled conv coupling is
        bilinear only for a fixed choice of pooling winners, which depends on the sample's
        state; its matrix is the Jacobian of the drive there (exact: the drive is piecewise
        linear)."""
        if not self.has_conv():
            return self.coupling_matrix(free)
        flat = self._flat({g: states[g].detach() for g in free}, free)

        def drive_of(x: Tensor) -> Tensor:
            st = self._unflat(x[None], free)
            return self._flat(self.drive(st, targets=set(free), sources=set(free), bias=False), free)[0]

        with torch.enable_grad():
            jac = [torch.autograd.functional.jacobian(drive_of, row) for row in flat]
        # jacobian[j, i] = d drive_j / d s_i; row convention A[i, j]
        return torch.stack(jac).transpose(1, 2).detach()

    def _flat(self, s: Mapping[str, Tensor], free: list[str]) -> Tensor:
        return torch.cat([s[g] for g in free], dim=1)

    def _unflat(self, x: Tensor, free: list[str]) -> States:
        return {g: x[:, sl] for g, sl in self.free_index(free).items()}

    @torch.no_grad()
    def _newton(
        self,
        s: States,
        cl: States,
        c_ext: States,
        nudge: Mapping[str, Nudge] | None,
        free: list[str],
        max_iter: int = 20,
    ) -> tuple[States, int, bool]:
        if not free:
            return s, 0, True
        a = self.local_matrix(free, s)
        n = a.shape[-1]
        eye = torch.eye(n, dtype=a.dtype, device=a.device)
        # the target term of a nudge adds -beta to the diagonal of the Jacobian of the drive
        diag = torch.zeros(n, dtype=a.dtype, device=a.device)
        idx = self.free_index(free)
        for g, nd in (nudge or {}).items():
            if nd.target is not None and g in idx:
                diag[idx[g]] = -nd.beta
        x = self._flat(s, free)
        for it in range(max_iter):
            st = self._unflat(x, free)
            if it and self.has_conv():  # the pooling winners move with the states
                a = self.local_matrix(free, st)
            a_full = a + torch.diag(diag)
            u = self._flat(self._drive_total(st, c_ext, nudge, free), free)
            f = x - rho(u, self.gain, self.activation)
            if float(f.abs().max()) < 1e-13 * max(1.0, float(x.abs().max())):
                return st, it, True
            d = rho_prime(u, self.gain, self.activation)
            # F(x) = x - rho(x A + c); Jacobian (row form) I - A D  ->  (I - D A^T) dx^T = -f^T
            m = (eye - d[:, :, None] * a_full.transpose(-1, -2)).contiguous()
            dx = _solve(m, -f)
            x = x + dx
        st = self._unflat(x, free)
        u = self._flat(self._drive_total(st, c_ext, nudge, free), free)
        ok = float((x - rho(u, self.gain, self.activation)).abs().max()) < 1e-10
        return (st if ok else s), max_iter, ok

    def _drive_total(
        self, s: States, c_ext: States, nudge: Mapping[str, Nudge] | None, free: list[str]
    ) -> States:
        d = self.drive(s, targets=set(free), sources=set(free), bias=False)
        out = {}
        for g in free:
            u = d[g] + c_ext[g]
            if nudge and g in nudge:
                u = u + _nudge_drive(nudge[g], s[g])
            out[g] = u
        return out

    # --------------------------------------------------------------- implicit differentiation
    def adjoint(self, states: Mapping[str, Tensor], clamped: set[str], grad: Mapping[str, Tensor]) -> States:
        """Solve ``(I - A D) v = dL/ds`` at the free fixed point and return ``D v`` per free
        group: the loss gradient with respect to each free group's drive."""
        free = [g for g in self.topology.groups if g not in clamped]
        with torch.no_grad():
            st = {g: states[g].detach() for g in self.topology.groups}
            u = self.drive(st, targets=set(free))
            d = self._flat({g: rho_prime(u[g], self.gain, self.activation) for g in free}, free)
            batch = d.shape[0]
            gflat = torch.cat(
                [
                    grad[g].detach().to(d.dtype)
                    if g in grad and grad[g] is not None
                    else torch.zeros(batch, self.size(g), dtype=d.dtype, device=d.device)
                    for g in free
                ],
                dim=1,
            )
            a = self.local_matrix(free, st).detach()
            m = (torch.eye(a.shape[-1], dtype=a.dtype, device=a.device) - a * d[:, None, :]).contiguous()
            v = _solve(m, gflat)
        return self._unflat(d * v, free)

    def vjp(
        self, clamp: Mapping[str, Tensor], states: Mapping[str, Tensor], grad: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], States]:
        """Implicit differentiation: given the free equilibrium `states` and ``dL/ds`` (`grad`,
        per free group), return (dL/dW per tile, dL/dx per clamped group)."""
        clamped = set(clamp)
        u = self.adjoint(states, clamped, grad)
        free = [g for g in self.topology.groups if g not in clamped]
        with torch.enable_grad():
            x = {g: torch.as_tensor(v).detach().to(self.dtype).requires_grad_(True) for g, v in clamp.items()}
            st = {**x, **{g: states[g].detach() for g in free}}
            d = self.drive(st, targets=set(free))
            params = list(self.weights.values())
            outs = [d[g] for g in free]
            grads = torch.autograd.grad(
                outs, params + list(x.values()), grad_outputs=[u[g] for g in free], allow_unused=True
            )
        gw = {
            t: (gr if gr is not None else torch.zeros_like(p))
            for t, p, gr in zip(self.weights.keys(), params, grads[: len(params)], strict=True)
        }
        gx = {
            g: (gr if gr is not None else torch.zeros_like(x[g]))
            for g, gr in zip(x.keys(), grads[len(params) :], strict=True)
        }
        return gw, gx

    def implicit_gradients(
        self,
        clamp: Mapping[str, Tensor],
        loss: Callable[[States], Tensor],
        *,
        budget: SettleBudget | None = None,
    ) -> tuple[Tensor, dict[str, Tensor], States, RefEquilibrium]:
        """Settle (Newton-polished), evaluate ``loss(states)`` (a scalar) and return
        (loss, dL/dW per tile, dL/dx per clamped group, equilibrium)."""
        eq = self.settle(clamp, budget=budget, newton=True)
        cl = self._prepare(clamp)
        free = self.free_groups(cl)
        with torch.enable_grad():
            leaves = {g: eq.states[g].detach().clone().requires_grad_(True) for g in free}
            value = loss({**cl, **leaves})
            gs = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
        grad = {
            g: (gr if gr is not None else torch.zeros_like(leaves[g])) for g, gr in zip(free, gs, strict=True)
        }
        gw, gx = self.vjp(cl, eq.states, grad)
        return value.detach(), gw, gx, eq

    def forward(self, clamp: Mapping[str, Tensor], outputs: tuple[str, ...] | None = None) -> States:
        """Differentiable free settle: returns the free states of `outputs` (default: all free
        groups); autograd reaches the weights and the clamped inputs by implicit
        differentiation."""
        names = tuple(clamp)
        free = self.free_groups(clamp)
        outs = outputs or tuple(free)
        params = list(self.weights.values())
        res = _FixedPoint.apply(self, names, outs, len(params), *params, *[clamp[g] for g in names])
        return dict(zip(outs, res, strict=True))


def _solve(m: Tensor, b: Tensor) -> Tensor:
    """Solve ``m[i] x[i] = b[i]`` for a batch, one system at a time: the batched LU of the
    MKL build behind torch 2.x returns wrong pivots for some sizes when torch runs on a
    reduced thread count (``torch.set_num_threads(2)``), so it is not used."""
    return torch.stack([torch.linalg.solve(m[i], b[i]) for i in range(m.shape[0])])


class _FixedPoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, net: DHN, names, outs, n_params, *tensors):  # type: ignore[override]
        xs = tensors[n_params:]
        clamp = {g: x.detach() for g, x in zip(names, xs, strict=True)}
        eq = net.settle(clamp, newton=True)
        ctx.net, ctx.names, ctx.outs, ctx.n_params = net, names, outs, n_params
        ctx.states = {g: v.detach() for g, v in eq.states.items()}
        ctx.clamp = clamp
        return tuple(eq.states[g].clone() for g in outs)

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        net: DHN = ctx.net
        g = {o: gr for o, gr in zip(ctx.outs, grads, strict=True) if gr is not None}
        gw, gx = net.vjp(ctx.clamp, ctx.states, g)
        return (None, None, None, None, *[gw[t] for t in net.weights], *[gx[n] for n in ctx.names])


def reference_settle(net: DHN, *, newton: bool = True) -> Callable[..., Equilibrium]:
    """The reference network's minimiser with the signature of `Device.settle`, so that the EP
    estimator (`hil.estimator.EPEstimator`) runs on it exactly as on a board: states come
    back as float32 numpy arrays; with `newton` each settle is polished to the exact fixed
    point. Settle time and joules are 0 (nothing physical ran); traces are not recorded."""

    def settle(
        clamp: dict[str, np.ndarray],
        nudge: dict[str, Nudge] | None = None,
        init: dict[str, np.ndarray] | None = None,
        trace: bool | int = False,
    ) -> Equilibrium:
        if trace:
            raise ValueError("the reference settle records no trace; pass trace=False")
        like = next(iter(net.weights.values()))
        ini = {g: torch.as_tensor(v).to(like.dtype) for g, v in (init or {}).items() if g not in clamp}
        eq = net.settle(clamp, nudge, ini, newton=newton)
        states = {g: v.detach().to(torch.float32).numpy() for g, v in eq.states.items()}
        cl = net._prepare(clamp)
        energy = net.energy(eq.states, set(cl), nudge).detach().to(torch.float32).numpy()
        return Equilibrium(states, eq.steps, eq.converged, eq.residual, energy, 0.0, 0.0)

    return settle
