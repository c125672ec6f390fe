"""Board-side checks through unchecked requests (`RemoteDevice.send_unchecked`), for links
without a raw text path (the framed link; `visa://` boards get the raw SCPI ones of
`hil.conformance.scpi`): the host drivers check every request before sending it, so only an
unchecked one shows whether the board checks its limits again ("a host may be buggy") and
refuses what it does not declare."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from drivers.checks import conductance_window
from drivers.errors import DeviceError, LimitViolation, NotSupported, distinct_numbers
from drivers.wire import payload as pl
from hil.conformance.report import Check, Mismatch
from hil.conformance.session import Session

Send = Callable[[pl.Op, pl.Message], pl.Message]
LIMITS = 'docs/protocol.md section 1, "Limits": refused before anything is sent; a board must check again'
MAX_BATCH_PROBE_BYTES = 8 << 20  # the largest framed message (docs/protocol.md section 1, "Server limits")


def checks(sess: Session) -> None:
    send = getattr(sess.dev, "send_unchecked", None)
    if not callable(send):
        return
    tile = sess.topo.couplings[0].tile
    rows, _ = sess.topo.tile_shape(tile)
    if sess.report.uri.lower().startswith("visa://"):
        # raw SCPI has its own probes (`hil.conformance.scpi`), but its text queries carry only
        # printable bytes: the two whose blocks cannot be text (clamp_max itself, a batch of
        # zeros) go as unchecked typed requests, which a VisaDevice sends as SCPI as given
        if "mvm" in sess.caps:
            _mvm_edges(sess, send, tile, rows, "scpi")
        return
    sess.probe(
        "unchecked board conductance limit",
        "the board checks program targets again: above g_max is error -222, its own refused + 1, "
        "violations 0, the tile unchanged",
        lambda sent: _board_conductance_limit(sess, sent, send, tile),
    )
    if "mvm" in sess.caps:
        sess.probe(
            "unchecked board limit",
            "the board checks limits again: an mvm input above clamp_max is error -222, its own "
            "refused + 1, violations 0",
            lambda sent: _board_limit(sess, sent, send, tile, rows),
        )
        _mvm_edges(sess, send, tile, rows, "unchecked")
    else:
        sess.run(
            "unchecked undeclared mvm",
            "an undeclared capability is error 101 on the board too",
            lambda sent: _refused(sent, send, pl.Op.MVM, _mvm(tile, rows, 0.0), NotSupported),
        )
    sess.probe(
        "unchecked wait limit",
        "the board checks a wait again: NaN seconds refused, one float64 step past max_wait_s is error "
        f"-222, its own refused + 1 ({LIMITS})",
        lambda sent: _wait_limit(sess, sent, send),
    )
    if "settle" not in sess.caps:  # the host driver refuses it first: only an unchecked one reaches the board
        settle = pl.settle_request({}, {}, {}, False)
        sess.run(
            "unchecked undeclared settle",
            "a settle on a board that does not declare it is error 101 on the board too",
            lambda sent: _refused(sent, send, pl.Op.SETTLE, settle, NotSupported),
        )


def _mvm_edges(sess: Session, send: Send, tile: str, rows: int, prefix: str) -> None:
    """An mvm input exactly at clamp_max runs; max_batch samples run, max_batch + 1 are refused."""
    sess.run(
        f"{prefix} mvm at clamp_max",
        "an mvm input exactly at clamp_max runs: the limit is x v_read <= v_read_max, equal passes "
        f"({LIMITS})",
        lambda sent: _at_clamp_max(sess, sent, send, tile, rows),
    )
    batch_bytes = 4 * (sess.lim.max_batch + 1) * rows
    if batch_bytes > MAX_BATCH_PROBE_BYTES:
        reason = f"an mvm of max_batch + 1 = {sess.lim.max_batch + 1} samples would be {batch_bytes} bytes"
        sess.add(Check(f"{prefix} batch limit", "SKIP", "-", "-", reason))
    else:
        sess.run(
            f"{prefix} batch limit",
            "an mvm of max_batch samples runs, one of max_batch + 1 is error -222 on the board, its own "
            f"refused + 1 ({LIMITS})",
            lambda sent: _batch_limit(sess, sent, send, tile, rows),
        )


def _mvm(tile: str, rows: int, value: float) -> pl.Message:
    return pl.mvm_request(tile, np.full((1, rows), value, np.float32), False)


def _refused(sent: list[str], send: Send, op: pl.Op, request: pl.Message, expected: type[DeviceError]) -> str:
    sent.append(f"{op.name} unchecked")
    try:
        send(op, request)
    except expected as exc:
        return f"{type(exc).__name__}: {exc}"
    except DeviceError as exc:
        raise Mismatch(f"refused as {type(exc).__name__} ({exc}); expected {expected.__name__}") from exc
    raise Mismatch(f"the board ran {op.name}; expected {expected.__name__}")


def _step_past(limit: float) -> float:
    """The first float32 above `limit` (as float32 holds it): the smallest value a board must
    refuse. The probes of the board's own checks send it on one line or device, every other
    at a harmless value, so that a board in bring-up whose check is missing (what they look
    for) takes the least possible excess, not 2 to 4 times a limit on every line."""
    return float(np.nextafter(np.float32(limit), np.float32(np.inf)))


def _board_limit(sess: Session, sent: list[str], send: Send, tile: str, rows: int) -> str:
    value = _step_past(sess.lim.clamp_max)
    x = np.zeros((1, rows), np.float32)
    x[0, 0] = value
    request = pl.mvm_request(tile, x, False)
    shown, most = distinct_numbers(value, sess.lim.clamp_max)
    return sess.counted_refusal(
        sent, value, lambda: _refused(sent, send, pl.Op.MVM, request, LimitViolation),
        what=f"x[0] = {shown} > clamp_max {most} (one float32 step past it; every other input 0)",
    )  # fmt: skip


def _board_conductance_limit(sess: Session, sent: list[str], send: Send, tile: str) -> str:
    top = conductance_window(sess.lim)[1]
    value = _step_past(top)
    gm = np.full(sess.topo.tile_shape(tile), sess.lim.g_min, np.float32)
    gp = gm.copy()
    gp[0, 0] = value
    request = pl.program_request(tile, gp, gm, False, None, 1)
    shown, most = distinct_numbers(value, top)
    got = sess.counted_refusal(
        sent, value, lambda: _refused(sent, send, pl.Op.PROGRAM, request, LimitViolation),
        what=f"G+[0, 0] = {shown} S > the window's top {most} S (one float32 step past it; every other "
        "device g_min)",
    )  # fmt: skip
    return got + sess.tile_within_window(tile)


def _at_clamp_max(sess: Session, sent: list[str], send: Send, tile: str, rows: int) -> str:
    """A board whose check is strict (`>=`), or made in float32 where clamp_max times v_read rounds
    up, refuses the largest input the host sends (a clamp at the rail) in the middle of training."""
    x = np.zeros((1, rows), np.float32)
    x[0, 0] = np.float32(sess.lim.clamp_max)
    sent.append(f"MVM unchecked, x[0] = clamp_max {float(x[0, 0])!r} (every other input 0)")
    sess.mvm_lines_within(sess.topo, tile, x, False)
    before = sess.dev.safety()
    try:
        y = pl.mvm_result(send(pl.Op.MVM, pl.mvm_request(tile, x, False)), 1, sess.topo.tile_shape(tile)[1])
    except DeviceError as exc:
        raise Mismatch(
            f"refused ({type(exc).__name__}: {exc}): x v_read = {float(x[0, 0]) * sess.lim.v_read!r} V is "
            f"within v_read_max {sess.lim.v_read_max!r} V (computed in float64); the board checks with >= or "
            f"in another width than the host, which sends this value; {LIMITS}"
        ) from exc
    after = sess.dev.safety()
    if after.refused != before.refused:
        raise Mismatch(f"ran, but refused {before.refused} -> {after.refused}: nothing was refused")
    return f"ran: y {y.shape}; refused {after.refused} unchanged"


def _batch_limit(sess: Session, sent: list[str], send: Send, tile: str, rows: int) -> str:
    """The host splits a larger set into chunks of max_batch, so a board that refuses max_batch
    (`>=`) fails every full chunk; one that runs max_batch + 1 has no bound on a request's work
    (its buffers are sized for max_batch)."""
    n = sess.lim.max_batch
    cols = sess.topo.tile_shape(tile)[1]
    sent.append(f"MVM unchecked, x = 0 of {n} x {rows} (max_batch), then of {n + 1} x {rows}")
    try:
        pl.mvm_result(send(pl.Op.MVM, _mvm_batch(tile, n, rows)), n, cols)
    except DeviceError as exc:
        raise Mismatch(
            f"a batch of max_batch = {n} samples was refused ({type(exc).__name__}: {exc}): the limit is "
            f"'at most max_batch' (> where the board has >=), and the host sends full chunks of {n}; {LIMITS}"
        ) from exc
    request = _mvm_batch(tile, n + 1, rows)
    what = f"a batch of max_batch + 1 = {n + 1} samples"
    try:
        got = sess.counted_refusal(
            sent, 0.0, lambda: _refused(sent, send, pl.Op.MVM, request, LimitViolation), what=what
        )
    except Mismatch as exc:
        if "the board ran MVM" in str(exc):
            raise Mismatch(
                f"{what} ran: the board's own batch check is off by one (or missing), so a request's work "
                f"is not bounded by max_batch; {LIMITS}"
            ) from exc
        raise
    return f"{n} samples ran; {got}"


def _mvm_batch(tile: str, n: int, rows: int) -> pl.Message:
    return pl.mvm_request(tile, np.zeros((n, rows), np.float32), False)


def _wait_limit(sess: Session, sent: list[str], send: Send) -> str:
    """A wait's seconds are a physical quantity (board time over which the devices drift, and on
    hardware the board is busy for them): a board that compares ``seconds > max_wait_s`` passes a
    NaN, and one without the check sleeps as long as a buggy host asks. NaN first (a board that
    takes it has no finite-number check), then one float64 step past max_wait_s (JSON carries
    float64: the step a board must refuse)."""
    nan = _refused(sent, send, pl.Op.WAIT, pl.Message({"seconds": math.nan}), DeviceError)
    value = math.nextafter(sess.lim.max_wait_s, math.inf)
    request = pl.Message({"seconds": value})
    got = sess.counted_refusal(
        sent, value, lambda: _refused(sent, send, pl.Op.WAIT, request, LimitViolation),
        what=f"WAIT seconds = {value!r} > max_wait_s {sess.lim.max_wait_s!r} (one float64 step past it)",
    )  # fmt: skip
    return f"NaN: {nan}; {got}"
