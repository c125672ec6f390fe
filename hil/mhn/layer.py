"""An MHN block as a torch layer, for ff-EBMs: input clamped, output settled, EP backward.

The block's state is ``[input (d_in) ; output (d_out)]``; the input part is clamped to the
layer's input (`MHNBlock.retrieve`'s `clamp`) and the output part starts at `start` (0 by
default) and settles to the energy's minimum given the input. Backward, as `hil.ffebm.EBFunction`
does for DHN blocks: the incoming gradient ``g = dL/dout`` becomes the linear cost
``g . out`` of two nudged retrievals (``+-beta``, scaled to a peak of 1 and back), and

    dL/dxi = [dE/dxi(x+) - dE/dxi(x-)] / (2 beta),        dE/dxi = -x p^T
    dL/din = [dE/din(x+) - dE/din(x-)] / (2 beta),        dE/din = in - xi_in p

(the input enters E like a parameter; its own term cancels between the two phases, leaving
``-xi_in (p+ - p-) / (2 beta)``), summed over the batch like autograd's gradients.
Inputs must lie in the block's state box (`MHNBlock.box`): end the digital part in front with
a clamp to it. Make the block with a `margin` (0.1 will do): an output component at a
pattern's extreme value sits on the box's edge, where the nudged state would be clipped and
the gradient wrong (with margin 0 the patterns' gradient had a cosine of 0.95 in the test).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from drivers import ConfigurationError
from hil.mhn.block import CurrentNudge, MHNBlock, Retrieval
from hil.mhn.core import check_nudge


class MHNFunction(torch.autograd.Function):
    """``MHNFunction.apply(x, layer, patterns)``: clamped retrieval forward, EP backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, layer: MHNLayer, patterns: Tensor) -> Tensor:  # type: ignore[override]
        blk = layer.block
        x0 = np.concatenate([x.detach().double().cpu().numpy(), layer.start(x.shape[0])], 1)
        free = blk.retrieve(x0, clamp=layer.clamp)
        ctx.layer, ctx.free = layer, free
        ctx.x_dtype, ctx.x_device = x.dtype, x.device
        return torch.from_numpy(free.x[:, layer.d_in :].copy()).to(x.device, x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor):  # type: ignore[override]
        layer: MHNLayer = ctx.layer
        blk, free = layer.block, ctx.free
        g = grad.detach().double().cpu().numpy()
        scale = float(np.abs(g).max())
        if scale == 0.0:
            return None, None, None
        current = np.concatenate([np.zeros((g.shape[0], layer.d_in)), g / scale], 1)
        b = layer.beta
        plus = blk.retrieve(free.x, nudge=CurrentNudge(b, current), clamp=layer.clamp)
        minus = blk.retrieve(free.x, nudge=CurrentNudge(-b, current), clamp=layer.clamp)
        layer.last = (free, plus, minus)
        k = scale / (2 * b)
        d_xi = (-plus.x.T @ plus.p + minus.x.T @ minus.p) * k
        xi_in = blk.device_patterns()[: layer.d_in].numpy()
        d_in = -(plus.p - minus.p) @ xi_in.T * k
        gx = torch.from_numpy(d_in).to(ctx.x_device, ctx.x_dtype) if ctx.needs_input_grad[0] else None
        gp = torch.from_numpy(d_xi).to(blk.patterns.device, blk.patterns.dtype)
        return gx, None, gp


class MHNLayer(nn.Module):
    """An `MHNBlock` whose first `d_in` components are the layer's input and the rest its
    output. `beta`: the EP nudge (0.01 on an ideal board; a noisy one needs more, docs/mhn.md)."""

    def __init__(self, block: MHNBlock, d_in: int, *, beta: float = 0.01) -> None:
        super().__init__()
        if not 0 < d_in < block.d:
            raise ValueError(f"d_in must be in (0, {block.d}), got {d_in}")
        self.block = block
        self.d_in = d_in
        self.beta = check_nudge(beta, "MHNLayer beta")
        self.clamp = np.arange(block.d) < d_in
        self.last: tuple[Retrieval, Retrieval, Retrieval] | None = None
        self.patterns = block.patterns  # registered: optimisers see it

    def start(self, batch: int) -> np.ndarray:
        """Where the output part starts: 0, or the box's nearest point to it."""
        lo, hi = self.block.box()
        return np.full((batch, self.block.d - self.d_in), min(max(0.0, lo), hi))

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], -1)
        if x.shape[1] != self.d_in:
            raise ConfigurationError(
                f"MHNLayer input: {self.d_in} features per sample (the clamped part of the block's "
                f"{self.block.d}-dimensional state), got {x.shape[1]} (input shape {tuple(x.shape)})"
            )
        lo, hi = self.block.box()
        if x.numel():
            # one pass: a NaN gives NaN extremes, and an infinity lies outside the box either way
            least, most = (float(t) for t in torch.aminmax(x.detach()))
            if not (lo - 1e-6 <= least and most <= hi + 1e-6):
                raise ConfigurationError(
                    f"MHNLayer input: must lie in the block's state box [{lo:.4g}, {hi:.4g}] (the "
                    f"patterns' range plus margin), got values in [{least:.4g}, {most:.4g}]; clamp the "
                    "part in front (as a clamp to [0, 1] does) or give the block a larger margin"
                )
        return MHNFunction.apply(x, self, self.patterns)
