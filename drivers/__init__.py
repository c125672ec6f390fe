"""Device-abstraction layer: one Device interface, several backends, one error hierarchy."""

from drivers.base import (
    CAPABILITIES,
    BoardStatus,
    Device,
    DeviceInfo,
    Equilibrium,
    Identity,
    Limits,
    Meter,
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
    OpenTransactionWarning,
    ProtocolError,
    RetriesExhausted,
    SafeStateWarning,
)
from drivers.placement import Placement, place
from drivers.shared import BlockView, SharedBoard
from drivers.tiled import TiledDevice
from drivers.topology import BIAS, Coupling, SettleBudget, Topology
from drivers.uri import open_device, register_backend, replace_params
from drivers.watch import BoardViolations, SafetyWatch

__all__ = [
    "BIAS",
    "CAPABILITIES",
    "BlockView",
    "BoardReset",
    "BoardStatus",
    "BoardViolations",
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
    "Meter",
    "NotSupported",
    "Nudge",
    "OpenTransactionWarning",
    "Placement",
    "ProgramReport",
    "ProtocolError",
    "PulseReport",
    "RetriesExhausted",
    "SafeStateWarning",
    "SafetyCounters",
    "SafetyWatch",
    "SettleBudget",
    "SharedBoard",
    "TiledDevice",
    "Topology",
    "open_device",
    "place",
    "programming_transaction",
    "register_backend",
    "replace_params",
    "report_open_transactions",
]
