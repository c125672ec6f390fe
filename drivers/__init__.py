"""Device-abstraction layer: one Device interface, several backends, one error hierarchy."""

from drivers.base import (
    Device,
    DeviceInfo,
    Equilibrium,
    Identity,
    Limits,
    Nudge,
    ProgramReport,
    PulseReport,
    SafetyCounters,
)
from drivers.errors import (
    ConfigurationError,
    DeviceError,
    DeviceFault,
    DeviceTimeout,
    LimitViolation,
    NotSupported,
    ProtocolError,
)
from drivers.topology import BIAS, Coupling, SettleBudget, Topology
from drivers.uri import open_device

__all__ = [
    "BIAS",
    "ConfigurationError",
    "Coupling",
    "Device",
    "DeviceError",
    "DeviceFault",
    "DeviceInfo",
    "DeviceTimeout",
    "Equilibrium",
    "Identity",
    "LimitViolation",
    "Limits",
    "NotSupported",
    "Nudge",
    "ProgramReport",
    "ProtocolError",
    "PulseReport",
    "SafetyCounters",
    "SettleBudget",
    "Topology",
    "open_device",
]
