"""`TiledDevice`: a logical network on a board whose tiles are smaller than its couplings.

`configure` places the logical topology (`drivers.placement.place`) and configures the inner
board with the physical one; every other call speaks logical tiles and groups and is split
on the way in and reassembled on the way out:

- `program`, `pulse`: the (rows, cols) arrays are cut into the blocks of the physical tiles;
  `program` returns one report for the logical tile (conductances reassembled, iterations the
  most of any block, pulses, `gave_up`, energy and time summed, `within_tol` weighted by cells);
- `read_conductance`: the blocks' reads reassembled;
- `mvm`: each physical tile multiplies its slice of the input (DAC, array, ADC); the row
  blocks' outputs are summed on the host and the column blocks concatenated (``transpose``:
  the other way round);
- a split dense coupling (`drivers.placement`): a diagonal tile's rows are its part's rows
  and the logical bias row; an off-diagonal tile ``W#a_b`` holds both ``W[a, b]`` and
  ``W[b, a] = W[a, b]^T``: `program` writes the mean of the two (their symmetric part; equal on
  a symmetric W), `pulse` the mean of the two counts (rounded half to even where their sum
  is odd), `read_conductance` puts the read back in both places, and `mvm` reads the tile
  twice, forwards for one block and transposed for the other;
- `settle`, `settle_tensors`: clamps, nudges and initial states are cut into the sub-groups,
  the equilibrium's states (and trace) put back together as logical groups; steps, energy and
  times are the board's.

`topology` is the logical topology; `placement` says where it lies. A topology that fits the
board's tiles passes through as itself (no copies, no extra calls).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from drivers import checks
from drivers.base import Device, Equilibrium, Nudge, ProgramReport, PulseReport, TileWear, Wear
from drivers.errors import ConfigurationError, DeviceError
from drivers.placement import Block, Placement, place, rebudget
from drivers.topology import Topology
from drivers.wrapper import DeviceWrapper


def _cat(parts: list[Any], axis: int) -> Any:
    """Concatenate numpy arrays or torch tensors (`settle_tensors`' states) along `axis`."""
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts, axis=axis)
    import torch

    return torch.cat(parts, dim=axis)


class TiledDevice(DeviceWrapper):
    """Wraps `inner` so that couplings larger than its tiles are placed on grids of tiles."""

    def __init__(self, inner: Device) -> None:
        super().__init__(inner)
        self._placement: Placement | None = None

    def __getattr__(self, name: str) -> Any:
        """What the inner device has beyond the Device interface (a `CalibratedDevice`'s
        `record`, ...), so that wrapping a board for placement hides nothing of it."""
        if name == "inner" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def placement(self) -> Placement | None:
        """Where the configured topology lies on the board (None before `configure`)."""
        return self._placement

    @property
    def topology(self) -> Topology | None:
        p = self._placement
        if p is None or self.inner.topology is None:
            return self.inner.topology
        return p.logical

    @property
    def tensor_device(self) -> Any:  # type: ignore[override]
        return self.inner.tensor_device

    def configure(self, topology: Topology) -> None:
        if not isinstance(topology, Topology):
            raise ConfigurationError(f"configure takes a Topology, got {type(topology).__name__}")
        p = None if self._placement is None else rebudget(self._placement, topology)
        if p is None:
            p = place(topology, self.inner.info.limits)
        self.inner.configure(p.physical)
        self._placement = p

    def _placed(self) -> Placement:
        p = self._placement
        if p is None or self.inner.topology is None:
            raise ConfigurationError("the device has no topology yet; call configure(topology) first")
        return p

    def _blocks(self, tile: str) -> tuple[Placement, Any]:
        p = self._placed()
        blocks = p.blocks.get(tile)
        if blocks is None:
            raise ConfigurationError(f"unknown tile {tile!r}; known: {list(p.blocks)}")
        return p, blocks

    def _shape_check(self, what: str, p: Placement, tile: str, a: np.ndarray) -> np.ndarray:
        a = np.asarray(a)
        shape = p.logical.tile_shape(tile)
        if a.shape != shape:
            raise ConfigurationError(f"{what} for tile {tile!r}: expected shape {shape}, got {a.shape}")
        return a

    def _checked(
        self, tile: str, b: Block, check: Callable[..., tuple[np.ndarray, np.ndarray]], x: Any, y: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        """`check` (`checks.check_program` or `check_pulse`, what the inner board runs) on
        block `b`'s arrays; a refusal names the logical tile and the block's place in it, and
        says that nothing was written."""
        try:
            return check(self.inner.topology, self.inner.info.limits, b.tile, x, y)
        except DeviceError as exc:
            exc.args = (f"{_where(tile, b)}: {exc}; nothing of {tile!r} was written", *exc.args[1:])
            raise

    # ------------------------------------------------------------------------ tiles
    def program(
        self,
        tile: str,
        g_plus: np.ndarray,
        g_minus: np.ndarray,
        *,
        verify: bool = False,
        tol: float | None = None,
        max_iters: int | None = None,
    ) -> ProgramReport:
        p, blocks = self._blocks(tile)
        if not p.split:
            return self.inner.program(tile, g_plus, g_minus, verify=verify, tol=tol, max_iters=max_iters)
        gp = self._shape_check("g_plus", p, tile, g_plus)
        gm = self._shape_check("g_minus", p, tile, g_minus)
        # every block's targets are cut and checked as the inner board checks them before the
        # first is written: a refused block after a written one left the tile half-programmed
        checks.check_verify(self.inner.info.limits, tol, max_iters)
        cuts = [self._checked(tile, b, checks.check_program, _cut(gp, b), _cut(gm, b)) for b in blocks]
        out_p, out_m = np.empty(gp.shape, np.float32), np.empty(gm.shape, np.float32)
        reps = []
        with _stopped_note("program", tile, blocks, reps):
            for b, (bp, bm) in zip(blocks, cuts, strict=True):
                r = self.inner.program(b.tile, bp, bm, verify=verify, tol=tol, max_iters=max_iters)
                _put(out_p, b, r.g_plus)
                _put(out_m, b, r.g_minus)
                reps.append((r, b.shape[0] * b.shape[1]))
        cells = sum(n for _, n in reps)
        return ProgramReport(
            tile=tile,
            g_plus=out_p,
            g_minus=out_m,
            iterations=max(r.iterations for r, _ in reps),
            pulses=sum(r.pulses for r, _ in reps),
            residual_max=max(r.residual_max for r, _ in reps),
            within_tol=sum(r.within_tol * n for r, n in reps) / cells,
            energy_j=sum(r.energy_j for r, _ in reps),
            time_s=sum(r.time_s for r, _ in reps),
            # unknown (None) when any block's board did not report it
            gave_up=None if any(r.gave_up is None for r, _ in reps) else sum(r.gave_up or 0 for r, _ in reps),
            spent=None if any(r.spent is None for r, _ in reps) else sum(r.spent or 0 for r, _ in reps),
        )

    def pulse(self, tile: str, counts_plus: np.ndarray, counts_minus: np.ndarray) -> PulseReport:
        p, blocks = self._blocks(tile)
        if not p.split:
            return self.inner.pulse(tile, counts_plus, counts_minus)
        cp = self._shape_check("counts_plus", p, tile, counts_plus)
        cm = self._shape_check("counts_minus", p, tile, counts_minus)
        cuts = [
            self._checked(tile, b, checks.check_pulse, _cut(cp, b, counts=True), _cut(cm, b, counts=True))
            for b in blocks
        ]
        reps: list[PulseReport] = []
        with _stopped_note("pulse", tile, blocks, reps):
            for b, (bp, bm) in zip(blocks, cuts, strict=True):
                reps.append(self.inner.pulse(b.tile, bp, bm))
        return PulseReport(
            tile, sum(r.pulses for r in reps), sum(r.energy_j for r in reps), sum(r.time_s for r in reps)
        )

    def read_conductance(self, tile: str) -> tuple[np.ndarray, np.ndarray]:
        p, blocks = self._blocks(tile)
        if not p.split:
            return self.inner.read_conductance(tile)
        shape = p.logical.tile_shape(tile)
        gp, gm = np.empty(shape, np.float32), np.empty(shape, np.float32)
        for b in blocks:
            rp, rm = self.inner.read_conductance(b.tile)
            _put(gp, b, rp)
            _put(gm, b, rm)
        return gp, gm

    def mvm(self, tile: str, x: np.ndarray, *, transpose: bool = False) -> np.ndarray:
        p, blocks = self._blocks(tile)
        if not p.split:
            return self.inner.mvm(tile, x, transpose=transpose)
        x = np.asarray(x)
        rows, cols = p.logical.tile_shape(tile)
        n_in, n_out = (cols, rows) if transpose else (rows, cols)
        if x.ndim != 2 or x.shape[1] != n_in:
            raise ConfigurationError(
                f"mvm input for tile {tile!r}{' (transposed)' if transpose else ''}: expected shape "
                f"(batch, {n_in}), got {x.shape}"
            )
        y = np.zeros((x.shape[0], n_out), np.float32)
        for b in blocks:
            n = b.r1 - b.r0
            if transpose:
                out = self.inner.mvm(b.tile, np.ascontiguousarray(x[:, b.c0 : b.c1]), transpose=True)
                y[:, b.r0 : b.r1] += out[:, :n]
                if b.bias_row >= 0:
                    y[:, b.bias_row] += out[:, n]
            else:
                rows = x[:, b.r0 : b.r1]
                if b.bias_row >= 0:
                    rows = np.concatenate([rows, x[:, b.bias_row : b.bias_row + 1]], axis=1)
                y[:, b.c0 : b.c1] += self.inner.mvm(b.tile, np.ascontiguousarray(rows))
            if b.mirror:  # the other block of the pair: W[c-range, r-range] = M^T
                src = x[:, b.r0 : b.r1] if transpose else x[:, b.c0 : b.c1]
                dst = slice(b.c0, b.c1) if transpose else slice(b.r0, b.r1)
                y[:, dst] += self.inner.mvm(b.tile, np.ascontiguousarray(src), transpose=not transpose)
        return y

    def wear(self) -> Wear | None:
        """The board's wear under the logical tiles' names, in the logical topology's order: per
        tile, the most worn device of any of its physical tiles, and its devices near or at the
        end summed over them (each physical tile belongs to one logical tile; a dense pair tile's
        devices count once). `Wear.boards` names the board (its *IDN string) and `Wear.physical`
        the board's tiles each logical tile lies on. A logical tile one of whose physical tiles
        the board did not report is left out, as a board leaves out a tile it has no count of."""
        w = self.inner.wear()
        p = self._placement
        if w is None or p is None or self.inner.topology is None:
            return w
        idn = self.inner.info.identity.idn()
        tiles: dict[str, TileWear] = {}
        boards: dict[str, str] = {}
        physical: dict[str, tuple[str, ...]] = {}
        for c in p.logical.couplings:
            where = tuple(dict.fromkeys(b.tile for b in p.blocks.get(c.tile, ())))
            if not where or any(t not in w.tiles for t in where):
                continue
            parts = [w.tiles[t] for t in where]
            tiles[c.tile] = TileWear(
                max_wear=max(t.max_wear for t in parts),
                near_end=sum(t.near_end for t in parts),
                spent=sum(t.spent for t in parts),
            )
            boards[c.tile] = idn
            physical[c.tile] = tuple(q for t in where for q in w.physical.get(t, (t,)))
        return Wear(w.endurance, w.near_from, tiles, boards, physical)

    # ------------------------------------------------------------------------ settles
    def _split(self, p: Placement, values: dict[str, Any] | None) -> dict[str, Any] | None:
        """Logical groups' (batch, n) arrays or tensors cut into the sub-groups' (views)."""
        if values is None:
            return None
        out: dict[str, Any] = {}
        for g, v in values.items():
            parts = p.parts.get(g)
            if parts is None or len(parts) == 1:
                out[g] = v  # unknown names reach the board's own check as they are
                continue
            a = v if v.ndim == 2 else v[None, :]
            for q in parts:
                out[q.name] = a[:, q.start : q.stop]
        return out

    def _split_nudge(self, p: Placement, nudge: dict[str, Nudge] | None) -> dict[str, Nudge] | None:
        if nudge is None:
            return None
        out: dict[str, Nudge] = {}
        for g, n in nudge.items():
            parts = p.parts.get(g)
            if parts is None or len(parts) == 1 or not isinstance(n, Nudge):
                out[g] = n
                continue
            t = self._split(p, {g: n.target}) if n.target is not None else None
            d = self._split(p, {g: n.grad}) if n.grad is not None else None
            for q in parts:
                out[q.name] = Nudge(n.beta, t[q.name] if t else None, d[q.name] if d else None)
        return out

    def _join(self, p: Placement, eq: Equilibrium) -> Equilibrium:
        """The equilibrium with its sub-groups' states (and trace) put back into logical groups."""
        eq.states = self._join_groups(p, eq.states, axis=1)
        if eq.trace is not None:
            eq.trace = self._join_groups(p, eq.trace, axis=2)
        return eq

    @staticmethod
    def _join_groups(p: Placement, values: dict[str, Any], axis: int) -> dict[str, Any]:
        out = {k: v for k, v in values.items() if k not in p.physical.groups}  # "step", "energy"
        for g, parts in p.parts.items():
            if all(q.name in values for q in parts):
                out[g] = _cat([values[q.name] for q in parts], axis)
        return out

    def settle(
        self,
        clamp: dict[str, np.ndarray],
        nudge: dict[str, Nudge] | None = None,
        init: dict[str, np.ndarray] | None = None,
        trace: bool | int = False,
    ) -> Equilibrium:
        p = self._placed()
        if not p.split:
            return self.inner.settle(clamp, nudge, init, trace)
        clamp = {g: np.asarray(v, np.float32) for g, v in clamp.items()}
        eq = self.inner.settle(
            self._split(p, clamp) or {}, self._split_nudge(p, nudge), self._split(p, init), trace
        )
        return self._join(p, eq)

    def settle_tensors(
        self,
        clamp: dict[str, Any],
        nudge: dict[str, Nudge] | None = None,
        init: dict[str, Any] | None = None,
        trace: bool | int = False,
    ) -> Equilibrium:
        p = self._placed()
        if not p.split:
            return self.inner.settle_tensors(clamp, nudge, init, trace)
        eq = self.inner.settle_tensors(
            self._split(p, clamp) or {}, self._split_nudge(p, nudge), self._split(p, init), trace
        )
        return self._join(p, eq)


def _where(tile: str, b: Block) -> str:
    """Block `b` of logical tile `tile` in the logical tile's terms."""
    rows = f"rows {b.r0}..{b.r1 - 1}" + (f" and bias row {b.bias_row}" if b.bias_row >= 0 else "")
    mirror = f" (and its mirror, rows {b.c0}..{b.c1 - 1} x cols {b.r0}..{b.r1 - 1})" if b.mirror else ""
    return f"logical tile {tile!r}, {rows} x cols {b.c0}..{b.c1 - 1}{mirror} (physical tile {b.tile!r})"


@contextmanager
def _stopped_note(op: str, tile: str, blocks: list[Block], done: list[Any]) -> Iterator[None]:
    """On anything raised inside (a link error, Ctrl-C between blocks) after `len(done)` of
    `blocks` were written, a note on the exception: which blocks, and what to do."""
    try:
        yield
    except BaseException as exc:
        if done:
            written = "; ".join(_where(tile, b) for b in blocks[: len(done)])
            fix = (
                f"program {tile!r} again (all of it) before using it"
                if op == "program"
                else f"read {tile!r} back (read_conductance) or program it again before using it"
            )
            exc.add_note(
                f"{op} of {tile!r} stopped after {len(done)} of its {len(blocks)} blocks: {written} "
                f"{'were' if len(done) > 1 else 'was'} written, the rest not; {fix}"
            )
        raise


def _cut(a: np.ndarray, b: Block, counts: bool = False) -> np.ndarray:
    """Physical tile `b.tile`'s (rows, cols) array from a logical tile's: its rectangle, the
    bias row of a dense diagonal tile appended, the mean with the transposed mirror block of a
    dense off-diagonal tile (pulse `counts` rounded half to even)."""
    x = a[b.r0 : b.r1, b.c0 : b.c1]
    if b.bias_row >= 0:
        x = np.concatenate([x, a[b.bias_row : b.bias_row + 1, b.c0 : b.c1]])
    if b.mirror:
        mean = 0.5 * (x.astype(np.float64) + a[b.c0 : b.c1, b.r0 : b.r1].T)
        x = (np.rint(mean) if counts else mean).astype(a.dtype)
    return np.ascontiguousarray(x)


def _put(out: np.ndarray, b: Block, x: np.ndarray) -> None:
    """Physical tile `b.tile`'s (rows, cols) array put back into the logical tile's `out`."""
    n = b.r1 - b.r0
    out[b.r0 : b.r1, b.c0 : b.c1] = x[:n]
    if b.bias_row >= 0:
        out[b.bias_row, b.c0 : b.c1] = x[n]
    if b.mirror:
        out[b.c0 : b.c1, b.r0 : b.r1] = x.T


def placement_record(device: Device) -> dict[str, object]:
    """``{"placement": ...}`` (`Placement.as_dict`) for a `TiledDevice` whose network is split
    over several tiles, for a run log's board record; ``{}`` otherwise (records of networks
    that fit stay as they were)."""
    p = device.placement if isinstance(device, TiledDevice) else None
    return {"placement": p.as_dict()} if p is not None and p.split else {}
