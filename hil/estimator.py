"""The EP gradient estimator: phases, betas and the gradient difference, for any minimiser.

It knows a `Topology` (which fixes ``dPhi/dtheta``) and takes a *settle function*, the
minimiser, as an argument: the board's own analog settle (`Device.settle`), the host-iterated
settle over `Device.mvm` (`hil.host_settle.HostSettle`) and the pure-torch reference
(`reference_settle`) all have the signature of `Device.settle` and plug in unchanged, as
energy-based-learning codebases keep the minimiser apart from the gradient estimator.

- parameters: ``dL/dW = -[dPhi/dW(s^a) - dPhi/dW(s^b)] / (beta_a - beta_b)`` with
  ``dPhi/dW = s_rows^T s_cols`` for a bipartite tile (bias row: ``1^T s_cols``) and
  ``[s s^T / 2 (diagonal 0) ; s]`` for a dense tile;
- clamped inputs: the same difference of ``dPhi/dx`` (the drive the neighbours put on x),
  which the caller computes (it needs the weights) and passes as `input_drive`.

Phases (``mode``): ``"positive"`` (free and +beta), ``"negative"`` (-beta and free),
``"centered"`` (+beta and -beta: bias O(beta^2) instead of O(beta) for a smooth activation)
and ``"random"`` (one-sided with a random sign per call, from `generator`). With the hard
sigmoid a unit whose drive crosses a kink between the phases adds an error of its own, which
centering does not cancel: measured over 10 random networks at beta 0.01, the worst
parameter's error was 26 % centered and 50 % one-sided, but the median network's 4.7 %
centered and 4.1 % one-sided; a smooth curve (``Topology.activation``) brings centered EP to
0.06-0.7 % (docs/neuron.md). Centered EP with error-current (grad) nudges
may run its two nudged phases as one settle over the batch twice over (`settle_both`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch
from torch import Tensor

from drivers import BIAS, Coupling, Equilibrium, Nudge, Topology, conv

Mode = Literal["centered", "positive", "negative", "random"]
MODES: tuple[str, ...] = ("centered", "positive", "negative", "random")
StateMap = Mapping[str, np.ndarray | Tensor]


class SettleFn(Protocol):
    """A minimiser with the signature of `Device.settle`."""

    def __call__(
        self,
        clamp: dict[str, np.ndarray],
        nudge: dict[str, Nudge] | None = None,
        init: dict[str, np.ndarray] | None = None,
        trace: bool | int = False,
    ) -> Equilibrium: ...


@dataclass
class Phases:
    """The two equilibria EP differences, with their betas."""

    first: Equilibrium  # the phase with the larger beta (the free one in "negative" mode)
    second: Equilibrium  # the phase with the smaller beta (the free one in "positive" mode)
    betas: tuple[float, float]
    steps: int  # settle steps of the nudged phases (not the free one)


def check_phases(beta: float, mode: str) -> None:
    """Refuse a mode or beta EP cannot run with (before any settle is spent on it)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0 (the mode sets the sign), got {beta}")


def joined(parts: Mapping[str, Tensor], groups: tuple[str, ...], dim: int = 1) -> Tensor:
    """The tensors of `groups`, concatenated along `dim` (the one tensor itself for one group)."""
    return torch.cat([parts[g] for g in groups], dim=dim) if len(groups) > 1 else parts[groups[0]]


def settle_both(
    settle: SettleFn,
    clamp: dict[str, np.ndarray],
    nudge: dict[str, Nudge],
    init: dict[str, np.ndarray],
    trace: bool | int,
    max_beta: float = math.inf,
) -> tuple[Equilibrium, Equilibrium]:
    """The +beta and -beta phases of centered EP (`nudge`: the +beta phase's error-current
    nudges) as one settle over the batch twice over: the samples are independent, so the
    doubled batch holds the two phases side by side, with the injected current ``-beta grad``
    in the first half and ``+beta grad`` in the second (one grad nudge with beta 1 carries
    both). One settle call instead of two: one round trip to a board, and per step one
    product over 2B rows instead of two over B. Elastic (target) nudges cannot be expressed
    this way (their beta is one number per settle), so they settle phase by phase.

    The two halves share `steps`, `converged` and `residual` (taken over both phases); the
    settle time and the array energy are split equally.

    `max_beta`: the board's bound on a nudge's |beta| (`Limits.max_beta`). Where it allows 1,
    the nudge carries beta 1 and the error current ``beta grad`` computed here; a board that
    declares less (a chip whose nudge is a small injected current) gets the phase's own
    ``|beta|`` and ``+-grad``, the sign flips exact, the product ``|beta| grad`` the board's."""
    n = next(iter(clamp.values())).shape[0]

    def twice(x: np.ndarray) -> np.ndarray:
        # tensors (a settle on a compute device, `Device.settle_tensors`) stay tensors; states
        # that are batch-major in memory (the (batch, n) views of an emulated board's (nodes,
        # batch) buffer) are doubled along that axis, so they stay so (no transposing copy)
        if not isinstance(x, Tensor):
            return np.concatenate([x, x])
        if x.ndim == 2 and not x.is_contiguous() and x.T.is_contiguous():
            return torch.cat([x.T, x.T], 1).T
        return torch.cat([x, x])

    nudges = {}
    for g, nd in nudge.items():
        if nd.target is not None or nd.grad is None:
            raise ValueError(f"settle_both takes error-current (grad) nudges only; {g!r} has a target")
        if max_beta < 1.0:
            sign = -1.0 if nd.beta < 0 else 1.0
            if isinstance(nd.grad, Tensor):
                gt = nd.grad.to(torch.float32) * sign
                nudges[g] = Nudge(abs(nd.beta), grad=torch.cat([gt, -gt]))  # type: ignore[arg-type]
            else:
                gn = np.asarray(nd.grad, dtype=np.float32) * np.float32(sign)
                nudges[g] = Nudge(abs(nd.beta), grad=np.concatenate([gn, -gn]))
            continue
        if isinstance(nd.grad, Tensor):
            dt = nd.grad.to(torch.float32) * nd.beta
            nudges[g] = Nudge(1.0, grad=torch.cat([dt, -dt]))  # type: ignore[arg-type]
            continue
        d = np.asarray(nd.grad, dtype=np.float32) * np.float32(nd.beta)
        nudges[g] = Nudge(1.0, grad=np.concatenate([d, -d]))
    both = settle(
        {g: twice(x) for g, x in clamp.items()}, nudges, {g: twice(x) for g, x in init.items()}, trace
    )

    def half(rows: slice) -> Equilibrium:
        states = {g: v[rows] for g, v in both.states.items()}
        states.update(clamp)  # the clamped groups as applied, one object for both phases

        def energy() -> np.ndarray | None:
            return None if both.energy is None else both.energy[rows]

        pending = both.energy_pending  # a backend computing the energy when asked: keep it so
        eq = Equilibrium(
            states=states,
            steps=both.steps,
            converged=both.converged,
            residual=both.residual,
            energy=None if pending else energy(),
            settle_time_s=both.settle_time_s / 2,
            energy_j=both.energy_j / 2,
            trace=None
            if both.trace is None
            else {k: v if k == "step" else v[:, rows] for k, v in both.trace.items()},
        )
        return eq.defer_energy(energy) if pending else eq

    return half(slice(0, n)), half(slice(n, 2 * n))


class EPEstimator:
    """EP for one topology: which phases to settle, and the gradients from their equilibria.

    `joint_phases`: centered EP with error-current nudges settles both nudged phases as one
    settle (`settle_both`). `generator` draws the sign of ``"random"`` mode (a CPU generator:
    the same signs whatever the compute device). `device`: where the gradients are computed
    (states that arrive as numpy or on another device are moved there; None: where they are,
    numpy on the CPU). `weights`: the tiles' weights as the device holds them, for conv
    couplings, whose dPhi/dW routes the destination's states to the pooling winners of the
    source's pre-activations (`drivers.conv`)."""

    def __init__(
        self,
        topology: Topology,
        *,
        joint_phases: bool = True,
        generator: torch.Generator | None = None,
        device: torch.device | None = None,
        weights: Callable[[], Mapping[str, Tensor]] | None = None,
    ) -> None:
        self.topology = topology
        self.joint_phases = joint_phases
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.device = device
        self.weights = weights

    def _tensors(self, states: StateMap) -> dict[str, Tensor]:
        # row-major (batch, n) tensors: a board may hand its states over as views of a
        # batch-major buffer, and the products' rounding depends on the operands' layout
        return {g: torch.as_tensor(v, device=self.device).contiguous() for g, v in states.items()}

    # ------------------------------------------------------------------------------ phases
    def phases(
        self,
        settle: SettleFn,
        clamp: dict[str, np.ndarray],
        free: Equilibrium,
        nudges: Callable[[float], dict[str, Nudge]],
        *,
        beta: float,
        mode: Mode = "centered",
        trace: bool | int = False,
        max_beta: float = math.inf,
    ) -> Phases:
        """Settle the nudged phases of `mode` from the free equilibrium `free`; `nudges(b)`
        gives the nudges of the phase with signed beta ``b``. `max_beta`: the board's bound on
        a nudge's |beta| (`settle_both`)."""
        check_phases(beta, mode)
        init = {g: free.states[g] for g in self.topology.groups if g not in clamp}
        if mode == "random":
            sign = 1.0 if torch.rand((), generator=self.generator).item() < 0.5 else -1.0
            mode = "positive" if sign > 0 else "negative"
        plus = nudges(beta) if mode in ("positive", "centered") else {}
        if mode == "centered" and self.joint_phases and all(n.target is None for n in plus.values()):
            first, second = settle_both(settle, clamp, plus, init, trace, max_beta)
            return Phases(first, second, (beta, -beta), first.steps + second.steps)
        steps = 0
        if mode in ("positive", "centered"):
            first, b1 = settle(clamp, plus, init, trace), beta
            steps += first.steps
        else:
            first, b1 = free, 0.0
        if mode in ("negative", "centered"):
            second, b2 = settle(clamp, nudges(-beta), init, trace), -beta
            steps += second.steps
        else:
            second, b2 = free, 0.0
        return Phases(first, second, (b1, b2), steps)

    def scale(self, phases: Phases, batch: int, reduce: Literal["mean", "sum"]) -> float:
        """The factor that turns a difference of dPhi into dL: ``-1 / (beta_a - beta_b)``
        (divided by the batch size for ``reduce="mean"``)."""
        b1, b2 = phases.betas
        s = -1.0 / (b1 - b2)
        return s / batch if reduce == "mean" else s

    # ------------------------------------------------------------------------------ dPhi
    def phi_grads(self, states: StateMap) -> dict[str, Tensor]:
        """dPhi/dW per tile, summed over the batch, at the given states."""
        st = self._tensors(states)
        out = {}
        units = {c.tile: u for u in conv.units(self.topology) for c in u}
        winners: dict[str, Tensor | None] = {}  # per unit (its first tile): shared by its tiles
        for c in self.topology.couplings:
            rows, cols = self.topology.tile_shape(c.tile)
            if c.kind == "conv":
                out[c.tile] = self._conv_grad(c, st, units[c.tile], winners)
                continue
            s = joined(st, c.cols)
            if c.kind == "dense":
                g = torch.empty(rows, cols, dtype=s.dtype, device=s.device)
                g[:cols] = 0.5 * (s.T @ s)
                g[:cols].fill_diagonal_(0.0)
                if rows > cols:
                    g[cols:] = s.sum(0)
                out[c.tile] = g
            else:
                out[c.tile] = joined(
                    {g: s.sum(0, keepdim=True) if g == BIAS else st[g].T @ s for g in c.rows}, c.rows, 0
                )
        return out

    def _conv_grad(
        self,
        c: Coupling,
        st: dict[str, Tensor],
        unit: tuple[Coupling, ...],
        winners: dict[str, Tensor | None],
    ) -> Tensor:
        """dPhi/dW of conv tile `c`, at the pooling winners of its unit (`drivers.conv.units`:
        a pool group's tiles share the winners of their summed pre-activations)."""
        if self.weights is None:
            raise ValueError(
                f"conv tile {c.tile!r}: the estimator needs the device's weights (EPEstimator(weights=...)) "
                "to find the pooling winners"
            )
        g = conv.ConvGeometry.of(self.topology, c)
        x, y = st[c.rows[0]], conv.joined(st, c.cols)
        if unit[0].tile not in winners:
            weights = self.weights()
            ws = [weights[m.tile].detach().to(x.device, x.dtype) for m in unit]
            geoms = [conv.ConvGeometry.of(self.topology, m) for m in unit]
            winners[unit[0].tile] = conv.unit_winners([st[m.rows[0]] for m in unit], ws, geoms)
        return conv.weight_grad(x, y, g, winners[unit[0].tile])

    def phi_grad_difference(
        self, a: StateMap, b: StateMap, out: Mapping[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """``phi_grads(a) - phi_grads(b)`` with fewer products: a bipartite tile whose row
        group holds the same states in both (a clamped input, the bias) needs one product
        of the difference of its column states, ``x^T (c_a - c_b)``. Each row group's part is
        written straight into its rows of the tile's result (no concatenation). `out`: per
        tile, a tensor of the tile's shape, dtype and device to write the result into (e.g.
        the parameter's last ``.grad``); a tile without a usable one gets a new tensor."""
        sa, sb = self._tensors(a), self._tensors(b)
        if any(c.kind in ("dense", "conv") for c in self.topology.couplings):
            pa, pb = self.phi_grads(sa), self.phi_grads(sb)
            return {t: pa[t] - pb[t] for t in pa}
        result = {}
        for c in self.topology.couplings:
            ca, cb = joined(sa, c.cols), joined(sb, c.cols)
            dc = ca - cb
            shape = self.topology.tile_shape(c.tile)
            g = None if out is None else out.get(c.tile)
            if (
                g is None
                or tuple(g.shape) != shape
                or g.dtype != dc.dtype
                or g.device != dc.device
                or not g.is_contiguous()
            ):
                g = torch.empty(shape, dtype=dc.dtype, device=dc.device)
            start = 0
            for grp in c.rows:
                n = self.topology.size(grp)
                rows = g[start : start + n]  # contiguous: the tile's full-width rows
                start += n
                if grp == BIAS:
                    torch.sum(dc, 0, keepdim=True, out=rows)
                    continue
                xa, xb = sa[grp], sb[grp]
                if xa is xb or (torch.equal(xa[:1], xb[:1]) and torch.equal(xa, xb)):
                    torch.mm(xa.T, dc, out=rows)
                else:
                    torch.mm(xa.T, ca, out=rows)
                    rows.addmm_(xb.T, cb, alpha=-1.0)
            result[c.tile] = g
        return result

    def gradients(
        self,
        phases: Phases,
        batch: int,
        reduce: Literal["mean", "sum"] = "mean",
        input_drive: Callable[[StateMap], dict[str, Tensor]] | None = None,
        out: Mapping[str, Tensor] | None = None,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(dL/dW per tile, dL/dx per clamped group); `input_drive(states)` gives dPhi/dx of
        the clamped groups at `states` (skipped when None). `out`: per tile, a tensor to write
        dL/dW into (`phi_grad_difference`)."""
        scale = self.scale(phases, batch, reduce)
        diff = self.phi_grad_difference(phases.first.states, phases.second.states, out)
        grads = {t: g.mul_(scale) for t, g in diff.items()}
        in_grads: dict[str, Tensor] = {}
        if input_drive is not None:
            da, db = input_drive(phases.first.states), input_drive(phases.second.states)
            in_grads = {g: (da[g] - db[g]) * scale for g in da}
        return grads, in_grads
