"""`open_device(uri)`: the one way the host stack gets a Device.

emulator://?preset=rram&seed=0[&key=value...]     in-process emulated board
visa://TCPIP0::127.0.0.1::5025::SOCKET            SCPI over VISA (pyvisa-py by default)
visa://ASRL/dev/ttyUSB0::INSTR
serial:///dev/ttyACM0?baud=921600                 framed binary over a serial port
serial+socket://127.0.0.1:7000                    framed binary over TCP
"""

from __future__ import annotations

import importlib
from urllib.parse import parse_qsl, urlsplit

from drivers.base import Device
from drivers.errors import ConfigurationError

# scheme -> (module, function(target: str, params: dict[str, str]) -> Device)
BACKENDS = {
    "emulator": ("drivers.emulated", "open_from_uri"),
    "visa": ("drivers.visa", "open_from_uri"),
    "serial": ("drivers.serial", "open_from_uri"),
    "serial+socket": ("drivers.serial", "open_socket_from_uri"),
}


def parse_uri(uri: str) -> tuple[str, str, dict[str, str]]:
    """Split a device URI into (scheme, target, query parameters)."""
    if "://" not in uri:
        raise ConfigurationError(
            f"device URI {uri!r} has no scheme; use one of "
            + ", ".join(f"{s}://..." for s in BACKENDS)
            + " (e.g. emulator://?preset=rram&seed=0)"
        )
    scheme, rest = uri.split("://", 1)
    scheme = scheme.lower()
    if scheme not in BACKENDS:
        raise ConfigurationError(f"unknown device scheme {scheme!r} in {uri!r}; known: {sorted(BACKENDS)}")
    if scheme == "visa":
        # VISA resource strings contain '::' and may contain '?'-free paths: keep them whole,
        # only split off our own query string.
        target, _, query = rest.partition("?")
    else:
        parts = urlsplit(f"{scheme}://{rest}")
        target = parts.netloc + parts.path
        query = parts.query
    try:
        params = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
    except ValueError as exc:
        raise ConfigurationError(f"cannot parse the query string {query!r} of {uri!r}: {exc}") from exc
    return scheme, target, params


def open_device(uri: str) -> Device:
    scheme, target, params = parse_uri(uri)
    module, function = BACKENDS[scheme]
    return getattr(importlib.import_module(module), function)(target, params)
