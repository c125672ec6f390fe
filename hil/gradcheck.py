"""The gradient check: EP on a block's Device against implicit differentiation of the
pure-torch reference (`gradcheck`, what `hil gradcheck` tabulates, on the network that
`check_block` builds), and the comparison metrics and losses it and the tests use (`cosine`,
`rel_error`, `mse_loss`, `ce_loss`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from drivers import BIAS, Device, SettleBudget, Topology
from hil.ep import ArrayLike, EBBlock
from hil.init import gaussian_init
from hil.reference import States

__all__ = [
    "CHECK_BUDGET",
    "NOISY_RESIDUAL",
    "CheckRow",
    "ce_loss",
    "check_block",
    "cosine",
    "gradcheck",
    "mse_loss",
    "rel_error",
    "split_bias",
]

CHECK_BUDGET = SettleBudget(max_steps=20_000, tol=1e-7, dt=0.5, check_every=5)
# a free phase still moving by more than this (100 times the check's tolerance) was stopped by
# a noisy board's noise floor (`SettleResult.converged` counts that as converged), not settled
NOISY_RESIDUAL = 100 * CHECK_BUDGET.tol


@dataclass
class CheckRow:
    beta: float
    mode: str  # "one-sided" (+beta and free) or "centered"
    param: str  # "W0.weight", "W0.bias", ..., "input"
    cosine: float
    rel_error: float


def check_block(
    device: Device,
    sizes: list[int],
    *,
    dense: bool = False,
    init_scale: float = 0.5,
    bias: tuple[float, float] = (0.1, 0.4),
    seed: int = 0,
    budget: SettleBudget = CHECK_BUDGET,
    settle: str = "auto",
    activation: str = "hard_sigmoid",
) -> EBBlock:
    """The network `hil gradcheck` checks: weights ``N(0, init_scale^2 / fan_in)``, biases
    ``U(bias)`` (so that units are active and few sit on a kink of the hard sigmoid), a
    tight settle budget (a converged free phase). Layered: groups s0 (input) ... sL (output);
    dense: groups ``x`` (input, clamped), ``h0`` ... (hidden), ``y`` (output) on one tile.
    `settle`: ``auto``, ``board`` or ``host`` (`hil.ep.settle_path`); `activation`: the node
    curve (`drivers.activation`)."""
    gen = torch.Generator().manual_seed(seed)
    # gain 1 and w_max 1, or the board's max_gain / max_w_max where it declares less (the
    # reference takes both from the topology; a board of a narrower scale refused the configure)
    lim = device.info.limits
    gain, w_max = lim.unit_scales
    if dense:
        groups = {"x": sizes[0], **{f"h{k}": n for k, n in enumerate(sizes[1:-1])}, "y": sizes[-1]}
        topo = Topology.dense(groups, budget=budget, activation=activation, gain=gain, w_max=w_max)
        inputs, outputs = ("x",), ("y",)
    else:
        topo = Topology.layered(sizes, budget=budget, activation=activation, gain=gain, w_max=w_max)
        inputs, outputs = ("s0",), (f"s{len(sizes) - 1}",)
    w = gaussian_init(topo, init_scale, gen)
    lo, hi = bias
    for tile, m in w.items():
        if topo.coupling(tile).rows[-1] == "bias":
            m[-1] = lo + (hi - lo) * torch.rand(m.shape[1], generator=gen)
    return EBBlock(device, topo, inputs=inputs, outputs=outputs, weights=w, seed=seed, settle=settle)  # type: ignore[arg-type]


def split_bias(topology: Topology, grads: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Per tile, the weight rows and the bias row as separate entries (``W0.weight``,
    ``W0.bias``)."""
    out = {}
    for c in topology.couplings:
        g = grads[c.tile]
        if BIAS in c.rows:
            sl = topology.row_slice(c.tile, BIAS)
            keep = torch.ones(g.shape[0], dtype=torch.bool)
            keep[sl] = False
            out[f"{c.tile}.weight"] = g[keep]
            out[f"{c.tile}.bias"] = g[sl]
        else:
            out[f"{c.tile}.weight"] = g
    return out


def gradcheck(
    block: EBBlock,
    clamp: ArrayLike | Mapping[str, ArrayLike],
    target: ArrayLike | Mapping[str, ArrayLike],
    betas: tuple[float, ...] = (0.1, 0.01, 0.001),
    modes: tuple[str, ...] = ("positive", "centered"),
    on_step: Callable[[str], None] | None = None,
    loss: Literal["mse", "ce"] = "mse",
    tau: float = 1.0,
) -> list[CheckRow]:
    """EP on the block's Device against implicit differentiation of the pure-torch reference
    (float64, the weights read back from the Device). `loss` ``"mse"``: the batch mean of
    ``1/2 |s_out - target|^2``, nudged towards the target; ``"ce"``: the batch mean of the
    cross-entropy of ``softmax(tau s_out)`` against the one-hot `target`, nudged as the
    classifier trains (`Classifier.step`): the loss gradient at the free state,
    ``tau (softmax(tau s_out) - target)``, injected as a constant current of ``beta`` times
    it (its peak is up to `tau`: at the classifier's beta 0.2 and tau 6 a nudge of about one
    state unit, far from the small-beta limit; docs/neuron.md). One free settle is shared by
    every beta and mode. `on_step(what)` is called after the reference and the free phase
    (``"reference"``) and after each EP estimate (``"beta 0.01 centered"``), e.g. to advance
    a progress bar."""
    if loss not in ("mse", "ce"):
        raise ValueError(f"loss must be 'mse' or 'ce', got {loss!r}")
    cl = block.clamp_arrays(clamp)
    tg = block.as_groups(target)
    assert tg is not None
    ref = block.reference(torch.float64)
    targets = {g: torch.as_tensor(v, dtype=torch.float64, device=block.compute) for g, v in tg.items()}

    def total(states: dict[str, Tensor]) -> Tensor:
        one = ce_loss if loss == "ce" else mse_loss
        kw = {"tau": tau} if loss == "ce" else {}
        return sum(one(g, t, **kw)(states) for g, t in targets.items())  # type: ignore[return-value]

    _, gw, gx, _ = ref.implicit_gradients({g: block.as_tensor(v) for g, v in cl.items()}, total)
    truth = split_bias(block.topology, gw) | {f"input:{g}": v for g, v in gx.items()}
    free = block.free(cl)
    if on_step is not None:
        on_step("reference")
    nudge: dict[str, dict[str, Tensor]] = {"target": tg}  # type: ignore[dict-item]
    if loss == "ce":
        nudge = {"grad": {}}
        for g, t in tg.items():
            s = block.as_tensor(free.states[g])
            onehot = torch.as_tensor(t, dtype=s.dtype).to(s.device)
            nudge["grad"][g] = tau * (torch.softmax(tau * s, -1) - onehot)
    rows = []
    for beta in betas:
        for mode in modes:
            r = block.ep(cl, beta=beta, mode=mode, free=free, **nudge)  # type: ignore[arg-type]
            if on_step is not None:
                on_step(f"beta {beta:g} {mode}")
            est = split_bias(block.topology, r.grads) | {f"input:{g}": v for g, v in r.input_grads.items()}
            name = "one-sided" if mode in ("positive", "negative") else mode
            for k, v in truth.items():
                rows.append(CheckRow(beta, name, k, cosine(est[k], v), rel_error(est[k], v)))
    return rows


# ------------------------------------------------------------------------------- comparisons
def cosine(a: Tensor, b: Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    den = float(a.norm() * b.norm())
    return float((a @ b) / den) if den > 0 else (1.0 if float(a.norm()) == float(b.norm()) else 0.0)


def rel_error(est: Tensor, ref: Tensor) -> float:
    """``|est - ref| / |ref|`` (Frobenius norms)."""
    est, ref = est.flatten().double(), ref.flatten().double()
    den = float(ref.norm())
    return float((est - ref).norm()) / den if den > 0 else float(est.norm())


def mse_loss(output: str, target: Tensor) -> Callable[[States], Tensor]:
    """The loss a target nudge optimises: batch mean of ``1/2 |s_out - target|^2``."""

    def f(states: States) -> Tensor:
        return 0.5 * ((states[output] - target.to(states[output].dtype)) ** 2).sum(-1).mean()

    return f


def ce_loss(output: str, target: Tensor, tau: float) -> Callable[[States], Tensor]:
    """The loss the classifier's cross-entropy nudge optimises: batch mean of the cross-entropy
    of ``softmax(tau s_out)`` against the one-hot `target`."""

    def f(states: States) -> Tensor:
        s = states[output]
        return -(torch.log_softmax(tau * s, -1) * target.to(s.dtype)).sum(-1).mean()

    return f
