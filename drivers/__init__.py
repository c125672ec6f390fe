"""Device-abstraction layer: one Device interface, several backends, one error hierarchy."""

from drivers.base import (
    BoardStatus,
    Device,
    DeviceInfo,
    Equilibrium,
    Identity,
    Limits,
    Nudge,
    ProgramReport,
    PulseReport,
    SafetyCounters,
    programming_transaction,
    report_open_transactions,
)
from drivers.errors import (
    BoardReset,
    ConfigurationError,
    DeviceError,
    DeviceFault,
    DeviceTimeout,
    LimitViolation,
    NotSupported,
    ProtocolError,
    RetriesExhausted,
)
from drivers.topology import BIAS, Coupling, SettleBudget, Topology
from drivers.uri import open_device

__all__ = [
    "BIAS",
    "BoardReset",
    "BoardStatus",
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
    "RetriesExhausted",
    "SafetyCounters",
    "SettleBudget",
    "Topology",
    "open_device",
    "programming_transaction",
    "report_open_transactions",
]
