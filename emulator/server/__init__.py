"""Servers that expose any `drivers.base.Device` on real transports, so the remote backends
are tested over real bytes: SCPI (for VISA clients) and the framed binary protocol (for
serial clients), each on TCP and on pseudo-terminals. Loopback only unless told otherwise.

Imports only `drivers.base`, `drivers.errors`, `drivers.topology` and `drivers.wire`.
"""

from drivers.wire.link import Faults
from emulator.server.framed import FramedServer
from emulator.server.scpi import ScpiFaults, ScpiServer

__all__ = ["Faults", "FramedServer", "ScpiFaults", "ScpiServer"]
