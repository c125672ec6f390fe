"""Board-side checks over raw SCPI (`visa://` boards only): the host drivers check every request
before sending it, so only raw commands show whether the board itself queues its errors,
checks its limits again ("a host may be buggy") and refuses what it does not declare."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import numpy as np

from drivers.errors import ProtocolError
from drivers.wire import scpi
from hil.conformance.report import Mismatch
from hil.conformance.session import Session

Query = Callable[[str], str]
EMPTY_BLOCK = "#10"  # the reply of a block query that failed (docs/protocol.md, section 2)


def checks(sess: Session) -> None:
    query = getattr(sess.dev, "query_unchecked", None)  # raw text, the host checks skipped
    if not (callable(query) and sess.report.uri.lower().startswith("visa://")):
        return
    tile = sess.topo.couplings[0].tile
    sess.run(
        "scpi error queue",
        'a failed query answers #10 and queues its error: SYST:ERR? gives 100,... then 0,"No error"',
        lambda sent: _queue(sent, query),
    )
    sess.probe(
        "scpi board conductance limit",
        "the board checks program targets again: above g_max is -222 in the queue, its own refused + 1, "
        "violations 0, the tile unchanged",
        lambda sent: _board_conductance_limit(sess, sent, query, tile),
    )
    if "mvm" in sess.caps:
        sess.probe(
            "scpi board limit",
            "the board checks limits again: -222 in the queue, its own refused + 1, violations 0",
            lambda sent: _board_limit(sess, sent, query, tile),
        )
    else:
        sess.run(
            "scpi undeclared mvm",
            "an undeclared capability is error 101 on the board too",
            lambda sent: _expect_error(sent, query, _mvm_command(sess, tile, 0.0), "101"),
        )
    sess.probe(
        "scpi wait limit",
        "the board checks a wait again: SYST:WAIT NAN is refused (-224 or -222), one float64 step past "
        "max_wait_s is -222 in the queue, its own refused + 1",
        lambda sent: _wait_limit(sess, sent, query),
    )
    if "settle" not in sess.caps:  # the host driver refuses it first: only a raw one reaches the board
        sess.run(
            "scpi undeclared settle",
            "a settle on a board that does not declare it is error 101 on the board too",
            lambda sent: _expect_error(sent, query, _settle_command(), "101"),
        )


def _errors(query: Query) -> list[str]:
    """SYST:ERR? until 0 (at most 33: the queue holds 32)."""
    out = []
    for _ in range(33):
        text = str(query("SYST:ERR?")).strip()
        out.append(text)
        if text.startswith("0,"):
            break
    return out


def _queue(sent: list[str], query: Query) -> str:
    _errors(query)  # start from an empty queue
    return _expect_error(sent, query, 'TILE:COND? "no-such-tile"', "100")


def _expect_error(sent: list[str], query: Query, command: str, code: str) -> str:
    sent.append(f"{_short(command)}; SYST:ERR? until 0")
    try:
        reply = str(query(command)).strip()
    except (ProtocolError, UnicodeDecodeError) as exc:  # binary data: the board ran the request
        raise Mismatch(
            f"a reply that is not text ({type(exc).__name__}): the board ran the request; "
            f"expected {EMPTY_BLOCK} and error {code}"
        ) from exc
    errors = _errors(query)
    got = f"reply {reply!r}, SYST:ERR? {errors}"
    if reply != EMPTY_BLOCK:
        raise Mismatch(f"{got}: expected {EMPTY_BLOCK} (a failed block query) and error {code}")
    if len(errors) != 2 or not errors[0].startswith(f"{code},") or not errors[1].startswith("0,"):
        raise Mismatch(f'{got}: expected {code},"..." then 0,"No error"')
    return got


def _short(command: str) -> str:
    head, _, rest = command.partition("#")
    return head + (f"<block of {len(rest) - 1 - int(rest[0])} bytes>" if rest else "")


def _ascii_float(at_least: float) -> float:
    """The smallest odd power of 2 above `at_least` (..., 2**-15, ..., 0.5, 2, 8, 32, ...):
    its float32 bytes are all ASCII, so that a block of them can travel through a text query."""
    v = 2.0
    while v / 4.0 > at_least:
        v /= 4.0
    while v <= at_least:
        v *= 4.0
    return v


def text_block(values: np.ndarray) -> str:
    """`values` as an IEEE 488.2 block inside a text query: their bytes must all be ASCII
    (`_ascii_float` values, small counts)."""
    return scpi.block(values.tobytes()).decode("ascii")


# the smallest positive float32 whose bytes are all printable ASCII (0x20202020, about 1.3e-19):
# the harmless value of the lines and devices a probe does not drive past a limit
ASCII_TINY = float(np.frombuffer(b"    ", "<f4")[0])


def _ascii_float_within(lo: float, hi: float) -> float | None:
    """The smallest float32 in [lo, hi] whose bytes are all printable ASCII (None: none is)."""
    for b3 in range(0x20, 0x7F):
        for b2 in range(0x20, 0x7F):
            v = float(np.frombuffer(bytes((0x20, 0x20, b2, b3)), "<f4")[0])
            if lo <= v <= hi:
                return v
    return None


def _mvm_command(sess: Session, tile: str, value: float) -> str:
    """An mvm whose first input line is `value` and every other one `ASCII_TINY` (0 V, as near
    as a text block allows): a probe past a limit drives one line, not all."""
    rows, _ = sess.topo.tile_shape(tile)
    x = np.full(rows, ASCII_TINY, "<f4")
    x[0] = value
    return f'TILE:MVM? "{tile}",0,{text_block(x)}'


def _settle_command() -> str:
    """A settle request as the host's driver sends it, without arrays (a board that settles
    refuses it for its missing clamp; one that does not must refuse it as undeclared)."""
    spec = json.dumps({"trace": False, "beta": {}}).encode("ascii")
    return f"{scpi.short_form(scpi.SETTLE_Q)} {scpi.block(spec).decode('ascii')},{EMPTY_BLOCK}"


def _board_limit(sess: Session, sent: list[str], query: Query, tile: str) -> str:
    value = _ascii_float(sess.lim.clamp_max)
    return sess.counted_refusal(
        sent, value, lambda: _expect_error(sent, query, _mvm_command(sess, tile, value), "-222"),
        what=f"x[0] = {value:g} > clamp_max {sess.lim.clamp_max:.3g} (every other input {ASCII_TINY:.2g})",
    )  # fmt: skip


def _program_command(sess: Session, tile: str, value: float) -> str:
    """A plain program of G+ device (0, 0) of `tile` to `value` siemens and every other device
    to an ASCII value within the window (where there is one; else all to `value`), without a
    request id."""
    rows, cols = sess.topo.tile_shape(tile)
    inside = _ascii_float_within(sess.lim.g_min, sess.lim.g_max)
    g = np.full(2 * rows * cols, value if inside is None else inside, "<f4")
    g[0] = value
    return f'TILE:PROG? "{tile}",0,DEF,1,{text_block(g)}'


def _board_conductance_limit(sess: Session, sent: list[str], query: Query, tile: str) -> str:
    value = _ascii_float(sess.lim.g_max)
    got = sess.counted_refusal(
        sent, value, lambda: _expect_error(sent, query, _program_command(sess, tile, value), "-222"),
        what=f"G+[0, 0] = {value:g} S > g_max {sess.lim.g_max:.3g} S (every other device within the window)",
    )  # fmt: skip
    return got + sess.tile_within_window(tile)


def _expect_command_error(sent: list[str], query: Query, command: str, codes_: tuple[str, ...]) -> str:
    """`command` (no reply of its own) followed by ``SYST:ERR?`` in one message: its error is
    one of `codes_`, then the queue is empty."""
    _errors(query)  # start from an empty queue
    sent.append(f"{command};SYST:ERR?; SYST:ERR? until 0")
    first = str(query(f"{command};SYST:ERR?")).strip()
    rest = _errors(query)
    got = f"SYST:ERR? {[first, *rest]}"
    if not first.startswith(tuple(f"{c}," for c in codes_)) or not rest[-1].startswith("0,"):
        raise Mismatch(f'{got}: expected {" or ".join(codes_)} (the board refuses it), then 0,"No error"')
    return got


def _wait_limit(sess: Session, sent: list[str], query: Query) -> str:
    """`hil.conformance.framed._wait_limit` over SCPI: NaN, then one float64 step past max_wait_s
    (SCPI numbers are text: the float64 repr is what the board parses)."""
    nan = _expect_command_error(sent, query, "SYST:WAIT NAN", ("-224", "-222"))
    value = math.nextafter(sess.lim.max_wait_s, math.inf)
    got = sess.counted_refusal(
        sent, value, lambda: _expect_command_error(sent, query, f"SYST:WAIT {value!r}", ("-222",)),
        what=f"SYST:WAIT {value!r} > max_wait_s {sess.lim.max_wait_s!r} (one float64 step past it)",
    )  # fmt: skip
    return f"NAN: {nan}; {got}"
