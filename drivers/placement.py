"""Placing a logical network on a board's physical tiles.

A coupling larger than the board's tiles (`Limits.tile_rows_max` x `tile_cols_max`) is split
as in-memory-computing compilers split a layer: its groups become consecutive sub-groups
``g#0``, ``g#1``, ... and its matrix a grid of physical tiles ``W#i_j``, each joining row
block i's sub-groups to column block j's. The sub-groups carry the same nodes in the same
order, so the energy and the fixed points are the logical network's. Per kind:

- **bipartite**: every group larger than ``min(tile_rows_max, tile_cols_max)`` becomes parts of
  that size; the rows (sub-groups, then the bias) are packed into row blocks of at most
  `tile_rows_max`, the columns into column blocks of at most `tile_cols_max`. Column block j's
  drive is the sum of the row blocks' products (summed on the host after each tile's ADC, or
  by the node circuits in an analog settle); the column blocks are concatenated.
- **dense** (all-to-all over N nodes, an (N + bias) x N tile, diagonal disconnected): the nodes
  become consecutive parts of at most ``min(tile_rows_max - bias, tile_cols_max)`` (room for
  the bias row). Part a's diagonal block is a dense tile ``W#a_a`` on its sub-groups with its
  share of the bias row; each pair a < b is ONE bipartite tile ``W#a_b`` (rows part a, columns
  part b) holding the symmetric coupling ``(W[a, b] + W[b, a]^T) / 2``: a bipartite tile couples
  both ways with energy factor 1, which is the dense energy's ``1/2 (W_ab + W_ba^T)``. Exact on
  a symmetric W (which EP keeps); `drivers.tiled` maps program, pulse, read and mvm both ways.
- **conv** (one kernel tile, ``C_in k^2`` (+ bias) rows by ``C_out`` columns, read at every
  position): the feature maps are split by channels into sub-groups of shape
  ``(c_part, H, W)``. Columns: the destination's parts (at most `tile_cols_max` channels
  each) packed into column blocks of at most `tile_cols_max` channels, one tile per block
  driving its parts as one map of their channels (exact: pooling acts per output channel).
  Rows: one tile per source part of at most ``(tile_rows_max - bias) // k^2`` channels, the
  bias row on the last; their products sum at the destination. Without pooling that sum is
  all there is, and so with average-pooling (a mean of sums is a sum of means); with
  max-pooling (a max of sums is not a sum of maxes) the row tiles of one column
  block name one ``pool_group`` and every settle sums their pre-activations before the
  pooling and routes back through the shared winners (`drivers.conv.units`).

A group split for one coupling is split for every coupling that holds it: the other couplings
are re-expressed on the parts (a conv map split as the destination of one conv is the source
of the next one's row blocks; a dense or conv coupling then splits too).

A topology that fits is placed as itself: `Placement.split` is False and `physical` is the
logical topology, the same object.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from drivers.base import Limits
from drivers.errors import ConfigurationError, LimitViolation
from drivers.topology import BIAS, Coupling, Topology, picks_winners

# separates a logical name from its part index in a physical group or tile name (``W0#1_2``: no
# dot, so that the physical topology's tile names are valid torch parameter names in `hil`)
SEP = "#"
MAX_PARTS = 1 << 12  # parts of one group (a dense coupling's tiles grow with their square)


@dataclass(frozen=True)
class Part:
    """One physical group (or the bias row) holding ``[start, stop)`` of a logical group."""

    name: str
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Block:
    """Physical tile `tile`: logical rows ``[r0, r1)`` by columns ``[c0, c1)`` of its coupling.

    A dense coupling's blocks also use `bias_row` (a diagonal tile: the logical bias row, its
    tile's last row; -1 for none) and `mirror` (an off-diagonal tile: it also holds logical
    ``[c0, c1) x [r0, r1)`` as its transpose, the other half of the symmetric pair)."""

    tile: str
    i: int  # row block
    j: int  # column block
    r0: int
    r1: int
    c0: int
    c1: int
    bias_row: int = -1
    mirror: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        """The physical tile's (rows, cols)."""
        return self.r1 - self.r0 + (self.bias_row >= 0), self.c1 - self.c0


@dataclass(frozen=True)
class Placement:
    """Where a logical topology lies on the board: the physical topology, each logical group's
    parts and each logical tile's blocks (row-major: row block, then column block)."""

    logical: Topology
    physical: Topology
    parts: dict[str, tuple[Part, ...]]
    blocks: dict[str, tuple[Block, ...]]
    tile_rows_max: int
    tile_cols_max: int

    @property
    def split(self) -> bool:
        """Some coupling spans more than one physical tile."""
        return self.physical is not self.logical

    @property
    def tiles(self) -> int:
        """Physical tiles used."""
        return len(self.physical.couplings)

    @property
    def cells(self) -> int:
        """Crossbar cells (differential pairs) the network uses, bias rows included (a split
        dense coupling uses one cell per node pair across parts, not two)."""
        return self.physical.cells()

    @property
    def utilisation(self) -> float:
        """Cells used over the cells of the tiles occupied (a whole tile per physical tile)."""
        return self.cells / (self.tiles * self.tile_rows_max * self.tile_cols_max)

    def grid(self, tile: str) -> tuple[int, int]:
        """(row blocks, column blocks) of logical `tile` (a dense one: parts x parts, its
        upper triangle used)."""
        b = self.blocks[tile]
        return max(x.i for x in b) + 1, max(x.j for x in b) + 1

    def pooled(self, tile: str) -> bool:
        """Logical conv `tile` is split into row blocks that pool at the destination nodes."""
        return any(self.physical.coupling(b.tile).pool_group for b in self.blocks[tile])

    def _what(self, tile: str) -> str:
        c = self.logical.coupling(tile)
        r, k = self.logical.tile_shape(tile)
        n = len(self.blocks[tile])
        if c.kind == "dense":
            parts = self.grid(tile)[0]
            return f"{tile} dense {r}x{k} in {parts} parts on {n} tiles"
        pool = " (node-side pool)" if c.kind == "conv" and self.pooled(tile) else ""
        return "{} {} {}x{} on {}x{} tiles{}".format(tile, c.kind, r, k, *self.grid(tile), pool)

    def describe(self) -> str:
        """``W0 bipartite 785x2048 on 4x8 tiles, ...; 73 tiles of 256x256, 4198400 cells,
        utilisation 0.88``."""
        per = ", ".join(self._what(t) for t in self.blocks)
        return (
            f"{per}; {self.tiles} tiles of {self.tile_rows_max}x{self.tile_cols_max}, "
            f"{self.cells} cells, utilisation {self.utilisation:.3f}"
        )

    def _kinds(self) -> list[tuple[str, str]]:
        return [(t, self.logical.coupling(t).kind) for t in self.blocks]

    def as_dict(self) -> dict[str, object]:
        """The figures of the placement, JSON-ready (for run logs and benchmarks): per logical
        tile its kind, grid and physical tiles, and which conv tiles pool at the nodes."""
        return {
            "split": self.split,
            "tiles": self.tiles,
            "cells": self.cells,
            "utilisation": self.utilisation,
            "tile_rows_max": self.tile_rows_max,
            "tile_cols_max": self.tile_cols_max,
            "grid": {t: list(self.grid(t)) for t in self.blocks},
            "kinds": dict(self._kinds()),
            "physical_tiles": {t: len(b) for t, b in self.blocks.items()},
            "node_pools": [t for t, c in self._kinds() if c == "conv" and self.pooled(t)],
        }


def _pack(items: list[tuple[str, int]], cap: int) -> list[list[tuple[str, int]]]:
    """Consecutive items (name, size <= cap) in blocks of at most `cap` in total."""
    out: list[list[tuple[str, int]]] = [[]]
    used = 0
    for name, size in items:
        if used + size > cap and out[-1]:
            out.append([])
            used = 0
        out[-1].append((name, size))
        used += size
    return out


def _fits(topology: Topology, limits: Limits) -> bool:
    return all(_tile_fits(topology, c, limits) for c in topology.couplings)


class _Caps:
    """The largest part of every group, in units: channels for a feature map that a conv
    coupling holds (it is split by channels), nodes for any other group."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.maps = {g for c in topology.couplings if c.kind == "conv" for g in (c.rows[0], *c.cols)}
        shapes = topology.shapes
        self.unit = {g: (shapes[g][1] * shapes[g][2] if g in self.maps else 1) for g in topology.groups}
        self.units = {g: topology.groups[g] // self.unit[g] for g in topology.groups}
        self.cap = dict(self.units)

    def split(self, g: str) -> bool:
        return g != BIAS and self.cap[g] < self.units[g]

    def nodes(self, g: str, cap: int, tile: str, why: str) -> bool:
        """At most `cap` nodes per part of `g`; True when that lowers its cap."""
        if self.topology.groups[g] <= cap:
            return False  # its parts, if another coupling split it, are smaller still
        units = cap // self.unit[g]
        if units < 1:
            raise ConfigurationError(
                f"tile {tile!r} must be split into parts of at most {cap} nodes ({why}), but a channel "
                f"of feature map {g!r} {self.topology.shapes[g]} has {self.unit[g]} nodes and a map is "
                "split by whole channels; use smaller maps, or a board with larger tiles"
            )
        return self.channels(g, units)

    def channels(self, g: str, units: int) -> bool:
        if units >= self.cap[g]:
            return False
        self.cap[g] = units
        return True


def _caps(topology: Topology, limits: Limits) -> _Caps:
    """Tighten the groups' part sizes until every coupling that must split (larger than a
    tile, or holding a split group) fits its tiles."""
    rmax, cmax = limits.tile_rows_max, limits.tile_cols_max
    caps = _Caps(topology)
    changed = True
    while changed:
        changed = False
        for c in topology.couplings:
            fits = _tile_fits(topology, c, limits)
            groups = [g for g in c.rows + c.cols if g != BIAS]
            if fits and not any(caps.split(g) for g in groups):
                continue
            b = int(BIAS in c.rows)
            if c.kind == "bipartite" and not fits:
                for g in groups:
                    # a map in parts of whole channels, as many as its side of the tile holds
                    side = min(rmax, cmax) if g not in caps.maps else (rmax if g in c.rows else cmax)
                    changed |= caps.nodes(g, side, c.tile, "a bipartite tile larger than a tile")
            elif c.kind == "dense":
                side = min(rmax - b, cmax)
                if side < 1:
                    raise ConfigurationError(
                        f"dense tile {c.tile!r}: a {rmax}-row tile has no room for a node besides the "
                        "bias row; use a board with larger tiles"
                    )
                for g in c.cols:
                    changed |= caps.nodes(g, side, c.tile, "a dense coupling leaves room for its bias row")
            elif c.kind == "conv" and not fits:
                rows, cols = topology.tile_shape(c.tile)
                src = c.rows[0]
                if rows > rmax:
                    per = (rmax - b) // c.kernel**2
                    if per < 1:
                        raise ConfigurationError(
                            f"conv tile {c.tile!r}: the kernel of one source channel ({c.kernel}^2 rows"
                            f"{' plus the bias row' if b else ''}) does not fit the board's {rmax}-row "
                            "tiles; use a smaller kernel or a board with larger tiles"
                        )
                    changed |= caps.channels(src, per)
                if cols > cmax:  # destination maps in parts of at most cmax channels, then packed
                    for dst in c.cols:
                        changed |= caps.channels(dst, cmax)
    return caps


def place(topology: Topology, limits: Limits) -> Placement:
    """Place `topology` on tiles of ``limits.tile_rows_max x tile_cols_max``, at most
    `limits.max_tiles` of them (see the module doc). Raises ConfigurationError for a coupling
    that cannot be split (a conv kernel of one channel larger than a tile, a feature-map
    channel larger than a part) and LimitViolation when the split needs more tiles than the
    board has."""
    rmax, cmax = limits.tile_rows_max, limits.tile_cols_max
    if _fits(topology, limits):
        blocks = {c.tile: _whole(topology, c.tile) for c in topology.couplings}
        parts = {g: (Part(g, 0, n),) for g, n in topology.groups.items()}
        return Placement(topology, topology, parts, blocks, rmax, cmax)
    caps = _caps(topology, limits)
    parts: dict[str, tuple[Part, ...]] = {}
    groups: dict[str, int] = {}
    shapes: dict[str, tuple[int, int, int]] = {}
    for g, n in topology.groups.items():
        if caps.split(g):
            k = math.ceil(caps.units[g] / caps.cap[g])
            if k > MAX_PARTS:
                why = "use a smaller network or a board with larger tiles"
                raise LimitViolation(f"parts of group {g!r}", k, MAX_PARTS, why)
            step = caps.cap[g] * caps.unit[g]
            parts[g] = tuple(Part(f"{g}{SEP}{i}", i * step, min(n, (i + 1) * step)) for i in range(k))
        else:
            parts[g] = (Part(g, 0, n),)
        if g in topology.shapes and len(parts[g]) == 1:
            shapes[g] = topology.shapes[g]
        for p in parts[g]:
            groups[p.name] = p.size
            # a map is split by channels; another shaped group keeps its shape only whole
            if g in caps.maps and len(parts[g]) > 1:
                _, h, w = topology.shapes[g]
                shapes[p.name] = (p.size // (h * w), h, w)
    if len(groups) != sum(len(p) for p in parts.values()) or BIAS in groups:
        raise ConfigurationError(
            f"the sub-group names of the split ({SEP}-numbered) clash with the topology's own group "
            f"names {sorted(topology.groups)}; rename the groups that contain {SEP!r}"
        )
    couplings: list[Coupling] = []
    blocks: dict[str, tuple[Block, ...]] = {}
    for c in topology.couplings:
        if c.kind == "dense":
            out = _dense(topology, c, parts, min(rmax - int(BIAS in c.rows), cmax), couplings)
        elif c.kind == "conv":
            out = _conv(topology, c, parts, cmax, couplings)
        else:
            out = _bipartite(topology, c, parts, rmax, cmax, couplings)
        blocks[c.tile] = tuple(out)
    names = [c.tile for c in couplings]
    if len(set(names)) != len(names):
        raise ConfigurationError(
            f"the physical tile names of the split ({SEP}-numbered) clash with the topology's own tile "
            f"names {[c.tile for c in topology.couplings]}; rename the tiles that contain {SEP!r}"
        )
    if len(couplings) > limits.max_tiles:
        raise LimitViolation(
            "physical tiles of the split network",
            len(couplings),
            limits.max_tiles,
            f"the network needs {len(couplings)} tiles of {rmax} x {cmax}; use a smaller network, a board "
            "with more or larger tiles, or split it into EB blocks on several boards (model.kind = "
            "'ffebm' with model.block_layers and one URI per block in devices; docs/multiboard.md)",
        )
    physical = Topology(
        groups,
        tuple(couplings),
        gain=topology.gain,
        mode=topology.mode,
        budget=topology.budget,
        shapes=shapes,
        activation=topology.activation,
    )
    return Placement(topology, physical, parts, blocks, rmax, cmax)


def _sub(parts: dict[str, tuple[Part, ...]], groups: tuple[str, ...]) -> list[tuple[str, int]]:
    """The (name, size) of the parts of `groups` in order (the bias as itself, one row)."""
    return [(p.name, p.size) for g in groups for p in ((Part(BIAS, 0, 1),) if g == BIAS else parts[g])]


def _bipartite(
    topology: Topology,
    c: Coupling,
    parts: dict[str, tuple[Part, ...]],
    rmax: int,
    cmax: int,
    couplings: list[Coupling],
) -> list[Block]:
    rblocks, cblocks = _pack(_sub(parts, c.rows), rmax), _pack(_sub(parts, c.cols), cmax)
    out = []
    r0 = 0
    for i, rb in enumerate(rblocks):
        r1 = r0 + sum(n for _, n in rb)
        c0 = 0
        for j, cb in enumerate(cblocks):
            c1 = c0 + sum(n for _, n in cb)
            one = len(rblocks) == len(cblocks) == 1  # a tile that fits keeps its name
            name = c.tile if one else f"{c.tile}{SEP}{i}_{j}"
            rows, cols = tuple(g for g, _ in rb), tuple(g for g, _ in cb)
            couplings.append(replace(c, tile=name, rows=rows, cols=cols))
            out.append(Block(name, i, j, r0, r1, c0, c1))
            c0 = c1
        r0 = r1
    return out


def _dense(
    topology: Topology,
    c: Coupling,
    parts: dict[str, tuple[Part, ...]],
    side: int,
    couplings: list[Coupling],
) -> list[Block]:
    """Diagonal dense tiles and one bipartite tile per pair of parts (module doc)."""
    packed = _pack(_sub(parts, c.cols), side)
    bias = BIAS in c.rows
    n = topology.tile_shape(c.tile)[1]
    if len(packed) == 1:  # fits: the tile keeps its name (on sub-groups if a group was split)
        cols = tuple(g for g, _ in packed[0])
        couplings.append(replace(c, rows=cols + ((BIAS,) if bias else ()), cols=cols))
        return list(_whole(topology, c.tile))
    starts = [0]
    for p in packed:
        starts.append(starts[-1] + sum(k for _, k in p))
    out = []
    for a, pa in enumerate(packed):
        ga = tuple(g for g, _ in pa)
        for b in range(a, len(packed)):
            name = f"{c.tile}{SEP}{a}_{b}"
            r0, r1, c0, c1 = starts[a], starts[a + 1], starts[b], starts[b + 1]
            if a == b:
                rows = ga + ((BIAS,) if bias else ())
                couplings.append(Coupling(name, rows, ga, "dense", c.w_max))
                out.append(Block(name, a, b, r0, r1, c0, c1, bias_row=n if bias else -1))
            else:
                gb = tuple(g for g, _ in packed[b])
                couplings.append(Coupling(name, ga, gb, "bipartite", c.w_max))
                out.append(Block(name, a, b, r0, r1, c0, c1, mirror=True))
    return out


def _conv(
    topology: Topology,
    c: Coupling,
    parts: dict[str, tuple[Part, ...]],
    cmax: int,
    couplings: list[Coupling],
) -> list[Block]:
    """One conv tile per (source part, column block): the destination's channel parts (of all
    its maps, in order) packed into column blocks of at most `cmax` channels; the row tiles of
    a pooled conv share a pool group per column block (module doc)."""
    src = c.rows[0]
    _, h, w = topology.shapes[src]
    k2, bias = c.kernel**2, BIAS in c.rows
    ps = parts[src]
    cols, at = [], 0  # (part, its first channel in the logical destination)
    for g in c.cols:
        plane = topology.shapes[g][1] * topology.shapes[g][2]
        for q in parts[g]:
            cols.append((q.name, q.size // plane, at + q.start // plane))
        at += topology.shapes[g][0]
    first = {name: ch for name, _, ch in cols}
    cblocks = _pack([(name, n) for name, n, _ in cols], cmax)
    if len(ps) == len(cblocks) == 1:
        couplings.append(replace(c, rows=(ps[0].name, *c.rows[1:]), cols=tuple(n for n, _ in cblocks[0])))
        return list(_whole(topology, c.tile))
    out = []
    for i, p in enumerate(ps):
        last = i == len(ps) - 1
        r0, r1 = p.start // (h * w) * k2, p.stop // (h * w) * k2 + int(bias and last)
        rows = (p.name, BIAS) if bias and last else (p.name,)
        for j, cb in enumerate(cblocks):
            name = f"{c.tile}{SEP}{i}_{j}"
            pooled = picks_winners(c.pool, c.pool_mode) and len(ps) > 1  # a mean of sums is a sum of means
            group = "" if not pooled else (c.tile if len(cblocks) == 1 else f"{c.tile}{SEP}{j}")
            dst = tuple(n for n, _ in cb)
            couplings.append(replace(c, tile=name, rows=rows, cols=dst, pool_group=group))
            c0 = first[dst[0]]
            out.append(Block(name, i, j, r0, r1, c0, c0 + sum(n for _, n in cb)))
    return out


def _whole(topology: Topology, tile: str) -> tuple[Block]:
    r, c = topology.tile_shape(tile)
    return (Block(tile, 0, 0, 0, r, 0, c),)


def _tile_fits(topology: Topology, c: Coupling, limits: Limits) -> bool:
    r, k = topology.tile_shape(c.tile)
    return r <= limits.tile_rows_max and k <= limits.tile_cols_max


def rebudget(placement: Placement, topology: Topology) -> Placement | None:
    """The placement of `topology` when it is `placement.logical` with other settings (gain,
    mode, budget, activation): the physical topology keeps its couplings object, so a board
    sees the same network re-configured. None when the network itself differs."""
    old = placement.logical
    if topology.groups != old.groups or topology.couplings != old.couplings or topology.shapes != old.shapes:
        return None
    if not placement.split:
        return replace(placement, logical=topology, physical=topology)
    physical = replace(
        placement.physical,
        gain=topology.gain,
        mode=topology.mode,
        budget=topology.budget,
        activation=topology.activation,
    )
    return replace(placement, logical=topology, physical=physical)
