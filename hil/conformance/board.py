"""Identity, limits, capabilities and configuration."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from drivers.base import CAPABILITIES, BoardStatus
from drivers.errors import ConfigurationError, DeviceError, LimitViolation
from drivers.topology import BIAS, Coupling, Topology
from drivers.wire import payload as pl
from drivers.wire.payload import LOCK_CAPABILITY
from hil.conformance.report import Mismatch
from hil.conformance.session import Session


def identity(sess: Session) -> None:
    def body(sent: list[str]) -> str:
        sent.append("*IDN? (info.identity)")
        ident = sess.info.identity
        fields = (ident.manufacturer, ident.model, ident.serial, ident.firmware)
        if not all(isinstance(f, str) and f.strip() for f in fields):
            raise Mismatch(f"fields {fields!r}: one is empty")
        if any("," in f for f in fields):
            raise Mismatch(f"fields {fields!r}: a field contains a comma")
        return ident.idn()

    sess.run("identity", "*IDN? -> manufacturer,model,serial,firmware, none empty (IEEE 488.2)", body)

    def limits(sent: list[str]) -> str:
        sent.append("SYST:INFO? (info.limits)")
        lim, bad = sess.lim, []
        peak = max(abs(lim.adc_range[0]), abs(lim.adc_range[1]))
        if not 0 < lim.v_read * peak <= lim.v_read_max:
            bad.append(
                f"the state range {lim.adc_range} at v_read {lim.v_read} V vs v_read_max {lim.v_read_max} V"
            )
        if not 0 <= lim.g_min < lim.g_max:
            bad.append(f"g_min {lim.g_min} >= g_max {lim.g_max} (or negative)")
        for name in ("dac_bits", "adc_bits"):
            bits = getattr(lim, name)
            if bits is not None and not (isinstance(bits, int) and 1 <= bits <= 64):
                bad.append(f"{name} {bits!r} (None or 1..64)")
        lo, hi = lim.adc_range
        if not lo < hi:
            bad.append(f"adc_range {lim.adc_range} is empty")
        for name in ("tile_rows_max", "tile_cols_max", "max_tiles", "max_settle_steps"):
            if not getattr(lim, name) >= 1:
                bad.append(f"{name} {getattr(lim, name)} < 1")
        least_pulses = 1 if "pulse" in sess.caps else 0  # a board that does not pulse may declare 0
        if not lim.max_pulses >= least_pulses:
            bad.append(f"max_pulses {lim.max_pulses} < {least_pulses}")
        if not lim.settle_step_s >= 0:
            bad.append(f"settle_step_s {lim.settle_step_s} < 0")
        if bad:
            raise Mismatch("; ".join(bad))
        return (
            f"G [{lim.g_min:.3g}, {lim.g_max:.3g}] S, v_read {lim.v_read} V (max {lim.v_read_max}), "
            f"DAC {lim.dac_bits} / ADC {lim.adc_bits} bits over {lim.adc_range}, tiles "
            f"{lim.max_tiles} x {lim.tile_rows_max}x{lim.tile_cols_max}"
        )

    sess.run(
        "limits",
        "g_min < g_max, sizes >= 1 (max_pulses >= 0 without pulse), bits None or 1..64, "
        "0 < v_read x the state range <= v_read_max",
        limits,
    )

    def capabilities(sent: list[str]) -> str:
        sent.append("SYST:INFO? (info.capabilities)")
        unknown = set(sess.caps) - {*CAPABILITIES, LOCK_CAPABILITY}
        if unknown:
            raise Mismatch(f"unknown names {sorted(unknown)}")
        return ",".join(sorted(sess.caps)) or "(none)"

    sess.run("capabilities", f"a subset of {', '.join((*CAPABILITIES, LOCK_CAPABILITY))}", capabilities)


def configure(sess: Session) -> bool:
    sess.run(
        "configure max_tiles",
        "a board holds as many tiles as its max_tiles declares: a chain of max_tiles 1-node layers "
        "(2 x 1 tiles) is configured and read back",
        lambda sent: _max_tiles(sess, sent),
    )

    sess.run(
        "configure largest tile",
        "a board takes a tile of tile_rows_max x tile_cols_max, the bias row counted (docs/protocol.md "
        "section 1, Topology: a tile within tile_rows_max x tile_cols_max; bias adds one row)",
        lambda sent: _largest_tile(sess, sent),
    )

    def body(sent: list[str]) -> str:
        t = sess.topo
        sent.append(
            f"layered {'-'.join(str(n) for n in t.groups.values())} (+bias), max_steps {t.budget.max_steps}"
        )
        sess.dev.configure(t)
        if sess.dev.topology != t:
            raise Mismatch(f"topology read back differs: {sess.dev.topology}")
        status = sess.dev.status()
        if not isinstance(status, BoardStatus) or not status.configured:
            raise Mismatch(f"status {status} after configure: configured should be True")
        return "topology read back equal; status configured"

    return sess.run("configure", "CONF:TOP sets the topology; CONF:TOP? returns it", body)


MAX_TILES_CHECKED = 4096  # a board declaring more is checked at this many tiles


def _max_tiles(sess: Session, sent: list[str]) -> str:
    """A board that declares more tiles than it has passes every other check (the test network
    needs two) and fails mid-training on a network of more tiles."""
    n = min(sess.lim.max_tiles, MAX_TILES_CHECKED)
    gain, w_max = sess.lim.unit_scales
    chain = Topology.layered([1] * (n + 1), budget=sess.topo.budget, gain=gain, w_max=w_max)
    sent.append(f"layered 1-1-...-1 ({n + 1} layers: {n} tiles of 2 x 1), then the test network")
    sess.configure_own(chain)
    back = sess.dev.topology
    if back != chain:
        tiles = "none" if back is None else len(back.couplings)
        raise Mismatch(f"the {n}-tile topology read back differs ({tiles} tiles)")
    of = "" if n == sess.lim.max_tiles else f" (of {sess.lim.max_tiles})"
    return f"{n} tiles configured and read back{of}"


def _largest_tile(sess: Session, sent: list[str]) -> str:
    """A board whose tile check is strict (`>=`) or counts the bias row twice refuses the largest
    tile it declares (-222), which a placement that fills the board asks for; nothing is
    programmed. A board without the converter channels for it (rows - 1 + cols, which no limit
    declares) refuses it as 100: SKIPPED (`Session.configure_own`)."""
    rows, cols = sess.lim.tile_rows_max, sess.lim.tile_cols_max
    sources = ("m0", BIAS) if rows > 1 else ("m0",)
    gain, w_max = sess.lim.unit_scales
    topo = Topology(
        {"m0": rows - len(sources) + 1, "m1": cols},
        (Coupling("W0", sources, ("m1",), w_max=w_max),),
        budget=sess.topo.budget,
        gain=gain,
    )
    sent.append(
        f"{rows - len(sources) + 1}-{cols}{' (+bias)' if rows > 1 else ''}: one tile of {rows} x {cols}"
    )
    try:
        sess.configure_own(topo)  # refused as 100 (a resource no limit declares): SKIPPED
    except LimitViolation as exc:
        raise Mismatch(
            f"refused ({type(exc).__name__}: {exc}): a tile of exactly tile_rows_max x tile_cols_max "
            "(the bias row one of its rows) is within the limits; the board checks with >= or counts the "
            "bias row twice"
        ) from exc
    except DeviceError as exc:
        raise Mismatch(
            f"refused ({type(exc).__name__}: {exc}): a tile of exactly tile_rows_max x tile_cols_max "
            "(the bias row one of its rows) is within the limits"
        ) from exc
    if sess.dev.topology != topo:
        raise Mismatch(f"the topology read back differs: {sess.dev.topology}")
    return f"a {rows} x {cols} tile configured and read back"


CONFIGURE_RULE = (
    "docs/protocol.md section 1, Topology: a topology that breaks a rule is error 100, one beyond a "
    "declared limit -222 (counted in refused); a board without settle validates gain, activation and "
    "budget all the same; w_max finite in (0, max_w_max], gain finite in (0, max_gain]"
)


def configure_limits(sess: Session) -> None:
    """A board checks a topology again (a host may be buggy), on every link; with the test network
    configured (it must stay so)."""
    send = getattr(sess.dev, "send_unchecked", None)
    if not callable(send):  # in-process: no wire past the host's checks
        return
    prefix = "scpi" if sess.report.uri.lower().startswith("visa://") else "unchecked"
    sess.run(
        f"{prefix} configure limits",
        "the board checks a topology again: w_max and gain past their declared limits are -222 "
        f"(refused + 1), an unknown activation 100; the configured topology stays ({CONFIGURE_RULE})",
        lambda sent: _configure_limits(sess, sent, send),
    )
    with contextlib.suppress(DeviceError):  # a board that took a probe holds it: the test network again
        sess.dev.configure(sess.topo)


def _configure_limits(sess: Session, sent: list[str], send: Callable[..., pl.Message]) -> str:
    """An MVM-only board computes every product with a coupling's w_max, so one that takes a w_max
    past max_w_max (or NaN) scales every product by it; gain and activation it only stores, and
    still refuses what it does not declare."""
    lim = sess.lim
    base = pl.topology_to_dict(sess.topo)
    w_max = dict(base, couplings=[dict(c, w_max=2 * lim.max_w_max) for c in base["couplings"]])
    probes = (
        (f"w_max 2 x max_w_max = {2 * lim.max_w_max:g}", w_max, LimitViolation),
        (f"gain 2 x max_gain = {2 * lim.max_gain:g}", dict(base, gain=2 * lim.max_gain), LimitViolation),
        ("activation 'no-such-curve'", dict(base, activation="no-such-curve"), ConfigurationError),
    )
    said = []
    for what, topo, expected in probes:
        sent.append(f"CONFIGURE unchecked, {what}")
        before = sess.dev.safety()
        try:
            send(pl.Op.CONFIGURE, pl.Message(topo))
        except expected as exc:
            said.append(f"{what}: {type(exc).__name__}")
        except DeviceError as exc:
            raise Mismatch(
                f"{what}: refused as {type(exc).__name__} ({exc}), expected {expected.__name__}; "
                f"{CONFIGURE_RULE}"
            ) from exc
        else:
            raise Mismatch(f"{what}: the board configured it; {CONFIGURE_RULE}")
        after = sess.dev.safety()
        counted = after.refused - before.refused
        if counted != (1 if expected is LimitViolation else 0):
            raise Mismatch(
                f"{what}: refused, but the board's refused went {before.refused} -> {after.refused}"
            )
        back = sess.dev.send_unchecked(pl.Op.TOPOLOGY, pl.Message()).meta.get("topology")
        if back is None or pl.topology_from_dict(back) != sess.topo:
            raise Mismatch(f"{what}: refused, but the board's topology changed: {str(back)[:200]}")
    return "; ".join(said) + "; the test network still configured"
