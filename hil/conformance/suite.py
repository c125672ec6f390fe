"""`run_conformance`: every family of checks, in order, on one board; the board ends safe."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from drivers.base import Device
from drivers.errors import DeviceError
from hil.conformance import (
    arrays,
    board,
    cobs,
    fragments,
    framed,
    lifecycle,
    lines,
    mvm,
    owner_gone,
    ownership,
    refusals,
    replay,
    scpi,
    settle,
    wear,
)
from hil.conformance.report import Check, Report
from hil.conformance.session import LinkLost, Options, Session, probes_by_default


def run_conformance(
    dev: Device,
    uri: str = "",
    options: Options | None = None,
    on_check: Callable[[Check], None] | None = None,
) -> Report:
    """Check `dev` against the spec; the board ends in its safe state (not closed).
    `on_check` is called with each check as soon as it is done (to print it).

    ValueError when the test network does not fit the board's limits (see `plan_topology`).
    When the link is lost (a timeout, or a retry budget spent), the remaining checks are not
    run: the report says so in a last failed line.

    The probes past a limit that only the board's own check stops go out only when
    `options.limit_probes` is True, or left None with an ``emulator://`` `uri` (the in-process
    emulator): a chip whose firmware lacks the check would take them. Off, those checks are
    SKIPPED and `Report.unverified` names them."""
    options = options or Options()
    if options.limit_probes is None:
        options = dataclasses.replace(options, limit_probes=probes_by_default(uri))
    report = Report(uri=uri, identity=dev.info.identity.idn())
    t0 = time.perf_counter()
    sess = Session(dev, options, report, on_check)
    try:
        board.identity(sess)
        cobs.checks(sess)
        if board.configure(sess):
            board.configure_limits(sess)
            arrays.program(sess)
            arrays.read_conductance(sess)
            mvm.mvm(sess)
            settle.settle(sess)
            arrays.pulse(sess)
            refusals.errors(sess)
            mvm.w_max(sess)
            scpi.checks(sess)
            framed.checks(sess)
            replay.checks(sess)
            replay.program_ids(sess)
            fragments.checks(sess)
            lines.checks(sess)
            wear.checks(sess)
            ownership.checks(sess)
            owner_gone.checks(sess)
            lifecycle.status_reset(sess)
            replay.after_reset(sess)
    except LinkLost as exc:
        sess.add(
            Check(
                "link",
                "FAIL",
                "-",
                f"lost during {exc}; the remaining checks were not run",
                "a board answers every request within the link's timeout",
            )
        )
    finally:
        try:
            dev.safe_state()
        except DeviceError as exc:
            sess.add(
                Check(
                    "safe_state",
                    "FAIL",
                    "safe_state() at the end",
                    f"raised {type(exc).__name__}: {exc}",
                    "SYST:SAFE: all lines to 0 V, nothing in flight",
                )
            )
        report.wall_s = time.perf_counter() - t0
    return report
