"""Board-side checks through unchecked requests (`RemoteDevice.send_unchecked`), for links
without a raw text path (the framed link; `visa://` boards get the raw SCPI ones of
`hil.conformance.scpi`): the host drivers check every request before sending it, so only an
unchecked one shows whether the board checks its limits again ("a host may be buggy") and
refuses what it does not declare."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from drivers.checks import conductance_window
from drivers.errors import DeviceError, LimitViolation, NotSupported, distinct_numbers
from drivers.wire import payload as pl
from hil.conformance.report import Mismatch
from hil.conformance.session import Session

Send = Callable[[pl.Op, pl.Message], pl.Message]


def checks(sess: Session) -> None:
    send = getattr(sess.dev, "send_unchecked", None)
    if not callable(send) or sess.report.uri.lower().startswith("visa://"):
        return
    tile = sess.topo.couplings[0].tile
    rows, _ = sess.topo.tile_shape(tile)
    sess.run(
        "unchecked board conductance limit",
        "the board checks program targets again: above g_max is error -222, its own refused + 1, "
        "violations 0, the tile unchanged",
        lambda sent: _board_conductance_limit(sess, sent, send, tile),
    )
    if "mvm" in sess.caps:
        sess.run(
            "unchecked board limit",
            "the board checks limits again: an mvm input above clamp_max is error -222, its own "
            "refused + 1, violations 0",
            lambda sent: _board_limit(sess, sent, send, tile, rows),
        )
    else:
        sess.run(
            "unchecked undeclared mvm",
            "an undeclared capability is error 101 on the board too",
            lambda sent: _refused(sent, send, pl.Op.MVM, _mvm(tile, rows, 0.0), NotSupported),
        )
    if "settle" not in sess.caps:  # the host driver refuses it first: only an unchecked one reaches the board
        settle = pl.settle_request({}, {}, {}, False)
        sess.run(
            "unchecked undeclared settle",
            "a settle on a board that does not declare it is error 101 on the board too",
            lambda sent: _refused(sent, send, pl.Op.SETTLE, settle, NotSupported),
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
