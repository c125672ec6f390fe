"""`CalibratedDevice`: any Device with a calibration record applied on the way in and out.

A decorator, so the host stack can use a record without changing a line: clamps, nudge
targets and mvm inputs are pre-compensated for the DAC, read-out states and mvm outputs
corrected for the ADCs, and programming targets moved into each device's measured window
with stuck devices compensated by their partners (on the tiles the record calibrated, at
their positions and shapes; other tiles are programmed as asked), and, where the record
measured the wires' resistance (its mvm routine), every tile's targets pre-distorted for
the wires' IR drop (`calibration.wires.predistort`: the effective conductances an mvm or a
settle sees are then the ones asked for; a tile whose wires take more than that can give
back is programmed as asked, and named in `uncompensated`). Clamped groups come back as the host asked for
them, as from any Device. A path through a converter bank the record lacks (a record from a
board that does not settle has none) passes uncorrected, said once by a warning at the first
`configure`. Everything else passes through (`DeviceWrapper`).

    dev = CalibratedDevice(open_device(uri), calibration.load("cal.zarr"))
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np

from calibration.apply import Corrections, conductance_targets
from calibration.record import CalibrationError, CalibrationRecord, TileCalibration
from calibration.routines import NEEDS, REQUIRES, ROUTINES
from calibration.wires import predistort
from drivers import Device, Equilibrium, Nudge, ProgramReport, Topology
from drivers.wrapper import DeviceWrapper

# a tile is compensated for IR drop only where no column's weights must be scaled below this
# (`calibration.wires.Predistorted.column_scale`)
MIN_COMPENSATED_SCALE = 0.9
# the routines `hil calibrate --channels` sets the extent of
CHANNEL_ROUTINES = ("adc", "dac")
# the routines that calibrate devices of the session's tiles at their positions and shapes
DEVICE_ROUTINES = ("stuck", "gmap", "pulse")
# what passes uncorrected when a record lacks each converter bank
UNCORRECTED_PATHS = {
    "dac": "clamps, nudge targets and mvm inputs",
    "adc": "read-out states",
    "mvm": "mvm outputs",
}


class CalibratedDevice(DeviceWrapper):
    def __init__(
        self,
        device: Device,
        record: CalibrationRecord,
        *,
        targets: bool = True,
        wires: bool = True,
        session: str = "hil calibrate URI --out RECORD",
    ) -> None:
        record.check_board(device.info)
        super().__init__(device)
        self.record = record
        self.targets = targets  # also correct programming targets (per-device windows, stuck devices)
        # pre-distort programming targets for IR drop, by the record's wire resistance (if any)
        self.wires = wires
        self.session = session  # the command that made the record, named when it falls short
        # per (tile, shape): each array's attenuation at its last targets, to warm-start the next
        self._attenuation: dict[tuple[str, tuple[int, int]], tuple[np.ndarray, np.ndarray]] = {}
        # (tile, shape) programmed without IR compensation from then on, with the smallest
        # column scale pre-distortion would have needed
        self.uncompensated: dict[tuple[str, tuple[int, int]], float] = {}
        self._told_uncorrected = False
        self._told_tiles: set[tuple[tuple[int, int], ...]] = set()
        self._told_reach: set[str] = set()

    def configure(self, topology: Topology) -> None:
        """Refuse, before anything reaches the board, a topology with more node channels than the
        record's DAC or state-ADC calibration covers (the message gives the one session to rerun,
        `cover`, whose record this network then takes without further hints)."""
        nodes = sum(topology.groups.values())
        for bank in ("dac", "adc"):
            cal = self.record.converters.get(bank)
            if cal is not None and cal.channels < nodes:
                groups = ", ".join(f"{g} {n}" for g, n in topology.groups.items())
                raise CalibrationError(
                    f"this network has {nodes} node channels ({groups}); the calibration record "
                    f"covers {cal.channels} ({bank} channels 0..{cal.channels - 1}): rerun "
                    f"`{self.cover(topology)}` (the record this network needs)"
                )
        if not self._told_uncorrected:
            self._told_uncorrected = True
            self._warn_partial(topology)
            self._warn_uncorrected(topology)
        self._warn_unmatched_tiles(topology)
        super().configure(topology)

    def rerun(
        self, tiles: str | None = None, channels: int | None = None, routines: tuple[str, ...] | None = None
    ) -> str:
        """The session command that replaces this record: `session` with ``--overwrite``, the
        record's own tiles, channels and routines unless `tiles` (``ROWSxCOLS,...``), `channels`
        or `routines` say otherwise (so that following the advice does not lose what the record
        covered, nor add routines it left out: a record of ``adc,dac,mvm`` rerun with every
        routine gains device calibrations at its tiles' positions, which a network of other
        shapes is then warned about). The record's channels only where this board can run a
        routine that uses them (the DAC and state-ADC ones, `CHANNEL_ROUTINES`): on an
        MVM-only board they would change nothing."""
        opts = self.record.session.get("options", {})
        shapes = tiles or ",".join(f"{r}x{c}" for r, c in opts.get("tile_shapes", []))
        caps = self.info.capabilities
        uses_channels = any(NEEDS.get(r) in caps for r in CHANNEL_ROUTINES)
        n = channels or (opts.get("channels") if uses_channels else None)
        names = routines or self._routines()
        return " ".join(
            [
                self.session,
                "--overwrite",
                *(["--tiles", shapes] if shapes else []),
                *(["--channels", str(n)] if n else []),
                *(["--routines", ",".join(names)] if names and set(names) != set(ROUTINES) else []),
            ]
        )

    def _routines(self) -> tuple[str, ...]:
        """The routines the record's session was asked for (all of them for a partial record),
        in running order."""
        asked = self.record.session.get("options", {}).get("routines") or self.record.routines
        return tuple(r for r in ROUTINES if r in set(asked))

    def _cover_routines(self) -> tuple[str, ...]:
        """The routines of `cover`: the record's, and on a board that settles the converter
        routines it lacks (whose paths `_warn_uncorrected` says pass uncorrected)."""
        names = set(self._routines()) | set(self.record.converters)
        if "settle" in self.info.capabilities:
            names |= {b for b in UNCORRECTED_PATHS if b not in self.record.converters}
        while True:  # with what each needs (`hil calibrate` would add it)
            more = {need for r in names for need in REQUIRES.get(r, ())} - names
            if not more:
                return tuple(r for r in ROUTINES if r in names)
            names |= more

    def cover(self, topology: Topology) -> str:
        """The one session command whose record covers every line and channel `topology` uses,
        with this record's routines: the node channels (DAC and state ADC); with the mvm routine,
        every line an mvm of the network's tiles reaches either way (the routine measures the
        lines 0..max(rows, cols)-1 of the session's first tile); with device routines, the
        network's tiles at their positions and shapes. Without device routines the mvm routine's
        tile is square, of the network's longest tile side (docs/mhn.md: on a ROWSxCOLS tile the
        lines past COLS are fitted from the transposed sweep alone, and keep up to half an ADC
        step of offset); with them the first tile is the network's own, and its side must reach
        the longest (`_warn_mvm_reach` says where it cannot)."""
        routines = self._cover_routines()
        shapes = [topology.tile_shape(name) for name in _tile_names(topology)]
        side = max((max(s) for s in shapes), default=0)
        channels = sum(topology.groups.values())
        opts = self.record.session.get("options", {})
        tiles: str | None = None
        if any(r in routines for r in DEVICE_ROUTINES):
            tiles = _tile_list(topology)
        elif "mvm" in routines and shapes:
            mvm = self.record.converters.get("mvm")
            measured = mvm.channels if mvm is not None else 0
            first = opts.get("tile_shapes") or [[0, 0]]
            if measured < side or first[0][0] != first[0][1]:
                # square where the board's tiles allow it (a side past one of its bounds: as long
                # as that bound), so that the routine measures `side` lines
                lim = self.info.limits
                tiles = f"{min(side, lim.tile_rows_max)}x{min(side, lim.tile_cols_max)}"
        if "mvm" in routines:
            # the session calibrates the DAC for every line its mvm routine drives
            channels = max(channels, side)
        caps = self.info.capabilities
        if not any(NEEDS.get(r) in caps for r in CHANNEL_ROUTINES):
            return self.rerun(tiles=tiles, routines=routines)  # no routine here uses --channels
        channels = max(channels, int(opts.get("channels") or 0))
        return self.rerun(tiles=tiles, channels=channels, routines=routines)

    def _cover_reaches(self, topology: Topology) -> int:
        """The mvm lines the record of `cover` measures: the longest side of its first tile."""
        if any(r in self._cover_routines() for r in DEVICE_ROUTINES):
            names = _tile_names(topology)
            return max(topology.tile_shape(names[0])) if names else 0
        return max((max(topology.tile_shape(n)) for n in _tile_names(topology)), default=0)

    def _device_tiles(self) -> dict[int, TileCalibration]:
        """The record's tiles with a device calibration that corrects programming targets
        (stuck devices or pulse windows), by position."""
        return {k: t for k, t in self.record.tiles.items() if t.stuck is not None or t.pulse is not None}

    def _warn_unmatched_tiles(self, topology: Topology) -> None:
        """Say once per set of tile shapes which tiles the record has no device calibration
        for (stuck devices, windows) at their position and shape: they are programmed as asked.
        A record of the default session (one 64 x 64 tile) corrects no tile of the default
        64-256-10 network (65 x 256 and 257 x 10), so this names the session that would."""
        measured = self._device_tiles()
        names = _tile_names(topology)
        shapes = [topology.tile_shape(name) for name in names]
        if not measured or tuple(shapes) in self._told_tiles:
            return
        self._told_tiles.add(tuple(shapes))
        unmatched = []
        for k, (name, (rows, cols)) in enumerate(zip(names, shapes, strict=True)):
            cal = measured.get(k)
            if cal is None:
                unmatched.append(f"{name} {rows}x{cols} at position {k} (none measured there)")
            elif tuple(cal.shape) != (rows, cols):
                got = "x".join(str(n) for n in cal.shape)
                unmatched.append(f"{name} {rows}x{cols} at position {k} (measured as {got})")
        if unmatched:
            warnings.warn(
                f"the calibration record has no device calibration for {'; '.join(unmatched)}: "
                "programmed without stuck-device or window correction; rerun "
                f"`{self.cover(topology)}` to calibrate this network's tiles",
                stacklevel=3,
            )

    def _warn_partial(self, topology: Topology) -> None:
        """Say that the record is of a session stopped part-way (`CalibrationRecord.partial`):
        it corrects what its finished routines measured, and nothing the stopped one would have."""
        if not self.record.partial:
            return
        where = self.record.session.get("stopped_in", "an unknown routine")
        stopped = "between routines" if where is None else f"in {where}"
        warnings.warn(
            f"the calibration record is partial: its session stopped {stopped}, and it holds "
            f"only the routines that had finished ({', '.join(self.record.routines) or 'none'}); "
            f"rerun `{self.cover(topology)}` for a whole record",
            stacklevel=4,
        )

    def _warn_uncorrected(self, topology: Topology) -> None:
        """Say once which paths the record leaves uncorrected: those through a converter bank
        it lacks (a board that does not settle cannot have them measured)."""
        missing = [b for b in UNCORRECTED_PATHS if b not in self.record.converters]
        if not missing:
            return
        paths = "; ".join(f"{UNCORRECTED_PATHS[b]} ({b})" for b in missing)
        if "settle" in self.info.capabilities:
            why = f"rerun `{self.cover(topology)}` to measure them"
        else:
            why = "a board that does not settle cannot have them measured"
        rest = (
            "programming targets are still corrected on the tiles the record measured"
            if self._device_tiles() or self.record.wire_resistance
            else "and it has no stuck-device or device-window calibration (routines stuck, pulse) "
            "either: it corrects nothing"
        )
        warnings.warn(
            f"the calibration record has no {', '.join(missing)} calibration ({why}): {paths} pass "
            f"uncorrected; {rest}",
            stacklevel=3,
        )

    def _corrections(self) -> Corrections:
        topo = self.inner.topology
        if topo is None:
            raise ValueError("configure the device before using it")
        return Corrections(self.record, topo)

    def program(
        self,
        tile: str,
        g_plus: np.ndarray,
        g_minus: np.ndarray,
        *,
        verify: bool = False,
        tol: float | None = None,
        max_iters: int | None = None,
    ) -> ProgramReport:
        corr = self._corrections()
        position = corr.position(tile)
        shape = corr.topology.tile_shape(tile)
        cal = self.record.tiles.get(position)
        stuck = None
        if self.targets and cal is not None and tuple(cal.shape) == shape:
            t = conductance_targets(self.record, position, g_plus, g_minus, self.info.limits)
            g_plus, g_minus = t.g_plus, t.g_minus
            if cal.stuck is not None:
                stuck = (cal.stuck.stuck[0].astype(bool), cal.stuck.stuck[1].astype(bool))
        r = self.record.wire_resistance
        key = (tile, shape)
        if self.wires and r and key not in self.uncompensated:
            lim = self.info.limits
            pre = predistort(
                np.asarray(g_plus), np.asarray(g_minus), r, lim.g_min, lim.g_max,
                fixed=stuck, start=self._attenuation.get(key),
            )  # fmt: skip
            self._attenuation[key] = pre.attenuation
            scale = float(pre.column_scale.min())
            if scale >= MIN_COMPENSATED_SCALE:
                g_plus, g_minus = pre.g_plus, pre.g_minus
            else:
                # the wires take more than the devices can give back: pre-distortion would
                # scale some column's weights below MIN_COMPENSATED_SCALE, which deploys worse
                # than the wires' own attenuation (docs/calibration.md); programmed as asked
                self.uncompensated[key] = scale
                warnings.warn(
                    f"{tile} ({shape[0]}x{shape[1]}) is programmed without IR-drop pre-distortion: its "
                    f"wires ({r:.3g} ohm per segment) take more than its devices can give back (a column "
                    f"would keep {100 * scale:.1f} % of its weights, under {100 * MIN_COMPENSATED_SCALE:.0f} "
                    "%); smaller tiles are compensated (docs/calibration.md)",
                    stacklevel=2,
                )
        return self.inner.program(tile, g_plus, g_minus, verify=verify, tol=tol, max_iters=max_iters)

    def mvm(self, tile: str, x: np.ndarray, *, transpose: bool = False) -> np.ndarray:
        corr = self._corrections()
        self._warn_mvm_reach(corr, tile, transpose)
        return corr.mvm_outputs(self.inner.mvm(tile, corr.mvm_inputs(np.asarray(x)), transpose=transpose))

    def _warn_mvm_reach(self, corr: Corrections, tile: str, transpose: bool) -> None:
        """Say once per bank when an mvm reaches lines the record did not measure (they pass
        uncorrected): the mvm routine measures the lines of the session's first tile, the DAC
        routine the node channels."""
        rows, cols = corr.topology.tile_shape(tile)
        reach = {"dac": cols if transpose else rows, "mvm": rows if transpose else cols}
        for bank, n in reach.items():
            cal = self.record.converters.get(bank)
            if cal is None or n <= cal.channels or bank in self._told_reach:
                continue
            self._told_reach.add(bank)
            fix = f"`{self.cover(corr.topology)}`"
            covered = self._cover_reaches(corr.topology) if bank == "mvm" else n
            if covered < n:  # the network's first tile is shorter: a session of its tiles cannot
                fix += (
                    f" calibrates this network's tiles but its mvm routine only the first tile's "
                    f"{covered} lines; a record of routines adc,dac,mvm on one {n}x{n} tile"
                )
            lines = f"line {n - 1} passes" if n - 1 == cal.channels else f"lines {cal.channels}..{n - 1} pass"
            warnings.warn(
                f"an mvm of {tile} ({rows}x{cols}{', transposed' if transpose else ''}) reaches {n} "
                f"{bank} lines; the calibration record measured 0..{cal.channels - 1}: {lines} "
                f"uncorrected ({fix} measures them)",
                stacklevel=3,
            )

    def settle(
        self,
        clamp: dict[str, np.ndarray],
        nudge: dict[str, Nudge] | None = None,
        init: dict[str, np.ndarray] | None = None,
        trace: bool | int = False,
    ) -> Equilibrium:
        corr = self._corrections()
        eq = self.inner.settle(corr.clamp(clamp), nudge=corr.nudge(nudge), init=init, trace=trace)
        states = corr.states(eq.states, skip=clamp)
        states.update({g: np.asarray(x) for g, x in clamp.items()})
        out_trace = eq.trace
        if out_trace is not None:
            fixed = {"step", "energy", *clamp}
            out_trace = {k: v if k in fixed else corr.states({k: v})[k] for k, v in out_trace.items()}
        return dataclasses.replace(eq, states=states, trace=out_trace)


def _tile_names(topology: Topology) -> list[str]:
    """The topology's tiles in the order of its couplings (a tile's position)."""
    return list(dict.fromkeys(c.tile for c in topology.couplings))


def _tile_list(topology: Topology) -> str:
    """The topology's tiles as `hil calibrate --tiles` takes them: ROWSxCOLS,... by position."""
    return ",".join("x".join(str(n) for n in topology.tile_shape(name)) for name in _tile_names(topology))
