"""Placing a logical network on a board's physical tiles.

A bipartite coupling larger than the board's tiles (`Limits.tile_rows_max` x `tile_cols_max`)
is split as in-memory-computing compilers split a layer: every group larger than a tile side
becomes consecutive sub-groups ``g#0``, ``g#1``, ... (each at most ``min(tile_rows_max,
tile_cols_max)`` nodes), the coupling's rows (its sub-groups and the bias node, in order) are
packed into row blocks of at most `tile_rows_max` and its columns into column blocks of at most
`tile_cols_max`, and block (i, j) becomes the physical tile ``W#i.j``. Column block j's drive is
the sum of the row blocks' products (summed on the host after each tile's ADC, or by the node
circuits in an analog settle: a node sums the currents of every tile it is wired to); the
column blocks are concatenated. The sub-groups carry the same nodes, so the energy and the
fixed point are the logical network's.

What cannot be split exactly is refused: a dense coupling (its W_ij and W_ji are separate
devices on one square tile with a disconnected diagonal, wired as one node set) and a conv
coupling whose kernel tile (``C_in k^2`` (+ 1) x ``C_out``) exceeds the tile (its weight-stationary
kernel is applied at every position by one tile).

A topology that fits is placed as itself: `Placement.split` is False and `physical` is the
logical topology, the same object.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from drivers.base import Limits
from drivers.errors import ConfigurationError, LimitViolation
from drivers.topology import BIAS, Coupling, Topology

SEP = "#"  # separates a logical name from its part index in a physical group or tile name


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
    """Physical tile `tile`: logical rows ``[r0, r1)`` by columns ``[c0, c1)`` of its coupling."""

    tile: str
    i: int  # row block
    j: int  # column block
    r0: int
    r1: int
    c0: int
    c1: int


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
        """Crossbar cells (differential pairs) the network uses, bias rows included."""
        return self.physical.cells()

    @property
    def utilisation(self) -> float:
        """Cells used over the cells of the tiles occupied (a whole tile per physical tile)."""
        return self.cells / (self.tiles * self.tile_rows_max * self.tile_cols_max)

    def grid(self, tile: str) -> tuple[int, int]:
        """(row blocks, column blocks) of logical `tile`."""
        b = self.blocks[tile]
        return b[-1].i + 1, b[-1].j + 1

    def describe(self) -> str:
        """``W0 785x2048 on 4x8 tiles, ...; 73 tiles of 256x256, 4198400 cells, utilisation 0.88``."""
        shape, grid = self.logical.tile_shape, self.grid
        per = ", ".join("{} {}x{} on {}x{} tiles".format(t, *shape(t), *grid(t)) for t in self.blocks)
        return (
            f"{per}; {self.tiles} tiles of {self.tile_rows_max}x{self.tile_cols_max}, "
            f"{self.cells} cells, utilisation {self.utilisation:.3f}"
        )

    def as_dict(self) -> dict[str, object]:
        """The figures of the placement, JSON-ready (for run logs and benchmarks)."""
        return {
            "split": self.split,
            "tiles": self.tiles,
            "cells": self.cells,
            "utilisation": self.utilisation,
            "tile_rows_max": self.tile_rows_max,
            "tile_cols_max": self.tile_cols_max,
            "grid": {t: list(self.grid(t)) for t in self.blocks},
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


def place(topology: Topology, limits: Limits) -> Placement:
    """Place `topology` on tiles of ``limits.tile_rows_max x tile_cols_max``, at most
    `limits.max_tiles` of them. Raises ConfigurationError for a coupling that cannot be split
    (dense, or a conv kernel larger than a tile) and LimitViolation when the split needs more
    tiles than the board has."""
    rmax, cmax = limits.tile_rows_max, limits.tile_cols_max
    if _fits(topology, limits):
        blocks = {c.tile: _whole(topology, c.tile) for c in topology.couplings}
        parts = {g: (Part(g, 0, n),) for g, n in topology.groups.items()}
        return Placement(topology, topology, parts, blocks, rmax, cmax)
    for c in topology.couplings:
        r, k = topology.tile_shape(c.tile)
        if r <= rmax and k <= cmax:
            continue
        if c.kind == "dense":
            raise ConfigurationError(
                f"dense tile {c.tile!r} ({r} x {k}) does not fit the board's {rmax} x {cmax} tiles and an "
                "all-to-all coupling cannot be split (W_ij and W_ji are separate devices of one square "
                "tile, its diagonal disconnected); use fewer nodes, or a layered (bipartite) network"
            )
        if c.kind == "conv":
            raise ConfigurationError(
                f"conv tile {c.tile!r}: its kernel tile ({r} x {k}: C_in k^2 rows plus the bias row, C_out "
                f"columns) does not fit the board's {rmax} x {cmax} tiles, and one kernel is applied at "
                "every position by one tile; use fewer channels or a smaller kernel"
            )
    chunk = min(rmax, cmax)
    # a group is split only when it is larger than a tile side and a coupling that needs splitting
    # holds it (the other couplings keep their groups whole)
    big = {
        g
        for c in topology.couplings
        if c.kind == "bipartite" and not _tile_fits(topology, c, limits)
        for g in c.rows + c.cols
        if g != BIAS and topology.groups[g] > chunk
    }
    for c in topology.couplings:
        if c.kind != "bipartite" and big & set(c.rows + c.cols):
            raise ConfigurationError(
                f"{c.kind} tile {c.tile!r} joins group(s) {sorted(big & set(c.rows + c.cols))} that must be "
                f"split into parts of at most {chunk} nodes for another tile; a {c.kind} coupling needs its "
                "groups whole: make those groups at most the tile side, or use a board with larger tiles"
            )
    parts: dict[str, tuple[Part, ...]] = {}
    groups: dict[str, int] = {}
    for g, n in topology.groups.items():
        if g in big:
            k = math.ceil(n / chunk)
            parts[g] = tuple(Part(f"{g}{SEP}{i}", i * chunk, min(n, (i + 1) * chunk)) for i in range(k))
        else:
            parts[g] = (Part(g, 0, n),)
        for p in parts[g]:
            groups[p.name] = p.size
    if len(groups) != sum(len(p) for p in parts.values()) or BIAS in groups:
        raise ConfigurationError(
            f"the sub-group names of the split ({SEP}-numbered) clash with the topology's own group "
            f"names {sorted(topology.groups)}; rename the groups that contain {SEP!r}"
        )
    couplings: list[Coupling] = []
    blocks: dict[str, tuple[Block, ...]] = {}
    for c in topology.couplings:
        if c.kind != "bipartite":
            couplings.append(c)
            blocks[c.tile] = _whole(topology, c.tile)
            continue
        rows = [(p.name, p.size) for g in c.rows for p in ((Part(BIAS, 0, 1),) if g == BIAS else parts[g])]
        cols = [(p.name, p.size) for g in c.cols for p in parts[g]]
        rblocks, cblocks = _pack(rows, rmax), _pack(cols, cmax)
        out = []
        r0 = 0
        for i, rb in enumerate(rblocks):
            r1 = r0 + sum(n for _, n in rb)
            c0 = 0
            for j, cb in enumerate(cblocks):
                c1 = c0 + sum(n for _, n in cb)
                one = len(rblocks) == len(cblocks) == 1  # a tile that fits keeps its name
                name = c.tile if one else f"{c.tile}{SEP}{i}.{j}"
                couplings.append(
                    Coupling(name, tuple(g for g, _ in rb), tuple(g for g, _ in cb), "bipartite", c.w_max)
                )
                out.append(Block(name, i, j, r0, r1, c0, c1))
                c0 = c1
            r0 = r1
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
            "with more or larger tiles, or spread the blocks over several boards",
        )
    physical = Topology(
        groups,
        tuple(couplings),
        gain=topology.gain,
        mode=topology.mode,
        budget=topology.budget,
        shapes={g: s for g, s in topology.shapes.items() if g not in big},
        activation=topology.activation,
    )
    return Placement(topology, physical, parts, blocks, rmax, cmax)


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
