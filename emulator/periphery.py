"""DAC and ADC models with per-channel gain and offset errors (the calibration truth)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from drivers.base import Limits
from drivers.checks import check_state_range_voltage
from drivers.converters import IDEAL_LSB_BITS, lsb
from drivers.scalars import INT32_MAX, as_float, as_int
from emulator.devices import Bound

MAX_GAIN_ERROR = 0.2  # std of a per-channel relative gain error: gains 1 + N(0, 0.2) stay > 0 to 5 sigma
MIN_READ_V = 1e-3  # volts: a read under a millivolt is below the sense amplifiers' offsets
MAX_READ_V = 10.0  # volts on a read line: past any cell's breakdown (reads are 0.1-0.3 V)
MAX_STEP_S = 1.0  # seconds per node step or per mvm
# amps a declared line-current limit may be: a crossbar line's driver and TIA carry uA to tens of
# mA (the presets' design points are 1-5 mA), so 1 A is a limit in the wrong unit (2 meant as 2 mA)
MAX_LINE_CURRENT_A = 1.0
# The bounds on one request's work and scale a board declares (`Limits`), at the defaults of
# `Limits` unless a URI or preset sets them (`emulator://?preset=ideal&max_batch=256&max_w_max=1`),
# so that a test stack can meet the limits its own chip declares: integers as counts of at least
# one, floats finite and > 0
REQUEST_BOUNDS = (
    "max_batch", "max_verify_iters", "max_wait_s", "max_gain", "max_w_max", "max_beta", "max_drive"
)  # fmt: skip
_LIMIT_DEFAULTS = {f.name: f.default for f in fields(Limits) if f.name in REQUEST_BOUNDS}


@dataclass(frozen=True)
class PeripheryModel:
    """Board periphery. States are normalised: 1.0 is `v_read` volts on a node line."""

    dac_bits: int | None = 8
    adc_bits: int | None = 8
    state_range: tuple[float, float] = (0.0, 1.0)  # DAC and state-ADC range, normalised
    mvm_range: float = 4.0  # mvm read-out ADC covers [-mvm_range, mvm_range] (weight units)
    gain_error: float = 0.0  # std of per-channel relative gain error (ADC and DAC)
    offset_error: float = 0.0  # std of per-channel offset, in LSB of the channel's converter
    node_noise: float = 0.0  # input-referred noise of a node circuit per settle step (normalised)
    v_read: float = 0.2  # volts for state 1.0
    v_read_max: float = 0.25  # absolute limit on any read line (volts)
    settle_step_s: float = 10e-9  # one step of the node circuits' relaxation
    mvm_time_s: float = 100e-9  # one mvm (DAC, array, ADC)
    tile_rows_max: int = 1024
    tile_cols_max: int = 1024
    max_tiles: int = 64
    max_settle_steps: int = 100_000
    max_pulses: int = 1000
    channels: int = 4096  # converter channels per direction
    # amps one tile line may carry (a column into its TIA/ADC, a row out of its driver); None:
    # the board's design point, a full line of the largest tile at g_max read at v_read
    # (`Board.limits`, `line_current_limit`)
    max_line_current_a: float | None = None
    # std of a Gaussian noise added to every output of every mvm read-out (the board's `mvm`
    # command and each product of an mvm-mode settle), in the mvm ADC's units (weight x state,
    # as `mvm_range`; scaled by a coupling's w_max like its weights): the TIA / ADC noise of a
    # column, what aihwkit calls `IOParameters.out_noise` (default 0.06 there, in the same units:
    # one device pair at full weight read at full input gives 1). An analog settle's lines feed
    # node circuits, not read-outs: their output-referred noise is `node_noise`. 0 (every
    # preset): no output noise. Left out of the repr, so boards without it keep their
    # configuration fingerprint (`Board.configuration` adds it where it is set)
    out_noise: float = field(default=0.0, repr=False)
    # the request bounds the board declares (`REQUEST_BOUNDS`, docs/protocol.md "Limits"); left
    # out of the repr like `out_noise`, so boards at the defaults keep their fingerprint
    max_batch: int = field(default=_LIMIT_DEFAULTS["max_batch"], repr=False)
    max_verify_iters: int = field(default=_LIMIT_DEFAULTS["max_verify_iters"], repr=False)
    max_wait_s: float = field(default=_LIMIT_DEFAULTS["max_wait_s"], repr=False)
    max_gain: float = field(default=_LIMIT_DEFAULTS["max_gain"], repr=False)
    max_w_max: float = field(default=_LIMIT_DEFAULTS["max_w_max"], repr=False)
    max_beta: float = field(default=_LIMIT_DEFAULTS["max_beta"], repr=False)
    max_drive: float = field(default=_LIMIT_DEFAULTS["max_drive"], repr=False)

    def __post_init__(self) -> None:
        """Refuse a periphery no board could have (a URI override of 0 bits or a v_read of 0
        would divide by zero in every later check; a channel count of -1 would crash)."""
        for name in ("dac_bits", "adc_bits"):
            bits = getattr(self, name)
            if bits is not None:
                as_int(name, bits, 1, 32)
        for name in ("tile_rows_max", "tile_cols_max", "max_tiles", "max_settle_steps", "max_pulses"):
            as_int(name, getattr(self, name), 1, INT32_MAX)
        as_int("channels", self.channels, 1, 1 << 24)
        for name in ("max_batch", "max_verify_iters"):
            as_int(name, getattr(self, name), 1, INT32_MAX)
        for name in ("max_wait_s", "max_gain", "max_w_max", "max_beta", "max_drive"):
            as_float(name, getattr(self, name), 0.0, float("inf"), lo_open=True)
        for name in ("v_read", "v_read_max", "settle_step_s", "mvm_time_s", "mvm_range"):
            as_float(name, getattr(self, name), 0.0, float("inf"), lo_open=True)
        if self.max_line_current_a is not None:
            as_float("max_line_current_a", self.max_line_current_a, 0.0, float("inf"), lo_open=True)
        lo, hi = self.state_range
        as_float("state_range high", hi, as_float("state_range low", lo, -1e30, 1e30), 1e30, lo_open=True)
        check_state_range_voltage(self.v_read, self.v_read_max, self.state_range)
        for bound in self.bounds():
            bound.check("periphery", getattr(self, bound.name))

    def bounds(self) -> tuple[Bound, ...]:
        """The physically meaningful range of the converter errors, noise, read voltages and
        times (`emulator.devices.Bound`); mvm_range has none above (a range past the largest sum
        only leaves ADC codes unused), bits and counts are checked above."""
        lo, hi = self.state_range
        read = "reads are 0.1-0.3 V, below the cells' switching (~0.5-2 V); 10 V breaks any cell"
        return (
            # gains are 1 + gain_error N(0,1): at 0.2 a gain <= 0 (a channel that inverts or
            # vanishes) is a 5-sigma draw, 3e-7 per channel; at 0.5 it is 2 % of the channels
            Bound("gain_error", 0.0, MAX_GAIN_ERROR, "gains 1 + gain_error N(0,1) must stay positive"),
            # in LSB of each converter: past the narrowest one's full scale it saturates channels
            Bound(
                "offset_error", 0.0, self._full_scale_lsb(), "an offset past a converter's full scale", "LSB"
            ),
            # input-referred, normalised: a std past the whole state range drowns every state
            Bound("node_noise", 0.0, hi - lo, "a node noise std past the whole state range"),
            # in the mvm ADC's units: a std past its half-range drowns every read-out
            Bound("out_noise", 0.0, self.mvm_range, "an output noise std past the mvm ADC's half-range"),
            # a read below a millivolt is under the sense amplifiers' offsets
            Bound("v_read", MIN_READ_V, MAX_READ_V, "a read above 1 mV (amplifier offsets); " + read, "V"),
            # at least the voltage of the board's own states (`check_state_range_voltage`)
            Bound("v_read_max", max(abs(lo), abs(hi)) * self.v_read, MAX_READ_V, read, "V"),
            # a node step or an mvm takes ns-us on a crossbar; a second is a million times slower
            Bound("settle_step_s", 0.0, MAX_STEP_S, "a node step takes ns-us", "s", True),
            Bound("mvm_time_s", 0.0, MAX_STEP_S, "an mvm takes ns-us", "s", True),
            Bound(
                "max_line_current_a",
                0.0,
                MAX_LINE_CURRENT_A,
                "a line carries uA to tens of mA, in amps (2 mA is 2e-3)",
                "A",
                True,
            ),
        )

    def _full_scale_lsb(self) -> float:
        """Codes across the narrowest converter's range (`lsb`: 255 for an ideal one)."""
        return float(min((1 << (b or IDEAL_LSB_BITS)) - 1 for b in (self.dac_bits, self.adc_bits)))

    def ideal(self) -> PeripheryModel:
        """The same periphery with ideal converters and no noise."""
        from dataclasses import replace

        off = {"gain_error": 0.0, "offset_error": 0.0, "node_noise": 0.0, "out_noise": 0.0}
        return replace(self, dac_bits=None, adc_bits=None, **off)

    def out_key(self) -> str:
        """The fields left out of the repr, as text for a fingerprint ('' where all are off or
        at their defaults)."""
        key = f" out_noise={self.out_noise!r}" if self.out_noise else ""
        for name in REQUEST_BOUNDS:
            if getattr(self, name) != _LIMIT_DEFAULTS[name]:
                key += f" {name}={getattr(self, name)!r}"
        return key

    def request_bounds(self) -> dict[str, int | float]:
        """The request bounds as `Limits` takes them (`REQUEST_BOUNDS`)."""
        return {name: getattr(self, name) for name in REQUEST_BOUNDS}


def line_current_limit(periphery: PeripheryModel, g_max: float) -> float:
    """The line-current limit a board declares (`Limits.max_line_current_a`, amps): the
    periphery's own value, or by default its design point, the current of a full line of the
    largest tile (``max(tile_rows_max, tile_cols_max)`` devices of one array) at `g_max`, read at
    the nominal read voltage `v_read`: ``1024 x 10 uS x 0.2 V = 2.05 mA`` for rram and ideal,
    ``1024 x 25 uS x 0.2 V = 5.12 mA`` for pcm, ``1024 x 5 uS x 0.2 V = 1.02 mA`` for ecram. A
    line driver and its TIA are sized for the array they serve at its nominal read (our choice;
    real periphery is sized the same way, to the worst-case line at full read), so every request
    of states in [0, 1] on a tile the board accepts passes, as do the default networks (their
    states and inputs are in [0, 1]); what is refused is a line of many devices near g_max
    driven past v_read (up to v_read_max, 1.25 x v_read), whose current the periphery was not
    sized for."""
    if periphery.max_line_current_a is not None:
        return periphery.max_line_current_a
    return max(periphery.tile_rows_max, periphery.tile_cols_max) * g_max * periphery.v_read


def quantize(x: torch.Tensor, bits: int | None, lo: float, hi: float) -> torch.Tensor:
    """Uniform quantiser with saturation over ``[lo, hi]``, codes ``lo + k step`` for ``k = 0 ...
    2**bits - 1`` (end to end): at most 2**bits distinct output values, for the unipolar
    converters (states over the state range, whose lower end is a code). A symmetric range
    ``[-r, r]`` has no zero code here (an even number of levels, zero between two): a signed
    read-out or drive goes through `quantize_signed`. One new
    tensor (the clamp's), the rest in place on it: the same operations in the same order as
    ``round((clamp(x) - lo) / step) * step + lo``, so the same numbers, without five more
    allocations of the input's size (a settle's states: 0.7 against 0.1 ms at 256 x 512)."""
    if bits is None:
        return x
    step = lsb(bits, hi - lo)
    y = x.clamp(lo, hi)
    if not y.is_floating_point():  # as ``clamp(x) - lo`` promotes an integer tensor
        y = y.to(torch.get_default_dtype())
    return y.sub_(lo).div_(step).round_().mul_(step).add_(lo)


def quantize_signed(x: torch.Tensor, bits: int | None, full: float) -> torch.Tensor:
    """Signed (bipolar) uniform quantiser over ``[-full, full]``, mid-tread: the step of the
    unipolar one over the same span (``lsb(bits, 2 full)``, so every model of the step, the
    settle's stop floor and the calibration's included, is unchanged) on a grid through zero,
    codes ``k step`` for ``|k| <= 2**(bits-1) - 1``: ``2**bits - 1`` levels, an exact zero and
    rails at ``+-(full - step / 2)``, half a step inside the range. A zero input (a column of
    no current) reads 0 and a drive under half a step reads 0, as a real read-out's ADC and
    aihwkit's output quantiser do (IOParameters.out_res: ``2**bits - 2`` steps over
    ``[-out_bound, out_bound]``, zero in the middle; that step is larger by a factor
    ``(2**bits - 1) / (2**bits - 2)``, 0.4 % at 8 bits). A 1-bit converter is a comparator: the
    sign, ``+-full`` (no zero code, as `quantize` gives it). One new tensor, the rest in
    place on it."""
    if bits is None:
        return x
    if bits == 1:
        return quantize(x, bits, -full, full)
    step = lsb(bits, 2.0 * full)
    top = float((1 << (bits - 1)) - 1)
    y = x / step if x.is_floating_point() else x.to(torch.get_default_dtype()) / step
    return y.round_().clamp_(-top, top).mul_(step)


@dataclass
class ChannelErrors:
    """Per-channel gain (multiplicative) and offset (additive, in normalised units)."""

    gain: torch.Tensor
    offset: torch.Tensor
    exact: bool = False  # no errors at all (gain 1, offset 0): `apply` hands its input back

    @staticmethod
    def draw(
        n: int, gain_std: float, offset_std_units: float, gen: torch.Generator, device: torch.device
    ) -> ChannelErrors:
        # drawn where `gen` lives, then moved (a CPU generator: the same errors on every device)
        gain = 1.0 + gain_std * torch.randn(n, generator=gen, device=gen.device).to(device)
        offset = offset_std_units * torch.randn(n, generator=gen, device=gen.device).to(device)
        return ChannelErrors(gain, offset, exact=gain_std == 0 and offset_std_units == 0)

    def apply(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """`x` (..., n) through channels ``start ... start + n - 1``, counted modulo the number
        of channels: the nodes of a feature map beyond the last channel share converters with
        the first ones, in time, as the reads of a conv tile do (`emulator.conv_settle`)."""
        if self.exact:
            return x
        n, m = x.shape[-1], self.gain.shape[0]
        # x * gain + offset, the sum in place on the product (the same numbers, one allocation)
        if start + n <= m:
            return torch.mul(x, self.gain[start : start + n]).add_(self.offset[start : start + n])
        idx = torch.arange(start, start + n, device=self.gain.device) % m
        return torch.mul(x, self.gain[idx]).add_(self.offset[idx])
