"""Device wear against a declared pulse endurance (`Limits.pulse_endurance`), one copy for the
board (`emulator.board`, `emulator.array`) and the host (`drivers.checks.SessionWear`), so
both count and word a refusal alike (docs/protocol.md, "Pulse endurance").

The functions take numpy arrays (the host) or torch tensors (the board, on CPU or CUDA) alike:
they use only what both have (``abs``, comparisons, masked assignment, ``argmax``, ``reshape``).
"""

from __future__ import annotations

import math
from typing import Any

from drivers.base import TileWear
from drivers.errors import LimitViolation

# A device counts as near its end with at most this share of its endurance left (`Wear.near_from`)
NEAR_END_SHARE = 0.1


def near_end_from(endurance: int) -> int:
    """The wear from which a device has at most a tenth of `endurance` left, in integers
    (``endurance - wear <= endurance / 10``): ``endurance - endurance // 10``."""
    return endurance - endurance // 10


def tile_wear(wear: Any, endurance: int) -> TileWear:
    """The summary of one tile's wear (an integer array, numpy or torch, G+ then G-) that the
    wear query reports: its largest count, the devices near their end, the devices spent."""
    if math.prod(wear.shape) == 0:
        return TileWear(0, 0, 0)
    return TileWear(
        max_wear=int(wear.max()),
        near_end=int((wear >= near_end_from(endurance)).sum()),
        spent=int((wear >= endurance).sum()),
    )


def pulse_wear(counts: Any, one_sided: bool) -> Any:
    """The pulses each device takes for signed pulse `counts` (an integer array of any shape,
    numpy or torch; a new array of the same kind): ``|n|``, and on a one-sided device (PCM:
    pulses only raise G) 1 for a negative count of any size, the one RESET pulse it gets."""
    wear = abs(counts)
    if one_sided:
        wear[counts < 0] = 1
    return wear


def endurance_refusal(
    tile: str, endurance: int, worn: Any, total: Any, what: str, *, session: bool = False
) -> LimitViolation | None:
    """The refusal of a request that would take a device of `tile` past `endurance`, or None
    when every device stays within it. `worn`: the devices' pulses before the request, `total`
    after it (arrays of one shape, (2, rows, cols): G+ then G-); `what` names the request ("pulse
    request", "program's write"). The board's count is the devices' life (``session=False``);
    the host's (``session=True``) only what this session sent, a lower bound of it."""
    if math.prod(total.shape) == 0:
        return None
    worst = int(total.argmax())
    after = int(total.reshape(-1)[worst])
    if after <= endurance:
        return None
    had = int(worn.reshape(-1)[worst])
    side, rest = divmod(worst, total.shape[1] * total.shape[2])
    row, col = divmod(rest, total.shape[2])
    device = f"{'G+' if side == 0 else 'G-'} device ({row}, {col})"
    # what to do instead, short enough for a SCPI error string (255 characters)
    go_on = (
        f"give it at most {endurance - had}, or use another tile or board" if had < endurance
        else "give it 0 (spent: a program skips it), or use another tile or board"
    )  # fmt: skip
    if session:
        limit = f"pulse endurance of tile {tile!r} (this session's pulses)"
        hint = (
            f"{device} was sent {had} pulses in this session and this {what} adds {after - had}; "
            f"nothing was sent: {go_on}"
        )
    else:
        limit = f"pulse endurance of tile {tile!r}"
        hint = (
            f"{device} has taken {had} pulses and this {what} adds {after - had}; nothing was applied: "
            f"{go_on}"
        )
    return LimitViolation(limit, float(after), endurance, hint)
