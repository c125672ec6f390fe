"""Feedforward-tied energy-based models (ff-EBM, Nest & Ernoult, NeurIPS 2024).

An ff-EBM chains digital feedforward parts (Linear, Conv2d, BatchNorm, pooling, ...) and
energy-based (EB) blocks that live on Devices. Gradients are computed by BP-EP chaining:
backprop through the digital parts, EP through the EB blocks. `EBFunction` is the
``torch.autograd.Function`` that makes an EB block an ordinary torch op:

- forward: clamp the block's input, free settle on the Device, return the output states;
- backward: the incoming gradient ``dL/ds_out`` becomes the nudge
  (``Nudge(beta, grad=dL/ds_out)``, scaled to a peak of 1 and scaled back), and EP gives
  the parameter gradients and ``dL/dx`` for the block's input, which autograd carries on
  through the digital parts in front of it.

The block's input is a clamped node group coupled to the block's first free layer by a
tile: that tile is the feedforward weight of the ff-EBM (the clamped group receives no
feedback), so one layered DHN split into blocks (`split_layered`) is exactly the ff-EBM of
the paper: block k's last layer is copied onto block k+1's clamped input layer. Clamped
values must lie in the board's read-voltage range (normalised [0, 1] by default): a
digital part that feeds a block should end in `Clamp01` (a hard sigmoid).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from drivers import Device, SettleBudget, Topology, seeds
from hil.ep import EBBlock, Mode
from hil.init import init_weights
from hil.programming import make_scheme
from hil.reference import DHN


def split_layered(sizes: Sequence[int], block_layers: int) -> list[list[int]]:
    """Split a layered DHN ``sizes`` into blocks of `block_layers` free layers each: block k's
    first layer is the clamped copy of block k-1's last layer (the last block may be shorter).

    >>> split_layered([64, 256, 256, 10], 2)
    [[64, 256, 256], [256, 10]]
    """
    if block_layers < 1:
        raise ValueError("block_layers must be >= 1")
    sizes = list(sizes)
    if len(sizes) < 2:
        raise ValueError("a DHN needs at least two layers")
    out = []
    start = 0
    while start < len(sizes) - 1:
        stop = min(start + block_layers, len(sizes) - 1)
        out.append(sizes[start : stop + 1])
        start = stop
    return out


# --------------------------------------------------------------------------- autograd glue
class EBFunction(torch.autograd.Function):
    """``EBFunction.apply(x, layer, *params)``: free settle forward, EP backward."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: EBLayer, *params: Tensor) -> Tensor:  # type: ignore[override]
        blk = layer.block
        eq = blk.free({blk.inputs[0]: x.detach()})
        ctx.layer = layer
        ctx.eq = eq
        ctx.x_dtype, ctx.x_device = x.dtype, x.device
        # on the input's device and dtype (a copy: the settle's result may be a view of the board's)
        out = blk.as_tensor(eq.states[blk.outputs[0]])
        return out.to(x.device, x.dtype, copy=True)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        layer: EBLayer = ctx.layer
        blk = layer.block
        res = blk.vjp(ctx.eq, {blk.outputs[0]: grad.detach()}, beta=layer.beta, mode=layer.mode)
        layer.last_vjp = res
        gx = res.input_grads[blk.inputs[0]].to(ctx.x_device, ctx.x_dtype) if ctx.needs_input_grad[0] else None
        return (gx, None, *[res.grads[t].to(w.device, w.dtype) for t, w in blk.weights.items()])


class EBLayer(nn.Module):
    """An EB block as a torch layer: input (B, ...) is flattened onto the clamped group,
    output (B, n_out) is the settled output group."""

    def __init__(self, block: EBBlock, *, beta: float = 0.2, mode: Mode = "centered") -> None:
        super().__init__()
        if len(block.inputs) != 1 or len(block.outputs) != 1:
            raise ValueError("an EBLayer needs a block with one input group and one output group")
        self.block = block
        self.beta = beta
        self.mode = mode
        self.last_vjp = None

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], -1)
        return EBFunction.apply(x, self, *self.block.weights.values())

    def extra_repr(self) -> str:
        sizes = list(self.block.topology.groups.values())
        return f"sizes={sizes}, beta={self.beta}, mode={self.mode!r}"


class Clamp01(nn.Module):
    """Hard sigmoid ``clamp(x, 0, 1)``: brings a digital part's output into the clamp range."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.clamp(x, 0.0, 1.0)


class RefLayer(nn.Module):
    """The pure-torch counterpart of an `EBLayer`: the same network on `hil.reference.DHN`,
    differentiated by implicit differentiation (for end-to-end gradient checks)."""

    def __init__(self, net: DHN, inp: str, out: str) -> None:
        super().__init__()
        self.net = net
        self.inp = inp
        self.out = out

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], -1)
        return self.net({self.inp: x}, outputs=(self.out,))[self.out]


# ----------------------------------------------------------------------------------- model
class FFEBM(nn.Module):
    """A sequence of digital modules and `EBLayer`s; `forward` returns the last output."""

    def __init__(self, parts: Sequence[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: Tensor) -> Tensor:
        for p in self.parts:
            x = p(x)
        return x

    @property
    def eb_layers(self) -> list[EBLayer]:
        return [p for p in self.parts if isinstance(p, EBLayer)]

    def block_parameters(self) -> list[Tensor]:
        return [w for layer in self.eb_layers for w in layer.block.weights.values()]

    def digital_parameters(self) -> list[Tensor]:
        ids = {id(p) for p in self.block_parameters()}
        return [p for p in self.parameters() if id(p) not in ids]

    def reference(self, dtype: torch.dtype = torch.float64) -> nn.Module:
        """A copy in which every EB block is replaced by its `RefLayer` (weights as read back
        from the device) and every digital part is deep-copied, in `dtype`."""
        import copy

        parts: list[nn.Module] = []
        for p in self.parts:
            if isinstance(p, EBLayer):
                b = p.block
                parts.append(RefLayer(b.reference(dtype), b.inputs[0], b.outputs[0]))
            else:
                parts.append(copy.deepcopy(p).to(dtype))
        return nn.Sequential(*parts)

    @staticmethod
    def layered(
        sizes: Sequence[int],
        block_layers: int,
        devices: Callable[[int], Device],
        *,
        between: Literal["identity", "linear"] = "identity",
        gain: float = 1.0,
        activation: str = "hard_sigmoid",
        w_max: float = 1.0,
        budget: SettleBudget | None = None,
        budgets: dict[str, SettleBudget] | None = None,
        init: Literal["goe", "gaussian"] = "goe",
        init_scale: float = 0.5,
        init_bias: Literal["zero", "mid"] = "zero",
        beta: float = 0.2,
        mode: Mode = "centered",
        settle_mode: Literal["analog", "mvm"] = "analog",
        programming: str | None = None,
        refresh_every: int = 0,
        refresh_mode: str | None = None,
        seed: int = 0,
        joint_phases: bool = True,
        settle: Literal["auto", "board", "host"] = "auto",
        compute: str | torch.device | None = None,
    ) -> FFEBM:
        """One layered DHN `sizes` split into EB blocks of `block_layers` free layers, block k
        on ``devices(k)``. `between`: ``identity`` (block k's output is block k+1's clamped
        input, as in the paper) or ``linear`` (a digital ``Linear(n, n)`` + `Clamp01`).
        `programming` / `refresh_every` / `refresh_mode`: each block gets its own
        `ProgrammingScheme`. `settle`: where each block settles (`hil.ep.settle_path`).
        `compute`: the torch device of the blocks (`EBBlock`) and of the digital parts, which
        are initialised from the CPU generator of ``ffebm.init`` and moved there."""
        gen = seeds.torch_generator(seed, "ffebm.init")
        parts: list[nn.Module] = []
        for k, bs in enumerate(split_layered(sizes, block_layers)):
            if k > 0 and between == "linear":
                lin = nn.utils.skip_init(nn.Linear, bs[0], bs[0])  # drawn from `gen` below
                with torch.no_grad():
                    # near-identity start, so the chain works from the first step
                    lin.weight.copy_(torch.eye(bs[0]) + 0.1 * torch.randn(bs[0], bs[0], generator=gen)
                                     / math.sqrt(bs[0]))  # fmt: skip
                    lin.bias.zero_()
                if compute is not None:
                    lin.to(compute)
                parts += [lin, Clamp01()]
            topo = Topology.layered(
                list(bs),
                gain=gain,
                w_max=w_max,
                budget=budget,
                mode=settle_mode,
                prefix="s",
                activation=activation,
            )
            parts.append(_eb_layer(
                topo, k, devices, gen, init=init, init_scale=init_scale, init_bias=init_bias, seed=seed,
                programming=programming,
                refresh_every=refresh_every, refresh_mode=refresh_mode, budgets=budgets,
                joint_phases=joint_phases, settle=settle, compute=compute, beta=beta, mode=mode,
            ))  # fmt: skip
        return FFEBM(parts)

    @staticmethod
    def convolutional(
        input_shape: tuple[int, int, int],
        channels: Sequence[int],
        pools: Sequence[int],
        block_layers: int,
        classes: int,
        devices: Callable[[int], Device],
        *,
        kernel: int = 3,
        padding: int = 1,
        pool_mode: Literal["max", "avg"] = "max",
        front: int = 0,
        between: Literal["identity", "bn"] = "identity",
        head: Literal["eb", "digital"] = "eb",
        gain: float = 1.0,
        activation: str = "hard_sigmoid",
        w_max: float = 1.0,
        budget: SettleBudget | None = None,
        budgets: dict[str, SettleBudget] | None = None,
        init: Literal["goe", "gaussian"] = "goe",
        init_scale: float = 0.5,
        init_bias: Literal["zero", "mid"] = "zero",
        beta: float = 0.2,
        mode: Mode = "centered",
        settle_mode: Literal["analog", "mvm"] = "analog",
        programming: str | None = None,
        refresh_every: int = 0,
        refresh_mode: str | None = None,
        seed: int = 0,
        joint_phases: bool = True,
        settle: Literal["auto", "board", "host"] = "auto",
        compute: str | torch.device | None = None,
    ) -> FFEBM:
        """A convolutional ff-EBM (Nest & Ernoult 2024): one conv DHN of maps `channels`
        (`kernel` x `kernel`, stride 1, `padding`; layer k pooled by ``pools[k]``, `pool_mode`
        "max" or "avg") split into EB blocks of `block_layers` conv layers (`split_conv`), block
        k on ``devices(k)``.

        `front` > 0: a digital `ConvFront` of that many channels before the first block (the
        input is then any (C, H, W) image, not only [0, 1] values). `between`: ``identity``
        (block k's last map is block k+1's clamped input) or ``bn`` (a digital `MapNorm`:
        batch-norm of the map, clamped into [0, 1]). `head`: the `classes` output layer as a
        fully connected tile inside the last EB block (``eb``) or a digital ``Linear`` after
        it (``digital``). Every parameter is drawn from the CPU generator of ``ffebm.init``;
        programming, settle path and compute device as in `FFEBM.layered`."""
        gen = seeds.torch_generator(seed, "ffebm.init")
        parts: list[nn.Module] = []
        shape = tuple(input_shape)
        if front:
            f = ConvFront(shape, front, kernel, padding, generator=gen)  # type: ignore[arg-type]
            parts.append(f)
            shape = f.out_shape
        blocks = split_conv(shape, channels, pools, block_layers, kernel, padding)  # type: ignore[arg-type]
        out_shape = shape
        for k, (in_shape, ch, pl) in enumerate(blocks):
            if k > 0 and between == "bn":
                parts.append(MapNorm(in_shape))
            last = k == len(blocks) - 1
            topo = Topology.convolutional(
                in_shape, ch, pools=pl, pool_mode=pool_mode, kernel=kernel, padding=padding,
                head=[classes] if last and head == "eb" else [], gain=gain, mode=settle_mode,
                budget=budget, w_max=w_max, activation=activation,
            )  # fmt: skip
            out_shape = topo.shapes[f"s{len(ch)}"]
            parts.append(_eb_layer(
                topo, k, devices, gen, init=init, init_scale=init_scale, init_bias=init_bias, seed=seed,
                programming=programming,
                refresh_every=refresh_every, refresh_mode=refresh_mode, budgets=budgets,
                joint_phases=joint_phases, settle=settle, compute=compute, beta=beta, mode=mode,
            ))  # fmt: skip
        if head == "digital":
            n = out_shape[0] * out_shape[1] * out_shape[2]
            lin = nn.utils.skip_init(nn.Linear, n, classes)  # allocated, drawn from `gen`
            _draw_digital(lin, gen)
            parts.append(lin)
        if compute is not None:
            for p in parts:
                if not isinstance(p, EBLayer):
                    p.to(compute)
        return FFEBM(parts)

    def cells(self) -> int:
        """Crossbar cells of every EB block (bias rows included)."""
        return sum(layer.block.topology.cells() for layer in self.eb_layers)


def _eb_layer(
    topo: Topology, k: int, devices: Callable[[int], Device], gen: torch.Generator, *, init: str,
    init_scale: float, init_bias: str, seed: int, programming: str | None, refresh_every: int,
    refresh_mode: str | None,
    budgets: dict[str, SettleBudget] | None, joint_phases: bool, settle: Literal["auto", "board", "host"],
    compute: str | torch.device | None, beta: float, mode: Mode,
) -> EBLayer:  # fmt: skip
    """Block k of an ff-EBM on ``devices(k)``: weights drawn from `gen` (GOE or Gaussian), its own
    programming scheme and seed (independent streams per block)."""
    weights = init_weights(topo, init, init_scale, gen, init_bias)
    block_seed = seeds.derive(seed, "ffebm.block", k)
    scheme = make_scheme(programming, refresh_every=refresh_every, refresh_mode=refresh_mode, seed=block_seed)
    blk = EBBlock(
        devices(k), topo, weights=weights, budgets=budgets, programming=scheme, seed=block_seed,
        joint_phases=joint_phases, settle=settle, compute=compute,
    )  # fmt: skip
    return EBLayer(blk, beta=beta, mode=mode)


def _draw_digital(module: nn.Module, gen: torch.Generator) -> None:
    """Initialise a digital part's weights from `gen` (torch's default initialisers draw from
    the global generator): ``N(0, 1 / fan_in)`` weights, zero biases; batch-norm as torch
    starts it (scale 1, shift 0)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / math.sqrt(fan_in))
                if m.bias is not None:
                    m.bias.zero_()


def split_conv(
    input_shape: tuple[int, int, int], channels: Sequence[int], pools: Sequence[int], block_layers: int,
    kernel: int = 3, padding: int = 1,
) -> list[tuple[tuple[int, int, int], list[int], list[int]]]:  # fmt: skip
    """Split one convolutional DHN (`Topology.convolutional`: maps of `channels`, each pooled
    by `pools`) into blocks of `block_layers` conv layers: per block (the shape of its clamped
    input map, its channels, its pools); block k's input is block k-1's last map.

    >>> split_conv((1, 28, 28), [8, 8, 16, 16], [1, 2, 1, 2], 2)
    [((1, 28, 28), [8, 8], [1, 2]), ((8, 14, 14), [16, 16], [1, 2])]
    """
    if block_layers < 1:
        raise ValueError("block_layers must be >= 1")
    if not channels or len(pools) != len(channels):
        raise ValueError(f"one pool per conv layer: {len(channels)} channels, {len(pools)} pools")
    out = []
    c, h, w = input_shape
    layer = 0
    for start in range(0, len(channels), block_layers):
        ch, pl = list(channels[start : start + block_layers]), list(pools[start : start + block_layers])
        out.append(((c, h, w), ch, pl))
        for n, p in zip(ch, pl, strict=True):
            conv_h, conv_w = h + 2 * padding - kernel + 1, w + 2 * padding - kernel + 1
            if min(conv_h, conv_w) // max(p, 1) < 1:
                raise ValueError(
                    f"conv layer {layer}: its {h} x {w} input map with model.kernel {kernel} and "
                    f"model.padding {padding} gives {conv_h} x {conv_w}, which model.pools[{layer}] = {p} "
                    "pools to nothing: use a smaller kernel or pool, more padding, or fewer conv layers "
                    "(model.channels)"
                )
            c, h, w = n, conv_h // p, conv_w // p
            layer += 1
    return out


class ConvFront(nn.Sequential):
    """The digital part in front of a conv EB block: ``Conv2d (k, stride 1, padding) -> MaxPool2d
    (2) -> BatchNorm2d -> Clamp01`` (the feedforward transformation of Nest & Ernoult: batch-norm
    after convolution and pooling, the clamp into the board's input range). Input (B, C, H, W)
    or flat (B, C H W) with `in_shape`; output flat, for the block's clamped input map. The
    convolution is drawn from `generator` (`_draw_digital`)."""

    def __init__(self, in_shape: tuple[int, int, int], channels: int, kernel: int = 3, padding: int = 1,
                 pool: int = 2, *, generator: torch.Generator) -> None:  # fmt: skip
        c, h, w = in_shape
        super().__init__(
            nn.Unflatten(1, in_shape),
            nn.utils.skip_init(nn.Conv2d, c, channels, kernel, padding=padding),  # drawn below
            nn.MaxPool2d(pool) if pool > 1 else nn.Identity(),
            nn.BatchNorm2d(channels),
            Clamp01(),
            nn.Flatten(),
        )
        _draw_digital(self, generator)
        ho, wo = h + 2 * padding - kernel + 1, w + 2 * padding - kernel + 1
        self.out_shape = (channels, ho // pool, wo // pool)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.reshape(x.shape[0], -1))


class MapNorm(nn.Sequential):
    """Between two conv EB blocks: ``BatchNorm2d -> Clamp01`` of the previous block's last map."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        super().__init__(nn.Unflatten(1, shape), nn.BatchNorm2d(shape[0]), Clamp01(), nn.Flatten())
