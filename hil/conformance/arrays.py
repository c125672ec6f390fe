"""Writing and reading conductances: program (with and without verify), read, pulse."""

from __future__ import annotations

import math

import numpy as np

from drivers.base import ProgramReport
from hil.conformance.report import Mismatch
from hil.conformance.session import (
    RANGE_MARGIN,
    VERIFY_FRACTION,
    VERIFY_ITERS,
    WRITE_ALLOWANCE,
    Session,
    desc,
    expect_array,
)


def program(sess: Session) -> None:
    for c in sess.topo.couplings:
        tile = c.tile
        gp, gm = sess.targets(c)
        sess.run(
            f"program {tile}",
            "G+/G- read back after programming, tile shape, f4; iterations 0 without verify",
            lambda sent, t=tile, a=gp, b=gm: _program(sess, sent, t, a, b, verify=False),
        )
        if "program_verify" in sess.caps:
            sess.run(
                f"program verify {tile}",
                "verify iterates until |G - target| <= tol (default 2 % of g_max - g_min)",
                lambda sent, t=tile, a=gp, b=gm: _program(sess, sent, t, a, b, verify=True),
            )
    if "program_verify" not in sess.caps:
        tile = sess.topo.couplings[0].tile
        g = np.full(sess.topo.tile_shape(tile), sess.lim.g_min, np.float32)
        sess.skip("program_verify", "program verify", lambda: sess.dev.program(tile, g, g, verify=True))


def _program(
    sess: Session, sent: list[str], tile: str, gp: np.ndarray, gm: np.ndarray, *, verify: bool
) -> str:
    # the verified writes' round budget, within what the board declares (a board may allow fewer)
    iters = min(VERIFY_ITERS, sess.lim.max_verify_iters)
    sent.append(f"{tile} G+ {desc(gp)}, G- {desc(gm)}, verify={verify}, max_iters={iters}")
    rep = sess.own_program(tile, gp, gm, verify=verify, max_iters=iters)
    if not isinstance(rep, ProgramReport) or rep.tile != tile:
        raise Mismatch(f"report {rep!r} is not a ProgramReport for {tile!r}")
    shape = gp.shape
    expect_array("report g_plus", rep.g_plus, shape)
    expect_array("report g_minus", rep.g_minus, shape)
    if not verify and rep.iterations != 0:
        raise Mismatch(f"iterations {rep.iterations} without verify (expected 0)")
    if rep.pulses < 0 or not 0 <= rep.within_tol <= 1 or rep.energy_j < 0 or rep.time_s < 0:
        raise Mismatch(f"report fields out of range: {rep}")
    target = np.stack([gp, gm]).astype(np.float64)
    back = np.stack([rep.g_plus, rep.g_minus]).astype(np.float64)
    err = np.abs(back - target)
    if verify:
        _, _, sigma = sess.read_avg(tile)
        tol = 0.02 * sess.g_range + 3 * sigma
        within = float((err <= tol).mean())
        got = (
            f"{within:.1%} of devices within tol {tol:.3g} S (2 % of range + 3 sigma read noise); "
            f"{rep.iterations} of max {iters} iterations, report within_tol {rep.within_tol:.1%}, "
            f"{rep.pulses} pulses"
        )
        if rep.iterations > iters:
            raise Mismatch(got + ": more iterations than max_iters")
        # A board may run out of iterations (one-sided devices, stuck ones); then its report
        # must say that not every device made it.
        if within < VERIFY_FRACTION and not (rep.iterations == iters and rep.within_tol < 1):
            raise Mismatch(got + f": < {VERIFY_FRACTION:.0%} within tol before max_iters")
        return got
    mean_err = float(err.mean())
    got = (
        f"read-back {desc(rep.g_plus)}, mean |G - target| {mean_err / sess.g_range:.2%} of range "
        f"(allowed {WRITE_ALLOWANCE:.0%})"
    )
    if mean_err > WRITE_ALLOWANCE * sess.g_range:
        raise Mismatch(got)
    return got


def read_conductance(sess: Session) -> None:
    for tile in (c.tile for c in sess.topo.couplings):
        sess.run(
            f"read_conductance {tile}",
            "one noisy read of (G+, G-) in siemens, tile shape, f4, within [g_min, g_max]",
            lambda sent, t=tile: _read(sess, sent, t),
        )


def _read(sess: Session, sent: list[str], tile: str) -> str:
    sent.append(f"TILE:COND? {tile!r} x {sess.opt.reads}")
    shape = sess.topo.tile_shape(tile)
    for name, a in zip(("G+", "G-"), sess.own_read(tile), strict=True):
        expect_array(name, a, shape)
        margin = RANGE_MARGIN * sess.g_range
        if a.min() < sess.lim.g_min - margin or a.max() > sess.lim.g_max + margin:
            raise Mismatch(f"{name} {desc(a)} outside [g_min, g_max] +- {RANGE_MARGIN:.0%} of the range")
    gp, gm, sigma = sess.read_avg(tile)
    sess.g[tile] = (gp, gm)
    sess.sigma_g = max(sess.sigma_g, sigma)
    return f"{desc(gp.astype(np.float32))}, read noise {sigma:.3g} S ({sigma / sess.g_range:.2%} of range)"


def pulse(sess: Session) -> None:
    tile = sess.topo.couplings[-1].tile
    shape = sess.topo.tile_shape(tile)
    if "pulse" not in sess.caps:
        z = np.zeros(shape, np.int32)
        sess.skip("pulse", "pulse", lambda: sess.dev.pulse(tile, z, z))
        return
    n = min(sess.opt.pulses, sess.lim.max_pulses)
    mid = np.full(shape, sess.lim.g_min + 0.5 * sess.g_range, np.float32)
    spec = "signed counts per device: positive potentiates (G up), negative depresses, zero leaves G"
    ok = sess.run(
        "pulse setup",
        "program to mid-range (verify if declared) before pulsing",
        lambda sent: _program_mid(sess, sent, tile, mid),
    )
    if not ok and "pulse setup" not in sess.not_run:
        return
    # pulse setup SKIPPED (its program over the declared line-current limit): these SKIP naming it
    for name, sign in (("pulse +", 1), ("pulse -", -1), ("pulse 0", 0)):
        sess.run(name, spec, lambda sent, s=sign: _pulse(sess, sent, tile, s * n))


def _program_mid(sess: Session, sent: list[str], tile: str, mid: np.ndarray) -> str:
    sent.append(f"{tile} G+ = G- = {float(mid.flat[0]):.3g} S")
    rep = sess.own_program(tile, mid, mid, verify="program_verify" in sess.caps)
    return f"residual_max {rep.residual_max:.3g} S"


def _pulse(sess: Session, sent: list[str], tile: str, count: int) -> str:
    sess.needs("pulse setup")
    shape = sess.topo.tile_shape(tile)
    cp = np.full(shape, count, np.int32)
    sent.append(f"{tile} counts+ {count}, counts- {-count} on every device")
    gp0, gm0, _ = sess.read_avg(tile)
    rep = sess.dev.pulse(tile, cp, -cp)
    total = 2 * abs(count) * cp.size
    if rep.tile != tile or not 0 <= rep.pulses <= total or rep.energy_j < 0 or rep.time_s < 0:
        raise Mismatch(f"report {rep} (pulses must be within 0..{total})")
    gp1, gm1, _ = sess.read_avg(tile)
    dp, dm = float((gp1 - gp0).mean()), float((gm1 - gm0).mean())
    noise = 4 * sess.sigma_g * math.sqrt(2.0 / (sess.opt.reads * cp.size))
    got = (
        f"mean dG+ {dp / sess.g_range:+.3%}, dG- {dm / sess.g_range:+.3%} of range "
        f"(noise bound {noise / sess.g_range:.3%}); {rep.pulses} pulses"
    )
    if count == 0:
        still = 0.01 * sess.g_range + noise  # 1 % of the range: drift between the reads
        if rep.pulses != 0 or abs(dp) > still or abs(dm) > still:
            within = f"{still / sess.g_range:.2%}"
            raise Mismatch(f"{got}; zero counts must leave G (within {within}) and apply no pulses")
        return got
    up, down = (dp, dm) if count > 0 else (dm, dp)
    if not (up > noise and down < -noise):
        raise Mismatch(got + ": positive counts must raise G, negative lower it")
    return got
