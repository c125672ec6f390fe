"""The wear query (`SYSTem:WEAR?`, framed opcode 0x24, `Device.wear`; docs/protocol.md,
"Pulse endurance") of a board that declares `pulse_endurance`: it answers, its reply passes the
host's checks and names the declared endurance and the configured tiles, and a write or a pulse
raises the reported wear as the board counts it. The second check wears the board a little, and
says so in its spec: on the two devices (G+ and G-) of a 1 x 1 tile, one write and, with `pulse`,
a pulse of +`PULSES` and one of -`PULSES` each (at most 7 pulses a device). A board without an
endurance: SKIPPED, with the reason."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from drivers.base import Wear
from drivers.errors import NotSupported
from drivers.topology import Coupling, Topology
from drivers.wear import near_end_from
from drivers.wire import payload as pl
from hil.conformance.report import Check, Mismatch
from hil.conformance.session import Session

NAME = "wear"
TILE = "E0"  # the 1 x 1 tile whose two devices the write and pulse checks wear
PULSES = 3  # the count of each pulse request (capped by max_pulses)
RULE = (
    'docs/protocol.md section 1, "Pulse endurance", Wear: a program adds 1 to every device (its '
    "write), a pulse |n|, and on a board that declares one_sided a negative count 1 (one RESET "
    "pulse); max_wear is the most pulses any device of the tile has taken"
)


def checks(sess: Session) -> None:
    endurance = sess.lim.pulse_endurance
    if endurance is None:
        reason = (
            "pulse_endurance not declared (absent from the device info): the board counts no wear, "
            "and the host does not ask SYST:WEAR? (Device.wear() is None)"
        )
        sess.add(Check(NAME, "SKIP", "-", "-", reason))
        return
    names = ", ".join(c.tile for c in sess.topo.couplings)
    ok = sess.run(
        NAME,
        f"SYST:WEAR? / opcode 0x24 answers (reading it changes nothing: two replies equal) with the "
        f"declared endurance {endurance}, near_from = endurance - endurance // 10, the configured tiles "
        f"({names}) in the topology's order, each within the host's checks (drivers.wire.payload.wear)",
        lambda sent: _query(sess, sent),
    )
    if not ok:  # the counts are read with the same query
        return
    n = min(PULSES, sess.lim.max_pulses)
    pulses = "pulse" in sess.caps and n >= 1
    neg = 1 if sess.lim.one_sided else n
    spend = 1 + (n + neg if pulses else 0)
    gain, w_max = sess.lim.unit_scales
    coupling = Coupling(TILE, ("e0",), ("e1",), w_max=w_max)
    topo = Topology({"e0": 1, "e1": 1}, (coupling,), budget=sess.topo.budget, gain=gain)
    left = _left(sess, topo)
    if left is not None and left < spend:
        reason = (
            f"{TILE}'s most worn device has {left} of its {endurance} pulses left; the check spends {spend}"
        )
        sess.add(Check(f"{NAME} counts", "SKIP", "-", "-", reason))
        return
    sess.run(
        f"{NAME} counts",
        f"on a 1 x 1 tile {TILE}, a program without verify raises its max_wear by 1"
        + (
            f", a pulse of +{n} on its cell (G+ and G-) by {n}, one of -{n} by {neg}"
            f"{' (one_sided: one RESET pulse)' if sess.lim.one_sided else ''}"
            if pulses
            else " ('pulse' not declared: no pulse checked)"
        )
        + f"; spends {spend} of each of its two devices' {endurance} pulses ({RULE})",
        lambda sent: _counts(sess, sent, topo, n if pulses else 0, neg),
    )


def _ask(sess: Session, shapes: dict[str, tuple[int, int]]) -> Wear:
    """The board's wear, through the host's checks of the reply (also for an in-process board,
    whose reply no wire decodes)."""
    try:
        got = sess.dev.wear()
    except NotSupported as exc:
        raise Mismatch(
            f"NotSupported ({exc}): a board that declares pulse_endurance {sess.lim.pulse_endurance} "
            "answers SYST:WEAR? / opcode 0x24 (firmware that predates the query answers -113 / 110)"
        ) from exc
    if got is None:
        raise Mismatch(
            f"no wear (None) from a board that declares pulse_endurance {sess.lim.pulse_endurance}"
        )
    return pl.wear(pl.wear_reply(got), sess.lim, shapes)


def _shapes(topo: Topology) -> dict[str, tuple[int, int]]:
    return {c.tile: topo.tile_shape(c.tile) for c in topo.couplings}


def _query(sess: Session, sent: list[str]) -> str:
    sent.append("SYST:WEAR? twice (Device.wear()) on the test network")
    first = _ask(sess, _shapes(sess.topo))
    again = _ask(sess, _shapes(sess.topo))
    endurance = sess.lim.pulse_endurance
    assert endurance is not None
    bad = []
    if first != again:
        bad.append(f"a second query answered differently ({again}): reading it must change nothing")
    if first.near_from != near_end_from(endurance):
        bad.append(f"near_from {first.near_from}, expected {near_end_from(endurance)}")
    tiles = [c.tile for c in sess.topo.couplings]
    if list(first.tiles) != tiles:
        bad.append(f"tiles {list(first.tiles)}, expected the topology's {tiles} in its order")
    if bad:
        raise Mismatch("; ".join(bad))
    worst = ", ".join(f"{k} {t.max_wear}" for k, t in first.tiles.items())
    return f"endurance {first.endurance}, near_from {first.near_from}; max_wear {worst}"


def _left(sess: Session, topo: Topology) -> int | None:
    """The pulses left to the most worn device of `topo`'s one tile; None: the board did not
    say (the check then runs and reports what went wrong)."""
    try:
        with sess.configured(topo):
            wear = _ask(sess, _shapes(topo))
        return wear.endurance - wear.tiles[TILE].max_wear
    except Exception:  # the check itself reports it
        return None


def _counts(sess: Session, sent: list[str], topo: Topology, n: int, neg: int) -> str:
    with sess.configured(topo):
        return _spend(sess, sent, n, neg)


def _spend(sess: Session, sent: list[str], n: int, neg: int) -> str:
    shapes = {TILE: (1, 1)}

    def max_wear() -> int:
        tiles = _ask(sess, shapes).tiles
        if list(tiles) != [TILE]:
            raise Mismatch(f"tiles {list(tiles)} after configuring the single tile {TILE}")
        return tiles[TILE].max_wear

    sent.append(f"configure {TILE} (1 x 1), SYST:WEAR?")
    start = max_wear()
    mid = np.full((1, 1), sess.lim.g_min + 0.5 * sess.g_range, np.float32)
    steps: list[tuple[str, str, Callable[[], object], int]] = [
        (
            "program",
            f"program {TILE} G+ = G- = {float(mid[0, 0]):.3g} S (verify=False)",
            lambda: sess.dev.program(TILE, mid, mid, verify=False),
            1,
        )
    ]
    for count, adds in ((n, n), (-n, neg)) if n else ():
        c = np.full((1, 1), count, np.int32)
        steps.append(
            (
                f"pulse {count:+d}",
                f"pulse {TILE} {count:+d} on G+ and G-",
                lambda c=c: sess.dev.pulse(TILE, c, c),
                adds,
            )
        )
    got, was = [], start
    for what, request, call, adds in steps:
        sent.append(f"{request}, SYST:WEAR?")
        call()
        now = max_wear()
        got.append(f"{what}: {was} -> {now}")
        if now != was + adds:
            raise Mismatch(f"max_wear of {TILE} {'; '.join(got)}, expected {was} -> {was + adds} ({RULE})")
        was = now
    return f"max_wear of {TILE} {'; '.join(got)}"
