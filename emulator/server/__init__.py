"""Servers that expose any `drivers.base.Device` on real transports, so the remote backends
are tested over real bytes: SCPI (for VISA clients) and the framed binary protocol (for
serial clients), each on TCP and on pseudo-terminals. Loopback only unless told otherwise.
`FaultPlan` makes them a noisy, slow or crashing board (docs/reliability.md).

Imports only `drivers.base`, `drivers.errors`, `drivers.topology` and `drivers.wire`
(`harness`, the test helper, also `drivers.open_device`).
"""

from drivers.wire.link import Faults
from emulator.server.dispatch import ReplayCache
from emulator.server.faults import FaultPlan
from emulator.server.framed import FramedServer
from emulator.server.scpi import ScpiFaults, ScpiServer

__all__ = ["FaultPlan", "Faults", "FramedServer", "ReplayCache", "ScpiFaults", "ScpiServer"]
