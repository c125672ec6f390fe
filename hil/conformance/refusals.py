"""What a board must refuse: unknown tiles, wrong shapes, requests beyond its limits."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np

from drivers.errors import ConfigurationError, LimitViolation
from hil.conformance.report import Mismatch
from hil.conformance.session import Session, desc, expect_array


def errors(sess: Session) -> None:
    tile = sess.topo.couplings[0].tile
    shape = sess.topo.tile_shape(tile)
    sess.run(
        "unknown tile",
        "unknown tile: error 100, ConfigurationError",
        lambda sent: _refuses(
            sess,
            sent,
            ConfigurationError,
            "read_conductance('no-such-tile')",
            lambda: sess.dev.read_conductance("no-such-tile"),
        ),
    )
    sess.run(
        "bad shape",
        "an array that does not fit the tile: error 100, ConfigurationError",
        lambda sent: _refuses(
            sess,
            sent,
            ConfigurationError,
            f"program {tile} with a {shape[0] + 1} x {shape[1]} target",
            lambda: sess.dev.program(
                tile, *(np.full((shape[0] + 1, shape[1]), sess.lim.g_min, np.float32),) * 2
            ),
        ),
    )
    sess.run(
        "limit conductance",
        "targets outside [g_min, g_max] are refused before anything is sent (LimitViolation)",
        lambda sent: _limit(
            sess,
            sent,
            f"program {tile} G+ = g_max + 50 % of the range",
            lambda: sess.dev.program(
                tile,
                np.full(shape, sess.lim.g_max + 0.5 * sess.g_range, np.float32),
                np.full(shape, sess.lim.g_min, np.float32),
            ),
        ),
    )
    big = np.float32(2 * sess.lim.clamp_max)
    if "mvm" in sess.caps:
        sess.run(
            "limit mvm input",
            "inputs beyond clamp_max (x * v_read <= v_read_max) are refused (LimitViolation)",
            lambda sent: _limit(
                sess,
                sent,
                f"mvm x = 2 clamp_max = {big:.3g}",
                lambda: sess.dev.mvm(tile, np.full((1, shape[0]), big)),
            ),
        )
        over = sess.lim.max_batch + 1
        sess.run(
            "limit batch",
            "a batch over max_batch is refused (LimitViolation): a request's work is bounded",
            lambda sent: _limit(
                sess,
                sent,
                f"mvm with a batch of max_batch + 1 = {over}",
                lambda: sess.dev.mvm(tile, np.zeros((over, shape[0]), np.float32)),
            ),
        )
    if "settle" in sess.caps:
        g0, n0 = next(iter(sess.topo.groups.items()))
        sess.run(
            "limit clamp",
            "clamps beyond clamp_max (x * v_read <= v_read_max) are refused (LimitViolation)",
            lambda sent: _limit(
                sess,
                sent,
                f"settle clamp = 2 clamp_max = {big:.3g}",
                lambda: sess.dev.settle({g0: np.full((1, n0), big)}),
            ),
        )
    sess.run(
        "error queue",
        "after an error the queue is drained: the next operation succeeds",
        lambda sent: _after_error(sess, sent, tile),
    )


def _refuses(
    sess: Session, sent: list[str], kind: type[Exception], what: str, call: Callable[[], object]
) -> str:
    sent.append(what)
    try:
        call()
    except kind as exc:
        return f"{type(exc).__name__}: {exc}"
    raise Mismatch(f"no {kind.__name__}: the board accepted it")


def _limit(sess: Session, sent: list[str], what: str, call: Callable[[], object]) -> str:
    before = sess.dev.safety()
    got = _refuses(sess, sent, LimitViolation, what, call)
    after = sess.dev.safety()
    if after.refused != before.refused + 1:
        raise Mismatch(f"{got}; safety().refused {before.refused} -> {after.refused}, expected +1")
    if after.violations != 0:
        raise Mismatch(f"{got}; safety().violations {after.violations}, must stay 0")
    return f"{got}; refused {before.refused} -> {after.refused}, violations 0"


def _after_error(sess: Session, sent: list[str], tile: str) -> str:
    sent.append(f"read_conductance('no-such-tile'), then read_conductance({tile!r})")
    with contextlib.suppress(ConfigurationError):
        sess.dev.read_conductance("no-such-tile")
    gp, _ = sess.dev.read_conductance(tile)
    expect_array("G+", gp, sess.topo.tile_shape(tile))
    return f"next read {desc(gp)}"
