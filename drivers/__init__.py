"""Device-abstraction layer: one Device interface, several backends, one error hierarchy.

The names below load on first use (`__getattr__`, PEP 562): importing the package imports
neither numpy nor torch, nor does importing its plain modules `drivers.capabilities` (which
`hil emulator serve --help` names) and `drivers.errors`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from drivers.lazy import lazy_exports

if TYPE_CHECKING:
    from drivers.base import (
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
        TileWear,
        Wear,
        programming_transaction,
        repair_lost_arrays,
        report_open_transactions,
    )
    from drivers.capabilities import CAPABILITIES
    from drivers.errors import (
        ArraysLost,
        BoardChanged,
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

# The module each name of the package comes from, imported on the name's first use
_HOMES = {
    "drivers.capabilities": ("CAPABILITIES",),
    "drivers.base": (
        "BoardStatus",
        "Device",
        "DeviceInfo",
        "Equilibrium",
        "Identity",
        "Limits",
        "Meter",
        "Nudge",
        "ProgramReport",
        "PulseReport",
        "SafetyCounters",
        "TileWear",
        "Wear",
        "programming_transaction",
        "repair_lost_arrays",
        "report_open_transactions",
    ),
    "drivers.errors": (
        "ArraysLost",
        "BoardChanged",
        "BoardReset",
        "ConfigurationError",
        "DeviceError",
        "DeviceFault",
        "DeviceTimeout",
        "LimitViolation",
        "NotSupported",
        "OpenTransactionWarning",
        "ProtocolError",
        "RetriesExhausted",
        "SafeStateWarning",
    ),
    "drivers.placement": ("Placement", "place"),
    "drivers.shared": ("BlockView", "SharedBoard"),
    "drivers.tiled": ("TiledDevice",),
    "drivers.topology": ("BIAS", "Coupling", "SettleBudget", "Topology"),
    "drivers.uri": ("open_device", "register_backend", "replace_params"),
    "drivers.watch": ("BoardViolations", "SafetyWatch"),
}

__all__ = [
    "BIAS",
    "CAPABILITIES",
    "ArraysLost",
    "BlockView",
    "BoardChanged",
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
    "TileWear",
    "TiledDevice",
    "Topology",
    "Wear",
    "open_device",
    "place",
    "programming_transaction",
    "register_backend",
    "repair_lost_arrays",
    "replace_params",
    "report_open_transactions",
]


__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
