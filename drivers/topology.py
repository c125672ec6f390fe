"""Network topology: node groups and the tiles that couple them.

A topology is a list of node groups and a list of couplings. Each coupling is
one crossbar tile of differential conductance pairs, with the weight

    W = w_max * (G+ - G-) / (g_max - g_min)         shape (rows, cols)

A `bipartite` coupling joins the concatenated `rows` groups to the
concatenated `cols` groups: it drives the column nodes with ``s_rows @ W`` and
the row nodes with ``s_cols @ W.T`` (one physical crossbar gives both). A
`dense` coupling is an all-to-all network over the `cols` groups: the tile is
N x N (plus a bias row), the drive is ``s @ W``, the diagonal is disconnected,
and W_ij and W_ji are two separate devices. A `conv` coupling joins two feature
maps (groups with a shape in `Topology.shapes`): its tile holds one kernel,
weight-stationary, ``C_in * k * k`` rows (plus a bias row) by ``C_out`` columns,
applied at every position of the input map (stride 1, zero padding), optionally
followed by a max-pooling of the pre-activations (`drivers.conv` has the maps).

The reserved group ``bias`` is a single node held at 1: a bias is just one more
row of a tile.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Literal

from drivers.activation import HARD_SIGMOID, Activation
from drivers.errors import ConfigurationError
from drivers.scalars import INT32_MAX, as_float, as_int

BIAS = "bias"


# declared bounds of a conv coupling's geometry (the work of one settle step grows with them)
MAX_KERNEL = 15
MAX_POOL = 8
POOL_MODES = ("max", "avg")
MAX_POSITIONS = 1 << 16  # conv output positions per input map (a 256 x 256 image)
# nodes of a topology: every settle step touches each; feature maps make large counts possible
# (the CIFAR-10 example's widest block has 166 912), the bound keeps a settle's state in memory
MAX_NODES = 1 << 20


def picks_winners(pool: int, pool_mode: str) -> bool:
    """Whether a conv coupling's pooling picks a winner per window (a max-pool): its route
    back needs them, and a max of sums is not a sum of maxes (`drivers.conv`)."""
    return pool > 1 and pool_mode == "max"


@dataclass(frozen=True)
class Coupling:
    tile: str
    rows: tuple[str, ...]
    cols: tuple[str, ...]
    kind: Literal["bipartite", "dense", "conv"] = "bipartite"
    w_max: float = 1.0
    # conv couplings only: kernel size k (stride 1), zero padding, pooling window (1: none)
    kernel: int = 0
    padding: int = 0
    pool: int = 1
    # conv couplings only: "max" (the largest pre-activation of each window wins) or "avg"
    # (the window's mean: linear, so the energy is bilinear whatever the states)
    pool_mode: str = "max"
    # conv couplings only: conv tiles naming the same pool group (one logical conv split into
    # row blocks by source channels, `drivers.placement`) drive one destination map and sum
    # their pre-activations before its max-pooling (a node-side pool); "" for none
    pool_group: str = ""


# checks in a row without a new smallest residual after which a settle that started at the
# budget's dt falls back to its stability bound (the emulator's `SettlePlanner.step_sizes`,
# `hil.host_settle.HostSettle`). A converging settle's largest change is not monotone: the
# main job at dt 0.8 ran its decoding settles 866, 658 and 502 thousand steps with 1, 4 and
# 16 here (-ELBO 1.27, 1.27, 1.49), and 506 thousand with no fallback at all (2026-12-06). A
# settle that truly oscillates wastes 16 checks before it falls back: at dt 1.0 without the
# fallback 14 % of the main job's test settles converged and -ELBO was 9.7; with it all
# converged and -ELBO was 1.12, in 1.45 million steps
STALL_CHECKS = 16


@dataclass(frozen=True)
class SettleBudget:
    """How a settle runs. `dt` < 1 damps the update (needed for dense networks).

    A settle stops when its largest state change in a step is within `tol` (checked every
    `check_every` steps; on a noisy board per sample, within `tol` of what its noise moves
    it, `drivers.settle_stop`) or after `max_steps`. ``tol = 0`` switches the test off on
    every board, noisy or not: every settle runs exactly `max_steps`, checked at its last
    step only (the fixed-step recipe of the EP literature; `fixed_steps`)."""

    max_steps: int = 100
    tol: float = 1e-4
    dt: float = 0.5
    check_every: int = 5

    @property
    def fixed_steps(self) -> bool:
        """``tol = 0``: every settle runs `max_steps`, with no early stop of any kind."""
        return self.tol == 0

    @property
    def check_interval(self) -> int:
        """The steps between convergence checks: `check_every`, or with `fixed_steps` only the
        last step's."""
        return self.max_steps if self.fixed_steps else self.check_every

    def capped(self, most: int) -> SettleBudget:
        """This budget with at most `most` steps (a board's `Limits.max_settle_steps`, which it
        refuses past), its convergence checked no less often than that; itself where it fits."""
        if self.max_steps <= most:
            return self
        return replace(self, max_steps=most, check_every=min(self.check_every, most))


@dataclass(frozen=True)
class Topology:
    groups: dict[str, int]
    couplings: tuple[Coupling, ...]
    gain: float = 1.0
    mode: Literal["analog", "mvm"] = "analog"
    budget: SettleBudget = field(default_factory=SettleBudget)
    # feature-map groups: (channels, height, width), flattened channel-major into the group
    shapes: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    # the node circuits' transfer curve (`drivers.activation`); a name such as "logistic" or
    # "soft_sigmoid:0.05" is parsed
    activation: Activation = HARD_SIGMOID

    def __post_init__(self) -> None:
        if BIAS in self.groups:
            raise ConfigurationError(f"group name {BIAS!r} is reserved for the bias node; rename it")
        if self.mode not in ("analog", "mvm"):
            raise ConfigurationError(f"mode must be 'analog' or 'mvm', got {self.mode!r}")
        for name, size in self.groups.items():
            if not isinstance(name, str):
                raise ConfigurationError(f"group names are strings, got {name!r}")
            as_int(f"size of group {name!r}", size, 1, INT32_MAX)
        # kept as Python integers: numpy sizes (int32) would wrap around in the sums and
        # products the limit checks take of them (nodes, batch x nodes) past 2^31 - 1
        object.__setattr__(self, "groups", {name: int(size) for name, size in self.groups.items()})
        as_int("nodes of the topology (sum of group sizes)", sum(self.groups.values()), 1, MAX_NODES)
        # finite and > 0 here; the upper bounds are the board's (Limits.max_gain, max_w_max)
        as_float("activation gain", self.gain, 0.0, float("inf"), lo_open=True)
        object.__setattr__(self, "activation", Activation.parse(self.activation))
        if not isinstance(self.budget, SettleBudget):
            raise ConfigurationError(f"budget must be a SettleBudget, got {type(self.budget).__name__}")
        for c in self.couplings:
            if not isinstance(c, Coupling) or not isinstance(c.tile, str):
                raise ConfigurationError(f"couplings are Coupling objects with a tile name, got {c!r:.80}")
            if not (isinstance(c.rows, tuple) and isinstance(c.cols, tuple)) or not all(
                isinstance(g, str) for g in c.rows + c.cols
            ):
                raise ConfigurationError(f"tile {c.tile!r}: rows and cols are tuples of group names")
            if c.kind not in ("bipartite", "dense", "conv"):
                raise ConfigurationError(
                    f"tile {c.tile!r}: kind must be 'bipartite', 'dense' or 'conv', got {c.kind!r}"
                )
        names = [c.tile for c in self.couplings]
        if len(set(names)) != len(names):
            raise ConfigurationError(f"tile names must be unique, got {names}")
        for c in self.couplings:
            for g in c.rows + c.cols:
                if g != BIAS and g not in self.groups:
                    raise ConfigurationError(
                        f"tile {c.tile!r} names unknown group {g!r}; known: {sorted(self.groups)}"
                    )
            if BIAS in c.cols:
                raise ConfigurationError(f"tile {c.tile!r}: the bias node can only be on the rows side")
            if c.kind == "dense" and tuple(g for g in c.rows if g != BIAS) != c.cols:
                raise ConfigurationError(
                    f"dense tile {c.tile!r}: rows must be cols (plus optionally 'bias'), "
                    f"got rows={c.rows} cols={c.cols}"
                )
            as_float(f"tile {c.tile!r}: w_max", c.w_max, 0.0, float("inf"), lo_open=True)
        self._check_shapes()
        for c in self.couplings:
            if c.kind == "conv":
                self._check_conv(c)
            elif (c.kernel, c.padding, c.pool, c.pool_mode, c.pool_group) != (0, 0, 1, "max", ""):
                raise ConfigurationError(
                    f"tile {c.tile!r}: kernel, padding, pool, pool_mode and pool_group are for conv "
                    f"couplings; this one is {c.kind!r}"
                )
        self._check_pool_groups()

    def _check_shapes(self) -> None:
        if not isinstance(self.shapes, dict):
            raise ConfigurationError(
                f"shapes maps group names to (C, H, W), got {type(self.shapes).__name__}"
            )
        for g, shape in self.shapes.items():
            if g not in self.groups:
                raise ConfigurationError(f"shapes names unknown group {g!r}; known: {sorted(self.groups)}")
            if not isinstance(shape, tuple) or len(shape) != 3:
                raise ConfigurationError(
                    f"the shape of group {g!r} is (channels, height, width), got {shape!r}"
                )
            c, h, w = (as_int(f"shape of group {g!r}", v, 1, INT32_MAX) for v in shape)
            if c * h * w != self.groups[g]:
                raise ConfigurationError(
                    f"group {g!r} has {self.groups[g]} nodes but shape {shape} holds {c * h * w}; "
                    "make the size the product of the shape"
                )

    def _check_conv(self, c: Coupling) -> None:
        """A conv coupling: one source map (plus optionally the bias) on the rows, one
        destination map on the columns, whose shape is the pooled output of the kernel; or
        several destination maps of that size, their channels concatenated (the channel parts
        of split maps that one tile's columns hold, `drivers.placement`)."""
        src = tuple(g for g in c.rows if g != BIAS)
        if len(src) != 1 or not c.cols or c.rows[0] != src[0]:
            raise ConfigurationError(
                f"conv tile {c.tile!r}: rows are one feature map (then optionally 'bias'), cols one "
                f"feature map (or several of one size); got rows={c.rows} cols={c.cols}"
            )
        for g in (src[0], *c.cols):
            if g not in self.shapes:
                raise ConfigurationError(
                    f"conv tile {c.tile!r}: group {g!r} needs a (C, H, W) entry in Topology.shapes"
                )
        k = as_int(f"conv tile {c.tile!r}: kernel", c.kernel, 1, MAX_KERNEL)
        p = as_int(f"conv tile {c.tile!r}: padding", c.padding, 0, k - 1)
        pool = as_int(f"conv tile {c.tile!r}: pool", c.pool, 1, MAX_POOL)
        if c.pool_mode not in POOL_MODES:
            raise ConfigurationError(
                f"conv tile {c.tile!r}: pool_mode is one of {', '.join(map(repr, POOL_MODES))}, "
                f"got {c.pool_mode!r}"
            )
        _c_in, h, w = self.shapes[src[0]]
        ho, wo = h + 2 * p - k + 1, w + 2 * p - k + 1
        if ho < 1 or wo < 1:
            raise ConfigurationError(
                f"conv tile {c.tile!r}: a {k} x {k} kernel with padding {p} does not fit a {h} x {w} map"
            )
        as_int(f"conv tile {c.tile!r}: output positions", ho * wo, 1, MAX_POSITIONS)
        if ho % pool or wo % pool:
            raise ConfigurationError(
                f"conv tile {c.tile!r}: the {ho} x {wo} output does not split into {pool} x {pool} "
                "pooling windows; change the padding or the pool"
            )
        for g in c.cols:
            want = (self.shapes[g][0], ho // pool, wo // pool)
            if self.shapes[g] != want:
                raise ConfigurationError(
                    f"conv tile {c.tile!r}: {src[0]!r} {self.shapes[src[0]]} through a {k} x {k} kernel "
                    f"(padding {p}, pool {pool}) gives maps of {want[1]} x {want[2]}; group "
                    f"{g!r} has shape {self.shapes[g]}"
                )

    def _check_pool_groups(self) -> None:
        """The conv tiles of one pool group sum their pre-activations before one pooling: they
        drive the same destination map with the same kernel size, padding and pool."""
        first: dict[str, Coupling] = {}
        for c in self.couplings:
            if c.kind != "conv":
                continue
            # the type first: a falsy non-name (0, false, null, [] over the wire) must not pass
            # silently as "no pool group" (a peer that meant a group would get separate pools)
            if not isinstance(c.pool_group, str):
                raise ConfigurationError(
                    f'conv tile {c.tile!r}: pool_group is a name (a string; "" or absent: none), got '
                    f"{c.pool_group!r:.60}; send the group's name, or leave the field out"
                )
            if not c.pool_group:
                continue
            a = first.setdefault(c.pool_group, c)
            shared = ("cols", "kernel", "padding", "pool", "pool_mode")
            if any(getattr(a, f) != getattr(c, f) for f in shared):
                raise ConfigurationError(
                    f"conv tiles {a.tile!r} and {c.tile!r} share pool group {c.pool_group!r} but differ in "
                    "destination, kernel, padding, pool or pool_mode; the tiles of a pool group sum their "
                    "pre-activations before one pooling: give them the same, or separate groups"
                )

    def size(self, group: str) -> int:
        return 1 if group == BIAS else self.groups[group]

    def tile_shape(self, tile: str) -> tuple[int, int]:
        shape = self._tile_shapes.get(tile)
        if shape is None:
            raise ConfigurationError(f"unknown tile {tile!r}; known: {list(self._tile_shapes)}")
        return shape

    @cached_property
    def _tile_shapes(self) -> dict[str, tuple[int, int]]:
        """(rows, cols) per tile, computed once (the checks of every program call ask). A conv
        tile holds one kernel: ``C_in k^2`` rows (+ the bias row) by ``C_out`` columns."""
        out = {}
        for c in self.couplings:
            if c.kind == "conv":
                c_in, c_out = self.shapes[c.rows[0]][0], sum(self.shapes[g][0] for g in c.cols)
                out[c.tile] = (c_in * c.kernel**2 + (BIAS in c.rows), c_out)
            else:
                out[c.tile] = (sum(self.size(g) for g in c.rows), sum(self.size(g) for g in c.cols))
        return out

    def row_sizes(self, tile: str) -> list[int]:
        """The rows of `tile` each of its row groups occupies, in order (a conv tile's source
        map holds ``C_in k^2`` rows, its bias one)."""
        c = self.coupling(tile)
        if c.kind == "conv":
            return [self.tile_shape(tile)[0] - (BIAS in c.rows)] + ([1] if BIAS in c.rows else [])
        return [self.size(g) for g in c.rows]

    def row_slice(self, tile: str, group: str) -> slice:
        """The rows of `tile` that its row group `group` occupies (`row_sizes`; a conv tile's
        bias: its last row)."""
        start = 0
        for g, n in zip(self.coupling(tile).rows, self.row_sizes(tile), strict=True):
            if g == group:
                return slice(start, start + n)
            start += n
        raise ConfigurationError(
            f"tile {tile!r} has no row group {group!r}; rows: {self.coupling(tile).rows}"
        )

    def coupling(self, tile: str) -> Coupling:
        for c in self.couplings:
            if c.tile == tile:
                return c
        raise ConfigurationError(f"unknown tile {tile!r}; known: {[c.tile for c in self.couplings]}")

    def cells(self) -> int:
        """Crossbar cells (differential pairs) used, bias rows included."""
        return sum(r * c for r, c in (self.tile_shape(t.tile) for t in self.couplings))

    @staticmethod
    def layered(
        sizes: list[int],
        *,
        bias: bool = True,
        prefix: str = "s",
        gain: float = 1.0,
        mode: Literal["analog", "mvm"] = "analog",
        budget: SettleBudget | None = None,
        w_max: float = 1.0,
        activation: Activation | str = HARD_SIGMOID,
    ) -> Topology:
        """A layered DHN: groups s0 (input) ... sL, tiles W0 ... W{L-1} (bias in the rows of W_k
        feeds group s{k+1})."""
        if len(sizes) < 2:
            raise ConfigurationError("a layered network needs at least two layers")
        groups = {f"{prefix}{k}": n for k, n in enumerate(sizes)}
        couplings = tuple(
            Coupling(
                tile=f"W{k}",
                rows=(f"{prefix}{k}",) + ((BIAS,) if bias else ()),
                cols=(f"{prefix}{k + 1}",),
                w_max=w_max,
            )
            for k in range(len(sizes) - 1)
        )
        return Topology(
            groups, couplings, gain=gain, mode=mode, budget=budget or SettleBudget(),
            activation=activation,  # type: ignore[arg-type]  # parsed by Topology
        )  # fmt: skip

    @staticmethod
    def convolutional(
        input_shape: tuple[int, int, int],
        channels: list[int],
        *,
        pools: list[int] | None = None,
        pool_mode: str = "max",
        kernel: int = 3,
        padding: int = 1,
        head: list[int] | tuple[int, ...] = (),
        bias: bool = True,
        prefix: str = "s",
        gain: float = 1.0,
        mode: Literal["analog", "mvm"] = "analog",
        budget: SettleBudget | None = None,
        w_max: float = 1.0,
        activation: Activation | str = HARD_SIGMOID,
    ) -> Topology:
        """A layered convolutional DHN (the conv EB blocks of Laborieux et al. 2021 and Nest &
        Ernoult 2024): group s0 is the input map `input_shape` (C, H, W), groups s1 ... sL the
        maps of `channels`, each the output of a `kernel` x `kernel` conv (stride 1, `padding`)
        of the one before, pooled by ``pools[k]`` (default 2 for every layer; `pool_mode` "max"
        or "avg"); then fully connected groups of sizes `head`. Tiles W0 ... in that order, bias
        rows included."""
        pools = [2] * len(channels) if pools is None else list(pools)
        if not channels or len(pools) != len(channels):
            raise ConfigurationError(
                f"a convolutional DHN needs one pool per conv layer; got {len(channels)} layers, "
                f"{len(pools)} pools"
            )
        c, h, w = input_shape
        if min(c, h, w) < 1:
            raise ConfigurationError(
                f"input_shape is the input map's (C, H, W), each >= 1; got {tuple(input_shape)}"
            )
        shapes = {f"{prefix}0": (c, h, w)}
        couplings = []
        bias_rows = (BIAS,) if bias else ()
        for k, (ch, pool) in enumerate(zip(channels, pools, strict=True)):
            oh, ow = h + 2 * padding - kernel + 1, w + 2 * padding - kernel + 1
            if min(oh, ow) < 1:
                raise ConfigurationError(
                    f"conv layer {k} (tile W{k}): its {h} x {w} input map with kernel {kernel} and padding "
                    f"{padding} gives a {oh} x {ow} output; use a smaller kernel, more padding (at most "
                    "kernel - 1), a larger input or fewer pooled layers before it"
                )
            if min(oh, ow) < pool:
                raise ConfigurationError(
                    f"conv layer {k} (tile W{k}): its {oh} x {ow} output is smaller than its pool {pool}; "
                    "use a smaller pool, a smaller kernel or more padding"
                )
            h, w = oh // pool, ow // pool
            shapes[f"{prefix}{k + 1}"] = (ch, h, w)
            src, dst = f"{prefix}{k}", f"{prefix}{k + 1}"
            tile = Coupling(
                f"W{k}", (src, *bias_rows), (dst,), "conv", w_max, kernel, padding, pool, pool_mode
            )
            couplings.append(tile)
        groups = {g: a * b * d for g, (a, b, d) in shapes.items()}
        n = len(channels)
        for j, size in enumerate(head):
            groups[f"{prefix}{n + j + 1}"] = size
            src, dst = f"{prefix}{n + j}", f"{prefix}{n + j + 1}"
            couplings.append(Coupling(f"W{n + j}", (src, *bias_rows), (dst,), w_max=w_max))
        return Topology(
            groups, tuple(couplings), gain=gain, mode=mode, budget=budget or SettleBudget(), shapes=shapes,
            activation=activation,  # type: ignore[arg-type]  # parsed by Topology
        )  # fmt: skip

    @staticmethod
    def dense(
        groups: dict[str, int],
        *,
        bias: bool = True,
        tile: str = "W",
        gain: float = 1.0,
        mode: Literal["analog", "mvm"] = "analog",
        budget: SettleBudget | None = None,
        w_max: float = 1.0,
        activation: Activation | str = HARD_SIGMOID,
    ) -> Topology:
        """An all-to-all network over `groups` on one N x N tile (plus a bias row)."""
        cols = tuple(groups)
        rows = cols + ((BIAS,) if bias else ())
        c = Coupling(tile=tile, rows=rows, cols=cols, kind="dense", w_max=w_max)
        return Topology(
            dict(groups), (c,), gain=gain, mode=mode, budget=budget or SettleBudget(),
            activation=activation,  # type: ignore[arg-type]  # parsed by Topology
        )  # fmt: skip
