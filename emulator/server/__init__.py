"""Servers that expose any `drivers.base.Device` on real transports, so the remote backends
are tested over real bytes: SCPI (for VISA clients) and the framed binary protocol (for
serial clients), each on TCP and on pseudo-terminals. Loopback only unless told otherwise.
`FaultPlan` makes them a noisy, slow or crashing board (docs/reliability.md); `launch.serve`
puts a board behind both (what the CLI, the pytest plugin and the fault harness call).

Imports only `drivers.base`, `drivers.errors`, `drivers.topology` and `drivers.wire`
(`launch` also `drivers.open_device`, to open a board from its URI).
"""

from drivers.wire.link import Faults
from emulator.server.dispatch import ReplayCache
from emulator.server.faults import FaultPlan
from emulator.server.framed import FramedServer
from emulator.server.launch import ServedBoard, serve
from emulator.server.scpi import ScpiServer

__all__ = ["FaultPlan", "Faults", "FramedServer", "ReplayCache", "ScpiServer", "ServedBoard", "serve"]
