"""The emulated board: tiles, node circuits, periphery, a simulated clock and a safety monitor.

The board configures, programs, pulses, reads and multiplies; its settles run in
`emulator.settle.SettleEngine` (workspaces, the two settle loops, noise floor and the
settle's accounting; its plans and step size in `emulator.settle_plan`, the last clamp in
`emulator.clamp_cache`, energy and power in `emulator.settle_energy`), which `Board.settle`
calls with the clamps and the nudge (`emulator.settle_types.SettleNudge`) as the DAC applied them;
networks with conv couplings settle in `emulator.conv_settle.ConvSettle` (one tile read at
every position of its input map).

Works on torch tensors on one torch device (CPU or CUDA, same code). Everything random
comes from generators seeded by the board's seed, so a board is deterministic per seed:
the fabrication draws of physical tile k come from ``seed`` and ``k`` alone (the same chip
every time), the noise of writes, MVMs and settles from one noise stream, and the noise of
the host's reads (`read_conductance`) from another, so that reading a tile (a run log, a
calibration) never changes what the board's later settles and writes draw.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from dataclasses import dataclass

import torch

from drivers import seeds
from drivers.base import Identity, Limits
from drivers.checks import (
    READ_MARGIN,
    check_batch,
    check_line_current,
    check_settings,
    check_settle_batch,
    check_topology,
    check_trace_values,
    check_verify,
    check_wait,
    conductance_window,
    settle_line_volts,
)
from drivers.converters import IDEAL_LSB_BITS, lsb
from drivers.errors import ConfigurationError, LimitViolation
from drivers.numerics import denormals_flushed
from drivers.scalars import INT32_MAX, as_int
from drivers.topology import Coupling, Topology
from drivers.wear import endurance_refusal
from emulator.array import TileArray
from emulator.conv_settle import ConvSettle
from emulator.periphery import ChannelErrors, line_current_limit, quantize, quantize_signed
from emulator.presets import BoardPreset
from emulator.settle import SettleEngine
from emulator.settle_types import SettleNudge, SettleResult

_COUNT_DTYPES = frozenset(
    {torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64}
    | {torch.float16, torch.bfloat16, torch.float32, torch.float64}
)


def _peak_count(counts: torch.Tensor) -> int | float:
    """Largest |count| of a tensor of whole pulse counts, from its min and max as Python
    numbers (``abs`` of the most negative int32 stays negative); other dtypes are refused."""
    if not isinstance(counts, torch.Tensor):
        raise ConfigurationError(f"pulse counts must be a tensor, got {type(counts).__name__}")
    if counts.dtype not in _COUNT_DTYPES:
        raise ConfigurationError(f"pulse counts must be whole numbers, got dtype {counts.dtype}")
    if not counts.numel():
        return 0
    lo_t, hi_t = torch.aminmax(counts)
    if counts.is_floating_point():
        lo, hi = float(lo_t), float(hi_t)
        if not (math.isfinite(lo) and math.isfinite(hi)) or not bool(torch.equal(counts, counts.floor())):
            raise ConfigurationError("pulse counts must be whole numbers")
        return max(-lo, hi)
    return max(-int(lo_t), int(hi_t))


def _channels_needed(topology: Topology) -> int:
    """Converter channels a topology needs at once: one per node of the groups that fully
    connected or dense tiles drive (their lines are all driven in one analog step); a feature
    map that only conv tiles touch is read patch by patch through its tiles' lines (`ConvSettle`,
    channels shared in time), so it needs only the widest of those tiles' rows and columns."""
    analog = {g for c in topology.couplings if c.kind != "conv" for g in (*c.rows, *c.cols)}
    total = sum(n for g, n in topology.groups.items() if g in analog or g not in topology.shapes)
    lines = [max(topology.tile_shape(c.tile)) for c in topology.couplings if c.kind == "conv"]
    return total + max(lines, default=0)


@dataclass
class SafetyMonitor:
    """Counts refused requests and, as a last line of defence, out-of-limit conditions that
    reached the array (which the checks in front of it should make impossible)."""

    refused: int = 0
    violations: int = 0

    def refuse(self, exc: LimitViolation) -> LimitViolation:
        self.refused += 1
        return exc


def _auto_range(bits: int | None) -> float:
    """The range, in units of the largest magnitude it must carry, of a signed mid-tread DAC
    auto-ranged so that this magnitude is its top code (`quantize_signed`: the top code is
    ``(2**(bits-1) - 1)`` steps of ``2 range / (2**bits - 1)``): the injected nudge currents'
    DAC, whose zero current is then a code (it was driven as half a step either way)."""
    if not bits or bits == 1:
        return 1.0
    return ((1 << bits) - 1) / ((1 << bits) - 2)


class Board:
    def __init__(self, preset: BoardPreset, seed: int = 0, device: str | torch.device = "cpu") -> None:
        self.preset = preset
        self._limits: tuple[BoardPreset, Limits] | None = None  # (the preset they are of, `limits`)
        self.seed = as_int("board seed", seed, 0, (1 << 128) - 1)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None and torch.cuda.is_available():
            # indexed, as the device of every tensor made there is: `cuda` != `cuda:0` in torch,
            # and the driver's tensor paths compare a tensor's device with this one
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.clock = 0.0
        self.safety = SafetyMonitor()
        self.topology: Topology | None = None
        self._groups: dict[str, int] = {}  # the configured groups, as they were at configure
        self._physical: dict[int, TileArray] = {}
        self._tiles: dict[str, TileArray] = {}
        # STATUS `arrays_id` (docs/protocol.md, "Board status"): the arrays live in this process's
        # memory, so every new board (every server start) holds devices nobody programmed; a
        # random value, so one started again on the same port says so. Resets keep it.
        self.arrays_id = secrets.randbits(53)
        # Wear: pulses each device of physical tile k has taken over the board's life, int64
        # (2, rows, cols) at the largest shape tile k has been configured to (a configured tile
        # is the top-left block of its physical array), kept only when the board declares a
        # pulse endurance. Physical: a reset, the safe state and reconfigures keep it, and the
        # tiles wear out by it (`TileArray.wear_out`, `emulator.wear`).
        self._wear: dict[int, torch.Tensor] = {}
        self._physical_of: dict[str, int] = {}  # configured tile name -> physical tile index
        # Run-time noise (write, read-back, MVM and node noise) is drawn on the board's device, from
        # a generator there seeded from the `board.noise` stream, and that of the host's reads
        # (`read_conductance`) from one seeded from `board.read`: boards of one seed on CPU and
        # CUDA are noisy alike in distribution, not number by number (torch's CPU and CUDA
        # generators differ).
        # What makes the chip (converter errors, fabrication variation) is drawn once from CPU
        # generators and moved, so one seed is the same chip on every device.
        self.noise = seeds.torch_generator(self.seed, "board.noise", device=self.device)
        self.host_reads = seeds.torch_generator(self.seed, "board.read", device=self.device)
        per = preset.periphery
        truth = seeds.torch_generator(self.seed, "board.truth")
        lo, hi = per.state_range
        # offsets in LSB: of an 8-bit converter where the converter is ideal
        dac_lsb = lsb(per.dac_bits, hi - lo, ideal_bits=IDEAL_LSB_BITS)
        adc_lsb = lsb(per.adc_bits, hi - lo, ideal_bits=IDEAL_LSB_BITS)
        mvm_lsb = lsb(per.adc_bits, 2 * per.mvm_range, ideal_bits=IDEAL_LSB_BITS)
        self.dac_errors = ChannelErrors.draw(
            per.channels, per.gain_error, per.offset_error * dac_lsb, truth, self.device
        )
        self.adc_errors = ChannelErrors.draw(
            per.channels, per.gain_error, per.offset_error * adc_lsb, truth, self.device
        )
        self.mvm_errors = ChannelErrors.draw(
            per.channels, per.gain_error, per.offset_error * mvm_lsb, truth, self.device
        )
        self.engine = SettleEngine(self)  # plans, workspaces and the settle loops
        self.conv_engine = ConvSettle(self)  # networks with conv couplings
        self.energy_j = 0.0
        self.mvm_calls = 0  # `mvm` operations run since power-on (the meter's count)

    # ---------------------------------------------------------------- configuration

    @property
    def limits(self) -> Limits:
        """The board's limits, built from its (frozen) preset once per preset object: every
        program and settle checks against them, and building them cost ~14 us a call."""
        cached = self._limits
        if cached is not None and cached[0] is self.preset:
            return cached[1]
        per, m = self.preset.periphery, self.preset.device
        lim = Limits(
            v_read=per.v_read,
            v_read_max=per.v_read_max,
            g_min=m.g_min,
            g_max=m.g_max,
            dac_bits=per.dac_bits,
            adc_bits=per.adc_bits,
            adc_range=per.state_range,
            tile_rows_max=per.tile_rows_max,
            tile_cols_max=per.tile_cols_max,
            max_tiles=per.max_tiles,
            max_settle_steps=per.max_settle_steps,
            max_pulses=per.max_pulses,
            settle_step_s=per.settle_step_s,
            max_line_current_a=line_current_limit(per, m.g_max),
            pulse_endurance=m.pulse_endurance,
            one_sided=m.one_sided,
            **per.request_bounds(),
        )
        self._limits = (self.preset, lim)
        return lim

    @property
    def configuration(self) -> str:
        """A fingerprint of everything the board is built from (device model, periphery,
        converters' error spreads, limits): boards with equal identities but another preset
        or override differ here, so a calibration record can tell them apart."""
        key = repr(self.preset)
        m = self.preset.device
        if m.pulse_endurance is not None:  # the wear-out model's fields, out of the repr
            key += f" wear({m.wear_key()})"
        key += self.preset.periphery.out_key() + m.extra_key()  # opt-in effects, where they are on
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    @property
    def identity(self) -> Identity:
        from importlib.metadata import PackageNotFoundError, version

        try:
            firmware = version("xbar-hil")
        except PackageNotFoundError:
            firmware = "dev"
        return Identity("xbar-hil", f"emulator-{self.preset.name}", f"EMU-{self.seed:08d}", firmware)

    def configure(self, topology: Topology) -> None:
        old = self.topology
        if (
            old is not None
            and topology.couplings is old.couplings
            and topology.groups == self._groups
            and topology.shapes == old.shapes
        ):
            # the same network with another budget, gain or mode (an EBBlock switching between
            # its free and nudge budgets): tiles, channels and plans stay as they are. Not with
            # other map shapes: a conv tile's size is C_in k^2 by C_out, so new (C, H, W) shapes
            # of the same group sizes are new tiles, checked against the tile limits and made
            # anew below (the shortcut took a 2305-row tile on a board of 1024 rows)
            try:
                check_settings(topology, self.limits)
            except LimitViolation as exc:
                raise self.safety.refuse(exc) from None
            self.topology = topology
            return
        try:
            check_topology(topology, self.limits)
        except LimitViolation as exc:
            raise self.safety.refuse(exc) from None
        total = _channels_needed(topology)
        if total > self.preset.periphery.channels:
            raise ConfigurationError(
                # within the 255 characters of an SCPI error (a served board's refusal reaches its
                # client through the error queue); the server's option first, the part a host on a
                # link acts on (its visa:// or serial:// URI takes no channels)
                f"topology needs {total} converter channels (its nodes; a conv map: its tile's lines); "
                f"the board has {self.preset.periphery.channels} channels: make the network smaller "
                f"or give the emulator more (hil emulator serve --set channels={total}; &channels={total} "
                "in an emulator:// URI)"
            )
        tiles: dict[str, TileArray] = {}
        for k, c in enumerate(topology.couplings):
            shape = topology.tile_shape(c.tile)
            phys = self._physical.get(k)
            if phys is None or phys.shape != shape:
                fab = seeds.torch_generator(self.seed, "board.fabrication", k)  # CPU: the same chip anywhere
                phys = TileArray(shape[0], shape[1], self.preset.device, fab, self.device)
                self._physical[k] = phys
            tiles[c.tile] = phys
            self._grow_wear(k, shape)
            worn = self._wear.get(k)
            if worn is not None:  # a tile drawn anew over worn devices is as worn (`TileArray.wear_out`)
                phys.wear_out(worn[:, : shape[0], : shape[1]])
        if old is None or (old.groups, old.couplings, old.shapes) != (
            topology.groups,
            topology.couplings,
            topology.shapes,
        ):
            self.engine.clear()  # a new budget, gain or mode keeps the plans: they do not depend on them
        self.topology = topology
        self._groups = dict(topology.groups)
        self._tiles = tiles
        self._physical_of = {c.tile: k for k, c in enumerate(topology.couplings)}
        offsets, start = {}, 0
        for g, n in topology.groups.items():
            offsets[g] = start
            start += n
        self._channel = offsets

    def tile(self, name: str) -> TileArray:
        if self.topology is None:
            raise ConfigurationError("the board has no topology yet; call configure(topology) first")
        try:
            return self._tiles[name]
        except KeyError:
            raise ConfigurationError(f"unknown tile {name!r}; known: {sorted(self._tiles)}") from None

    def reset(self) -> None:
        """Power-on state: configuration cleared. Conductances are non-volatile and stay, and
        so does the devices' wear (it is physical)."""
        self.topology = None
        self._tiles = {}
        self._physical_of = {}
        self.engine.clear()

    # ---------------------------------------------------------------- wear

    def _grow_wear(self, k: int, shape: tuple[int, int]) -> None:
        """Physical tile `k`'s wear, grown (zeros: devices never pulsed) to cover `shape`."""
        if self.limits.pulse_endurance is None:
            return
        old = self._wear.get(k)
        if old is not None and old.shape[1] >= shape[0] and old.shape[2] >= shape[1]:
            return
        rows, cols = shape if old is None else (max(shape[0], old.shape[1]), max(shape[1], old.shape[2]))
        grown = torch.zeros((2, rows, cols), dtype=torch.int64, device=self.device)
        if old is not None:
            grown[:, : old.shape[1], : old.shape[2]] = old
        self._wear[k] = grown

    def wear(self, name: str) -> torch.Tensor | None:
        """The life pulse counts of tile `name`'s devices, int64 (2, rows, cols) (a view:
        the board's own counts); None when the board declares no pulse endurance."""
        tile = self.tile(name)
        if self.limits.pulse_endurance is None:
            return None
        w = self._wear.get(self._physical_of[name])
        if w is None:  # the endurance came with a preset swapped in after configure
            self._grow_wear(self._physical_of[name], tile.shape)
            w = self._wear[self._physical_of[name]]
        return w[:, : tile.rows, : tile.cols]

    def max_wear(self) -> dict[str, int]:
        """The most pulses any device of each configured tile has taken (empty when the board
        declares no pulse endurance or has no topology)."""
        out = {}
        for name in self._tiles:
            w = self.wear(name)
            if w is not None:
                out[name] = int(w.max()) if w.numel() else 0
        return out

    def _check_wear(self, name: str, wear: torch.Tensor, added: torch.Tensor | int, what: str) -> None:
        """Refuse (-222, counted in `refused`) a request that would take a device of tile
        `name` past the declared endurance: `added` pulses per device (int64 (2, rows, cols),
        or the same count for every device) on top of `wear`. Nothing is applied."""
        endurance = self.limits.pulse_endurance
        if endurance is None:
            return
        refusal = endurance_refusal(name, endurance, wear, wear + added, what)
        if refusal is not None:
            raise self.safety.refuse(refusal)

    def wait(self, seconds: float) -> None:
        try:
            seconds = check_wait(self.limits, seconds)
        except LimitViolation as exc:
            raise self.safety.refuse(exc) from None
        self.clock += seconds

    # ---------------------------------------------------------------- converters

    def _dac(self, x: torch.Tensor, channel: int, *, signed: bool = False) -> torch.Tensor:
        """Drive `x` through DAC `channel` (`dac_convert`), counting an output past the
        voltage limit as a violation."""
        y = self.dac_convert(x, channel, signed=signed)
        self._count_dac_violation(y)
        return y

    def _count_dac_violation(self, y: torch.Tensor) -> None:
        """A DAC output `y` past the voltage limit reached the array: a violation."""
        per = self.preset.periphery
        if y.numel():
            y_lo, y_hi = torch.aminmax(y)
            if max(-float(y_lo), float(y_hi)) * per.v_read > per.v_read_max:
                self.safety.violations += 1

    def dac_convert(self, x: torch.Tensor, channel: int, *, signed: bool = False) -> torch.Tensor:
        """What DAC `channel` outputs for `x`: quantised over the state range, saturating at
        its ends. `signed` (mvm inputs, which docs/protocol.md allows in ``[-clamp_max,
        clamp_max]``): a sign-magnitude DAC, a polarity and `dac_bits` of magnitude over
        ``[0, max |state range|]``, so a negative input is a negative read voltage (its
        product the negative of the positive input's) and a nonnegative one is driven
        exactly as the state DAC drives it. The one conversion of every DAC path (`_dac`,
        and the settle engine's write-back of node states), so their rails cannot differ."""
        per = self.preset.periphery
        lo, hi = per.state_range
        y = self.dac_errors.apply(x, channel)
        if signed and per.dac_bits is not None:  # an ideal DAC passes any sign as it is
            y = quantize(y.abs(), per.dac_bits, 0.0, max(abs(lo), abs(hi))).mul_(torch.sign(y))
        else:
            y = quantize(y, per.dac_bits, lo, hi)
        if per.dac_bits is None and not self.dac_errors.exact:
            # an unquantised DAC with gain and offset errors still has rails: at the voltage
            # limit (a quantised one saturates at the state range, within it)
            rail = self.limits.clamp_max  # `largest_state`, found once per preset
            y = y.clamp(-rail, rail)
        return y

    def _adc_state(self, x: torch.Tensor, channel: int) -> torch.Tensor:
        per = self.preset.periphery
        lo, hi = per.state_range
        return quantize(self.adc_errors.apply(x, channel), per.adc_bits, lo, hi)

    def _adc_mvm(self, y: torch.Tensor) -> torch.Tensor:
        """The mvm read-out's ADC: a signed, mid-tread converter over ``[-mvm_range,
        mvm_range]`` (`quantize_signed`): a column of no current reads 0, not half a step."""
        per = self.preset.periphery
        return quantize_signed(self.mvm_errors.apply(y), per.adc_bits, per.mvm_range)

    # ---------------------------------------------------------------- array operations

    def _weights(self, c: Coupling) -> torch.Tensor:
        """The coupling's weights; with ``w_max = 1`` the tile's cached tensor itself (which
        the tile updates in place: use it at once)."""
        w = self._tiles[c.tile].weights(self.clock)
        return w if c.w_max == 1.0 else w * c.w_max

    def program(
        self,
        name: str,
        g_plus: torch.Tensor,
        g_minus: torch.Tensor,
        *,
        verify: bool,
        tol: float | None,
        max_iters: int | None,
        target_range: tuple[float, float] | None = None,
    ) -> dict[str, object]:
        """Write (G+, G-) to tile `name` (write-verify with `verify`) and read it back.
        `target_range`: the smallest and largest target, when the caller has read them (the
        in-process driver's range check): a noise-free write then needs no second read of
        the targets to report its largest error."""
        tile = self.tile(name)
        try:
            tol, max_iters = check_verify(self.limits, tol, max_iters)
        except LimitViolation as exc:
            raise self.safety.refuse(exc) from None
        m = self.preset.device
        tol = 0.02 * (m.g_max - m.g_min) if tol is None else tol
        target = tile.stack_targets(g_plus, g_minus, "program")
        self._check_read_lines(name, target)
        wear = self.wear(name)  # the write skips spent devices: a program is never refused for wear
        if verify:
            st = tile.program_verify(
                g_plus, g_minus, tol, max_iters, self.clock, self.noise,
                wear=wear, endurance=self.limits.pulse_endurance,
            )  # fmt: skip
            iterations, within, gave_up = st.iterations, st.within_tol, st.gave_up
        else:
            st = tile.write_stacked(target, self.clock, self.noise, wear)
            iterations, gave_up = 0, 0
        spent = None if wear is None else st.spent
        self.clock += st.time_s
        self.energy_j += st.energy_j
        self._count_read_violation(tile)
        read = tile.read_stacked(self.clock, self.noise)
        residual = tile.deviation(read, target, target_range)
        if not verify:
            true = tile.state(self.clock)
            if true is read:
                err = residual
            elif m.write_noise > 0:
                err = math.inf  # a noisy write: count at once (the largest error would cost a pass)
            else:
                err = tile.deviation(true, target, target_range)  # noise-free: no read of targets if clean
            # every device within tol when the largest error is; else count them
            within = 1.0 if err <= tol else tile.within(true, target, tol)
        rp, rm = read[0], read[1]
        return {
            "g_plus": rp,
            "g_minus": rm,
            "iterations": iterations,
            "pulses": int(st.pulses),
            "residual_max": float(residual),
            "within_tol": float(within),
            "energy_j": float(st.energy_j),
            "time_s": float(st.time_s),
            "gave_up": int(gave_up),
            "spent": spent,
        }

    def pulse(self, name: str, counts_plus: torch.Tensor, counts_minus: torch.Tensor) -> dict[str, object]:
        tile = self.tile(name)
        bound = min(self.preset.periphery.max_pulses, INT32_MAX)
        peak = max(_peak_count(counts_plus), _peak_count(counts_minus))
        if peak > bound:
            raise self.safety.refuse(
                LimitViolation("pulses per device", float(peak), bound, "split into several calls")
            )
        n, mag = tile.pulse_counts(counts_plus, counts_minus)
        wear = self.wear(name)
        if wear is not None:
            self._check_wear(name, wear, mag, "pulse request")
        st = tile.apply_pulses(n, mag, self.clock, self.noise, wear)
        self.clock += st.time_s
        self.energy_j += st.energy_j
        return {"pulses": int(st.pulses), "energy_j": float(st.energy_j), "time_s": float(st.time_s)}

    def read_conductance(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A host read of tile `name`, its noise drawn from the `board.read` stream: a run
        with reads (a run log's) trains as one without. The read still takes the board's
        time, so on a drifting preset (`pcm`) later states are a read's time older. It costs
        what a verify read of the tile costs (`TileArray.program_verify`): one row at a time,
        ``read_time_s`` each, and ``read_energy_j`` per device."""
        g = self.read_conductance_stacked(name)
        return g[0], g[1]

    def read_conductance_stacked(self, name: str) -> torch.Tensor:
        """`read_conductance` as one (2, rows, cols) tensor (0: G+, 1: G-), for a host that
        converts it in one go (the emulated driver: one numpy conversion a read, not two)."""
        tile = self.tile(name)
        self._check_read_lines(name)
        m = tile.model
        self.clock += tile.rows * m.read_time_s
        self.energy_j += 2 * tile.cells * m.read_energy_j
        return tile.read_host(self.clock, self.host_reads)

    def _check_batch(self, name: str, batch: int) -> None:
        try:
            check_batch(name, batch, self.limits)
        except LimitViolation as exc:
            raise self.safety.refuse(exc) from None

    def mvm(self, name: str, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        assert self.topology is not None
        self._check_batch(f"mvm input to {name!r}", int(x.shape[0]))
        c = self.topology.coupling(name)
        tile = self.tile(name)
        # the lines are checked at the request (docs/protocol.md) and at what the DACs drive,
        # whichever is larger per line: a DAC's gain error and its rounding put up to ~1.5 % more
        # on a line (rram), past a limit the request met
        xd = self.dac_convert(x, 0, signed=True)
        if not self._lines_within_at_any_drive(name):  # a DAC's output is within clamp_max
            volts = torch.maximum(self._input_volts(x), self._input_volts(xd))
            self._check_lines(name, [(volts, transpose)], "mvm, inputs as asked and as the DACs drive them")
        self._count_dac_violation(xd)
        w = self._weights(c)
        y = xd @ (w.T if transpose else w)
        scale = c.w_max * tile.mvm_noise_std(xd)  # (B,)
        per = self.preset.periphery
        if per.out_noise > 0:  # the read-out's own noise, independent of the input
            scale = torch.sqrt(scale.square() + (c.w_max * per.out_noise) ** 2)
            y = y + scale[:, None] * torch.randn(y.shape, generator=self.noise, device=self.device)
        elif float(scale.abs().max()) > 0:
            y = y + scale[:, None] * torch.randn(y.shape, generator=self.noise, device=self.device)
        self.clock += per.mvm_time_s * x.shape[0]
        self.energy_j += self._read_energy(tile, xd, transpose) * per.mvm_time_s
        self.mvm_calls += 1
        return self._adc_mvm(y)

    def _read_energy(self, tile: TileArray, v: torch.Tensor, transpose: bool) -> float:
        """Joules per second of one read: sum_ij (G+ + G-) V_i^2 over the batch (the read
        voltage's square applied to the sum: one temporary of the input's size, not two)."""
        per_row, per_col = tile.line_sums(self.clock)
        lines = per_col if transpose else per_row
        return float((v.square() @ lines).sum()) * self.preset.periphery.v_read**2

    # ---------------------------------------------------------------- line currents

    def line_currents(
        self, name: str, volts: torch.Tensor, transpose: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The currents (amps, float64) of tile `name`'s lines when its input lines (rows;
        columns with `transpose`) are driven at `volts` (float64, one per line), from the
        conductances the tile holds now, each array (G+, G-) its own crossbar: (driven lines
        ``V_i sum_j G_ij``, shape (2, inputs); sensed lines ``sum_i V_i G_ij``, shape (2,
        outputs)). Wire resistance is left out: it only lowers the currents."""
        g = self.tile(name).state64(self.clock)
        if transpose:
            return volts * g.sum(1), torch.einsum("kij,j->ki", g, volts)
        return volts * g.sum(2), torch.einsum("kij,i->kj", g, volts)

    def _check_lines(self, name: str, drives: list[tuple[torch.Tensor, bool]], what: str) -> None:
        """Refuse (-222, counted in `refused`) a request whose lines would carry more than the
        declared line current, before anything is driven. `drives`: (the peak |V| of each input
        line over the request, float64 volts; transposed). Waved through at once when every
        line at the largest voltage would pass (the common case: no pass over the tile)."""
        limit = self.limits.max_line_current_a
        if limit == math.inf:
            return
        tile = self.tile(name)
        for volts, transpose in drives:
            if not volts.numel():
                continue
            peak = float(volts.max()) * (1.0 + 1e-9)
            if peak * tile.line_ceiling() <= limit or peak * tile.line_sum_max() <= limit:
                continue
            driven_name, sensed_name = ("column", "row") if transpose else ("row", "column")
            currents = self.line_currents(name, volts, transpose)
            for line_name, cur in zip((driven_name, sensed_name), currents, strict=True):
                k, i = divmod(int(torch.argmax(cur)), cur.shape[1])
                try:
                    check_line_current(
                        f"{line_name} {i} of {name!r} ({'G+' if k == 0 else 'G-'} array, {what})",
                        float(cur[k, i]),
                        self.limits,
                    )
                except LimitViolation as exc:
                    raise self.safety.refuse(exc) from None

    def _lines_within_at_any_drive(self, name: str) -> bool:
        """Whether no drive the voltage limit allows can take a line of tile `name` past the
        line-current limit (every line at `v_read_max`, every device at the largest conductance
        it can hold: `TileArray.line_ceiling`, O(1)). Every input a request drives was checked
        against the voltage limit, so such a tile needs no pass over the request's inputs."""
        limit = self.limits.max_line_current_a
        return self.preset.periphery.v_read_max * (1.0 + 1e-9) * self.tile(name).line_ceiling() <= limit

    def _input_volts(self, x: torch.Tensor) -> torch.Tensor:
        """The peak |V| of each input line over a request's batch (float64 volts)."""
        if not x.numel():
            return torch.zeros(x.shape[-1], dtype=torch.float64, device=self.device)
        return x.abs().amax(0).to(torch.float64) * self.preset.periphery.v_read

    def _check_read_lines(self, name: str, target: torch.Tensor | None = None) -> None:
        """A read (host read or write-verify) drives one row at a time at v_read: the row
        carries ``v_read sum_j G_ij``, each column one device's current (less). With `target`
        (a program's, before it writes), from the targets the verify reads will find."""
        limit = self.limits.max_line_current_a
        if limit == math.inf:
            return
        tile = self.tile(name)
        v = self.preset.periphery.v_read
        bound = v * (1.0 + READ_MARGIN)  # the bounds wave through with a margin; the sums are exact
        if target is not None:
            # a program is checked from its targets (docs/protocol.md "Line currents"), as the host
            # checks it (`check_program_lines`): a row of targets at the window's top, not the
            # devices' own ceiling (targets may lie a few float32 steps past it; the host refused
            # such a program that this board took)
            if bound * (target.shape[-1] * conductance_window(self.limits)[1]) <= limit:
                return
        elif bound * tile.line_ceiling() <= limit or bound * tile.line_sum_max() <= limit:
            return  # whatever the tile holds, or by the conductances written
        g = tile.state64(self.clock) if target is None else target.to(torch.float64)
        cur = v * g.sum(2)
        k, i = divmod(int(torch.argmax(cur)), cur.shape[1])
        what = "read" if target is None else "the verify reads of a program, from its targets"
        try:
            check_line_current(f"row {i} of {name!r} ({'G+' if k == 0 else 'G-'} array, {what})",
                               float(cur[k, i]), self.limits)  # fmt: skip
        except LimitViolation as exc:
            raise self.safety.refuse(exc) from None

    def _count_read_violation(self, tile: TileArray) -> None:
        """After a write: a row whose reads carried more than the limit (the written
        conductances landed past the targets that were checked) reached the array."""
        limit = self.limits.max_line_current_a
        v = self.preset.periphery.v_read
        if limit == math.inf or v * tile.line_ceiling() <= limit or v * tile.line_sum_max() <= limit:
            return
        if float((v * tile.state64(self.clock).sum(2)).max()) > limit:
            self.safety.violations += 1

    def _check_settle_lines(self, clamp: dict[str, torch.Tensor], init: dict[str, torch.Tensor]) -> None:
        """A settle's line currents, checked once before it starts: every line of a clamped
        group at its clamp's largest |x|, of a free group at the largest state the converters
        cover (or its init's, if larger), the bias row at 1 (`drivers.checks.settle_line_volts`),
        forwards and transposed, from the conductances the tiles hold."""
        limits = self.limits
        if limits.max_line_current_a == math.inf or self.topology is None:
            return
        if all(self._lines_within_at_any_drive(c.tile) for c in self.topology.couplings):
            return  # no pass over the clamps and inits: 0.5 ms a settle at 784-512-10
        v_max = self.preset.periphery.v_read_max * (1.0 + 1e-9)
        tiles = [self.tile(c.tile) for c in self.topology.couplings]
        if all(v_max * t.line_sum_max() <= limits.max_line_current_a for t in tiles):
            return  # every line at v_read_max, by the conductances written (one bound a write)
        per = self.preset.periphery
        lo, hi = per.state_range
        free = max(abs(lo), abs(hi))
        if per.dac_bits is None and not self.dac_errors.exact:
            # a free node is driven through its DAC (`dac_convert`): quantised, it saturates at
            # the state range; unquantised with gain errors, only at its rails (clamp_max), so a
            # node at the top of the range drives up to that (20 % gain: 1.25, not 1.0)
            free = self.limits.clamp_max

        def driven(g: str, x: torch.Tensor) -> float:
            """A clamp's peak as asked or at its DACs' output (gain errors and rounding: what its
            lines carry), whichever is larger."""
            if not x.numel():
                return 0.0
            return max(float(x.abs().max()), float(self.dac_convert(x, self._channel[g]).abs().max()))

        peaks = {g: driven(g, x) for g, x in clamp.items()}
        for g, x in init.items():
            if g not in clamp:
                peaks[g] = max(free, float(x.abs().max()) if x.numel() else 0.0)
        for name, (r, k) in settle_line_volts(self.topology, limits, peaks, free).items():
            rt = torch.from_numpy(r).to(self.device)
            kt = torch.from_numpy(k).to(self.device)
            self._check_lines(name, [(rt, False), (kt, True)], "settle")

    # ---------------------------------------------------------------- settle

    def settle(
        self,
        clamp: dict[str, torch.Tensor],
        nudge: dict[str, tuple[float, torch.Tensor | None, torch.Tensor | None]] | None = None,
        init: dict[str, torch.Tensor] | None = None,
        trace: int = 0,
    ) -> SettleResult:
        """Relax the network (`SettleEngine.settle`). `nudge` maps a group to (beta, target,
        grad); `trace` records every `trace` steps (0: no trace). Inputs were checked by the
        caller. Clamps and nudge targets go through the DAC once, injected currents through
        a signed, mid-tread DAC auto-ranged to the current it must carry this settle (its top
        code the largest, a zero current exactly zero: `_auto_range`)."""
        if self.topology is None:
            raise ConfigurationError("the board has no topology yet; call configure(topology) first")
        per = self.preset.periphery
        batch = next(iter(clamp.values())).shape[0]
        try:
            check_settle_batch(self.topology, int(batch), self.limits)
            check_trace_values(self.topology, clamp, int(batch), trace, self.limits)
        except LimitViolation as exc:
            raise self.safety.refuse(exc) from None
        self._check_settle_lines(clamp, init or {})
        conv = any(c.kind == "conv" for c in self.topology.couplings)
        if conv:
            applied = {g: self._dac(x, self._channel[g]) for g, x in clamp.items()}
        else:
            applied = self.engine.apply_clamp(clamp)  # the last settle's conversion when it is the same
        groups: dict[str, tuple[float, torch.Tensor | None, torch.Tensor | None]] = {}
        for g, (beta, target, grad) in (nudge or {}).items():
            t = None if target is None else self._dac(target, self._channel[g])
            gr = None
            if grad is not None:
                span = float(grad.abs().max()) or 1.0
                gr = quantize_signed(grad, per.dac_bits, span * _auto_range(per.dac_bits))
            groups[g] = (beta, t, gr)
        engine = self.conv_engine if conv else self.engine
        with denormals_flushed():  # states decaying at a clamp go subnormal (drivers.numerics)
            result = engine.settle(applied, SettleNudge(groups), init, trace)
        self.clock += result.settle_time_s
        self.energy_j += result.energy_j
        return result

    # ---------------------------------------------------------------- reliability state
    # Class-level defaults (immutable), set per instance on first change: the epoch counts
    # restarts, so a host learns of a reset it did not ask for; `transaction` is the open
    # programming sequence, kept (as if in non-volatile memory) across restarts.
    epoch: int = 0
    transaction: str | None = None

    def restart(self) -> None:
        """A reset as the host sees it: configuration lost (`reset`), conductances kept
        (non-volatile), the epoch advanced."""
        self.reset()
        self.epoch += 1

    def lose_arrays(self) -> None:
        """A restart that lost the arrays (re-formed or erased, a spare chip of this identity
        fitted; the fault plan's `lose`): the devices come back as fabricated (drawn from the
        board's seed as at its first configure: never programmed, never worn), under a new
        STATUS `arrays_id`; the identity, the epoch's advance and the transaction tag as for
        any restart. What the host sees is what a server started again on its port shows."""
        self.restart()
        self._physical = {}
        self._wear = {}
        self.arrays_id = secrets.randbits(53)

    def begin_transaction(self, tag: str) -> None:
        if not tag or len(tag) > 256:
            raise ConfigurationError(f"a transaction tag is 1 to 256 characters, got {len(tag)}")
        self.transaction = tag

    def commit_transaction(self, tag: str) -> None:
        if self.transaction is None:
            return  # nothing open: a retried commit
        if self.transaction != tag:
            raise ConfigurationError(
                f"cannot commit transaction {tag!r}: the open one is {self.transaction!r}"
            )
        self.transaction = None
