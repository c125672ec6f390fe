"""The maps of a conv coupling (`drivers.topology`): a kernel on a tile, applied at every
position of a feature map, with an optional max- or average-pooling.

A conv tile stores one kernel weight-stationary, as in-memory computing chips map a
convolution (im2col): row ``r = c k^2 + i k + j`` of the tile holds kernel entry (c, i, j)
for every output channel (column o), and the last row the bias when the coupling has one.
Applying the tile to the patch of every position of the input map (stride 1, zero padding)
is the 2-d convolution with that kernel; the board reuses the one tile at every position.

Feature maps travel flattened, channel-major, as node groups: (B, C * H * W). A conv tile may
drive several destination maps of one size (the channel parts of split maps that one tile's
columns hold, `drivers.placement`): their channels are concatenated, which for flat
channel-major states is the concatenation of the groups (`joined`, `split`).

With pooling, the coupling's term of the primitive function is, per sample,

    Phi_c = s_dst . pool(conv(s_src, K) + b)

(the energy of the convolutional DHNs of Laborieux et al. 2021 and of the conv EB blocks of
Nest & Ernoult 2024). Pooling takes the largest pre-activation of each window, so Phi_c is
bilinear in (s_src, s_dst) for a fixed choice of winners, and its derivatives are

- drive of the destination: ``pool(conv(s_src) + b)`` (`forward`);
- drive of the source: ``conv_transpose(unpool(s_dst))``: each destination node's state is
  routed back to the position that won its window, then through the transposed tile
  (`backward`);
- ``dPhi/dK``: the sum over positions of patch x routed destination state, and ``dPhi/db``
  the sum of the destination states (`weight_grad`).

Average-pooling (``pool_mode = "avg"``) takes each window's mean instead: a linear map, so
Phi_c is bilinear whatever the states, and the route back spreads each destination state
over its window, divided by the window's size (the adjoint of the mean). There are no
winners (`winners` is None), so the drive is smooth: a max-pool's winners can switch from one
settle step to the next, and a deep block's free settle then keeps moving (docs/conv.md).

A conv coupling split into row blocks by source channels (`drivers.placement`) is several
conv tiles whose products sum at one destination map. With max-pooling, a max of sums is not
a sum of maxes, so such tiles name one ``pool_group`` (`drivers.topology.Coupling`): the group is
one *unit* (`units`) that sums its members' pre-activations before the pooling (a node-side
pool) and routes the destination's states back to the shared winners through every member's
transposed tile (`unit_forward`, `unit_winners`, `unit_phi`; `backward` and `weight_grad` per
member with the unit's winners). A conv tile without a pool group is a unit of its own; the
mean of a sum is the sum of the means, so average-pooled tiles need no group.

The emulator, the host's iterated settle, the EP estimator and the pure-torch reference all
use these maps, so the four agree on what a conv coupling is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from drivers.topology import BIAS, Coupling, Topology, picks_winners


@dataclass(frozen=True)
class ConvGeometry:
    c_in: int
    h: int
    w: int
    c_out: int
    kernel: int
    padding: int
    pool: int
    bias: bool
    pool_mode: str = "max"

    @staticmethod
    def of(topology: Topology, coupling: Coupling) -> ConvGeometry:
        c_in, h, w = topology.shapes[coupling.rows[0]]
        c_out = sum(topology.shapes[g][0] for g in coupling.cols)
        return ConvGeometry(
            c_in, h, w, c_out, coupling.kernel, coupling.padding, coupling.pool, BIAS in coupling.rows,
            coupling.pool_mode,
        )  # fmt: skip

    @property
    def conv_hw(self) -> tuple[int, int]:
        """(height, width) of the conv output before pooling."""
        k, p = self.kernel, self.padding
        return self.h + 2 * p - k + 1, self.w + 2 * p - k + 1

    @property
    def out_shape(self) -> tuple[int, int, int]:
        ho, wo = self.conv_hw
        return self.c_out, ho // self.pool, wo // self.pool

    @property
    def has_winners(self) -> bool:
        """Whether the pooling picks winners (a max-pool), which the route back needs."""
        return picks_winners(self.pool, self.pool_mode)

    @property
    def positions(self) -> int:
        """Positions the kernel is applied at: one tile read (MVM) each."""
        ho, wo = self.conv_hw
        return ho * wo

    @property
    def kernel_rows(self) -> int:
        return self.c_in * self.kernel**2

    @property
    def rows(self) -> int:
        """The tile's rows: the kernel's, plus the bias row."""
        return self.kernel_rows + int(self.bias)

    def maps(self, x: Tensor) -> Tensor:
        """A flat source state (B, C_in H W) as maps (B, C_in, H, W)."""
        return x.reshape(x.shape[0], self.c_in, self.h, self.w)


def kernel(tile: Tensor, g: ConvGeometry) -> tuple[Tensor, Tensor | None]:
    """The tile (rows, C_out) as a conv weight (C_out, C_in, k, k) and a bias (C_out) or None."""
    k = tile[: g.kernel_rows].T.reshape(g.c_out, g.c_in, g.kernel, g.kernel)
    return k, (tile[g.kernel_rows] if g.bias else None)


def to_tile(weight: Tensor, bias: Tensor | None) -> Tensor:
    """A conv weight (C_out, C_in, k, k) and bias (C_out) as the tile (rows, C_out)."""
    rows = weight.reshape(weight.shape[0], -1).T
    return rows if bias is None else torch.cat([rows, bias.reshape(1, -1)])


def pre_activation(x: Tensor, tile: Tensor, g: ConvGeometry, bias: bool = True) -> Tensor:
    """``conv(x, K) (+ b)`` before pooling, (B, C_out, H_o, W_o); `bias` False leaves the bias
    row out (for a drive from the states alone)."""
    k, b = kernel(tile, g)
    return F.conv2d(g.maps(x), k, b if bias else None, padding=g.padding)


def pool(pre: Tensor, g: ConvGeometry) -> tuple[Tensor, Tensor | None]:
    """The pooled pre-activations, flat (B, n_dst), and the winners' indices (None without
    max-pooling)."""
    if g.pool == 1:
        return pre.reshape(pre.shape[0], -1), None
    if g.pool_mode == "avg":
        return F.avg_pool2d(pre, g.pool).reshape(pre.shape[0], -1), None
    # channels-last: torch's CPU max-pooling with indices is 3x faster there (0.9 against 2.7 ms
    # for (128, 16, 14, 14), copies included); the values and indices are the same
    y, idx = F.max_pool2d(pre.contiguous(memory_format=torch.channels_last), g.pool, return_indices=True)
    return y.reshape(pre.shape[0], -1), idx


def forward(x: Tensor, tile: Tensor, g: ConvGeometry, bias: bool = True) -> tuple[Tensor, Tensor | None]:
    """The destination's drive ``pool(conv(x) + b)`` (B, n_dst) and the pooling winners."""
    return pool(pre_activation(x, tile, g, bias), g)


def pool_at(pre: Tensor, g: ConvGeometry, idx: Tensor | None) -> Tensor:
    """The pre-activations at given pooling winners, flat (B, n_dst): a drive taken without
    the bias pools at the winners of the biased pre-activations, which the circuit compares.
    Without winners (no max-pool), the plain pooling."""
    if not g.has_winners or idx is None:
        return pool(pre, g)[0]
    return pre.flatten(2).gather(2, idx.flatten(2)).reshape(pre.shape[0], -1)


def unpool(y: Tensor, g: ConvGeometry, idx: Tensor | None) -> Tensor:
    """Flat destination states (B, n_dst) routed to the winning positions, (B, C_out, H_o, W_o);
    average-pooled, spread evenly over their windows (the mean's adjoint)."""
    maps = y.reshape(y.shape[0], *g.out_shape)
    if g.pool == 1:
        return maps
    if g.pool_mode == "avg":
        p = g.pool
        return (maps / p**2).repeat_interleave(p, 2).repeat_interleave(p, 3)
    if idx is None:
        raise ValueError("a pooled conv coupling needs the pooling winners (`forward`'s indices)")
    return F.max_unpool2d(maps, idx, g.pool, output_size=g.conv_hw)


def backward(y: Tensor, tile: Tensor, g: ConvGeometry, idx: Tensor | None) -> Tensor:
    """The source's drive ``conv_transpose(unpool(y), K)``, flat (B, n_src)."""
    k, _ = kernel(tile, g)
    out = F.conv_transpose2d(unpool(y, g, idx), k, padding=g.padding)
    return out.reshape(y.shape[0], -1)


def winners(x: Tensor, tile: Tensor, g: ConvGeometry) -> Tensor | None:
    """The pooling winners at source state `x` (None without max-pooling)."""
    if not g.has_winners:
        return None
    return forward(x, tile, g)[1]


def weight_grad(x: Tensor, y: Tensor, g: ConvGeometry, idx: Tensor | None) -> Tensor:
    """``dPhi_c/dW`` summed over the batch, in the tile's layout (rows, C_out)."""
    u = unpool(y, g, idx)
    gk = torch.nn.grad.conv2d_weight(g.maps(x), (g.c_out, g.c_in, g.kernel, g.kernel), u, padding=g.padding)
    return to_tile(gk, u.sum((0, 2, 3)) if g.bias else None)


def phi(x: Tensor, y: Tensor, tile: Tensor, g: ConvGeometry) -> Tensor:
    """``Phi_c`` per sample, (B,)."""
    return (forward(x, tile, g)[0] * y).sum(1)


def joined(states: Mapping[str, Tensor], groups: tuple[str, ...]) -> Tensor:
    """The flat (batch, n) states of `groups` side by side: for maps of one size, one map of
    their channels; for the groups of a fully connected coupling, its rows' or columns' input."""
    return states[groups[0]] if len(groups) == 1 else torch.cat([states[g] for g in groups], 1)


def split(y: Tensor, topology: Topology, groups: tuple[str, ...]) -> list[tuple[str, Tensor]]:
    """A flat drive of the concatenated maps `groups` cut back into (group, its part)."""
    if len(groups) == 1:
        return [(groups[0], y)]
    return list(zip(groups, torch.split(y, [topology.groups[g] for g in groups], 1), strict=True))


# ------------------------------------------------------------------ pool groups
def units(topology: Topology) -> list[tuple[Coupling, ...]]:
    """The conv couplings of `topology` as units that pool together: a tile alone, or the tiles
    of one pool group (at the place of its first tile, in topology order)."""
    out: list[list[Coupling]] = []
    at: dict[str, int] = {}
    for c in topology.couplings:
        if c.kind != "conv":
            continue
        if c.pool_group and c.pool_group in at:
            out[at[c.pool_group]].append(c)
            continue
        if c.pool_group:
            at[c.pool_group] = len(out)
        out.append([c])
    return [tuple(u) for u in out]


def unit_pre(xs: list[Tensor], tiles: list[Tensor], geoms: list[ConvGeometry], bias: bool = True) -> Tensor:
    """The summed pre-activations of a unit's members (their sources `xs`), (B, C_out, H_o, W_o)."""
    pre = pre_activation(xs[0], tiles[0], geoms[0], bias)
    for x, t, g in zip(xs[1:], tiles[1:], geoms[1:], strict=True):
        pre = pre + pre_activation(x, t, g, bias)
    return pre


def unit_forward(
    xs: list[Tensor], tiles: list[Tensor], geoms: list[ConvGeometry], bias: bool = True
) -> tuple[Tensor, Tensor | None]:
    """A unit's drive of its destination ``pool(sum_m conv(x_m, K_m) + b)`` and the winners."""
    return pool(unit_pre(xs, tiles, geoms, bias), geoms[0])


def unit_winners(xs: list[Tensor], tiles: list[Tensor], geoms: list[ConvGeometry]) -> Tensor | None:
    """The pooling winners of a unit at sources `xs` (None without max-pooling)."""
    if not geoms[0].has_winners:
        return None
    return unit_forward(xs, tiles, geoms)[1]


def unit_phi(xs: list[Tensor], y: Tensor, tiles: list[Tensor], geoms: list[ConvGeometry]) -> Tensor:
    """A unit's ``Phi`` per sample, (B,): ``s_dst . pool(sum of the members' pre-activations)``."""
    return (unit_forward(xs, tiles, geoms)[0] * y).sum(1)


# ------------------------------------------------------------------ as MVMs of the one tile
def patches(x: Tensor, g: ConvGeometry) -> Tensor:
    """The input vector of every position, (B * positions, rows), in the tile's row order
    (the bias column of ones last): one row per MVM of the tile.

    Written as one strided copy per kernel offset into the rows (k^2 copies of a shifted map):
    the same numbers as ``F.unfold`` and a transpose, which on the CPU took 2 to 3 times as
    long for maps of 8 x 14 x 14 and larger (two copies, the first with short inner loops)."""
    b, k, p = x.shape[0], g.kernel, g.padding
    ho, wo = g.conv_hw
    maps = F.pad(g.maps(x), (p, p, p, p)) if p else g.maps(x)
    out = torch.empty(b * ho * wo, g.rows, dtype=x.dtype, device=x.device)
    dst = out[:, : g.kernel_rows].view(b, ho, wo, g.c_in, k, k)
    for i in range(k):
        for j in range(k):
            dst[..., i, j] = maps[:, :, i : i + ho, j : j + wo].permute(0, 2, 3, 1)
    if g.bias:
        out[:, -1] = 1.0
    return out


def patch_totals(a: Tensor, g: ConvGeometry) -> Tensor:
    """Each kernel entry's patch values summed over the batch and every position, (C_in k^2,)
    in the tile's row order: ``patches(a, g)[:, :kernel_rows].sum(0)`` without the patches.
    Position (i, j) reads entry (c, di, dj) at map cell (i + di - p, j + dj - p), zero outside
    the map, so an entry's total is the sum of the batch-summed map over one rectangle: a
    settle's read energy needs these totals of the squared states, and the patches themselves
    are k^2 times the map (summed in another order: equal to float rounding)."""
    k, p = g.kernel, g.padding
    ho, wo = g.conv_hw
    m = g.maps(a).sum(0)  # (C_in, H, W)
    out = torch.empty(g.c_in, k, k, dtype=a.dtype, device=a.device)
    for i in range(k):
        band = m[:, max(0, i - p) : min(g.h, ho + i - p)].sum(1)  # (C_in, W)
        for j in range(k):
            out[:, i, j] = band[:, max(0, j - p) : min(g.w, wo + j - p)].sum(1)
    return out.reshape(-1)


def patch_norms(x: Tensor, g: ConvGeometry) -> Tensor:
    """Per position, the squared norm of the read's input (its patch, plus the bias line at 1
    when the tile has one): ``(patches(x, g) ** 2).sum(1)`` as (B, 1, H_o, W_o), without the
    patches. The squares summed over the channels, then a k x k box sum over the zero-padded
    map, written as k shifted adds along each axis (equal to float rounding)."""
    k, p = g.kernel, g.padding
    ho, wo = g.conv_hw
    m = g.maps(x).square().sum(1, keepdim=True)
    m = F.pad(m, (p, p, p, p)) if p else m
    rows = m[..., 0:wo].clone()
    for j in range(1, k):
        rows += m[..., j : j + wo]
    out = rows[..., 0:ho, :].clone()
    for i in range(1, k):
        out += rows[..., i : i + ho, :]
    return out + 1.0 if g.bias else out


def from_positions(y: Tensor, g: ConvGeometry) -> Tensor:
    """MVM outputs per position (B * positions, C_out) as maps (B, C_out, H_o, W_o)."""
    ho, wo = g.conv_hw
    return y.reshape(-1, ho * wo, g.c_out).transpose(1, 2).reshape(-1, g.c_out, ho, wo)


def to_positions(u: Tensor) -> Tensor:
    """Maps (B, C_out, H_o, W_o) as one row per position, (B * positions, C_out): the inputs of
    the transposed MVMs."""
    return u.flatten(2).transpose(1, 2).reshape(-1, u.shape[1])


def fold_patches(rows: Tensor, g: ConvGeometry) -> Tensor:
    """Transposed MVM outputs per position (B * positions, rows) summed back onto the source
    map (the bias column dropped), flat (B, n_src): per kernel offset, one shifted add of its
    column block (the numbers of ``F.fold``, which adds the offsets in the same order)."""
    k, p = g.kernel, g.padding
    ho, wo = g.conv_hw
    b = rows.shape[0] // (ho * wo)
    blocks = rows[:, : g.kernel_rows].reshape(b, ho, wo, g.c_in, k, k)
    out = torch.zeros(b, g.c_in, g.h + 2 * p, g.w + 2 * p, dtype=rows.dtype, device=rows.device)
    for i in range(k):
        for j in range(k):
            out[:, :, i : i + ho, j : j + wo] += blocks[..., i, j].permute(0, 3, 1, 2)
    return out[:, :, p : p + g.h, p : p + g.w].reshape(b, -1)
