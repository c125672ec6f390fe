"""A calibration session: the routines in dependency order, on any Device, into one record.

Routines (`ROUTINES`) and what each needs first (added automatically):

    adc     state-ADC gain/offset per node channel            (settle)
    dac     DAC gain/offset per node channel                  needs adc (its read-out reference)
    mvm     mvm-ADC gain/offset per output line, and the      needs dac (exact input codes)
            wires' resistance per segment (IR drop)
    stuck   stuck-device map per tile                         (program, read)
    gmap    conductance map and read-noise statistics         (program, read)
    pulse   pulse-response model per tile and per device      (pulse, read; uses the stuck map)
    settle  settle time and convergence                       (settle)

Physical tiles: the converter routines use tiles at positions 0.. with their own shapes;
the device routines calibrate the tiles `tile_shapes` at positions 0, 1, ... (the record
applies to a host topology whose couplings have those shapes at those positions). The
session leaves the board configured with its own last topology.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TypeVar

import numpy as np

from calibration.adc import measure_adc
from calibration.conductance import conductance_map, find_stuck
from calibration.converters import ConverterOptions, check_count
from calibration.dac import TILES_PER_DAC_PASS, measure_dac
from calibration.measure import Progress, board_budget, no_progress, tile_topology
from calibration.mvm import measure_mvm
from calibration.pulse import (
    PulseBudgetError,
    default_pulse_budget,
    measure_pulse_response,
    pulse_worst_case,
)
from calibration.pulse_fit import fit_pulse_model
from calibration.record import CalibrationError, CalibrationRecord, TileCalibration, board_fingerprint
from calibration.routines import NEEDS, PULSE_BUDGET_MAX, REQUIRES, ROUTINES
from calibration.settling import profile_settle
from drivers import Device
from drivers.base import Limits

T = TypeVar("T")

MAX_MAP_READS = 4096  # reads of the conductance map and of the stuck-device search (the CLI's bound)
MAX_PULSE_CHUNKS = 10_000  # sweep chunks of the pulse routine (50 times the default)


def runnable(routines: tuple[str, ...], capabilities: frozenset[str] | set[str]) -> dict[str, str]:
    """Of `routines` (resolved, `resolve_routines`), those a board with `capabilities` cannot
    run, each with why (``needs 'settle'``, or ``needs dac, which cannot run``): the rest run."""
    missing: dict[str, str] = {}
    for name in routines:  # running order: what a routine needs comes before it
        need = NEEDS.get(name)
        blocked = [r for r in REQUIRES.get(name, ()) if r in missing]
        if need is not None and need not in capabilities:
            missing[name] = f"needs '{need}'"
        elif blocked:
            missing[name] = f"needs {', '.join(blocked)}, which cannot run"
    return missing


def resolve_routines(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Validate routine names, add what they need, and put them in running order."""
    unknown = [n for n in names if n not in ROUTINES]
    if unknown:
        raise ValueError(f"unknown calibration routine(s) {unknown}; known: {', '.join(ROUTINES)}")
    chosen = set(names)
    changed = True
    while changed:
        changed = False
        for name in list(chosen):
            for need in REQUIRES.get(name, ()):
                if need not in chosen:
                    chosen.add(need)
                    changed = True
    return tuple(r for r in ROUTINES if r in chosen)


@dataclass(frozen=True)
class SessionOptions:
    routines: tuple[str, ...] = ROUTINES
    tile_shapes: tuple[tuple[int, int], ...] = ((64, 64),)
    channels: int | None = None  # node channels to calibrate; default rows + cols of the first tile
    reads: int = 64  # reads of the conductance map
    stuck_reads: int = 4
    pulse_chunks: int = 200
    # pulses per device the pulse routine may apply to each tile, worst case (checked before the
    # session starts; `calibration.pulse.pulse_worst_case`); at most PULSE_BUDGET_MAX; None: the
    # board's default (`calibration.pulse.default_pulse_budget`: 1 % of its devices' declared
    # endurance, or the default routine's worst case where it declares none)
    pulse_budget: int | None = None
    converter: ConverterOptions = field(default_factory=ConverterOptions)
    seed: int = 0

    def __post_init__(self) -> None:
        # the counts' bounds (the CLI's for `reads`): none may ask for unbounded reads or sweeps
        check_count("SessionOptions", "reads", self.reads, 2, MAX_MAP_READS)
        check_count("SessionOptions", "stuck_reads", self.stuck_reads, 1, MAX_MAP_READS)
        check_count("SessionOptions", "pulse_chunks", self.pulse_chunks, 1, MAX_PULSE_CHUNKS)
        b = self.pulse_budget
        if b is not None and (
            isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= PULSE_BUDGET_MAX
        ):
            raise ValueError(
                f"pulse budget {b!r}: give a whole number of pulses per device from 1 to "
                f"{PULSE_BUDGET_MAX}, or none for the board's default (1 % of its devices' declared "
                "endurance)"
            )

    def with_pulse_budget(self, limits: Limits) -> tuple[SessionOptions, str]:
        """These options with the pulse budget set (the board's default where None), and
        where it came from; PulseBudgetError if it exceeds the pulse endurance the board
        declares, or the pulse routine's worst case on this board exceeds it (before anything
        runs: a refusal after the other routines wastes them)."""
        if self.pulse_budget is None:
            budget, source = default_pulse_budget(limits)
        else:
            budget, source = self.pulse_budget, "set by the session: --pulse-budget"
        endurance = limits.pulse_endurance
        worst = self.pulse_worst_case(limits.max_pulses)
        # the pulse routine's worst case is a property of the routine and the board: no budget
        # within the declared endurance covers one above it; say so instead of a number to try
        beyond = (
            f"The pulse routine's worst case on this board is {worst} pulses per device, above "
            f"its declared pulse_endurance of {endurance}: no budget the board allows covers it. "
            "Leave pulse out of --routines (the other routines apply no pulses)"
        )
        if endurance is not None and budget > endurance:
            if worst > endurance:
                advice = beyond
            elif worst > default_pulse_budget(limits)[0]:
                advice = (
                    f"Give --pulse-budget from {worst} (the pulse routine's worst case on this board) to "
                    f"{endurance} (the board's declared pulse_endurance)"
                )
            else:
                advice = (
                    f"Give --pulse-budget at most {endurance} (the board's declared pulse_endurance), "
                    "or leave it out for the default (1 % of it)"
                )
            raise PulseBudgetError(
                f"the pulse budget of {budget} pulses per device ({source}) is above the board's "
                f"declared pulse_endurance of {endurance} pulses per device over its life: nothing "
                f"was run. {advice}"
            )
        if worst > budget:
            advice = (
                beyond
                if endurance is not None and worst > endurance
                else f"Raise the budget (hil calibrate --pulse-budget {worst}, at most {PULSE_BUDGET_MAX}) "
                "if the devices' endurance allows it, or leave the pulse routine out (--routines)"
            )
            raise PulseBudgetError(
                f"the pulse routine may apply up to {worst} pulses per device on this board "
                f"(max_pulses {limits.max_pulses} per call, {self.pulse_chunks} sweep chunks), above "
                f"the pulse budget of {budget} ({source}): nothing was run. {advice}"
            )
        return dataclasses.replace(self, pulse_budget=budget), source

    def pulse_worst_case(self, max_pulses: int) -> int:
        """The most pulses one device can get from this session's pulse routine on a board
        of `max_pulses` per call (0 without the pulse routine)."""
        if "pulse" not in self.routines:
            return 0
        return pulse_worst_case(max_pulses, chunks=self.pulse_chunks)

    def node_channels(self) -> int:
        rows, cols = self.tile_shapes[0]
        n = self.channels if self.channels is not None else rows + cols
        return max(n, rows, cols) if "mvm" in self.routines else n

    def adc_channels(self) -> int:
        """State-ADC channels the session calibrates: the node channels, and at least twice
        the DAC routine's reference tiles per pass (each DAC channel is read through an ADC
        channel of its own beside it)."""
        n = self.node_channels()
        return max(n, 2 * min(n, TILES_PER_DAC_PASS))


def _software() -> dict[str, str]:
    out = {}
    for pkg in ("xbar-hil", "numpy", "zarr", "torch"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def run_session(
    device: Device,
    options: SessionOptions,
    progress: Progress = no_progress,
    partial: Callable[[CalibrationRecord], None] | None = None,
) -> CalibrationRecord:
    """Run the session's routines on `device` into one record. Stopped part-way (Ctrl-C,
    SIGTERM taken as one, a board or link error), it calls `partial` with a record of what
    had finished (`CalibrationRecord.partial`: ``session["partial"]`` true, `routines` those
    finished on every tile, ``session["stopped_in"]`` the part that was running), then lets
    the exception go on: a long session keeps its finished routines."""
    options, source = options.with_pulse_budget(device.info.limits)
    _check_settle_steps(options, device.info.limits, device.info.capabilities)
    _check_converter_scales(options, device.info.limits, device.info.capabilities)
    state: dict[str, Any] = {"budget_source": source}
    try:
        return _run(device, options, progress, state)
    except BaseException:
        record = state.get("record")
        if partial is not None and record is not None and state["durations"]:
            finished = tuple(r for r in state["routines"] if r in state["finished"])
            record.routines = finished
            record.session = {
                **_session_options(
                    options, state["conv"], state["channels"], state["adc_channels"], state["budget_source"]
                ),
                "partial": True,
                "stopped_in": state.get("running"),
                "durations_s": dict(state["durations"]),
                "total_s": float(sum(state["durations"].values())),
                "preset": device.info.preset,
                "software": _software(),
            }
            partial(record)
        raise


def _check_settle_steps(
    options: SessionOptions, limits: Limits, capabilities: frozenset[str] | set[str]
) -> None:
    """The converter routines' settles (`ConverterOptions.steps` each, a measurement setting)
    within the steps the board declares, before anything runs (the other routines fit their
    budgets to the board: `calibration.measure.board_budget`). The error names what a user
    sets: `hil calibrate` has no option for the converter steps, so from the command line the
    fix is a --routines list without them (given in full); from Python, the steps that fit."""
    steps, most = options.converter.steps, limits.max_settle_steps
    chosen = resolve_routines(options.routines)
    converters = [r for r in chosen if r in ("adc", "dac")]
    if not converters or steps <= most:
        return
    cli = _without_converters(chosen, capabilities)
    raise CalibrationError(
        f"the converter routines ({', '.join(converters)}) settle {steps} steps per measurement and "
        f"the board declares at most {most} (max_settle_steps): nothing was run. {cli[0].upper()}{cli[1:]} "
        f"(adc, dac and mvm, which needs dac, need the {steps} steps); from Python, "
        f"SessionOptions(converter=ConverterOptions(steps={most})) fits the board, at the cost of node "
        f"noise short of the stationary spread that {steps} steps reach"
    )


def _without_converters(chosen: tuple[str, ...], capabilities: frozenset[str] | set[str]) -> str:
    """How a `hil calibrate` user runs the rest: the --routines list without adc, dac and mvm
    (mvm needs dac, dac needs adc), from the routines asked for, else those the board runs."""
    needing = ("adc", "dac", "mvm")
    rest = [r for r in chosen if r not in needing]
    if not rest:  # only converter routines were asked for: those the board can run instead
        rest = [r for r in ROUTINES if r not in needing and r not in runnable(ROUTINES, capabilities)]
    if rest:
        return f"with `hil calibrate`, leave them out: --routines {','.join(rest)}"
    return "`hil calibrate` cannot calibrate this board's converters"


def _check_converter_scales(
    options: SessionOptions, limits: Limits, capabilities: frozenset[str] | set[str]
) -> None:
    """The converter routines' networks run at gain 1 and w_max 1 (their references are
    computed at them; the DAC routine lowers its gain, the mvm probe its w_max, to what the
    board allows): on a board that declares less the first configure was refused naming
    Topology.gain or a coupling's w_max, which no `hil calibrate` option sets. Refused before
    anything runs, naming the bound and the routines that run."""
    chosen = resolve_routines(options.routines)
    converters = [r for r in chosen if r in ("adc", "dac", "mvm")]
    short = [
        f"{name} {most:g}"
        for name, most in (("max_gain", limits.max_gain), ("max_w_max", limits.max_w_max))
        if most < 1.0
    ]
    if not converters or not short:
        return
    cli = _without_converters(chosen, capabilities)
    raise CalibrationError(
        f"the converter routines ({', '.join(converters)}) configure their reference networks at gain 1 "
        f"and w_max 1, and the board declares {' and '.join(short)}: nothing was run. "
        f"{cli[0].upper()}{cli[1:]} (the device and settle routines keep within the board's bounds)"
    )


def _session_options(
    options: SessionOptions, conv: ConverterOptions, channels: int, adc_channels: int, source: str
) -> dict[str, Any]:
    return {
        "options": {
            "routines": list(resolve_routines(options.routines)),
            "tile_shapes": [list(s) for s in options.tile_shapes],
            "channels": channels,
            "adc_channels": adc_channels,
            "reads": options.reads,
            "stuck_reads": options.stuck_reads,
            "pulse_chunks": options.pulse_chunks,
            "pulse_budget": options.pulse_budget,
            "pulse_budget_source": source,
            "converter": dataclasses.asdict(conv),
        },
        "seed": options.seed,
    }


def _run(
    device: Device, options: SessionOptions, progress: Progress, state: dict[str, Any]
) -> CalibrationRecord:
    routines = resolve_routines(options.routines)
    info = device.info
    record = CalibrationRecord(
        identity=info.identity,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        limits=dataclasses.asdict(info.limits),
        routines=routines,
        fingerprint=board_fingerprint(info),
        configuration=str(info.extra.get("config", "")),
    )
    durations: dict[str, float] = {}
    conv = dataclasses.replace(options.converter, seed=options.seed)
    channels = options.node_channels()
    adc_channels = options.adc_channels()

    state.update(
        record=record, durations=durations, routines=routines, finished=set(), conv=conv,
        channels=channels, adc_channels=adc_channels,
    )  # fmt: skip
    tiles = len(options.tile_shapes)
    pulses: dict[str, int] = {}  # pulses per device of each tile's pulse routine

    def timed(name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        state["running"] = name
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        durations[name] = time.perf_counter() - t0
        base = name.split("[")[0]  # a tile routine is finished once done on every tile
        if base != "pulse" and (base == name or all(f"{base}[{k}]" in durations for k in range(tiles))):
            state["finished"].add("pulse" if base == "pulse_fit" else base)  # pulse: measured, fitted
        state["running"] = None
        return out

    if "adc" in routines:
        record.converters["adc"] = timed("adc", measure_adc, device, np.arange(adc_channels), conv, progress)
    if "dac" in routines:
        adc = record.converters["adc"]
        record.converters["dac"] = timed("dac", measure_dac, device, np.arange(channels), adc, conv, progress)
    if "mvm" in routines:
        dac = record.converters["dac"]
        record.converters["mvm"] = timed(
            "mvm", measure_mvm, device, options.tile_shapes[0], dac, conv, progress
        )
    shapes = list(options.tile_shapes)
    record.tiles = {k: TileCalibration(k, shape) for k, shape in enumerate(shapes)}
    if any(r in routines for r in ("stuck", "gmap", "pulse")):
        topo = tile_topology(shapes, board_budget(device), device.info.limits)
        g_range = info.limits.g_max - info.limits.g_min
        for k, shape in enumerate(shapes):
            tile = record.tiles[k]
            name = f"T{k}"
            device.configure(topo)
            if "stuck" in routines:
                tile.stuck = timed(
                    f"stuck[{k}]", find_stuck, device, name, shape, options.stuck_reads, progress
                )
            stuck = tile.stuck.stuck if tile.stuck is not None else None
            if "gmap" in routines:
                tile.gmap = timed(
                    f"gmap[{k}]",
                    conductance_map,
                    device,
                    name,
                    shape,
                    options.reads,
                    stuck,
                    options.seed,
                    progress,
                )
            if "pulse" in routines:
                data = timed(
                    f"pulse[{k}]",
                    measure_pulse_response,
                    device,
                    name,
                    shape,
                    chunks=options.pulse_chunks,
                    stuck=stuck,
                    progress=progress,
                    budget=options.pulse_budget,
                )
                pulses[name] = data.pulses_per_device
                # a stage of its own: a progress display that times each stage from the end of the
                # one before charged the fit (seconds, where the next stage took milliseconds) to it
                progress("pulse fit", 0, 1)
                tile.pulse = timed(f"pulse_fit[{k}]", fit_pulse_model, data, stuck, g_range, options.seed)
                progress("pulse fit", 1, 1)
                del data
    if "settle" in routines:
        record.settle = timed(
            "settle", profile_settle, device, options.tile_shapes[0], seed=options.seed, progress=progress
        )
    record.session = {
        **_session_options(options, conv, channels, adc_channels, state["budget_source"]),
        "durations_s": durations,
        "total_s": float(sum(durations.values())),
        "preset": info.preset,
        "software": _software(),
        "safety": dataclasses.asdict(device.safety()),
    }
    if pulses:
        record.session["pulses_per_device"] = _pulse_counts(pulses, options, info.limits.max_pulses)
    return record


def _tile_names(options: SessionOptions) -> list[str]:
    return [f"T{k}" for k in range(len(options.tile_shapes))]


def _pulse_counts(pulses: dict[str, int], options: SessionOptions, max_pulses: int) -> dict[str, Any]:
    """Pulses per device the pulse routine applied: max and mean over the devices of every
    tile (every call pulses a whole tile: each device of a tile gets the same), per tile, and
    the worst case and budget they were held to."""
    values = np.array(list(pulses.values()), np.float64)
    shapes = dict(zip(_tile_names(options), options.tile_shapes, strict=True))
    devices = np.array([2 * shapes[name][0] * shapes[name][1] for name in pulses], np.float64)
    return {
        "max": int(values.max()),
        "mean": float(np.average(values, weights=devices)),
        "per_tile": dict(pulses),
        "worst_case": options.pulse_worst_case(max_pulses),
        "budget": options.pulse_budget,
    }
