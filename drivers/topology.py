"""Network topology: node groups and the tiles that couple them.

A topology is a list of node groups and a list of couplings. Each coupling is
one crossbar tile of differential conductance pairs, with the weight

    W = w_max * (G+ - G-) / (g_max - g_min)         shape (rows, cols)

A `bipartite` coupling joins the concatenated `rows` groups to the
concatenated `cols` groups: it drives the column nodes with ``s_rows @ W`` and
the row nodes with ``s_cols @ W.T`` (one physical crossbar gives both). A
`dense` coupling is an all-to-all network over the `cols` groups: the tile is
N x N (plus a bias row), the drive is ``s @ W``, the diagonal is disconnected,
and W_ij and W_ji are two separate devices.

The reserved group ``bias`` is a single node held at 1: a bias is just one more
row of a tile.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

from drivers.errors import ConfigurationError
from drivers.scalars import INT32_MAX, as_float, as_int

BIAS = "bias"


@dataclass(frozen=True)
class Coupling:
    tile: str
    rows: tuple[str, ...]
    cols: tuple[str, ...]
    kind: Literal["bipartite", "dense"] = "bipartite"
    w_max: float = 1.0


@dataclass(frozen=True)
class SettleBudget:
    """How a settle runs. `dt` < 1 damps the update (needed for dense networks).

    A settle stops when the largest state change in a step is within `tol` of the board's
    noise floor (checked every `check_every` steps) or after `max_steps`. On a noise-free
    board ``tol = 0`` switches the test off: every settle runs exactly `max_steps` (the
    fixed-step recipe of the EP literature)."""

    max_steps: int = 100
    tol: float = 1e-4
    dt: float = 0.5
    check_every: int = 5


@dataclass(frozen=True)
class Topology:
    groups: dict[str, int]
    couplings: tuple[Coupling, ...]
    gain: float = 1.0
    mode: Literal["analog", "mvm"] = "analog"
    budget: SettleBudget = field(default_factory=SettleBudget)

    def __post_init__(self) -> None:
        if BIAS in self.groups:
            raise ConfigurationError(f"group name {BIAS!r} is reserved for the bias node; rename it")
        if self.mode not in ("analog", "mvm"):
            raise ConfigurationError(f"mode must be 'analog' or 'mvm', got {self.mode!r}")
        for name, size in self.groups.items():
            if not isinstance(name, str):
                raise ConfigurationError(f"group names are strings, got {name!r}")
            as_int(f"size of group {name!r}", size, 1, INT32_MAX)
        # finite and > 0 here; the upper bounds are the board's (Limits.max_gain, max_w_max)
        as_float("activation gain", self.gain, 0.0, float("inf"), lo_open=True)
        if not isinstance(self.budget, SettleBudget):
            raise ConfigurationError(f"budget must be a SettleBudget, got {type(self.budget).__name__}")
        for c in self.couplings:
            if not isinstance(c, Coupling) or not isinstance(c.tile, str):
                raise ConfigurationError(f"couplings are Coupling objects with a tile name, got {c!r:.80}")
            if not (isinstance(c.rows, tuple) and isinstance(c.cols, tuple)) or not all(
                isinstance(g, str) for g in c.rows + c.cols
            ):
                raise ConfigurationError(f"tile {c.tile!r}: rows and cols are tuples of group names")
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

    def size(self, group: str) -> int:
        return 1 if group == BIAS else self.groups[group]

    def tile_shape(self, tile: str) -> tuple[int, int]:
        shape = self._tile_shapes.get(tile)
        if shape is None:
            raise ConfigurationError(f"unknown tile {tile!r}; known: {list(self._tile_shapes)}")
        return shape

    @cached_property
    def _tile_shapes(self) -> dict[str, tuple[int, int]]:
        """(rows, cols) per tile, computed once (the checks of every program call ask)."""
        return {
            c.tile: (sum(self.size(g) for g in c.rows), sum(self.size(g) for g in c.cols))
            for c in self.couplings
        }

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
        return Topology(groups, couplings, gain=gain, mode=mode, budget=budget or SettleBudget())

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
    ) -> Topology:
        """An all-to-all network over `groups` on one N x N tile (plus a bias row)."""
        cols = tuple(groups)
        rows = cols + ((BIAS,) if bias else ())
        c = Coupling(tile=tile, rows=rows, cols=cols, kind="dense", w_max=w_max)
        return Topology(dict(groups), (c,), gain=gain, mode=mode, budget=budget or SettleBudget())
