"""Request ids: a resent pulse runs once (docs/protocol.md, "Request ids: at most once").

A host resends a request whose reply it lost, with the same id; a board that runs it again
applies the pulses twice, and nothing else in a session shows it. The check sends one pulse
request twice with one id, past the host's drivers (raw SCPI on `visa://` boards, an
unchecked request on the framed link). From the same programmed state each time, the tile
also takes the counts once, and twice under two ids: the resent pair must move the
conductances as one request does, nearer it than two, and the resend must be answered with
the first reply."""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from drivers.wire import payload as pl
from drivers.wire import scpi
from hil.conformance.report import Mismatch
from hil.conformance.scpi import text_block
from hil.conformance.session import Session

Pulse = Callable[[np.ndarray, int], object]  # (counts of G+, request id) -> the board's reply


def checks(sess: Session) -> None:
    if "pulse" not in sess.caps:
        return
    uri = sess.report.uri.lower()
    tile = sess.topo.couplings[-1].tile
    query = getattr(sess.dev, "query", None)
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
        sess.dev.program(tile, low, low, verify="program_verify" in sess.caps)
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
