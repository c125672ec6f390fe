"""One error hierarchy for every backend.

Each error says what went wrong and, where there is one, what to do about it.
"""

from __future__ import annotations


class DeviceError(Exception):
    """Base class of every error raised by a Device or by `open_device`."""


class DeviceTimeout(DeviceError):
    """The device did not answer within the configured timeout."""


class ProtocolError(DeviceError):
    """Malformed reply, bad framing, CRC mismatch or sequence error on the wire."""


class DeviceFault(DeviceError):
    """The device reported a fault; `code` is its error code (SCPI or device specific)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"device fault {code}: {message}")
        self.code = code
        self.message = message


class LimitViolation(DeviceError):
    """A request would exceed a device limit; it was refused before reaching the array."""

    def __init__(self, limit: str, value: float, bound: float, hint: str = "") -> None:
        text = f"{limit} exceeded: requested {value:.6g}, limit {bound:.6g}"
        super().__init__(f"{text}. {hint}" if hint else text)
        self.limit = limit
        self.value = value
        self.bound = bound


class NotSupported(DeviceError):
    """The device lacks the capability this call needs (see `DeviceInfo.capabilities`)."""


class ConfigurationError(DeviceError):
    """Bad topology, unknown tile or group, wrong array shape, or a bad URI."""
