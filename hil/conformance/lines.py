"""The line-current limit (`Limits.max_line_current_a`), checked on the board past the host's
own check (`RemoteDevice.send_unchecked`): on a tile programmed so that one line (the column
of an R x 1 tile, or the row of a 1 x C tile driven transposed) carries more than the limit at
inputs within the voltage limit, an mvm is error -222, counted in the board's `refused`,
with `violations` unchanged and the tile unchanged; one just under the limit runs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from drivers.base import Limits
from drivers.errors import DeviceError, LimitViolation
from drivers.topology import Coupling, Topology
from drivers.wire import payload as pl
from hil.conformance.framed import Send
from hil.conformance.report import Check, Mismatch
from hil.conformance.session import Session, desc

TILE = "L0"
NAME = "line current limit"
MAX_LINE = 1 << 16  # devices on the line at most (a board whose limit needs more is SKIPPED)
OVER = 1.2  # the line's current at x = clamp_max, as a multiple of the limit (where the tile allows)
UNDER = 0.9  # the request "just under": this fraction of the limit, from the conductances read back
JUST_OVER = 0.01  # the request "just over": this much over the limit at least (more where reads are noisy)
SATURATION = (
    "an output past the read-out's range saturates at its rail, never an error (docs/protocol.md section 2, "
    "TILE:MVM?)"
)
RULE = (
    'docs/protocol.md section 1, "Limits", Line currents: G+ and G- are two crossbars; a driven line '
    "carries V_i sum_j G_ij, a sensed line sum_i V_i G_ij (V_i = |x_i| v_read, float64); a request over "
    "max_line_current_a is error -222, counted in refused, nothing driven, nothing changed; equal passes"
)


@dataclass(frozen=True)
class LineTile:
    rows: int
    cols: int
    g: float  # every device of G+ (G- at g_min)
    transpose: bool  # drive the columns (a 1 x C tile: its one row is the sensed line)

    @property
    def n(self) -> int:
        return self.cols if self.transpose else self.rows

    def line(self) -> str:
        return (
            f"row 0 (sensed, {self.cols} columns driven)"
            if self.transpose
            else f"column 0 (sensed, {self.rows} rows driven)"
        )


def line_tile(lim: Limits) -> LineTile | str:
    """A tile within `lim` whose one sensed line carries more than the limit at x = clamp_max
    on every input line (`OVER` times it where the tile allows), or why there is none. An
    R x 1 tile first (a read drives one row: one device); else a 1 x C tile read transposed,
    its devices low enough that a read of its row at v_read stays within the limit."""
    limit = lim.max_line_current_a
    v_max = float(np.float32(lim.clamp_max)) * lim.v_read  # the largest input line voltage
    per = lim.g_max * v_max  # one device at g_max on a line at v_max
    need = math.floor(limit / per) + 1  # the fewest devices whose line exceeds the limit
    want = max(need, math.ceil(OVER * limit / per))
    if need <= min(lim.tile_rows_max, MAX_LINE):
        return LineTile(min(want, lim.tile_rows_max, MAX_LINE), 1, lim.g_max, False)
    n = min(lim.tile_cols_max, MAX_LINE)
    g = min(lim.g_max, 0.95 * limit / (lim.v_read * n))  # a read of the row: 95 % of the limit
    if n * g * v_max > limit and g >= lim.g_min:
        return LineTile(1, n, float(np.float32(g)), True)
    largest = max(min(lim.tile_rows_max, MAX_LINE), min(lim.tile_cols_max, MAX_LINE))
    return (
        f"no tile within the limits can exceed max_line_current_a {limit:g} A: the longest line, "
        f"{largest} devices at g_max {lim.g_max:g} S driven at clamp_max x v_read = {v_max:g} V, carries "
        f"{largest * per:.4g} A (of a 1 x C tile, {n} devices low enough to be read at v_read)"
    )


def checks(sess: Session) -> None:
    send = getattr(sess.dev, "send_unchecked", None)
    if not callable(send):  # in-process: no wire past the host's checks
        return
    spec = (
        f"an mvm whose line would carry more than max_line_current_a (at x <= clamp_max) is refused on "
        f"the board: -222, refused + 1, violations unchanged, the tile unchanged; {JUST_OVER:.0%} over the "
        f"limit too (no slack); at {UNDER:.0%} of the limit it runs ({RULE})"
    )
    limit = sess.lim.max_line_current_a
    if not math.isfinite(limit):
        reason = "max_line_current_a not declared (absent from the device info): no line-current limit"
        sess.add(Check(NAME, "SKIP", "-", "-", reason))
        return
    if "mvm" not in sess.caps:
        sess.add(Check(NAME, "SKIP", "-", "-", "'mvm' not in the declared capabilities"))
        return
    plan = line_tile(sess.lim)
    if isinstance(plan, str):
        sess.add(Check(NAME, "SKIP", "-", "-", plan))
        return
    sess.probe(NAME, spec, lambda sent: _line(sess, sent, send, plan))


def _line(sess: Session, sent: list[str], send: Send, t: LineTile) -> str:
    gain, w_max = sess.lim.unit_scales
    topo = Topology(
        {"l0": t.rows, "l1": t.cols},
        (Coupling(TILE, ("l0",), ("l1",), w_max=w_max),),
        budget=sess.topo.budget,
        gain=gain,
    )
    with sess.configured(topo):
        return _over_and_under(sess, sent, send, t)


def _read(sess: Session, send: Send, t: LineTile) -> np.ndarray:
    """`reads` unchecked reads of the tile averaged, (2, rows, cols) float64 (the host's own
    bound, every device at g_max, could refuse reading a long row that the board reads)."""
    request = pl.Message({"tile": TILE})
    reads = [pl.conductances(send(pl.Op.READ_CONDUCTANCE, request), (t.rows, t.cols), sess.lim)]
    reads += [
        pl.conductances(send(pl.Op.READ_CONDUCTANCE, request), (t.rows, t.cols), sess.lim)
        for _ in range(sess.opt.reads - 1)
    ]
    return np.mean([np.stack(r).astype(np.float64) for r in reads], axis=0)


def _mvm(send: Send, x: np.ndarray, t: LineTile) -> np.ndarray:
    return pl.mvm_result(
        send(pl.Op.MVM, pl.mvm_request(TILE, x, t.transpose)), 1, t.rows if t.transpose else t.cols
    )


def _over_and_under(sess: Session, sent: list[str], send: Send, t: LineTile) -> str:
    lim, limit = sess.lim, sess.lim.max_line_current_a
    gp = np.full((t.rows, t.cols), t.g, np.float32)
    gm = np.full((t.rows, t.cols), lim.g_min, np.float32)
    sent.append(f"{TILE} {t.rows} x {t.cols}: G+ = {t.g:.4g} S, G- = g_min; read x {sess.opt.reads}")
    send(pl.Op.PROGRAM, pl.program_request(TILE, gp, gm, False, None, 1))
    held = _read(sess, send, t)
    # the sensed line's current per volt on each array (G+ and G- each their own crossbar)
    sums = held.sum(axis=(1, 2))
    per_volt = float(sums.max())
    x_max = np.float32(lim.clamp_max)
    over = float(x_max) * lim.v_read * per_volt
    if not over > 1.02 * limit:
        raise Mismatch(
            f"the tile reads a line sum of {per_volt:.4g} S (programmed {t.n} x {t.g:.4g} S): at x = "
            f"clamp_max its line carries {over:.4g} A, not over max_line_current_a {limit:g} A; the program "
            "did not take"
        )
    x = np.full((1, t.n), x_max, np.float32)
    sent.append(
        f"mvm x = clamp_max {float(x_max):.4g} on all {t.n} input lines (transpose={t.transpose}): "
        f"{t.line()} ~{over:.4g} A > {limit:g} A"
    )
    before = sess.dev.safety()
    try:
        y = _mvm(send, x, t)
    except LimitViolation as exc:
        got = f"LimitViolation: {exc}"
    except DeviceError as exc:
        raise Mismatch(
            f"refused as {type(exc).__name__} ({exc}), not error -222 (LimitViolation): {t.line()} would "
            f"carry {over:.4g} A > max_line_current_a {limit:g} A; {RULE}"
        ) from exc
    else:
        raise Mismatch(
            f"the board ran the mvm (y {desc(y)}) although {t.line()} carries {over:.4g} A at x = "
            f"clamp_max, over its declared max_line_current_a {limit:g} A: it does not enforce the limit it "
            f"declares; {RULE}"
        )
    after = sess.dev.safety()
    counts = (
        f"refused {before.refused} -> {after.refused}, violations {before.violations} -> {after.violations}"
    )
    if after.refused != before.refused + 1 or after.violations != before.violations:
        raise Mismatch(
            f"{got}; {counts}: the board must count its refusal (+1) and drive nothing (violations "
            f"unchanged); {RULE}"
        )
    again = _read(sess, send, t)
    margin = 6.0 * sess.sigma_g + 1e-3 * sess.g_range
    moved = float(np.abs(again - held).max())
    if moved > margin:
        raise Mismatch(
            f"{got}; {counts}; the tile moved by up to {moved:.4g} S (allowed {margin:.3g}): nothing may "
            f"change; {RULE}"
        )
    got += _just_over(sess, sent, send, t, per_volt, held)
    x_under = np.float32(UNDER * limit / (lim.v_read * per_volt))
    under = float(x_under) * lim.v_read * per_volt
    xu = np.full((1, t.n), x_under, np.float32)
    sent.append(f"mvm x = {float(x_under):.4g}: ~{under:.4g} A ({UNDER:.0%} of the limit)")
    try:
        yu = _mvm(send, xu, t)
    except DeviceError as exc:
        # the product (every input x_under): past most read-outs' rails
        w_max = sess.lim.unit_scales[1]
        y_expected = w_max * float(x_under) * float(held[0].sum() - held[1].sum()) / sess.g_range
        saturates = "" if isinstance(exc, LimitViolation) else f" ({SATURATION}: about {y_expected:.4g} here)"
        raise Mismatch(
            f"{got}; {counts}; then a request at {UNDER:.0%} of the limit ({under:.4g} A <= {limit:g} A) was "
            f"refused ({type(exc).__name__}: {exc}): a board must run what is within its limit{saturates}; "
            f"{RULE}"
        ) from exc
    return f"{got}; {counts}; the tile unchanged (within {margin:.3g} S); at {under:.4g} A y {desc(yu)}"


def _just_over(
    sess: Session, sent: list[str], send: Send, t: LineTile, per_volt: float, held: np.ndarray
) -> str:
    """A request `JUST_OVER` past the limit (or 6 sigma of the line sum read back, if more) must be
    refused too: a board that enforces the limit with a slack (a "margin" added the wrong way)
    refuses the request at `OVER` and runs this one."""
    lim, limit = sess.lim, sess.lim.max_line_current_a
    sigma = sess.sigma_g * math.sqrt(held[0].size / sess.opt.reads)  # of one array's line sum, averaged
    excess = max(JUST_OVER, 6.0 * sigma / per_volt)
    x_just = np.float32((1.0 + excess) * limit / (lim.v_read * per_volt))
    just = float(x_just) * lim.v_read * per_volt
    if not x_just < np.float32(lim.clamp_max):
        return "; no request just over the limit (it needs x = clamp_max, sent above)"
    sent.append(f"mvm x = {float(x_just):.6g}: ~{just:.6g} A ({just / limit - 1:+.2%} over the limit)")
    before = sess.dev.safety()
    try:
        y = _mvm(send, np.full((1, t.n), x_just, np.float32), t)
    except LimitViolation as exc:
        after = sess.dev.safety()
        if after.refused != before.refused + 1:
            raise Mismatch(
                f"a request {just / limit - 1:.2%} over the limit was refused ({exc}) but refused went "
                f"{before.refused} -> {after.refused}; {RULE}"
            ) from exc
        return f"; {just / limit - 1:.2%} over: refused too"
    raise Mismatch(
        f"refused at x = clamp_max, but ran (y {desc(y)}) at x = {float(x_just):.6g}, where {t.line()} "
        f"carries {just:.6g} A, {just / limit - 1:.2%} over max_line_current_a {limit:g} A: the board "
        f"enforces the limit with a slack; {RULE}"
    )
