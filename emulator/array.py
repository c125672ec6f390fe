"""One crossbar tile of differential conductance pairs (G+, G-), with its hidden truth.

The two devices of every cell are stored stacked as one ``(2, rows, cols)`` tensor
(index 0: G+, index 1: G-), so every operation treats both arrays at once.

Time: ``t`` is the board's simulated clock in seconds. The tile never keeps a clock of
its own; it only remembers when each device was last written (for drift). Randomness:
the chip (every device-to-device draw) comes from the ``fab`` generator at construction;
every noisy operation draws from the generator it is given (the board's noise generator).

Cost model for programming: rows are programmed one at a time, all devices of a row
(both G+ and G- columns) in parallel, so a `pulse` call takes ``pulse_time_s`` times the
sum over rows of the largest pulse count in the row; a direct `write` takes one pulse
slot per row, and a verify read ``read_time_s`` per row. Energy is ``pulse_energy_j``
per pulse (a pulse sent to a stuck device still costs energy) plus ``read_energy_j`` per
device read.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np
import torch

from drivers.errors import ConfigurationError
from drivers.wear import pulse_wear
from emulator.devices import (
    DeviceModel,
    DeviceParams,
    PulsePlan,
    drift_factor,
    reset_level,
    step_size,
)
from emulator.ir_drop import WireSolver
from emulator.noise_table import NoisePool
from emulator.statistics import (
    pcm_1f_q,
    pcm_1f_time,
    pcm_1f_times,
    pcm_nu,
    pcm_read_std,
    pcm_write_std,
)
from emulator.wear import window_left, worn_bounds


@dataclass
class WriteStats:
    pulses: int  # programming pulses sent (one per device for a direct write)
    energy_j: float
    time_s: float
    spent: int = 0  # devices a write skipped: spent (at the declared endurance), no pulse left

    def __add__(self, other: WriteStats) -> WriteStats:
        return WriteStats(
            self.pulses + other.pulses,
            self.energy_j + other.energy_j,
            self.time_s + other.time_s,
            self.spent + other.spent,
        )


@dataclass
class VerifyStats:
    iterations: int  # read/correct rounds after the initial write
    pulses: int  # all programming pulses, the initial write included
    within_tol: float  # fraction of all devices (stuck ones included) truly within tol at the end
    residual_max: float  # max |read - target| (S) over all devices at the last read
    energy_j: float
    time_s: float
    gave_up: int = 0  # devices the firmware stopped correcting because they did not move
    reads: int = 0  # full-tile reads taken
    spent: int = 0  # devices the write skipped: spent (at the declared endurance)


def _uniform(lo: torch.Tensor, hi: torch.Tensor) -> tuple[float, float] | None:
    """(lo, hi) as two numbers when every device has the same bounds, else None."""
    lo_min, lo_max = torch.aminmax(lo)
    hi_min, hi_max = torch.aminmax(hi)
    if float(lo_min) == float(lo_max) and float(hi_min) == float(hi_max):
        return float(lo_min), float(hi_min)
    return None


def _attenuation_rms(g: torch.Tensor, m: list[torch.Tensor]) -> float:
    """The factor the wires scale the devices' read noise by on its way to a read-out: the RMS
    over the devices with a conductance > 0 of ``u^1.5``, u = effective / own conductance (`m`:
    each array's effective conductance, `g`: (2, rows, cols) own conductances); 1.0 where none
    has one. A conductance fluctuation moves an output by the voltage across its cell (u of
    the input: the forward share) times the share of the cell's current the output's sense
    amplifier collects (the adjoint problem, one column driven from its sense end: only that
    column's wire carries the full current, so it drops about half as much, ~ sqrt(u)). Against
    the nodal sensitivities of square and 2:1 tiles (tests/test_ir_read_noise.py; 24-48 rows
    and columns, 40-60 ohm, 0.72-0.82 of the ideal-wire noise) within 6 %, where u alone was
    5-16 % high."""
    held = g > 0
    n = int(held.sum())
    ratio = torch.stack(m).div_(g.clamp_min(1e-30)).abs_().pow_(3).masked_fill_(~held, 0.0)
    return math.sqrt(float(ratio.sum(dtype=torch.float64)) / n) if n else 1.0


def _randn(shape: tuple[int, ...], gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """N(0,1) from `gen` wherever it lives, moved to `device` (so a CPU generator gives the same
    numbers whatever the compute device is)."""
    return torch.randn(shape, generator=gen, device=gen.device).to(device, torch.float32)


def _storage_refs(t: torch.Tensor) -> int:
    """The reference count of `t`'s storage as this torch reports it (`t` and its views hold
    one each; the count may include the storage object asked for it), or -1 where this torch
    cannot tell (then no buffer is ever reused)."""
    try:
        return int(torch._C._storage_Use_Count(t.untyped_storage()._cdata))
    except (AttributeError, RuntimeError):
        return -1


def _list_only_refcount() -> int:
    """What ``sys.getrefcount(lst[i])`` reads for an object that only a list holds, on this
    interpreter (3.11 counts the call's argument, later versions may not): `Spares.take`
    compares with it, in the same form of call."""
    probe = [object()]
    return sys.getrefcount(probe[0])


_LIST_ONLY = _list_only_refcount()
# what `_storage_refs` reads for a tensor with no views, on this torch (-1: it cannot tell)
_STORAGE_ALONE = _storage_refs(torch.empty(1))


class Spares:
    """Retired (2, rows, cols) float32 buffers of one tile (its former states, its former
    reads), handed out again for the next write or read instead of a new allocation (a fresh
    buffer of a large tile costs more than the pass that fills it: the allocator maps and
    faults in its pages). A buffer is handed out only while nothing but this pool holds it:
    no other Python reference to the tensor and no view of its storage (a report's G+ and G-,
    a caller's `state`), so what anyone still holds is never written over; a buffer still
    held stays in the pool until it is free or pushed out by newer ones (`keep`)."""

    def __init__(self, shape: tuple[int, ...], device: torch.device, keep: int = 2) -> None:
        self.shape = shape
        self.device = device
        self.keep = keep
        self._bufs: list[torch.Tensor] = []

    def take(self) -> torch.Tensor | None:
        """A free buffer (removed from the pool), or None."""
        for i in range(len(self._bufs)):
            # Python references: the list's alone; the storage: the tensor alone (no views)
            b = self._bufs[i]
            alone = _STORAGE_ALONE >= 0 and _storage_refs(b) == _STORAGE_ALONE
            del b
            if alone and sys.getrefcount(self._bufs[i]) == _LIST_ONLY:
                return self._bufs.pop(i)
        return None

    def give(self, t: torch.Tensor | None) -> None:
        """Retire `t` into the pool (if it is a plain buffer of the pool's shape)."""
        if (
            t is None
            or tuple(t.shape) != self.shape
            or t.dtype != torch.float32
            or t.device != self.device
            or not t.is_contiguous()
            or t._base is not None
            or any(t is b for b in self._bufs)
        ):
            return
        self._bufs.append(t)
        if len(self._bufs) > self.keep:
            self._bufs.pop(0)


class TileArray:
    """A ``rows x cols`` tile of differential pairs drawn from `model` with the `fab` generator.

    Power-on state: both devices of every pair at their own g_lo (unprogrammed), written at
    t = 0; stuck devices at their stuck value.

    Write and read noise of a large tile (at least `noise_table_min` devices, both of every
    pair counted) come from a noise table (`emulator.noise_table.NoisePool.fresh_window`)
    instead of a fresh ``randn`` of the whole tile: the tile keeps a table of
    ``noise_table_blocks + 1`` tiles' worth of N(0,1) values drawn from the generator it is
    given (a new table when it is given another generator), and each noisy write or full-tile
    read renews ``1 / noise_table_reuse`` of a tile's worth of them in place and reads a
    window of one value per device at a random offset: an eighth of a fresh draw's cost plus
    one multiply-add pass (torch's CPU randn: ~4 ns a value, 3-6 ms for a 785 x 512 tile on
    one thread; its window and refresh ~0.5 ms). Fidelity: every value is exactly N(0,1) and
    the values of one write (or read) are i.i.d.; no device ever gets the same value twice
    (not in two writes, not in its write and a read), so a device's noise is independent from
    one operation to the next. What is not independent: each value serves about
    `noise_table_reuse` operations at different devices, so the noise pattern of a write is,
    but for its renewed values, an earlier one's shifted by some number of devices along the
    flattened (2, rows, cols) layout (the offsets are uniform over ``noise_table_blocks``
    tiles' worth); two given distinct devices share a value in two given operations with
    probability about 1 / (noise_table_blocks * 2 rows cols), but sums over many devices (a
    tile's mean write error, one column's error summed against inputs correlated at the
    shift's row lag) are correlated across the operations whose windows overlap. Smaller tiles
    draw fresh values every time (there a table would cost more than it saves; their noise
    streams, and the figures tests pin from them, are as before the table).
    `noise_table_min = math.inf` turns the table off.
    """

    noise_table_min: float = 1 << 16  # devices; a 256 x 128 tile has 65536
    noise_table_reuse = 8
    noise_table_blocks = 4

    def __init__(
        self, rows: int, cols: int, model: DeviceModel, fab: torch.Generator, device: torch.device
    ) -> None:
        if rows < 1 or cols < 1:
            raise ConfigurationError(f"a tile needs rows, cols >= 1, got {rows} x {cols}")
        self.rows = rows
        self.cols = cols
        self.model = model
        self.device = torch.device(device)
        self._dshape = (2, rows, cols)
        self.params, side = DeviceParams.draw_chip(model, self._dshape, fab, self.device)
        self._nominal = DeviceParams.nominal(model, self._dshape, self.device)
        self._g0 = torch.where(self.params.stuck, self.params.stuck_value, self.params.g_lo)
        # wear-out (`emulator.wear`), only with a declared endurance: the fabricated bounds and
        # stuck devices (the worn ones are derived from them and the wear) and which bound each
        # device fails at, from the draw that sides a factory-stuck device (no draw of its own)
        self._fab: tuple[torch.Tensor, ...] | None = None
        self._fails_high: torch.Tensor | None = None
        if model.pulse_endurance is not None:
            p = self.params
            self._fab = (p.g_lo.clone(), p.g_hi.clone(), p.stuck.clone(), p.stuck_value.clone())
            self._fails_high = side >= 1.0 - model.wear_stuck_high
        self._stuck_derived()
        self._scratch: torch.Tensor | None = None  # |g - target| of `deviation` and `within`
        # former states and former noisy reads, reused for the next write and read (`Spares`).
        # One former state is enough: the state before the present one is free by the next
        # write (a report viewing it has been replaced by then). A read's report is still
        # held when the next read is taken, so reads keep two. At most one extra state and
        # two extra reads of the tile's size stay allocated.
        self._spare_states = Spares(self._dshape, self.device, keep=1)
        self._spare_reads = Spares(self._dshape, self.device, keep=2)
        self._clean: tuple[torch.Tensor, int] | None = None  # see `write_stacked`, `deviation`
        # (g, target, their versions, absolute) of the difference the scratch holds (`_diff`)
        self._scratch_key: tuple[torch.Tensor, torch.Tensor, tuple[int, int], bool] | None = None
        # float64: the board's clock advances by nanoseconds on top of hours
        self._t_written = torch.zeros(self._dshape, dtype=torch.float64, device=self.device)
        self._drifts = bool((self.params.nu > 0).any())
        self._nu_max = float(self.params.nu.max())
        # drift lowers G toward 0 but never below a device's own g_lo (its RESET / HRS floor):
        # one number when the bounds are uniform, None when every g_lo is 0 (pcm), where
        # G0 (t / t0)^-nu >= 0 already holds and a drifted state needs no extra pass
        self._drift_floor = self._floor()
        # the common write time while all devices share one; `_t_written` holds per-device
        # times (and is meaningful) only while `_t_uniform` is None
        self._t_uniform: float | None = 0.0
        self._t_latest = 0.0  # the latest write time of any device
        self._wire = model.wire_resistance  # ohms per segment; > 0: weights through `emulator.ir_drop`
        # one IR-drop solver per array (G+, G-), keeping its warm start between writes
        arrays = 2 if self._wire > 0 else 0
        self._ir = [WireSolver(rows, cols, self._wire, model.ir_model) for _ in range(arrays)]
        self._version = 0
        self._cache_version = -1
        self._cache_t = 0.0
        self._cache: torch.Tensor | None = None
        self.weights_epoch = 0  # recomputations of the cached weights (see `weights`)
        self._table: NoisePool | None = None  # write and read noise of a large tile
        # `pcm_read_std` of the written state (`_g0`), kept with that tensor and its in-place
        # version: an undrifted tile's reads (the converter routines' reference tiles) share it
        self._read_std: tuple[torch.Tensor, int, torch.Tensor] | None = None
        self._read_noise_t: tuple[float, torch.Tensor] | None = None  # `_read_noise_scalar`
        # state-dependent statistics (`emulator.statistics`): a device's drift exponent is
        # drawn anew from what it holds at every write, from a stream of the tile's own (so
        # the board's noise stream is the same with and without them)
        self._pcm = model.statistics == "pcm"
        self._nu_gen: torch.Generator | None = None
        # ((version, time of the state or None: as written), RMS read-noise std): `read_noise_rms`
        self._read_rms: tuple[tuple[int, float | None], float] | None = None
        self._lines: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (version, `line_sums`)
        self._line_max: tuple[int, float] | None = None  # (version, `line_sum_max`)
        # (version, the per-array row and column sums of that version's state): `_array_line_sums`
        self._array_sums: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self._ceiling: float | None = None  # `line_ceiling`
        # with wire resistance: the line sums of the effective conductances `weights` last used
        self._eff_lines: tuple[torch.Tensor, torch.Tensor] | None = None
        # with wire resistance: the factor the wires scale the devices' read noise by on its way
        # to a read-out, as of the weights last computed (`noise_atten`); 1.0 with ideal wires
        self._noise_atten = 1.0
        if self._pcm:
            seed = int(torch.randint(0, 2**62, (1,), generator=fab, device=fab.device))
            self._nu_gen = torch.Generator().manual_seed(seed)
            self._redraw_nu(None)
        # what accumulates after a write (off: None and no draw, so the chip and every stream are
        # as without it): the PCM 1/f noise (`DeviceModel.noise_1f_scale`), per device
        # ``scale Q(G0) z``, and the RRAM relaxation (`relax_sigma`, `relax_mean`), per device
        # ``relax_mean + relax_sigma z`` (S per e-fold of time), drawn at each write from a
        # generator of the tile's own on the compute device; and when each write ended (one
        # number while all devices share it, else per device, float64)
        self._1f: torch.Tensor | None = None
        self._rx: torch.Tensor | None = None
        self._acc_gen: torch.Generator | None = None
        self._acc_uniform: float | None = 0.0
        self._acc_ended: torch.Tensor | None = None
        self._acc_latest = 0.0  # the latest end of a write of any device
        self._1f_amp = 0.0  # max |scale Q(G0) z G0| (S), for the weights' cache
        self._rx_amp = 0.0  # max |relax_mean + relax_sigma z| (S), likewise
        if model.noise_1f_scale > 0 or model.relaxes:
            seed = int(torch.randint(0, 2**62, (1,), generator=fab, device=fab.device))
            self._acc_gen = torch.Generator(device=self.device).manual_seed(seed)
            self._mark_acc(0.0, None)

    def _stuck_derived(self) -> None:
        """What direct writes take from the stuck devices and the bounds: the stuck devices'
        flat indices and values, and the devices' own bounds as two numbers when every device
        shares them (a scalar clamp, same result)."""
        p = self.params
        self._any_stuck = bool(p.stuck.any())
        self._stuck_idx = p.stuck.reshape(-1).nonzero().squeeze(1) if self._any_stuck else None
        self._stuck_val = None if self._stuck_idx is None else p.stuck_value.reshape(-1)[self._stuck_idx]
        self._bounds = _uniform(p.g_lo, p.g_hi)

    def _floor(self) -> float | torch.Tensor | None:
        """Drift lowers G toward 0 but never below a device's own g_lo (its RESET / HRS floor):
        one number when the bounds are uniform, None when every g_lo is 0 (pcm), where
        G0 (t / t0)^-nu >= 0 already holds and a drifted state needs no extra pass."""
        floor: float | torch.Tensor = self._bounds[0] if self._bounds else self.params.g_lo
        return None if float(self.params.g_lo.max()) <= 0.0 else floor

    # ----------------------------------------------------------------- wear-out

    def wear_out(self, wear: torch.Tensor) -> None:
        """Make the devices as worn as `wear` says (their life pulse counts, int64 (2, rows,
        cols)), against the model's declared endurance (`emulator.wear`): each device's window
        narrowed toward the bound it fails at, spent devices (at the endurance) stuck at that
        bound with no drift, and every device's state clamped into its window. A function of
        the fabrication and `wear` alone (a tile drawn anew over worn devices, on a
        reconfigure, is worn alike); nothing changes while no device is past the onset, or
        when `wear` is what the tile was last worn by. No-op without an endurance."""
        self._wear_out(wear, check=True)

    def _wear_out(self, wear: torch.Tensor, *, check: bool = False) -> None:
        """`wear_out`; without `check` (a write or pulse, which changes the state and the
        wear anyway) the tile's caches are invalidated without first comparing the new bounds
        with the old."""
        if self.model.pulse_endurance is not None:
            self._wear_to(wear, int(wear.max()), check)

    def _wear_to(self, wear: torch.Tensor, top: int, check: bool = False) -> None:
        """`_wear_out` with `top`, the largest count of `wear`, known to the caller (a write)."""
        endurance = self.model.pulse_endurance
        if endurance is None or self._fab is None or self._fails_high is None:
            return
        if wear.shape != self._dshape:
            raise ConfigurationError(
                f"wear must have the tile's device shape {self._dshape}, got {tuple(wear.shape)}: pass "
                "the tile's own counts (`Board.wear`)"
            )
        if top <= self.model.wear_onset * endurance:
            return  # the common case: no device has started to wear out
        lo0, hi0, stuck0, value0 = self._fab
        lo, hi = worn_bounds(lo0, hi0, self._fails_high, window_left(wear, endurance, self.model.wear_onset))
        p = self.params
        stuck = stuck0 | (wear >= endurance) if top >= endurance else p.stuck
        if check and torch.equal(lo, p.g_lo) and torch.equal(hi, p.g_hi) and torch.equal(stuck, p.stuck):
            return
        p.g_lo, p.g_hi = lo, hi
        if stuck is not p.stuck:  # devices spent: stuck at the bound each failed at, no drift
            spent = stuck & ~stuck0
            p.stuck = stuck
            p.stuck_value = torch.where(spent, torch.where(self._fails_high, hi0, lo0), value0)
            p.nu = torch.where(spent, torch.zeros_like(p.nu), p.nu)
            if self._1f is not None:  # nor 1/f noise
                self._1f = self._1f.masked_fill(spent, 0.0)
            if self._rx is not None:  # nor relaxation
                self._rx = self._rx.masked_fill(spent, 0.0)
            self._drifts = bool((p.nu > 0).any())
            self._nu_max = float(p.nu.max())
            self._stuck_derived()
        else:
            self._bounds = None  # worn bounds differ device to device: per-device clamps
        self._drift_floor = self._floor()
        g0 = torch.clamp(self._g0, lo, hi)
        self._g0 = torch.where(stuck, p.stuck_value, g0) if self._any_stuck else g0
        self._version += 1  # the cached weights, line sums and `deviation`'s shortcut are stale
        self._scratch_key = None
        self._clean = None

    # ----------------------------------------------------------------- shape and truth
    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    @property
    def cells(self) -> int:
        return self.rows * self.cols

    @property
    def stuck(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Boolean masks of the stuck devices (G+, G-)."""
        return self.params.stuck[0], self.params.stuck[1]

    def truth(self) -> dict[str, torch.Tensor]:
        """The hidden per-device parameters, each ``(2, rows, cols)`` (index 0: G+, 1: G-).

        Keys: g_min, g_max (own bounds), dw_up, dw_down (step scales, see `emulator.devices`),
        nu (drift exponent), stuck (bool), stuck_value (S). For calibration tests only.
        """
        p = self.params
        return {
            "g_min": p.g_lo.clone(),
            "g_max": p.g_hi.clone(),
            "dw_up": p.dw_up.clone(),
            "dw_down": p.dw_down.clone(),
            "nu": p.nu.clone(),
            "stuck": p.stuck.clone(),
            "stuck_value": p.stuck_value.clone(),
        }

    # ----------------------------------------------------------------- state
    def _now(self, t: float) -> torch.Tensor:
        """True conductances (2, rows, cols) at time t: drifted, and with accumulated 1/f noise
        where the model has it."""
        g = self._drifted(t)
        return g if self._acc_gen is None else self._with_acc(g, t)

    def _with_acc(self, g: torch.Tensor, t: float) -> torch.Tensor:
        """`g` with what each device accumulated since its write ended, at `t`: its 1/f noise
        ``g (1 + f(tau) c_1f)`` and its relaxation ``+ ln(1 + tau / relax_t0) c_rx``, kept
        within the device's own bounds (a fluctuation does not take a device past its SET or
        RESET state): a fresh tensor, or `g` itself while nothing has accumulated yet."""
        m = self.model
        out = g
        if self._acc_uniform is not None:
            tau = t - self._acc_uniform
            f = pcm_1f_time(tau, m.noise_1f_t_read) if self._1f is not None else 0.0
            if f > 0.0:
                out = torch.addcmul(g, g, self._1f, value=f)
            r = math.log1p(max(tau, 0.0) / m.relax_t0) if self._rx is not None else 0.0
            if r > 0.0:
                out = torch.add(out, self._rx, alpha=r)
            if out is g:
                return g
        else:
            assert self._acc_ended is not None
            taus = t - self._acc_ended
            if self._1f is not None:
                out = torch.addcmul(g, g, self._1f * pcm_1f_times(taus, m.noise_1f_t_read))
            if self._rx is not None:
                out = out + self._rx * taus.clamp_min(0.0).div_(m.relax_t0).log1p_().to(torch.float32)
        if self._bounds is not None:
            return out.clamp_(*self._bounds)
        return self._clamp_own(out, out=out)

    def _mark_acc(self, end: float, mask: torch.Tensor | None) -> None:
        """New draws for the devices just written (`mask`; None: all), whose write ended at
        `end`: 1/f ``scale Q(G0) z`` of what each holds, relaxation ``relax_mean + relax_sigma
        z'``; stuck devices get none."""
        assert self._acc_gen is not None
        m, stuck = self.model, self.params.stuck
        if m.noise_1f_scale > 0:
            z = torch.randn(self._dshape, generator=self._acc_gen, device=self.device)
            c = pcm_1f_q(self._g0, m.g_max).mul_(z).mul_(m.noise_1f_scale).masked_fill_(stuck, 0.0)
            self._1f = c if mask is None or self._1f is None else torch.where(mask, c, self._1f)
            self._1f_amp = float((self._1f * self._g0).abs().max())  # one sync per write
        if m.relaxes:
            z = torch.randn(self._dshape, generator=self._acc_gen, device=self.device)
            c = z.mul_(m.relax_sigma).add_(m.relax_mean).masked_fill_(stuck, 0.0)
            self._rx = c if mask is None or self._rx is None else torch.where(mask, c, self._rx)
            self._rx_amp = float(self._rx.abs().max())  # one sync per write
        if mask is None:
            self._acc_uniform, self._acc_ended = end, None
        else:
            if self._acc_uniform is not None:
                self._acc_ended = torch.full(
                    self._dshape, self._acc_uniform, dtype=torch.float64, device=self.device
                )
            assert self._acc_ended is not None
            self._acc_ended = self._acc_ended.masked_fill_(mask, end)
            self._acc_uniform = None
        self._acc_latest = max(self._acc_latest, end)

    def _acc_cached(self, t: float) -> bool:
        """Whether what accumulates after a write moved no device by more than the cache's
        tolerance between the cached weights' time and `t`: ``|f(b) - f(a)| max |c|`` per
        effect, with the times taken from the latest write (both laws grow fastest soonest after
        a write), within the larger of 1e-6 g_max and 1 % of one read's noise std."""
        m = self.model
        a, b = sorted((self._cache_t - self._acc_latest, t - self._acc_latest))
        moved = 0.0
        if self._1f is not None:
            moved += (pcm_1f_time(b, m.noise_1f_t_read) - pcm_1f_time(a, m.noise_1f_t_read)) * self._1f_amp
        if self._rx is not None:
            moved += (
                math.log1p(max(b, 0.0) / m.relax_t0) - math.log1p(max(a, 0.0) / m.relax_t0)
            ) * self._rx_amp
        return moved <= max(1e-6 * m.g_max, 0.01 * m.read_noise)

    def _drifted(self, t: float) -> torch.Tensor:
        """Drifted conductances (2, rows, cols) at time t (the tile's `_g0` while none drifts)."""
        if not self._drifts:
            return self._g0
        if self._t_uniform is not None:
            log_ratio = math.log(max(t - self._t_uniform, self.model.drift_t0) / self.model.drift_t0)
            if log_ratio == 0.0:
                return self._g0
            return self._floored(self._g0 * torch.exp(self.params.nu * -log_ratio))
        return self._floored(self._g0 * drift_factor(self.model, t - self._t_written, self.params.nu))

    def _floored(self, g: torch.Tensor) -> torch.Tensor:
        """A drifted state `g` (a fresh tensor) raised, in place, to the devices' own g_lo."""
        floor = self._drift_floor
        if floor is None:
            return g
        if isinstance(floor, float):
            return g.clamp_min_(floor)
        return torch.maximum(g, floor, out=g)

    def _written(self, t: float, mask: torch.Tensor | None = None, end: float | None = None) -> None:
        """Record a write at `t` of all devices (mask None) or of the masked ones, which ended
        at `end` (default `t`; the accumulated 1/f noise counts from there, drift from `t`)."""
        if mask is None:
            self._t_uniform = t  # `_t_written` is filled in only when the devices' times part
        else:
            if self._t_uniform is not None:
                self._t_written.fill_(self._t_uniform)
            self._t_written = torch.where(mask, torch.full_like(self._t_written, t), self._t_written)
            self._t_uniform = None
        self._t_latest = max(self._t_latest, t)
        self._version += 1  # the cached weights are stale
        self._scratch_key = None  # (and `_diff` holds no old state alive)
        if self._pcm:
            self._redraw_nu(mask)
        if self._acc_gen is not None:
            self._mark_acc(t if end is None else end, mask)

    def _redraw_nu(self, mask: torch.Tensor | None) -> None:
        """New drift exponents for the devices just written (`mask`; None: all), drawn from
        the conductance each holds (`emulator.statistics.pcm_nu`); stuck devices keep 0."""
        assert self._nu_gen is not None
        z = torch.randn(self._dshape, generator=self._nu_gen).to(self.device)
        written = ~self.params.stuck if mask is None else mask & ~self.params.stuck
        self.params.nu = torch.where(written, pcm_nu(self._g0, self.model.g_max, z), self.params.nu)
        self._drifts = bool((self.params.nu > 0).any())
        self._nu_max = float(self.params.nu.max())

    def conductances(self, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        """True (G+, G-) at time `t`: drift since each device's last write, stuck values.
        Fresh tensors: the caller may keep or modify them."""
        g = self._now(t)
        if g is self._g0:
            g = g.clone()
        return g[0], g[1]

    def _table_window(self, gen: torch.Generator) -> torch.Tensor | None:
        """N(0,1) for every device of one write or read from the tile's noise table (a view of
        the table: use it at once, do not modify it), or None where the tile draws fresh
        values instead (fewer than `noise_table_min` devices). See `noise_table_min`."""
        n = self._dshape[0] * self.cells
        if n < self.noise_table_min:
            return None
        table = self._table
        if table is None or table.gen is not gen:
            table = self._table = NoisePool(gen, n, self.device, blocks=self.noise_table_blocks)
        return table.fresh_window(self._dshape, -(-n // self.noise_table_reuse))

    def _read(self, t: float, gen: torch.Generator, table: bool = True) -> torch.Tensor:
        """True + N(0, read_noise) at `t`; `table=False` draws fresh values from `gen` even on a
        large tile, leaving the tile's noise table (and the generator it draws from) alone."""
        g = self._now(t)
        if self._pcm and self.model.read_noise > 0:  # each device's std follows what it holds
            z = self._table_window(gen) if table else None
            z = _randn(self._dshape, gen, self.device) if z is None else z
            return torch.addcmul(g, self._pcm_read_std(g), z)
        if self.model.read_noise > 0:
            z = self._table_window(gen) if table else None
            if z is not None:
                out = self._spare_reads.take()
                r = torch.add(g, z, alpha=self.model.read_noise, out=out) if out is not None else (
                    torch.add(g, z, alpha=self.model.read_noise))  # fmt: skip
                self._spare_reads.give(r)
                return r
            # read_noise * N(0,1) + g, in the draw's own buffer (the same numbers as g + ...)
            return _randn(self._dshape, gen, self.device).mul_(self._read_noise_scalar()).add_(g)
        return g

    def _read_noise_scalar(self) -> torch.Tensor:
        """The model's `read_noise` as a 0-d float32 CPU tensor, the factor a read's draw is
        scaled by: the same float32 product as the Python float (which the multiply casts to
        float32 anyway), without wrapping the float into a new tensor at every read (a third of
        a small tile's read). Kept with the value it was made from."""
        hit = self._read_noise_t
        v = self.model.read_noise
        if hit is None or hit[0] != v:
            hit = self._read_noise_t = (v, torch.tensor(v, dtype=torch.float32))
        return hit[1]

    def _pcm_read_std(self, g: torch.Tensor) -> torch.Tensor:
        """`pcm_read_std` of the state `g` a read finds: kept while `g` is the written state
        (`_g0`: nothing drifted or accumulated since the write) and unmodified (the tensor's own
        version counter), so repeated reads of such a tile compute it once, the same numbers
        as computed anew (a drifted state, a fresh tensor each read, is computed every time).
        Shared: do not modify it."""
        hit = self._read_std
        if hit is not None and hit[0] is g and hit[1] == g._version:
            return hit[2]
        std = pcm_read_std(g, self.model.g_max, self.model.read_noise)
        if g is self._g0:
            self._read_std = (g, g._version, std)
        return std

    def state(self, t: float) -> torch.Tensor:
        """True conductances (2, rows, cols) at time `t`; shared with the tile: do not modify."""
        return self._now(t)

    def line_sums(self, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``sum (G+ + G-)`` along each row and along each column at time `t`, shapes (rows,)
        and (cols,): the conductance each input line of a read sees (a read's energy is
        ``sum_i line_i V_i^2``). With wire resistance, the sums of the effective
        conductances (`emulator.ir_drop`): the wires let less current through than the
        devices alone would, and a line driven at V delivers V times the current it carries
        (exact for a single line, and for a uniform input under the attenuation model).
        Cached between writes of a tile that does not drift (the host's iteration reads a
        tile many times between two writes); do not modify them."""
        hit = self._lines
        if hit is not None and hit[0] == self._version and not self._drifts and self._acc_gen is None:
            return hit[1], hit[2]
        if self._wire > 0:
            self.weights(t)  # computes (or keeps) the effective conductances and their sums
            assert self._eff_lines is not None
            rows, cols = self._eff_lines
        else:
            g = self._now(t)
            if g is self._g0:  # the per-array sums `line_sum_max` takes too: one reading of the tile
                per_row, per_col = self._array_line_sums()
                rows, cols = per_row.sum(0), per_col.sum(0)
            else:
                rows, cols = g.sum((0, 2)), g.sum((0, 1))
        self._lines = (self._version, rows, cols)
        return rows, cols

    def _array_line_sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``sum G`` along each row and each column of each array of the conductances as last
        written (`_g0`), shapes (2, rows) and (2, cols), float32; cached between writes. Both
        the line-current bound (`line_sum_max`: its largest line of either array) and the
        power's line sums (`line_sums`: the two arrays added) come from them, so a write costs
        one pair of sums, not two."""
        hit = self._array_sums
        if hit is None or hit[0] != self._version:  # every new state is a new version
            g = self._g0
            hit = self._array_sums = (self._version, g.sum(2), g.sum(1))
        return hit[1], hit[2]

    def line_ceiling(self) -> float:
        """A bound on ``sum G`` along any line that holds whatever the tile is written to: the
        longest line's device count times the largest conductance a device can hold (its own
        upper bound, or its stuck value), float64 siemens. Fixed at fabrication: O(1) per call."""
        if self._ceiling is None:
            top = max(
                float(self.params.g_hi.max()), float(self.params.stuck_value.max()), float(self._g0.max())
            )
            self._ceiling = max(self.rows, self.cols) * top
        return self._ceiling

    def line_sum_max(self) -> float:
        """A bound on the largest ``sum G`` along any one line (row or column) of either array
        (G+, G-), siemens, of the conductances as last written: drift only lowers them, so a
        line driven at V carries at most V times this (`Board` waves a request through on it).
        Summed in float32 and raised by ``n 2^-23`` relative (n the longest line's devices),
        more than a float32 sum of n nonnegative values can fall short of the exact one in any
        order (``(n - 1) 2^-24``; a float64 copy of the tile cost a pass and 8 bytes a device
        every write); a request this bound does not wave through is checked exactly. Cached
        between writes."""
        hit = self._line_max
        if hit is not None and hit[0] == self._version:
            return hit[1]
        g = self._g0
        if self._1f is not None:  # the 1/f noise may raise a device up to its own g_hi
            g = torch.where(self._1f > 0, self.params.g_hi, g)
        if self._rx is not None:  # and so may its relaxation
            g = torch.where(self._rx > 0, self.params.g_hi, g)
        margin = max(self.rows, self.cols) * 2.0**-23
        per_row, per_col = self._array_line_sums() if g is self._g0 else (g.sum(2), g.sum(1))
        top = max(float(per_row.max()), float(per_col.max())) * (1.0 + margin)
        self._line_max = (self._version, top)
        return top

    def state64(self, t: float) -> torch.Tensor:
        """True conductances (2, rows, cols) at `t` in float64 (a line current's sum is taken in it)."""
        return self._now(t).double()

    def read_stacked(self, t: float, gen: torch.Generator) -> torch.Tensor:
        """`read` as one (2, rows, cols) tensor; without read noise it is `state(t)` itself."""
        return self._read(t, gen)

    def read_host(self, t: float, gen: torch.Generator) -> torch.Tensor:
        """One noisy read of every device for the host, (2, rows, cols): true + N(0,
        read_noise), fresh from `gen` (its own stream: the board's `read_conductance`), never
        from the noise table that the tile's writes share. Not clipped at 0: this is a
        measurement, and a clipped one would bias the noise statistics near g = 0. Without
        read noise it is `state(t)` itself (shared with the tile: do not modify it)."""
        return self._read(t, gen, table=False)

    def read(self, t: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """`read_host` as (G+, G-)."""
        g = self.read_host(t, gen)
        return g[0], g[1]

    def weights(self, t: float) -> torch.Tensor:
        """``(G+ - G-) / (g_max - g_min)`` (nominal range), IR drop applied, shape (rows, cols).

        Cached: recomputed after a write or pulse, or, on a drifting tile, when the drift
        since the cached time may have moved some conductance by more than 1e-6 relative
        (``nu_max |dt| / (time since the latest write)``; far below any read noise, and it
        keeps the many settles of a training step on one cached tensor).

        The returned tensor is the cache itself, one tensor for the tile's lifetime, updated
        in place whenever it is recomputed (`weights_epoch` counts the recomputations): a
        board keeps views of it from one write to the next. Do not modify it; clone it to
        keep a snapshot.
        """
        if self._cache is not None and self._cache_version == self._version:
            if not self._drifts and self._acc_gen is None:
                return self._cache
            since = max(min(t, self._cache_t) - self._t_latest, self.model.drift_t0)
            drift_ok = not self._drifts or self._nu_max * abs(t - self._cache_t) <= 1e-6 * since
            if drift_ok and (self._acc_gen is None or self._acc_cached(t)):
                return self._cache
        g = self._now(t)
        if self._cache is None:
            self._cache = torch.empty(self.shape, device=self.device)
        if self._wire > 0:  # each array's effective conductance, wires included
            m = [self._ir[k].effective(g[k]) for k in (0, 1)]
            both = m[0] + m[1]
            self._eff_lines = (both.sum(1), both.sum(0))
            if self.model.read_noise > 0:  # what it scales: none without read noise
                self._noise_atten = _attenuation_rms(g, m)
            w = torch.sub(m[0], m[1], out=self._cache).div_(self.model.g_range)
        else:
            w = torch.sub(g[0], g[1], out=self._cache).div_(self.model.g_range)
        self._cache_version = self._version
        self._cache_t = t
        self.weights_epoch += 1
        return w

    def read_noise_rms(self) -> float:
        """One read's noise std, as one number for the tile: the model's `read_noise`, or with
        state-dependent statistics the RMS over the devices of their stds at the conductances
        they hold when the tile's cached weights were last computed (`weights`: the state an
        mvm's product reads, drift and accumulated noise included; as last written where the
        tile neither drifts nor accumulates, or before its weights are computed). What the
        mvm's noise formula, which assumes equal devices, takes. A drifted pcm device reads
        with less noise than at its write (std ~ G^0.35): a day after a write at 20 uS, 0.153
        against 0.177 uS (tests/test_mvm_read_noise_drift.py)."""
        if not self._pcm:
            return self.model.read_noise
        moving = self._drifts or self._acc_gen is not None
        fresh = self._cache is not None and self._cache_version == self._version
        at = self._cache_t if moving and fresh else None
        key = (self._version, at)
        cached = self._read_rms
        if cached is None or cached[0] != key:
            g = self._g0 if at is None else self._now(at)
            std = pcm_read_std(g, self.model.g_max, self.model.read_noise)
            rms = math.sqrt(float(std.double().square().mean()))
            cached = self._read_rms = (key, rms)
        return cached[1]

    @property
    def noise_atten(self) -> float:
        """The factor the wires scale the devices' read noise by on its way to a read-out, as
        of the weights last computed (`weights`; `_attenuation_rms`), 1.0 with ideal wires. A
        device's read noise is a fluctuation of its conductance, and the wires attenuate what
        it does to an output as they attenuate its signal."""
        return self._noise_atten

    def mvm_noise_std(self, x: torch.Tensor) -> torch.Tensor:
        """Std of the read-noise error of ``x @ weights`` for each batch row, shape ``x.shape[:-1]``.

        Output j of ``x @ W`` with noisy devices is
        ``sum_i x_i (G+_ij + e+_ij - G-_ij - e-_ij) / range``; with independent Gaussian
        e ~ N(0, read_noise) the error is Gaussian with variance
        ``2 read_noise^2 sum_i x_i^2 / range^2``, independent across outputs j (disjoint
        devices) and across batch rows (each input vector is applied in its own read cycle).
        Adding ``N(0,1) * mvm_noise_std(x)[..., None]`` to each output is therefore
        statistically identical to drawing per-device read noise, at the cost of one
        output-sized draw. The same formula holds for ``x @ W.T`` (sum over x's own last
        axis). With wire resistance each device's noise reaches the output attenuated as its
        signal is (`noise_atten`, of the weights last computed: call `weights` first).
        """
        if self.model.read_noise == 0:
            return torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)
        scale = self.read_noise_rms() * math.sqrt(2.0) / self.model.g_range * self._noise_atten
        return scale * torch.linalg.vector_norm(x, dim=-1)

    # ----------------------------------------------------------------- programming
    def stack_targets(self, a: torch.Tensor, b: torch.Tensor, what: str) -> torch.Tensor:
        """(a, b) as one (2, rows, cols) tensor: a view when `b` directly follows `a` in one
        storage (the two halves of one stacked tensor; nothing is copied), else a stack.
        The tile never modifies or keeps it."""
        a = torch.as_tensor(a, device=self.device)
        b = torch.as_tensor(b, device=self.device)
        if a.shape != self.shape or b.shape != self.shape:
            raise ConfigurationError(
                f"{what}: expected two arrays of shape {self.shape}, got {tuple(a.shape)} and "
                f"{tuple(b.shape)}"
            )
        if (
            a.dtype == b.dtype
            and a.is_contiguous()
            and b.is_contiguous()
            and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and b.storage_offset() == a.storage_offset() + a.numel()
        ):
            return a.as_strided((2, *self.shape), (a.numel(), *a.stride()), a.storage_offset())
        return torch.stack((a, b))

    def write(
        self,
        target_plus: torch.Tensor,
        target_minus: torch.Tensor,
        t: float,
        gen: torch.Generator,
        wear: torch.Tensor | None = None,
    ) -> WriteStats:
        """Direct programming without verify: every non-stuck device lands at
        ``clip(target + N(0, write_noise), own bounds)`` and is marked written at `t`."""
        return self.write_stacked(self.stack_targets(target_plus, target_minus, "write"), t, gen, wear)

    def write_stacked(
        self, target: torch.Tensor, t: float, gen: torch.Generator, wear: torch.Tensor | None = None
    ) -> WriteStats:
        """`write` with the targets as one (2, rows, cols) tensor (`_stack`). `wear`: the
        devices' life pulse counts (int64, (2, rows, cols)), each raised by the write's one
        pulse (stuck devices take it too); with a declared endurance the devices wear out
        (`wear_out`) before the write lands, and a spent device (at the endurance: no pulse
        left) is skipped, as firmware skips a dead cell: no pulse, its wear stays at the
        endurance, it stays stuck where it failed (`WriteStats.spent` counts them)."""
        spent = 0
        endurance = self.model.pulse_endurance
        if wear is not None and endurance is not None:
            # after the write the largest count is as before once a device is spent (spent
            # devices take no pulse), else one more
            top = int(wear.max())
            if top >= endurance:
                left = wear < endurance
                spent = int(left.numel() - left.sum())
                wear.add_(left.to(wear.dtype))
            else:
                wear.add_(1)
            self._wear_to(wear, top if top >= endurance else top + 1)
        elif wear is not None:
            wear.add_(1)
        target = target.to(torch.float32)
        # the new state goes into a former state's buffer when nothing holds that any more
        buf = self._spare_states.take()
        if self._pcm and self.model.write_noise > 0:  # the std follows the target
            z = self._table_window(gen)
            z = _randn(self._dshape, gen, self.device) if z is None else z
            landed = torch.addcmul(target, pcm_write_std(target, self.model.g_max), z)
            landed = landed.clamp_(*self._bounds) if self._bounds else self._clamp_own(landed, out=landed)
        elif self.model.write_noise > 0:
            z = self._table_window(gen)
            if z is not None:
                wn = self.model.write_noise
                landed = (
                    torch.add(target, z, alpha=wn) if buf is None else torch.add(target, z, alpha=wn, out=buf)
                )
            else:
                # write_noise * N(0,1) + target, in the draw's own buffer (the same numbers)
                landed = _randn(self._dshape, gen, self.device).mul_(self.model.write_noise).add_(target)
            landed = landed.clamp_(*self._bounds) if self._bounds else self._clamp_own(landed, out=landed)
        elif self._bounds:
            landed = (
                torch.clamp(target, *self._bounds, out=buf)
                if buf is not None
                else torch.clamp(target, *self._bounds)
            )
        else:
            landed = self._clamp_own(target, out=buf)
        if self._stuck_idx is not None:
            landed.view(-1)[self._stuck_idx] = self._stuck_val
        self._spare_states.give(self._g0)
        self._g0 = landed
        self._written(t, end=t + self.rows * self.model.pulse_time_s)
        # a noise-free write of a tile whose devices share their bounds and none is stuck: every
        # device holds clamp(target, lo, hi) exactly, which `deviation` can use
        clean = self.model.write_noise == 0 and self._bounds is not None and self._stuck_idx is None
        self._clean = (target, self._version) if clean else None
        n = 2 * self.cells - spent
        return WriteStats(n, n * self.model.pulse_energy_j, self.rows * self.model.pulse_time_s, spent)

    def deviation(
        self, g: torch.Tensor, target: torch.Tensor, target_range: tuple[float, float] | None = None
    ) -> float:
        """``max |g - target|`` over every device (siemens), through a scratch buffer the tile
        keeps (no allocation of the tile's size per call). When `g` is the tile's state just
        after a noise-free `write_stacked` of `target` (with shared bounds, nothing stuck),
        every device holds ``clamp(target, lo, hi)`` and the largest deviation is
        ``max(0, lo - min target, max target - hi)``, in float32 as the devicewise
        subtraction rounds it (rounding is monotone): one read of `target`, the same number,
        or none when the caller knows `target`'s smallest and largest values already
        (`target_range`: the driver's range check read them)."""
        c = self._clean
        if c is not None and c[0] is target and c[1] == self._version and g is self._g0 and self._bounds:
            lo, hi = self._bounds
            # float32 subtraction, as the devicewise one rounds; a CUDA tensor reaches numpy as a float
            ends = torch.aminmax(target) if target_range is None else target_range
            t_min, t_max = (np.float32(float(e)) for e in ends)
            return max(0.0, float(np.float32(lo) - t_min), float(t_max - np.float32(hi)))
        # max |d| as max(-min d, max d) of the signed difference: one pass fewer than abs, then
        # max (negation is exact: the same number); a NaN shows in both ends
        d_min, d_max = torch.aminmax(self._diff(g, target, absolute=False))
        lo_d, hi_d = float(d_min), float(d_max)
        if math.isnan(lo_d) or math.isnan(hi_d):
            return math.nan
        return max(0.0, -lo_d, hi_d)

    def within(self, g: torch.Tensor, target: torch.Tensor, tol: float) -> float:
        """The fraction of devices with ``|g - target| <= tol``, as a float32 mean computes it
        (right after `deviation` of the same tensors, from its ``|g - target|``)."""
        d = self._diff(g, target, absolute=True)
        # the comparison written as 0.0 / 1.0 over the difference itself, in place (float32:
        # several times faster than a bool result and its sum on CPU, and the float32 sum of
        # ones is exact below 2^24; in place, a third faster than into a second buffer, which
        # the tile then need not keep); the scratch no longer holds the difference
        inside = d.le_(tol)
        self._scratch_key = None
        n = inside.sum() if d.numel() < 1 << 24 else inside.sum(dtype=torch.float64).to(torch.float32)
        return float(n / d.numel())

    def _diff(self, g: torch.Tensor, target: torch.Tensor, *, absolute: bool) -> torch.Tensor:
        """``g - target`` (``|g - target|`` with `absolute`) in the tile's scratch buffer; the
        previous call's difference again when neither tensor changed since (`within` right
        after `deviation` of the same tensors takes its absolute value in place)."""
        if self._scratch is None:
            self._scratch = torch.empty(self._dshape, device=self.device)
        key = self._scratch_key
        versions = (g._version, target._version)
        if key is not None and key[0] is g and key[1] is target and key[2] == versions:
            if absolute and not key[3]:
                self._scratch.abs_()
                self._scratch_key = (g, target, versions, True)
            return self._scratch
        torch.sub(g, target, out=self._scratch)
        if absolute:
            self._scratch.abs_()
        self._scratch_key = (g, target, versions, absolute)
        return self._scratch

    def _clamp_own(self, g: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """`g` clamped to every device's own bounds."""
        p = self.params
        return torch.clamp(g, p.g_lo, p.g_hi) if out is None else torch.clamp(g, p.g_lo, p.g_hi, out=out)

    def set_conductances(self, g_plus: torch.Tensor, g_minus: torch.Tensor, t: float) -> None:
        """Put every non-stuck device exactly at the given conductance (clipped to its own bounds),
        written at `t`; no noise, no cost. For tests and for restoring a saved board state."""
        target = self.stack_targets(g_plus, g_minus, "set_conductances").to(torch.float32)
        p = self.params
        landed = torch.minimum(torch.maximum(target, p.g_lo), p.g_hi)
        self._g0 = torch.where(p.stuck, p.stuck_value, landed)
        self._written(t)

    def pulse_counts(
        self, counts_plus: torch.Tensor, counts_minus: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(signed counts, pulses each device gets) as int64 (2, rows, cols): |n|, and on a
        one-sided (PCM) device 1 for a negative count of any size (one RESET pulse)."""
        n = self.stack_targets(counts_plus, counts_minus, "pulse")
        if n.is_floating_point() and not torch.equal(n, n.round()):
            raise ConfigurationError("pulse counts must be integers")
        n = n.to(torch.int64)
        return n, pulse_wear(n, self.model.one_sided)  # the host's SessionWear counts the same

    def pulse(
        self,
        counts_plus: torch.Tensor,
        counts_minus: torch.Tensor,
        t: float,
        gen: torch.Generator,
        wear: torch.Tensor | None = None,
    ) -> WriteStats:
        """Apply signed pulse counts (positive: potentiate) to every device, |n| pulses in sequence.

        Each pulse goes through the device model with cycle-to-cycle noise, asymmetry and the
        device's own bounds; stuck devices do not move. On a one-sided (PCM) device a negative
        count of any size is one RESET pulse to just above g_lo. A pulsed device takes its
        drifted conductance as the start and counts as written at `t`. `wear`: the devices'
        life pulse counts (int64, (2, rows, cols)), raised by the pulses each gets (stuck
        devices' included: the pulse reaches them).
        """
        n, mag = self.pulse_counts(counts_plus, counts_minus)
        return self.apply_pulses(n, mag, t, gen, wear)

    def apply_pulses(
        self,
        n: torch.Tensor,
        mag: torch.Tensor,
        t: float,
        gen: torch.Generator,
        wear: torch.Tensor | None = None,
    ) -> WriteStats:
        """`pulse` with its counts as `pulse_counts` gives them (signed counts, pulses per
        device), for a caller that has them already (the board, which checks the wear first)."""
        if wear is not None:
            wear.add_(mag)
            self._wear_out(wear)  # with a declared endurance: the pulses find the devices worn
        model = self.model
        p = self.params
        per_row = mag.amax(dim=(0, 2))
        stats = WriteStats(
            int(mag.sum()),
            float(mag.sum()) * model.pulse_energy_j,
            float(per_row.sum()) * model.pulse_time_s,
        )
        act = (mag > 0) & ~p.stuck
        if not bool(act.any()):
            return stats

        g_now = self._now(t)
        idx = torch.nonzero(act.reshape(-1)).squeeze(1)
        g = g_now.reshape(-1)[idx]
        m = mag.reshape(-1)[idx]
        up = n.reshape(-1)[idx] > 0
        sub = p.index(idx)
        if model.one_sided:
            reset = ~up
            if bool(reset.any()):
                level = reset_level(model, sub, _randn((idx.numel(),), gen, self.device))
                g = torch.where(reset, level, g)
                m = torch.where(reset, torch.zeros_like(m), m)

        # Sort by pulse count, largest first: the devices still pulsing at step k are then a
        # prefix, and every step works on views of the shrinking prefix (no gathers).
        m, order = torch.sort(m, descending=True, stable=True)
        idx, g = idx[order], g[order]
        plan = PulsePlan.make(model, up[order], sub.index(order))
        counts = torch.bincount(m, minlength=1)
        alive = (m.numel() - torch.cumsum(counts, 0)).tolist()  # alive[k] = #devices with m > k
        for k in range(int(m[0])):
            a = alive[k]
            noise = _randn((a,), gen, self.device) if model.dw_min_ctoc > 0 else None
            g[:a] = plan.head(a).apply(model, g[:a], noise)

        g0 = self._g0.reshape(-1).clone()
        g0[idx] = g  # pulsed devices restart from their drifted value; the others keep theirs
        self._g0 = g0.reshape(self._dshape)
        self._written(t, act, end=t + stats.time_s)
        return stats

    def program_verify(
        self,
        target_plus: torch.Tensor,
        target_minus: torch.Tensor,
        tol: float,
        max_iters: int,
        t: float,
        gen: torch.Generator,
        *,
        max_pulses: int = 64,
        patience: int = 3,
        wear: torch.Tensor | None = None,
        endurance: int | None = None,
    ) -> VerifyStats:
        """Firmware-style write-verify: a direct write, then up to `max_iters` rounds of
        {one noisy read of the tile; every device not yet verified gets
        ``n = round(error / mean step at the read value)`` pulses, at least one, at most
        `max_pulses`}. The loop ends early when every device is verified or given up.

        The firmware knows only the nominal device model and the nominal read noise:

        - a device is verified (and from then on inhibited, as in the incremental
          program-verify of NAND flash) once a read falls within
          ``max(tol - 2 read_noise, tol / 2)`` of its target, so that its true value is
          within `tol` with high probability;
        - a device that overshoots its target halves its own pulse-count gain (down to
          1/16), so devices with steps far above nominal converge instead of oscillating;
        - one-sided (PCM) devices aim low (``floor``), and a device above its target is
          RESET and climbs again;
        - stuck devices, and devices whose target lies beyond their own bounds, are detected
          instead of looped on: a device pulsed in the same direction for `patience` rounds
          in a row whose read moved by less than a fifth of the expected total movement
          (once that movement is well above the read noise) is given up (`gave_up`); on a
          one-sided device only where that shortfall is also beyond 4 standard deviations of
          the pulses' c2c scatter (and two reads' noise): a RESET device climbs back in
          full-size steps that c2c noise scatters by as much as a three-round shortfall.

        `within_tol` counts every device, stuck ones included, by its true conductance.

        `wear` (int64, (2, rows, cols)): the devices' life pulse counts, raised by every pulse
        sent (the write's one included). With `endurance`, a round's count is cut to the pulses
        a device has left, and a device that needs pulses and has none left is given up
        (`gave_up`): no device is pulsed past its endurance (the caller checked the write).
        """
        if tol <= 0:
            raise ConfigurationError(f"tol must be > 0 siemens, got {tol}")
        if max_iters < 0:
            raise ConfigurationError(f"max_iters must be >= 0, got {max_iters}")
        model = self.model
        target = self.stack_targets(target_plus, target_minus, "program_verify").to(torch.float32)
        stats = self.write(target[0], target[1], t, gen, wear)
        rn = model.read_noise
        accept = max(tol - 2.0 * rn, 0.5 * tol)
        # an expected movement this large is distinguishable from two reads' noise
        detectable = 6.0 * math.sqrt(2.0) * rn
        zeros = torch.zeros(self._dshape, dtype=torch.float32, device=self.device)
        gave_up = torch.zeros(self._dshape, dtype=torch.bool, device=self.device)
        done = torch.zeros(self._dshape, dtype=torch.bool, device=self.device)
        streak = torch.zeros(self._dshape, dtype=torch.int32, device=self.device)
        anchor = zeros  # read before the first pulse of the current same-direction streak
        expected = zeros  # signed movement the streak's pulses should have produced
        spread = zeros  # one-sided: sum of n step^2 over the streak's SET pulses (c2c variance / ctoc^2)
        gain = torch.ones(self._dshape, dtype=torch.float32, device=self.device)
        n = torch.zeros_like(gain)
        prev_err = zeros
        iterations = 0
        reads = 0
        while True:
            r = self._read(t, gen)
            reads += 1
            err = target - r
            if iterations > 0:
                overshot = (n != 0) & (torch.sign(err) != torch.sign(prev_err))
                if model.one_sided:
                    overshot &= n > 0  # landing below the target after a RESET is the plan
                gain = torch.where(overshot, (0.5 * gain).clamp_min(1.0 / 16.0), gain)
                progress = (r - anchor) * torch.sign(expected)
                stalled = (
                    (streak >= patience) & (expected.abs() >= detectable) & (progress < 0.2 * expected.abs())
                )
                if model.one_sided:
                    # a working device's climb scatters by its pulses' c2c noise: a shortfall
                    # within 4 of its standard deviations (and two reads') is no sign of a stuck
                    # one. A RESET sends a PCM device to the bottom, where its steps are full
                    # size (1 uS on pcm) and their c2c scatter (0.6 uS) is as large as a 3-round
                    # shortfall: without this, 0.2 % of working pcm devices were given up, up to
                    # 5 uS from their targets (tests/test_verify_c2c.py)
                    scatter = (model.dw_min_ctoc**2 * spread + 2.0 * rn * rn).sqrt_()
                    stalled &= expected.abs() - progress > 4.0 * scatter
                gave_up |= stalled
            done |= err.abs() <= accept
            need = ~done & ~gave_up
            if iterations >= max_iters or not bool(need.any()):
                break
            iterations += 1
            step = step_size(model, r, err > 0, self._nominal).clamp_min(1e-3 * model.dw_min)
            ratio = gain * err / step
            # a one-sided device cannot step back after an overshoot (only RESET and climb
            # again), so it aims low
            n = torch.floor(ratio) if model.one_sided else torch.round(ratio)
            n = n.clamp(-max_pulses, max_pulses)
            n = torch.where(n == 0, torch.sign(err), n)
            move = n * step
            if model.one_sided:
                n = torch.where(err < 0, -torch.ones_like(n), n)
                move = torch.where(err < 0, model.g_min - r, move)
            n = torch.where(need, n, torch.zeros_like(n))
            move = torch.where(need, move, zeros)
            if wear is not None and endurance is not None:
                left = (endurance - wear).clamp_min(0).to(torch.float32)
                cut = torch.sign(n) * torch.minimum(n.abs(), left)
                move = torch.where(n != 0, move * cut / torch.where(n != 0, n, 1.0), zeros)
                gave_up |= need & (left == 0)
                n = cut
            same = (streak > 0) & (torch.sign(move) == torch.sign(expected)) & (n != 0)
            anchor = torch.where(same, anchor, r)
            expected = torch.where(same, expected + move, move)
            if model.one_sided:  # a RESET (n < 0) lands by `reset_noise`, not by c2c-scattered steps
                var = torch.where(n > 0, n * step * step, zeros)
                spread = torch.where(same, spread + var, var)
            streak = torch.where(n == 0, torch.zeros_like(streak), torch.where(same, streak + 1, 1))
            stats = stats + self.pulse(n[0].to(torch.int64), n[1].to(torch.int64), t, gen, wear)
            prev_err = err

        read_cost = WriteStats(
            0, reads * 2 * self.cells * model.read_energy_j, reads * self.rows * model.read_time_s
        )
        stats = stats + read_cost
        true = self._now(t)
        within = float(((true - target).abs() <= tol).to(torch.float32).mean())
        return VerifyStats(
            iterations=iterations,
            pulses=stats.pulses,
            within_tol=within,
            residual_max=float((r - target).abs().max()),
            energy_j=stats.energy_j,
            time_s=stats.time_s,
            gave_up=int(gave_up.sum()),
            spent=stats.spent,
            reads=reads,
        )
