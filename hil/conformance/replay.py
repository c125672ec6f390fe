"""Request ids: a resent request runs once (docs/protocol.md, "Request ids: at most once").

`program_ids` (every board with a link): a program resent with the id of an earlier one is
answered with that one's stored reply and not run again, checked by programs A (id r), B
(id s), A again (id r): the tile must still read B; and on the framed link a program without
an id is refused with -109 and runs nothing.

`checks` (boards with `pulse`): a host resends a request whose reply it lost, with the same
id; a board that runs it again applies the pulses twice, and nothing else in a session shows
it. The check sends one pulse request twice with one id, past the host's drivers (raw SCPI
on `visa://` boards, an unchecked request on the framed link). From the same programmed
state each time, the tile also takes the counts once, and twice under two ids: the resent
pair must move the conductances as one request does, nearer it than two, and the resend
must be answered with the first reply."""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from drivers.errors import DeviceError, DeviceFault
from drivers.wire import codes, scpi
from drivers.wire import payload as pl
from hil.conformance.report import Mismatch
from hil.conformance.scpi import text_block
from hil.conformance.session import Session

EXECUTION_ERROR = -200  # "already ran; its outcome is no longer held" (docs/protocol.md section 1)
Pulse = Callable[[np.ndarray, int], object]  # (counts of G+, request id) -> the board's reply


def checks(sess: Session) -> None:
    if "pulse" not in sess.caps:
        return
    uri = sess.report.uri.lower()
    tile = sess.topo.couplings[-1].tile
    query = getattr(sess.dev, "query_unchecked", None)  # raw text, the host checks skipped
    send = getattr(sess.dev, "send_unchecked", None)
    if uri.startswith("visa://") and callable(query):
        pulse: Pulse = lambda counts, rid: str(query(_scpi_pulse(tile, counts, rid))).strip()  # noqa: E731
        name = "scpi request id"
    elif callable(send):
        pulse = lambda counts, rid: send(pl.Op.PULSE, _framed_pulse(tile, counts, rid)).meta  # noqa: E731
        name = "unchecked request id"
    else:
        return
    sess.run(
        name,
        "a pulse resent with the same request id is answered with the first reply and not run again",
        lambda sent: _resend(sess, sent, tile, pulse),
    )


def _scpi_pulse(tile: str, counts: np.ndarray, rid: int) -> str:
    """``TILE:PULS?`` with G+ counts `counts` and none on G-; small counts, so the block's
    bytes are ASCII and travel through a text query."""
    values = np.concatenate([counts.ravel(), np.zeros(counts.size, np.int32)]).astype("<i4")
    return f"{scpi.short_form(scpi.PULSE_Q)} {scpi.quote(tile)},{text_block(values)},{rid}"


def _framed_pulse(tile: str, counts: np.ndarray, rid: int) -> pl.Message:
    request = pl.pulse_request(tile, counts, np.zeros_like(counts))
    request.meta["rid"] = rid
    return request


def _resend(sess: Session, sent: list[str], tile: str, pulse: Pulse) -> str:
    shape = sess.topo.tile_shape(tile)
    n = min(sess.opt.pulses, sess.lim.max_pulses, 127)  # 127: one ASCII byte per count
    n = 9 if n == 10 else n  # 10 is a line feed
    counts = np.full(shape, n, np.int32)
    low = np.full(shape, sess.lim.g_min + 0.25 * sess.g_range, np.float32)

    def moved(ids: list[int]) -> tuple[float, list[object]]:
        """Mean change of G+ from `low` after one pulse request per id in `ids`, and the replies."""
        sess.own_program(tile, low, low, verify="program_verify" in sess.caps)
        g0, _, _ = sess.read_avg(tile)
        replies = [pulse(counts, rid) for rid in ids]
        g1, _, _ = sess.read_avg(tile)
        return float((g1 - g0).mean()), replies

    a, b, c, d = (int.from_bytes(os.urandom(6), "little") for _ in range(4))
    sent.append(
        f"{tile} from G+ {low.flat[0]:.3g} S each time: pulse +{n} once; twice (two ids); twice with one id"
    )
    single, _ = moved([a])
    double, _ = moved([b, c])
    pair, (first, again) = moved([d, d])
    noise = 4 * sess.sigma_g * np.sqrt(2.0 / (sess.opt.reads * counts.size))
    r = sess.g_range
    got = (
        f"G+ moved {single / r:+.3%} of range by one request, {double / r:+.3%} by two, {pair / r:+.3%} by "
        f"one resent (noise {noise / r:.3%})"
    )
    if double - single <= 2 * noise:
        raise Mismatch(f"{got}: two requests moved G no more than one, so a rerun cannot be told apart")
    if abs(pair - double) < abs(pair - single):
        raise Mismatch(f"{got}: the resend ran again (its pulses were applied twice)")
    if again != first:
        raise Mismatch(f"{got}; the resend's reply {again!r} differs from the first {first!r}")
    return got + "; the resend got the first reply"


ID_RULE = (
    'docs/protocol.md section 1, "Request ids": the board keeps the outcome of the last 64 ids; a '
    "request whose id it holds is answered with the stored outcome and not run again"
)
NO_ID_RULE = (
    'docs/protocol.md section 3, Opcodes: PROGRAM, PULSE and WAIT requests carry "rid"; without it '
    "the board answers -109 and runs nothing (section 1: a stale frame replayed on the link could "
    "otherwise run it again)"
)


def program_ids(sess: Session) -> None:
    """At most once for a program, on every board reached over a link (no capability needed)."""
    send = getattr(sess.dev, "send_unchecked", None)
    if not callable(send):
        return
    scpi_link = sess.report.uri.lower().startswith("visa://")
    prefix = "scpi" if scpi_link else "unchecked"
    tile = sess.topo.couplings[-1].tile
    if not scpi_link:  # over SCPI a request without an id runs every time (section 1)
        sess.run(
            "unchecked program without id",
            f"a program without a request id is error -109 and changes nothing ({NO_ID_RULE})",
            lambda sent: _without_id(sess, sent, send, tile),
        )
    sess.run(
        f"{prefix} program request id",
        "program A (id r), program B (id s), A again with id r: the reply is A's stored one and the "
        f"tile still reads B ({ID_RULE})",
        lambda sent: _program_twice(sess, sent, send, tile),
    )


def _levels(sess: Session, tile: str) -> tuple[np.ndarray, np.ndarray]:
    """Two uniform conductance levels, a quarter and three quarters of the window."""
    shape = sess.topo.tile_shape(tile)
    low = np.full(shape, sess.lim.g_min + 0.25 * sess.g_range, np.float32)
    high = np.full(shape, sess.lim.g_min + 0.75 * sess.g_range, np.float32)
    return low, high


def _reads_as(sess: Session, tile: str, low: np.ndarray, high: np.ndarray) -> tuple[str, float]:
    """ "low" or "high": which level the tile's G+ and G- read nearer, and their mean, in siemens."""
    gp, gm, _ = sess.read_avg(tile)
    mean = float(np.concatenate([gp.ravel(), gm.ravel()]).mean())
    return ("low" if abs(mean - float(low.flat[0])) < abs(mean - float(high.flat[0])) else "high"), mean


def _without_id(sess: Session, sent: list[str], send: Callable[..., pl.Message], tile: str) -> str:
    low, high = _levels(sess, tile)
    sess.program_lines_within(tile, high, high)  # the higher level's reads carry the more current
    sess.own_program(tile, low, low, verify="program_verify" in sess.caps)
    sent.append(f"{tile} programmed to {low.flat[0]:.3g} S; PROGRAM to {high.flat[0]:.3g} S without rid")
    try:
        send(pl.Op.PROGRAM, pl.program_request(tile, high, high, False, None, 1), request_id=False)
        refused = "the board ran it (a program report came back)"
    except DeviceFault as exc:
        if exc.code != codes.MISSING_PARAMETER:
            raise Mismatch(f"refused with {exc.code} ({exc}); expected -109: {NO_ID_RULE}") from exc
        refused = f"DeviceFault: {exc}"
    except DeviceError as exc:
        raise Mismatch(f"refused as {type(exc).__name__} ({exc}); expected -109: {NO_ID_RULE}") from exc
    level, mean = _reads_as(sess, tile, low, high)
    got = f"{refused}; the tile reads {mean:.3g} S"
    if level == "high":
        raise Mismatch(f"{got}: the board ran a program without a request id; {NO_ID_RULE}")
    if not refused.startswith("DeviceFault"):
        raise Mismatch(f"{got}: {NO_ID_RULE}")
    return got


def _same(a: pl.Message, b: pl.Message) -> bool:
    return (
        a.meta == b.meta
        and list(a.arrays) == list(b.arrays)
        and all(
            a.arrays[k].dtype == b.arrays[k].dtype and a.arrays[k].tobytes() == b.arrays[k].tobytes()
            for k in a.arrays
        )
    )


def _program_twice(sess: Session, sent: list[str], send: Callable[..., pl.Message], tile: str) -> str:
    low, high = _levels(sess, tile)
    sess.program_lines_within(tile, high, high)
    r, s = (int.from_bytes(os.urandom(6), "little") for _ in range(2))

    def program(g: np.ndarray, rid: int) -> pl.Message:
        request = pl.program_request(tile, g, g, False, None, 1)
        request.meta["rid"] = rid
        return send(pl.Op.PROGRAM, request)

    sent.append(
        f"{tile}: A = {low.flat[0]:.3g} S with id {r}, B = {high.flat[0]:.3g} S with id {s}, "
        f"A again with id {r}"
    )
    first = program(low, r)
    program(high, s)
    try:
        again = program(low, r)
    except DeviceFault as exc:
        if exc.code != EXECUTION_ERROR:
            raise
        raise Mismatch(
            f"the resend of id {r} was refused ({exc}) one request after it ran: the board holds the outcome "
            f"of fewer than the last 2 ids, and must hold those of the last 64; {ID_RULE}"
        ) from exc
    level, mean = _reads_as(sess, tile, low, high)
    got = f"the tile reads {mean:.3g} S after the resend"
    if level == "low":
        raise Mismatch(f"{got} (A's level): the resend of id {r} ran again after B; {ID_RULE}")
    if not _same(first, again):
        raise Mismatch(
            f"{got} (B's level), but the resend's reply {again.meta} differs from A's first reply "
            f"{first.meta} (or their arrays do); {ID_RULE}"
        )
    return f"{got} (B's level); the resend got A's first reply, arrays and all"


RESET_RULE = (
    'docs/protocol.md section 1, "Request ids": a reset clears the record (docs/bringup.md, "RESET and '
    'SAFE_STATE": its outcomes belong to the old epoch)'
)


def after_reset(sess: Session) -> None:
    """A request id from before a RESET runs again after it (every board reached over a link)."""
    send = getattr(sess.dev, "send_unchecked", None)
    if not callable(send):
        return
    prefix = "scpi" if sess.report.uri.lower().startswith("visa://") else "unchecked"
    sess.run(
        f"{prefix} request id after reset",
        f"program A (id r), RESET, configure, program B with id r: B runs, the tile reads B ({RESET_RULE})",
        lambda sent: _id_after_reset(sess, sent, send, sess.topo.couplings[-1].tile),
    )


def _id_after_reset(sess: Session, sent: list[str], send: Callable[..., pl.Message], tile: str) -> str:
    """A board that keeps the record across a reset answers the host's first request of the new
    epoch that reuses an id (a recovery that resends a program in flight, docs/protocol.md section
    4) with the old epoch's outcome, an error included, and runs nothing."""
    low, high = _levels(sess, tile)
    sess.program_lines_within(tile, high, high)
    r = int.from_bytes(os.urandom(6), "little")

    def program(g: np.ndarray) -> pl.Message:
        request = pl.program_request(tile, g, g, False, None, 1)
        request.meta["rid"] = r
        return send(pl.Op.PROGRAM, request)

    sent.append(
        f"configure; {tile}: A = {low.flat[0]:.3g} S with id {r}; reset(); configure; "
        f"B = {high.flat[0]:.3g} S, id {r}"
    )
    sess.dev.configure(sess.topo)  # whatever the reset check left (it stops at its first mismatch)
    first = program(low)
    sess.dev.reset()
    sess.dev.configure(sess.topo)
    again = program(high)
    level, mean = _reads_as(sess, tile, low, high)
    got = f"the tile reads {mean:.3g} S"
    if level == "low" or _same(first, again):
        raise Mismatch(
            f"{got} ({level} level; the reply {'is' if _same(first, again) else 'is not'} A's stored one): "
            f"the board kept the record of request ids across the reset and answered the new epoch's "
            f"request from the old one; {RESET_RULE}"
        )
    return f"{got} (B's level): the id ran again in the new epoch"
