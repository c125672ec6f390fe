"""`SharedBoard`: one physical board hosting the topologies of several blocks at once.

Each block gets a `view(name)`, a `Device` that sees only its own topology under its own
group and tile names. On the board the blocks' topologies are merged into one `Topology`
whose groups and tiles carry the block's prefix (``b0.s1``, ``b1.W0``); the views map names
both ways. What that means for a block:

- `configure`: the first configure of a block, or a change of its network, re-configures
  the merged topology. A board may lose programmed conductances when its topology changes
  (the emulator keeps them; a lab board may not), so the shared board re-writes the last
  targets every block programmed (`program`'s arguments, kept on the host; for a tile pulsed
  since, what it reads just before the re-configure) after such a re-configure. On a noisy
  board that re-write is a fresh write: the conductances of the earlier blocks get new write
  noise (and the pulses and energy it costs), as after a refresh. A configure that only
  changes the settle budget keeps the merged network (the emulator then keeps its tiles and
  plans) and re-writes nothing.
- `settle`: the view clamps its own inputs and holds every other block's groups clamped at 0,
  so only its own block moves and only its own nodes count in the convergence test. The
  blocks share one gain, settle mode and activation (one network on the board); each view
  applies its own settle budget before it settles. The equilibrium's ``energy`` is the
  merged network's, which adds the other blocks' energy at their all-zero states (0 for
  the hard sigmoid).
- `program`, `pulse`, `read_conductance`, `mvm` route to the block's tiles by prefix; the
  reports name the block's own tile.
- `info` is the board's: ``limits.max_tiles`` bounds the tiles of all blocks together
  (checked when a block configures, with an error that names the blocks).
- `close` of a view closes the board when the last open view closes; `SharedBoard.close`
  closes it at once. `wait`, `reset`, `begin`, `commit`, `status` act on the whole board.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from drivers.base import Device, Equilibrium, Nudge, ProgramReport, PulseReport, Wear, repair_lost_arrays
from drivers.errors import ConfigurationError, LimitViolation
from drivers.topology import BIAS, Coupling, Topology
from drivers.wrapper import DeviceWrapper

MAX_BLOCKS = 64  # views of one board (a board has far fewer tiles: Limits.max_tiles)


class SharedBoard:
    """One `Device` shared by several blocks: `view(name)` is the Device of block `name`."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self.views: dict[str, BlockView] = {}
        self._merged: Topology | None = None  # what the board is configured with
        self._merged_key: tuple[Any, ...] | None = None  # the blocks' networks it was built from
        self._closed = False

    def view(self, name: str) -> BlockView:
        """The Device of block `name` (its groups and tiles are ``name.<group>`` on the board)."""
        if not isinstance(name, str) or not name or "." in name:
            raise ConfigurationError(f"a block name is a non-empty string without '.', got {name!r}")
        if name in self.views:
            raise ConfigurationError(f"block {name!r} already has a view of this board; use another name")
        if len(self.views) >= MAX_BLOCKS:
            raise ConfigurationError(f"at most {MAX_BLOCKS} blocks share one board; spread them over boards")
        v = BlockView(self, name)
        self.views[name] = v
        return v

    # ------------------------------------------------------------------------------ merging
    def _configured_views(self) -> list[BlockView]:
        return [v for v in self.views.values() if v.own is not None]

    def configure_block(self, view: BlockView, topology: Topology) -> None:
        """Configure the merged topology with `view`'s block set to `topology`."""
        others = [v for v in self._configured_views() if v is not view]
        for v in others:
            assert v.own is not None
            for key in ("gain", "mode", "activation"):
                if getattr(v.own, key) != getattr(topology, key):
                    raise ConfigurationError(
                        f"blocks on one shared board run as one network and share {key}: block "
                        f"{view.name!r} has {getattr(topology, key)!r}, block {v.name!r} "
                        f"{getattr(v.own, key)!r}; give them the same {key} or put them on different boards"
                    )
        tiles = len(topology.couplings) + sum(len(v.own.couplings) for v in others if v.own is not None)
        limit = self.device.info.limits.max_tiles
        if tiles > limit:
            names = ", ".join(f"{v.name!r} ({len(v.own.couplings)})" for v in others if v.own is not None)
            raise LimitViolation(
                "tile count of the blocks sharing this board",
                tiles,
                limit,
                f"block {view.name!r} needs {len(topology.couplings)} tile(s) on top of "
                f"{names or 'none'}; give the blocks more boards (a device URI per block)",
            )
        blocks = {v.name: (topology if v is view else v.own) for v in self._configured_views()}
        blocks[view.name] = topology
        # the shapes too: a conv tile's size is C_in k^2 by C_out, so maps of new (C, H, W) shapes
        # with the same group sizes are other tiles (kept out, the view saw 37 x 16 tiles where
        # the board held 10 x 4 and settled the old network)
        key = tuple(
            (n, t.couplings, tuple(t.groups.items()), tuple(t.shapes.items()))  # type: ignore[union-attr]
            for n, t in blocks.items()
        )
        with self.device.lock:
            if self._merged is not None and key == self._merged_key:
                # the same networks: only the budget may differ (no re-configure of the tiles)
                merged = dataclasses.replace(
                    self._merged, budget=topology.budget, gain=topology.gain, mode=topology.mode,
                    activation=topology.activation,
                )  # fmt: skip
                self.device.configure(merged)
                self._merged = merged
                view.own = topology
                return
            merged = _merge(blocks, topology)  # type: ignore[arg-type]
            for v in others:
                v.keep_pulsed()
            self.device.configure(merged)
            self._merged, self._merged_key = merged, key
            view.own = topology
            rewritten = [v for v in self._configured_views() if v is not view]
            # the targets the re-configure may have lost; a board that loses its arrays meanwhile
            # (it rebooted) has them all written again, and the write in flight goes on
            with repair_lost_arrays([self.device], lambda _: [v.rewrite() for v in rewritten]):
                for v in rewritten:
                    v.rewrite()

    def use_budget(self, view: BlockView) -> None:
        """Before a settle of `view`: the board's settle budget is the block's own."""
        assert view.own is not None and self._merged is not None
        if self._merged.budget != view.own.budget:
            merged = dataclasses.replace(self._merged, budget=view.own.budget)
            self.device.configure(merged)
            self._merged = merged

    @property
    def merged(self) -> Topology | None:
        """The topology the board holds (every configured block's groups and tiles, prefixed)."""
        return self._merged

    def forget(self) -> None:
        """The board lost its configuration (reset): every block configures again."""
        self._merged = self._merged_key = None
        for v in self.views.values():
            v.own = None

    def release(self, view: BlockView) -> None:
        view.closed = True
        if all(v.closed for v in self.views.values()):
            self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.device.close()


def _merge(blocks: dict[str, Topology], like: Topology) -> Topology:
    """One topology holding every block's groups and tiles under ``name.`` prefixes, with the
    gain, mode, activation and budget of `like`."""
    groups: dict[str, int] = {}
    shapes: dict[str, tuple[int, int, int]] = {}
    couplings: list[Coupling] = []
    for name, t in blocks.items():
        p = f"{name}."
        groups.update({p + g: n for g, n in t.groups.items()})
        shapes.update({p + g: s for g, s in t.shapes.items()})
        for c in t.couplings:
            couplings.append(
                dataclasses.replace(
                    c,
                    tile=p + c.tile,
                    rows=tuple(g if g == BIAS else p + g for g in c.rows),
                    cols=tuple(p + g for g in c.cols),
                )
            )
    return dataclasses.replace(like, groups=groups, couplings=tuple(couplings), shapes=shapes)


class BlockView(DeviceWrapper):
    """The Device of one block on a `SharedBoard` (see the module docstring)."""

    def __init__(self, shared: SharedBoard, name: str) -> None:
        super().__init__(shared.device)
        self.shared = shared
        self.name = name
        self.prefix = f"{name}."
        self.own: Topology | None = None  # this block's topology, as last configured
        self.closed = False
        # the last `program` call per tile: (g_plus, g_minus, verify, tol, max_iters)
        self._targets: dict[str, tuple[np.ndarray, np.ndarray, bool, float | None, int]] = {}
        self._pulsed: set[str] = set()  # tiles pulsed since their last `program`

    @property
    def topology(self) -> Topology | None:
        return self.own

    @property
    def settle_topology(self) -> Topology | None:
        """What one settle of this view carries on the board: the merged topology (every
        block's groups are in its clamps and reply, the others' held at 0), so the bounds on a
        settle's values count it, not the block's own (`hil.ep.EBBlock.settle_batch_most`)."""
        return self.shared.merged or self.own

    @property
    def tensor_device(self) -> Any:  # type: ignore[override]
        return self.inner.tensor_device

    def _tile(self, tile: str) -> str:
        if self.own is None:
            raise ConfigurationError(
                f"block {self.name!r} has no topology yet; call configure(topology) first"
            )
        self.own.tile_shape(tile)  # an unknown tile: ConfigurationError naming the known ones
        return self.prefix + tile

    def configure(self, topology: Topology) -> None:
        if not isinstance(topology, Topology):
            raise ConfigurationError(f"configure takes a Topology, got {type(topology).__name__}")
        if self.own is not None and (self.own.groups, self.own.couplings, self.own.shapes) != (
            topology.groups,
            topology.couplings,
            topology.shapes,
        ):
            self._targets.clear()  # another network: the old targets are not its tiles'
            self._pulsed.clear()
        self.shared.configure_block(self, topology)

    def rewrite(self) -> None:
        """Program the last targets of every tile again (after the merged topology changed)."""
        for tile, (gp, gm, verify, tol, iters) in self._targets.items():
            self.inner.program(self.prefix + tile, gp, gm, verify=verify, tol=tol, max_iters=iters)

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
        r = self.inner.program(self._tile(tile), g_plus, g_minus, verify=verify, tol=tol, max_iters=max_iters)
        self._pulsed.discard(tile)
        self._targets[tile] = (
            np.array(g_plus, copy=True),
            np.array(g_minus, copy=True),
            verify,
            tol,
            max_iters,
        )
        return dataclasses.replace(r, tile=tile)

    def pulse(self, tile: str, counts_plus: np.ndarray, counts_minus: np.ndarray) -> PulseReport:
        r = self.inner.pulse(self._tile(tile), counts_plus, counts_minus)
        self._pulsed.add(tile)  # no longer at its last target: `keep_pulsed` reads it back
        return dataclasses.replace(r, tile=tile)

    def keep_pulsed(self) -> None:
        """Before the merged topology changes: the tiles pulsed since their last `program`
        get what they read now as their target (one read per such tile, not one per pulse),
        within [g_min, g_max]: a noisy read of a device at an end lies past it by its noise, and
        a target past the window is refused (the re-write, and so the configure, failed)."""
        lim = self.inner.info.limits
        for tile in sorted(self._pulsed):
            gp, gm = (
                np.clip(g, lim.g_min, lim.g_max).astype(np.float32)
                for g in self.inner.read_conductance(self.prefix + tile)
            )
            _, _, verify, tol, iters = self._targets.get(tile, (gp, gm, False, None, 20))
            self._targets[tile] = (gp, gm, verify, tol, iters)
        self._pulsed.clear()

    def read_conductance(self, tile: str) -> tuple[np.ndarray, np.ndarray]:
        return self.inner.read_conductance(self._tile(tile))

    def mvm(self, tile: str, x: np.ndarray, *, transpose: bool = False) -> np.ndarray:
        return self.inner.mvm(self._tile(tile), x, transpose=transpose)

    def wear(self) -> Wear | None:
        """The board's wear of this block's tiles only, under the block's own names (the board
        calls them ``name.<tile>``), with the board and physical tiles each lies on."""
        w = self.inner.wear()
        if w is None:
            return None
        idn = self.inner.info.identity.idn()
        own = [] if self.own is None else [c.tile for c in self.own.couplings]
        tiles = {t: w.tiles[self.prefix + t] for t in own if self.prefix + t in w.tiles}
        return Wear(
            w.endurance,
            w.near_from,
            tiles,
            {t: w.boards.get(self.prefix + t, idn) for t in tiles},
            {t: w.physical.get(self.prefix + t, (self.prefix + t,)) for t in tiles},
        )

    # ------------------------------------------------------------------------------ settles
    def _map_in(
        self,
        clamp: dict[str, Any],
        nudge: dict[str, Nudge] | None,
        init: dict[str, Any] | None,
        zeros: Any,
    ) -> tuple[dict[str, Any], dict[str, Nudge] | None, dict[str, Any] | None]:
        if self.own is None:
            raise ConfigurationError(
                f"block {self.name!r} has no topology yet; call configure(topology) first"
            )
        for d, what in ((clamp, "clamp"), (nudge or {}, "nudge"), (init or {}, "init")):
            for g in d:
                if g not in self.own.groups:
                    raise ConfigurationError(
                        f"{what} names unknown group {g!r} of block {self.name!r}; "
                        f"known: {list(self.own.groups)}"
                    )
        if not clamp:
            raise ConfigurationError(f"block {self.name!r}: a settle clamps at least one group")
        batch = len(next(iter(clamp.values())))
        cl = {self.prefix + g: x for g, x in clamp.items()}
        for v in self.shared._configured_views():  # hold every other block still, at 0
            if v is not self and v.own is not None:
                cl.update({v.prefix + g: zeros(batch, n) for g, n in v.own.groups.items()})
        nd = None if nudge is None else {self.prefix + g: n for g, n in nudge.items()}
        ini = None if init is None else {self.prefix + g: x for g, x in init.items()}
        return cl, nd, ini

    def _map_out(self, eq: Equilibrium) -> Equilibrium:
        p, n = self.prefix, len(self.prefix)
        eq.states = {k[n:]: v for k, v in eq.states.items() if k.startswith(p)}
        if eq.trace is not None:
            eq.trace = {
                (k[n:] if k.startswith(p) else k): v
                for k, v in eq.trace.items()
                if k.startswith(p) or k in ("step", "energy")
            }
        return eq

    def settle(
        self,
        clamp: dict[str, np.ndarray],
        nudge: dict[str, Nudge] | None = None,
        init: dict[str, np.ndarray] | None = None,
        trace: bool | int = False,
    ) -> Equilibrium:
        with self.lock:
            cl, nd, ini = self._map_in(clamp, nudge, init, lambda b, k: np.zeros((b, k), np.float32))
            self.shared.use_budget(self)
            return self._map_out(self.inner.settle(cl, nd, ini, trace))

    def settle_tensors(
        self,
        clamp: dict[str, Any],
        nudge: dict[str, Nudge] | None = None,
        init: dict[str, Any] | None = None,
        trace: bool | int = False,
    ) -> Equilibrium:
        import torch  # the tensor path exists only where the board has a tensor_device

        dev = self.inner.tensor_device
        with self.lock:
            cl, nd, ini = self._map_in(
                clamp, nudge, init, lambda b, k: torch.zeros((b, k), dtype=torch.float32, device=dev)
            )
            self.shared.use_budget(self)
            return self._map_out(self.inner.settle_tensors(cl, nd, ini, trace))

    # ------------------------------------------------------------------------------ board-wide
    def reset(self) -> None:
        self.inner.reset()
        self.shared.forget()

    def close(self) -> None:
        self.shared.release(self)
