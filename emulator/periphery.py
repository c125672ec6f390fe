"""DAC and ADC models with per-channel gain and offset errors (the calibration truth)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from drivers.checks import check_state_range_voltage
from drivers.scalars import INT32_MAX, as_float, as_int


def lsb(bits: int | None, span: float) -> float:
    """One step of a converter of `bits` over `span` (an 8-bit step without `bits`)."""
    return span / ((1 << bits) - 1) if bits else span / 255


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
        for name in ("v_read", "v_read_max", "settle_step_s", "mvm_time_s", "mvm_range"):
            as_float(name, getattr(self, name), 0.0, float("inf"), lo_open=True)
        for name in ("gain_error", "offset_error", "node_noise"):
            as_float(name, getattr(self, name), 0.0, float("inf"))
        lo, hi = self.state_range
        as_float("state_range high", hi, as_float("state_range low", lo, -1e30, 1e30), 1e30, lo_open=True)
        check_state_range_voltage(self.v_read, self.v_read_max, self.state_range)

    def ideal(self) -> PeripheryModel:
        """The same periphery with ideal converters and no noise."""
        from dataclasses import replace

        return replace(self, dac_bits=None, adc_bits=None, gain_error=0.0, offset_error=0.0, node_noise=0.0)


def quantize(x: torch.Tensor, bits: int | None, lo: float, hi: float) -> torch.Tensor:
    """Uniform quantiser with saturation: at most 2**bits distinct output values."""
    if bits is None:
        return x
    levels = (1 << bits) - 1
    lsb = (hi - lo) / levels
    return torch.round((x.clamp(lo, hi) - lo) / lsb) * lsb + lo


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
        if start + n <= m:
            return x * self.gain[start : start + n] + self.offset[start : start + n]
        idx = torch.arange(start, start + n, device=self.gain.device) % m
        return x * self.gain[idx] + self.offset[idx]
