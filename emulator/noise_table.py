"""A table of standard normal values drawn in bulk, read through windows at random offsets.

Fresh ``torch.randn`` costs about 4 ns a value on one CPU thread (torch's CPU mt19937), more
than the arithmetic that uses it whenever a value is used once: a settle step's node noise,
a full-tile write or read of a crossbar tile. `NoisePool` draws its values in bulk, hands
out views of them (windows) at offsets drawn on the host, and renews part of them in place
between uses: the noise-table technique of hardware noise generators. Its two users:

- the settle engine (`emulator.settle.SettleEngine`): `draw` per settle step, `refresh` once
  per settle;
- a large crossbar tile's write and read noise (`emulator.array.TileArray`): `fresh_window`
  per write or read, which renews a fixed share of the table first and never hands out an
  offset that an earlier, still live `fresh_window` used (see there for what that
  guarantees and what correlations remain).
"""

from __future__ import annotations

import random
from collections import deque

import torch


class NoisePool:
    """Standard normal noise drawn in bulk on the compute device.

    The pool holds ``blocks + 1`` blocks of `block` values and every request reads a window
    of at most `block` values at a random offset in ``[0, blocks * block)`` (drawn on the host
    from the pool's own `random.Random`, seeded from `gen`: no device synchronisation, and one
    generator state gives the same windows). Every value is exactly N(0, 1), drawn from `gen`
    (on the generator's device and moved when the pool lives elsewhere, so a CPU generator
    gives the same numbers whatever the compute device is), and independent of every other
    value and of the offsets; so the values of one window, distinct positions of the pool,
    are i.i.d. N(0, 1).

    Settles (`draw`, `refresh`): the settle engine's pool draws anew, in place, as many values
    as the settle's largest window once per settle (round robin over the pool: no
    allocation), so a value serves a few consecutive settles (``blocks + 1`` of the largest
    ones); within and across those settles, steps reuse pool values at random shifts, which
    leaves no correlation between a node's noise at two steps unless two offsets coincide
    (probability about 1 / (blocks * block) per pair).

    Writes (`fresh_window`): see there.
    """

    def __init__(self, gen: torch.Generator, block: int, device: torch.device, blocks: int = 8) -> None:
        self.gen = gen
        self.block = block
        self.size = block * blocks  # the range of window offsets
        self.values = torch.empty(block * (blocks + 1), device=device)
        self._base = self.values.storage_offset()  # `draw_rows` addresses the storage
        self._next = 0
        self.drawn = 0  # values drawn since construction (the initial fill included)
        self.refresh(self.values.numel())
        seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device))
        self.rng = random.Random(seed)
        # `fresh_window`'s offsets still live: (`drawn` when used, offset), oldest first
        self._live: deque[tuple[int, int]] = deque()
        self._live_set: set[int] = set()

    def refresh(self, n: int) -> None:
        """Draw the next `n` values anew, in place (round robin over the pool)."""
        total = self.values.numel()
        while n > 0:
            k = self._next
            part = self.values[k : min(k + n, total)]
            if self.gen.device == part.device:
                torch.randn(part.shape, generator=self.gen, device=part.device, out=part)
            else:  # a generator elsewhere: the same numbers whatever the compute device
                part.copy_(torch.randn(part.shape, generator=self.gen, device=self.gen.device))
            n -= part.numel()
            self.drawn += part.numel()
            self._next = (k + part.numel()) % total

    def draw(self, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        """A window of ``prod(shape)`` (at most `block`) values at a random offset: a view of
        the pool, valid until the next `refresh`; do not modify it."""
        n = 1
        for d in shape:
            n *= d
        offset = self.rng.randrange(self.size)
        return self.values[offset : offset + n].view(shape)

    def draw_rows(self, rows: int, cols: int) -> torch.Tensor:
        """`draw` of a (rows, cols) window (``rows * cols`` at most `block`), made in one call:
        the same offset from the same generator, the same values, as ``draw((rows, cols))``.
        A settle step adds one per noisy group, where slicing and viewing cost as much as the
        addition itself."""
        offset = self.rng.randrange(self.size)
        return self.values.as_strided((rows, cols), (cols, 1), self._base + offset)

    def fresh_window(self, shape: tuple[int, ...] | torch.Size, fresh: int) -> torch.Tensor:
        """`refresh` `fresh` values (at least 1), then a window (a view, as `draw`) at a random
        offset that no earlier `fresh_window` still live used.

        A window is live while some value it read has not been drawn anew, i.e. until `size`
        + `block` (the whole pool) more values have been drawn; with a fixed `fresh` that is
        ``ceil(pool / fresh)`` calls, and at most that many offsets are barred. Device i of a
        window reads position ``offset + i``, so barring the offsets of live windows means
        that one index i never reads the same pool value twice (the same number twice for
        one device of one tile, or for one device's write and read noise). Offsets are still
        independent of the values, so each window is i.i.d. N(0, 1).

        What remains across calls: while a value lives (about ``pool / fresh`` calls) each
        call reads it with probability ``window / size``, so a value is read about
        ``window / fresh`` times, each time at another index: the window of one call is,
        except for its renewed values, the window of an earlier call shifted by the
        difference of their offsets (``z'[i] = z[i + o - o']`` for the indices where both
        fall in the pool). Any one pair of distinct indices (i, j) shares a value in two
        given calls with probability about ``1 / size``; a statistic that sums over many
        indices (a tile's mean noise) is correlated across calls whose windows overlap.
        """
        n = 1
        for d in shape:
            n *= d
        if n > self.block:
            raise ValueError(f"a window of {n} values from a pool of {self.block}-value blocks")
        self.refresh(max(int(fresh), 1))
        live, barred = self._live, self._live_set
        total = self.values.numel()
        while live and live[0][0] <= self.drawn - total:  # every value it read is drawn anew
            barred.discard(live.popleft()[1])
        offset = self.rng.randrange(self.size)
        while offset in barred:
            offset = self.rng.randrange(self.size)
        live.append((self.drawn, offset))
        barred.add(offset)
        return self.values[offset : offset + n].view(shape)
