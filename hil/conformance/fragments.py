"""Messages longer than one frame (framed link) or than the test network's blocks (SCPI).

The test network's messages are a few hundred bytes, so a framed board that takes each frame
as a whole message, or that never acknowledges a frame and leaves its reply to stand in for
the ACK, passes every other check and fails on the first program of a real tile. This check
configures a tile whose G+/G- pair is larger than one fragment (32768 bytes,
docs/protocol.md section 3), programs it and reads it back, and runs an mvm whose input and
reply each exceed one fragment. Over SCPI the same requests carry definite-length blocks of
five length digits (`#5...`), which the test network's blocks (`#3`) do not reach."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from drivers.base import Limits
from drivers.errors import DeviceError, DeviceFault, DeviceTimeout, RetriesExhausted
from drivers.topology import Coupling, Topology
from drivers.wire import frames
from drivers.wire import payload as pl
from hil.conformance.mvm import mvm_tolerance
from hil.conformance.report import Check, Mismatch
from hil.conformance.session import WRITE_ALLOWANCE, Session, desc, expect_array

Send = Callable[[pl.Op, pl.Message], pl.Message]
FRAGMENT = frames.MAX_FRAGMENT  # payload bytes of one frame at most (docs/protocol.md section 3)
TILE = "F0"

RULES = (
    "docs/protocol.md section 3, Reliable delivery: a message over 32768 bytes goes as fragments, "
    "START on the first, MORE on all but the last, each acknowledged before the next is sent "
    "(rule 4), and the receiver of a valid data frame sends ACK(seq) at once (rule 1)"
)
SCPI_RULES = (
    "docs/protocol.md section 2: parameters may be definite-length blocks #<d><length><bytes> of "
    "any length up to the 16 MiB input cap"
)


def tile_shape(lim: Limits) -> tuple[int, int] | None:
    """A tile shape within the limits whose G+/G- pair of float32 is over one fragment (65 x 64
    where it fits), or None when no tile the board takes is that large."""
    need = FRAGMENT // 8 + 1  # devices: 8 bytes (G+ and G-) each
    cols = min(lim.tile_cols_max, 64)
    rows = -(-need // cols)
    if rows > lim.tile_rows_max:
        rows = lim.tile_rows_max
        cols = -(-need // rows)
        if cols > lim.tile_cols_max:
            return None
    return rows, cols


def checks(sess: Session) -> None:
    send = getattr(sess.dev, "send_unchecked", None)
    if not callable(send):  # in-process: no wire
        return
    scpi = sess.report.uri.lower().startswith("visa://")
    name = "scpi large blocks" if scpi else "fragmented messages"
    what = "definite-length blocks of over 32768 bytes" if scpi else "messages of several fragments"
    spec = (
        f"{what}: a tile whose G+/G- pair exceeds 32768 bytes is programmed and read back, and an "
        f"mvm whose input and reply each exceed 32768 bytes is x @ W ({SCPI_RULES if scpi else RULES})"
    )
    shape = tile_shape(sess.lim)
    if shape is None:
        lim = sess.lim
        sess.add(
            Check(
                name,
                "SKIP",
                "-",
                "-",
                f"the board's largest tile, {lim.tile_rows_max} x {lim.tile_cols_max}, holds a G+/G- pair "
                f"of {8 * lim.tile_rows_max * lim.tile_cols_max} bytes: no message needs more than one "
                "fragment",
            )
        )
        return
    sess.run(name, spec, lambda sent: _large(sess, sent, send, shape, scpi))


def _fragments(n: int, scpi: bool) -> str:
    """A message of `n` bytes on the link: its frames, or (SCPI) its arrays' block."""
    return f"a block of about {n} bytes" if scpi else f"{n} bytes, {-(-n // FRAGMENT)} fragments"


def _failed(exc: DeviceError, what: str, scpi: bool) -> Mismatch:
    """What a board that fails a large request did wrong."""
    cause = exc.__cause__ if isinstance(exc, RetriesExhausted) else exc
    if scpi:
        return Mismatch(f"{what} failed: {type(exc).__name__}: {exc}; {SCPI_RULES}")
    if isinstance(cause, DeviceTimeout) and "dropped as stale" in str(cause):
        return Mismatch(
            f"{what}: the board acknowledged the request, but its reply was dropped as stale "
            f"({type(exc).__name__}: {exc}): a response's ref must be the low byte of the seq of the "
            f"request's first fragment, and the board's is not (it passes every one-frame request, where "
            f"first and last are one frame); {RULES}, and rule 5"
        )
    if isinstance(cause, DeviceTimeout):
        return Mismatch(
            f"{what}: no acknowledgement of its first fragment ({type(exc).__name__}: {exc}): the board "
            "does not ACK every data frame at once, so the host cannot send the next fragment (a board "
            f"that leaves its reply to stand in for the ACK fails every request over one frame); {RULES}"
        )
    if isinstance(exc, DeviceFault):
        return Mismatch(
            f"{what}: refused as {type(exc).__name__}: {exc}: the board decoded one fragment as a whole "
            f"message instead of reassembling the fragments up to the one without MORE; {RULES}"
        )
    return Mismatch(f"{what} failed: {type(exc).__name__}: {exc}; {RULES}")


def _large(sess: Session, sent: list[str], send: Send, shape: tuple[int, int], scpi: bool) -> str:
    rows, cols = shape
    gain, w_max = sess.lim.unit_scales
    coupling = Coupling(TILE, ("f0",), ("f1",), w_max=w_max)
    topo = Topology({"f0": rows, "f1": cols}, (coupling,), budget=sess.topo.budget, gain=gain)
    mid = sess.lim.g_min + 0.5 * sess.g_range
    half = 0.5 * sess.rng.uniform(-0.8, 0.8, shape) * sess.g_range
    gp, gm = (mid + half).astype(np.float32), (mid - half).astype(np.float32)
    request = pl.program_request(TILE, gp, gm, False, None, 1)
    size = len(pl.pack(request))
    reads = f"read_conductance x {sess.opt.reads}"
    sent.append(f"{TILE} {rows} x {cols}: program ({_fragments(size, scpi)}), {reads}")
    with sess.configured(topo):
        return _program_read_mvm(sess, sent, send, topo, request, size, scpi)


def _program_read_mvm(
    sess: Session, sent: list[str], send: Send, topo: Topology, request: pl.Message, size: int, scpi: bool
) -> str:
    gp, gm = request.arrays["g_plus"], request.arrays["g_minus"]
    rows, cols = gp.shape
    sess.program_lines_within(TILE, gp, gm)
    try:
        reply = send(pl.Op.PROGRAM, request)
    except DeviceError as exc:
        raise _failed(exc, f"program {TILE} ({_fragments(size, scpi)})", scpi) from exc
    rep = pl.program_report(reply, TILE, (rows, cols), sess.lim)
    target = np.stack([gp, gm]).astype(np.float64)
    back_err = float(np.abs(np.stack([rep.g_plus, rep.g_minus]) - target).mean())
    read = sess.dev.read_conductance(TILE)
    for name, a in zip(("G+", "G-"), read, strict=True):
        expect_array(f"read {name}", a, (rows, cols))
    read_err = float(np.abs(np.stack(read).astype(np.float64) - target).mean())
    r = sess.g_range
    got = (
        f"mean |G - target| {back_err / r:.2%} of range in the program reply, {read_err / r:.2%} read back "
        f"(allowed {WRITE_ALLOWANCE:.0%})"
    )
    if max(back_err, read_err) > WRITE_ALLOWANCE * r:
        raise Mismatch(f"{got}: the tile does not hold the targets sent (bytes lost or misplaced)")
    batch = FRAGMENT // (4 * min(rows, cols)) + 1  # x (batch x rows) and y (batch x cols) over a fragment
    if "mvm" not in sess.caps:
        return f"{got}; no mvm (not declared)"
    if batch > sess.lim.max_batch:
        return f"{got}; no mvm: a batch of {batch} is needed, max_batch is {sess.lim.max_batch}"
    gp_avg, gm_avg, _ = sess.read_avg(TILE)
    w = sess.lim.unit_scales[1] * (gp_avg - gm_avg) / r
    # inputs scaled to the test network's 6 rows: the products stay within the range of the
    # main mvm check (an mvm ADC clips outputs of a whole 65-row tile at full inputs)
    x = (sess.inputs((batch, rows)) * min(1.0, 6.0 / rows)).astype(np.float32)
    sess.mvm_lines_within(topo, TILE, x, False)
    mvm = pl.mvm_request(TILE, x, False)
    sent.append(
        f"mvm x {desc(x)} ({_fragments(len(pl.pack(mvm)), scpi)}; y {_fragments(4 * batch * cols, scpi)}) "
        f"x {sess.opt.repeats}"
    )
    ys = []
    for _ in range(max(2, sess.opt.repeats)):
        try:
            ys.append(pl.mvm_result(send(pl.Op.MVM, mvm), batch, cols))
        except DeviceError as exc:
            raise _failed(exc, f"mvm of a {batch} x {rows} input", scpi) from exc
    stack = np.stack(ys).astype(np.float64)
    ref = x.astype(np.float64) @ w
    tol, how, _ = mvm_tolerance(sess, 1.0, x, w, stack)
    err = np.abs(stack.mean(0) - ref)
    got += f"; y {desc(ys[0])}, max |y - x @ W| {float(err.max()):.3g}, {how}"
    if float((err - tol).max()) > 0:
        i = np.unravel_index(int(np.argmax(err - tol)), err.shape)
        raise Mismatch(f"{got}; y{list(map(int, i))} = {stack.mean(0)[i]:.4g}, x @ W = {ref[i]:.4g}")
    return got
