"""`hil info`: what a board says about itself, read without changing anything on it."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from hil.cli.common import JSON_HELP, check_json_dest, one_line_errors, to_stdout, write_json

if TYPE_CHECKING:
    from drivers.base import BoardOwner, Device, Wear

_JSON = typer.Option(None, "--json", help=JSON_HELP.format(doc='the README, "Scripts and CI"'))


def owner_line(owner: BoardOwner | None) -> str:
    """Who owns the board, for `hil info` and `hil lock status`."""
    if owner is None:
        return "owner         - (the board has no ownership: any host may drive it)"
    if owner.token is None:
        return f"owner         nobody (a host takes the board when it opens it; lease {owner.lease_s:g} s)"
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(owner.since or 0.0))
    held = (
        f"{owner.connections} connection(s) present its token"
        if owner.lapses_in is None
        else f"no connection presents its token: lapses in {owner.lapses_in:.0f} s"
    )
    return f"owner         {owner.token} since {since}; {held}"


def _wear(dev: Device) -> tuple[Wear | None, str]:
    """The board's wear and, where there is none to show, why (firmware without the query)."""
    from drivers.errors import NotSupported

    try:
        return dev.wear(), ""
    except NotSupported as exc:
        return None, str(exc)


def wear_lines(dev: Device) -> list[str]:
    """One ``wear`` line per configured tile of a board that declares a pulse endurance: the
    pulses of its most worn device (and their share of the endurance), the devices near the end
    (at ``near_from`` or more: a tenth of the endurance or less left) and the spent ones (none
    left: a pulse that asks one of them for a pulse is refused whole, a program of the tile skips
    them and counts them in its report's `spent`). The command's help says what these mean."""
    if dev.info.limits.pulse_endurance is None:
        return []
    wear, why = _wear(dev)
    if wear is None:
        return [f"wear          not reported: {why}"]
    if not wear.tiles:
        return ["wear          no tile configured (the board counts wear per device; a tile names them)"]
    topo = dev.topology
    lines = []
    for name, t in wear.tiles.items():
        devices = ""
        if topo is not None and name in {c.tile for c in topo.couplings}:
            rows, cols = topo.tile_shape(name)
            devices = f" of {2 * rows * cols}"
        lines.append(
            f"wear          {name}: most worn {t.max_wear} pulses ({t.max_wear / wear.endurance:.0%}); "
            f"{t.near_end}{devices} devices near the end (>= {wear.near_from}), {t.spent} spent"
        )
    return lines


def describe(dev: Device, uri: str) -> list[str]:
    """The lines `hil info` prints: identity, capabilities, limits, status and counters, each
    with its unit. Only queries: no configure, program, settle, mvm or safe state."""
    info, lim = dev.info, dev.info.limits
    conv = [
        "DAC ideal"
        if lim.dac_bits is None
        else f"DAC {lim.dac_bits} bit over [{lim.dac_range[0]:g}, {lim.dac_range[1]:g}] (saturates past it)",
        f"ADC {'ideal' if lim.adc_bits is None else f'{lim.adc_bits} bit'} over "
        f"[{lim.adc_range[0]:g}, {lim.adc_range[1]:g}]",
    ]
    lines = [
        f"device        {info.identity.idn()}  ({uri})",
        f"capabilities  {', '.join(sorted(info.capabilities)) or 'none'}",
        f"voltages      v_read {lim.v_read:g} V per state unit, at most {lim.v_read_max:g} V on any line "
        f"(states up to {lim.clamp_max:g})",
        f"conductances  {lim.g_min:g} to {lim.g_max:g} S per device",
        "line current  "
        + (
            f"at most {lim.max_line_current_a:g} A on any tile line (row driver or column into its ADC)"
            if math.isfinite(lim.max_line_current_a)
            else "not declared (the board checks none)"
        ),
        f"converters    {', '.join(conv)}",
        f"tiles         up to {lim.max_tiles} of at most {lim.tile_rows_max} x {lim.tile_cols_max} cells",
        f"work bounds   batch {lim.max_batch} samples, "
        + (
            f"settle {lim.max_settle_steps} steps ({lim.settle_step_s:g} s each), "
            if "settle" in info.capabilities
            else "settle not supported (capability 'settle' not declared), "
        )
        + (
            f"{lim.max_pulses} pulses per device per call, "
            if "pulse" in info.capabilities
            else "pulses not supported (capability 'pulse' not declared), "
        )
        + (
            f"{lim.max_verify_iters} write-verify rounds, "
            if "program_verify" in info.capabilities
            else "write-verify not supported (capability 'program_verify' not declared), "
        )
        + f"wait {lim.max_wait_s:g} s",
        f"scale bounds  gain at most {lim.max_gain:g}, w_max at most {lim.max_w_max:g}, nudge |beta| at most "
        f"{lim.max_beta:g}, injected current |beta grad| at most {lim.max_drive:g}",
        "endurance     "
        + (
            "not declared (hil calibrate's default pulse budget is then the routine's worst case)"
            if lim.pulse_endurance is None
            else f"{lim.pulse_endurance} pulses per device"
        ),
    ]
    lines += wear_lines(dev)
    st = dev.status()
    open_tx = f"open transaction {st.transaction!r}" if st.transaction else "no open transaction"
    # the arrays' generation, where the board keeps one: it changes when the devices lost what
    # was programmed (docs/protocol.md, "Board status")
    arrays = "" if st.arrays_id is None else f", arrays_id {st.arrays_id}"
    lines.append(
        f"status        epoch {st.epoch}, {'configured' if st.configured else 'not configured'}, {open_tx}{arrays}"
    )
    safety = dev.safety()
    lines.append(f"safety        refused {safety.refused}, violations {safety.violations} (must stay 0)")
    meter = dev.meter()
    if meter is not None:
        lines.append(
            f"meter         clock {meter.clock_s:g} s, energy {meter.energy_j:g} J, {meter.mvm_calls} mvm calls "
            "(since power-on)"
        )
    lines.append(owner_line(dev.owner()))
    if info.extra:
        lines.append(f"extra         {info.extra}")
    return lines


def info_record(dev: Device, uri: str) -> dict[str, Any]:
    """What `hil info --json` writes, the same queries as `describe` (keys: README, "Scripts and
    CI"): ``uri``, ``idn``, ``identity`` (manufacturer, model, serial, firmware), ``preset``,
    ``capabilities`` (sorted), ``limits`` (every `Limits` field in its unit: volts, siemens,
    seconds, amperes; ``clamp_max`` added; an undeclared limit is null), ``extra``, ``status``
    (epoch, transaction, configured, arrays_id: null where the board keeps none), ``safety`` (refused, violations), ``meter`` (clock_s,
    energy_j, mvm_calls; null: the board keeps none), ``owner`` (token, since, connections,
    lease_s, lapses_in; null: no ownership), ``wear`` (endurance, near_from, tiles: per tile
    max_wear, near_end, spent; null: no endurance declared, or not reported). The device part is the run log's ``device``
    record (`hil.runlog.meta.device_record`)."""
    from hil.runlog.meta import device_record

    record = device_record(dev.info, uri)
    record["limits"]["clamp_max"] = dev.info.limits.clamp_max
    meter, owner, (wear, _) = dev.meter(), dev.owner(), _wear(dev)
    return {
        "uri": uri,
        **{k: v for k, v in record.items() if k != "uri"},
        "status": dataclasses.asdict(dev.status()),
        "safety": dataclasses.asdict(dev.safety()),
        "meter": None if meter is None else dataclasses.asdict(meter),
        "owner": None if owner is None else dataclasses.asdict(owner),
        # `boards` and `physical` are the host's placement (empty as a board reports its wear)
        "wear": None
        if wear is None
        else {k: v for k, v in dataclasses.asdict(wear).items() if v or k == "tiles"},
    }


def register(app: typer.Typer) -> None:
    @app.command()
    def info(
        uri: str = typer.Argument(
            ..., help="Device URI: visa://RESOURCE, serial://PORT, serial+socket://HOST:PORT, emulator://..."
        ),
        json_out: Path = _JSON,
    ) -> None:
        """Print what a board says about itself: identity, capabilities, limits (with units),
        status (epoch, configuration, an open programming transaction), safety counters and
        its meter, who owns it, and, on a board that declares a pulse endurance, each tile's
        wear: the pulses its most worn device has taken (and their share of the endurance), its
        devices near the end (a tenth of the endurance or less left: a wear of at least the number
        after >=) and spent (none left: a pulse that asks one of them for a pulse is refused
        whole; a program of the tile still runs, skips them and counts them in its report's
        `spent`). It only queries: nothing is configured or programmed, the
        board is not taken (as if `?lock=0`), and the lines are not driven to the safe state on
        close, so it can look at a board another host is using. On an emulator:// URI it shows
        a fresh emulated board. --json writes the same as one JSON object."""
        from drivers import open_device
        from drivers.uri import looking_uri

        check_json_dest(json_out)
        with one_line_errors():
            dev = open_device(looking_uri(uri))
            try:
                lines = describe(dev, uri)
                record = info_record(dev, uri) if json_out is not None else None
            finally:
                # not `close`: its safe state would drive the lines of a board another host uses
                dev.close_link()
        if not to_stdout(json_out):
            for line in lines:
                typer.echo(line)
        if record is not None and json_out is not None:
            write_json(record, json_out)
