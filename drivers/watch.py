"""The boards' own violation counters, watched while a host trains on them.

Every request a host sends has passed its checks, and a board checks again; `violations`
(`Device.safety`) counts out-of-limit conditions that reached a board's array anyway. It
must stay 0: a rise means the host and the board disagree on a limit (a firmware bug, a
limit declared wrong), and on real devices it may have damaged some. A trainer reads the
counters once per epoch (one request per board) and stops at the first rise.
"""

from __future__ import annotations

from collections.abc import Iterable

from drivers.base import Device
from drivers.errors import DeviceError


class BoardViolations(DeviceError):
    """A board counted violations while the host trained on it (`SafetyWatch.check`)."""


class SafetyWatch:
    """The `violations` counters of `devices` from now on."""

    def __init__(self, devices: Iterable[Device]) -> None:
        self.devices = list(devices)
        self.start = [d.safety().violations for d in self.devices]

    def new_violations(self) -> list[tuple[Device, int]]:
        """(board, violations since the watch began) for every board whose count rose."""
        out = []
        for dev, start in zip(self.devices, self.start, strict=True):
            rise = dev.safety().violations - start
            if rise > 0:
                out.append((dev, rise))
        return out

    @staticmethod
    def error(found: list[tuple[Device, int]], when: str, uri_hint: str = "URI") -> BoardViolations:
        """The error that stops training, naming each board, its count and what to do."""
        boards = "; ".join(f"{d.info.identity.idn()}: {n} violation(s)" for d, n in found)
        return BoardViolations(
            f"the board counted out-of-limit conditions at its array {when} ({boards}), although the "
            "host's checks passed every request: host and board disagree on a limit. Training stopped "
            f"with the board in its safe state. Run `hil conformance {uri_hint}` and inspect the devices "
            "before going on"
        )
