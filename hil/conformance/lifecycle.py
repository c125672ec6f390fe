"""Transactions, reset, safe state and the safety counters."""

from __future__ import annotations

import numpy as np

from drivers.base import BoardStatus
from hil.conformance.report import Mismatch
from hil.conformance.session import Session


def status_reset(sess: Session) -> None:
    tag = "conformance"
    sess.run(
        "transaction",
        "BEGIN keeps its tag in status() until COMMIT (optional)",
        lambda sent: _transaction(sess, sent, tag),
    )
    sess.run(
        "reset",
        "*RST clears the topology (conductances are non-volatile); the epoch changes",
        lambda sent: _reset(sess, sent),
    )
    sess.run("safe_state", "SYST:SAFE: all lines to 0 V, nothing in flight", lambda sent: _safe(sess, sent))
    sess.run(
        "safety counters",
        "violations (out-of-limit conditions at the array) stay 0",
        lambda sent: _safety(sess, sent),
    )


def _transaction(sess: Session, sent: list[str], tag: str) -> str:
    sent.append(f"begin({tag!r}), status(), commit({tag!r}), status()")
    sess.dev.begin(tag)
    during = sess.dev.status()
    sess.dev.commit(tag)
    after = sess.dev.status()
    for s in (during, after):
        if not isinstance(s, BoardStatus):
            raise Mismatch(f"status() returned {s!r}, not a BoardStatus")
    if during.transaction is None and after.transaction is None:
        return "not recorded (the board has no STATUS: no transactions, no epoch)"
    sess.has_status = True
    if during.transaction != tag or after.transaction is not None:
        raise Mismatch(f"transaction {during.transaction!r} while open, {after.transaction!r} after commit")
    return f"{tag!r} while open, None after commit"


def _reset(sess: Session, sent: list[str]) -> str:
    tile = sess.topo.couplings[0].tile
    sent.append(f"status(), reset(), status(), configure again, read {tile}")
    before = sess.dev.status()
    gp0, gm0, _ = sess.read_avg(tile)
    sess.dev.reset()
    after = sess.dev.status()
    if sess.dev.topology is not None or after.configured:
        raise Mismatch(f"after reset: topology {sess.dev.topology}, status {after}")
    if before.arrays_id is not None and after.arrays_id != before.arrays_id:
        raise Mismatch(
            f"after reset: arrays_id {before.arrays_id} -> {after.arrays_id}: a reset keeps the "
            "conductances, so it must keep arrays_id (docs/protocol.md, 'Board status'), or every "
            "host programs every tile again"
        )
    epoch = f"epoch {before.epoch} -> {after.epoch}"
    if before.epoch == after.epoch:
        if sess.has_status or before.epoch != 0:
            raise Mismatch(f"{epoch}: a reset must change the epoch")
        epoch += " (no STATUS: the host detects resets by the topology)"
    sess.dev.configure(sess.topo)
    gp1, gm1, _ = sess.read_avg(tile)
    d = float(max(np.abs(gp1 - gp0).max(), np.abs(gm1 - gm0).max()))
    allowed = 0.02 * sess.g_range + 6 * sess.sigma_g
    got = f"{epoch}; topology cleared; conductances moved {d:.3g} S (allowed {allowed:.3g})"
    if d > allowed:
        raise Mismatch(got + ": conductances must survive a reset")
    return got


def _safe(sess: Session, sent: list[str]) -> str:
    sent.append("safe_state(), status()")
    sess.dev.safe_state()
    status = sess.dev.status()
    return f"done; status {status}"


def _safety(sess: Session, sent: list[str]) -> str:
    sent.append("safety()")
    s = sess.dev.safety()
    if s.violations != 0:
        raise Mismatch(f"violations {s.violations}")
    return f"refused {s.refused}, violations 0"
