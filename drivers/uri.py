"""`open_device(uri)`: the one way the host stack gets a Device, and the registry of URI schemes.

emulator://?preset=rram&seed=0[&key=value...]     in-process emulated board
visa://TCPIP0::127.0.0.1::5025::SOCKET            SCPI over VISA (pyvisa-py by default)
visa://ASRL/dev/ttyUSB0::INSTR
serial:///dev/ttyACM0?baud=921600                 framed binary over a serial port
serial+socket://127.0.0.1:7000                    framed binary over TCP

A backend is a `Backend`: its scheme, an opener ``opener(target, options) -> Device`` and one
typed options class (`drivers.options`) that parses and validates the query string. Backends
are found by scheme, in this order:

1. registered at run time with `register_backend(scheme, opener, options=...)`;
2. the built-in ones (`BUILTIN_BACKENDS`), imported on first use, so that ``import drivers``
   does not import torch, pyvisa or pyserial;
3. installed packages' entry points in the group ``xbar_hil.backends``: the entry point's
   name is the scheme, its object a `Backend` (``mybackend = "mypkg.board:BACKEND"``), the
   way pyvisa finds its backends by name.
"""

from __future__ import annotations

import importlib.metadata
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from drivers.base import Device
from drivers.errors import ConfigurationError
from drivers.options import BackendOptions, QueryParams, format_value

ENTRY_POINT_GROUP = "xbar_hil.backends"
# scheme -> "module:attribute" of its Backend, exactly as an entry point would name it
BUILTIN_BACKENDS = {
    "emulator": "drivers.emulated:BACKEND",
    "visa": "drivers.visa:BACKEND",
    "serial": "drivers.serial:SERIAL_BACKEND",
    "serial+socket": "drivers.serial:SOCKET_BACKEND",
}
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*\Z")  # RFC 3986, lower case


@dataclass(frozen=True)
class Backend:
    """A URI scheme: how to open a device (`opener(target, options)`) and its options class."""

    scheme: str
    opener: Callable[[str, Any], Device]
    options: type[BackendOptions] = QueryParams

    def __post_init__(self) -> None:
        if not _SCHEME.match(self.scheme):
            raise ConfigurationError(
                f"backend scheme {self.scheme!r} is not a URI scheme: use lower-case letters, digits, "
                "'+', '-' and '.', starting with a letter (e.g. 'myboard' or 'myboard+tcp')"
            )


class BackendRegistry:
    """Schemes and their backends. Lookups load built-in and entry-point backends lazily;
    the module-level functions use one shared instance (a registry is the one piece of
    process-wide state here: it is what lets a third-party board plug in by name)."""

    def __init__(self, builtin: dict[str, str] | None = None, *, entry_points: bool = True) -> None:
        self._builtin = dict(BUILTIN_BACKENDS if builtin is None else builtin)
        self._entry_points = entry_points
        self._backends: dict[str, Backend] = {}
        self._lock = threading.Lock()

    def register(
        self,
        scheme: str,
        opener: Callable[[str, Any], Device],
        options: type[BackendOptions] | None = None,
        *,
        replace: bool = False,
    ) -> Backend:
        """Register `opener` for `scheme` (its query string parsed by `options`; without one the
        opener gets the parameters as text, a `QueryParams`). A scheme that is taken raises
        ConfigurationError unless `replace`."""
        backend = Backend(scheme, opener, options or QueryParams)
        with self._lock:
            if not replace and (scheme in self._backends or scheme in self._builtin):
                raise ConfigurationError(
                    f"URI scheme {scheme!r} already has a backend; pass replace=True to override it"
                )
            self._backends[scheme] = backend
        return backend

    def unregister(self, scheme: str) -> None:
        """Forget a backend registered at run time (built-in ones come back on next use)."""
        with self._lock:
            self._backends.pop(scheme, None)

    def schemes(self) -> list[str]:
        """Every scheme that can be opened: registered, built in, or installed as an entry point."""
        found = set(self._backends) | set(self._builtin)
        if self._entry_points:
            found |= {ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
        return sorted(found)

    def knows(self, scheme: str) -> bool:
        """Whether `scheme` has a backend (without loading it)."""
        with self._lock:
            if scheme in self._backends or scheme in self._builtin:
                return True
        if not self._entry_points:
            return False
        return bool(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP, name=scheme))

    def get(self, scheme: str) -> Backend:
        """The backend of `scheme`; ConfigurationError listing the known schemes otherwise."""
        with self._lock:
            found = self._backends.get(scheme)
        if found is not None:
            return found
        if scheme in self._builtin:
            builtin = importlib.metadata.EntryPoint(scheme, self._builtin[scheme], ENTRY_POINT_GROUP)
            return self._load(builtin, "built-in backend")
        if self._entry_points:
            for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP, name=scheme):
                return self._load(ep, f"entry point {ep.name!r} ({ENTRY_POINT_GROUP})")
        raise ConfigurationError(
            f"unknown device scheme {scheme!r}; known: {', '.join(self.schemes())} "
            f"(a third-party board registers its scheme with drivers.register_backend or an "
            f"entry point in the group {ENTRY_POINT_GROUP!r})"
        )

    def _load(self, ep: importlib.metadata.EntryPoint, what: str) -> Backend:
        scheme = ep.name
        try:
            obj = ep.load()
        except (ImportError, AttributeError) as exc:
            raise ConfigurationError(
                f"the {what} for {scheme}:// ({ep.value}) cannot be loaded: {exc}; is its package "
                "installed with its dependencies?"
            ) from exc
        if not isinstance(obj, Backend) or obj.scheme != scheme:
            raise ConfigurationError(
                f"the {what} for {scheme}:// ({ep.value}) is {obj!r}, not a "
                f"drivers.uri.Backend with scheme {scheme!r}"
            )
        with self._lock:
            return self._backends.setdefault(scheme, obj)

    # -- URIs
    def split(self, uri: str) -> tuple[str, str, dict[str, str]]:
        """(scheme, target, query parameters as text) of a device URI of a known scheme."""
        if "://" not in uri:
            raise ConfigurationError(
                f"device URI {uri!r} has no scheme; use one of "
                + ", ".join(f"{s}://..." for s in self.schemes())
                + " (e.g. emulator://?preset=rram&seed=0)"
            )
        scheme, rest = uri.split("://", 1)
        scheme = scheme.lower()
        if not self.knows(scheme):
            self.get(scheme)  # raises, naming the known schemes
        # the target is everything up to '?': VISA resource strings hold '::', ports and paths
        target, _, query = rest.partition("?")
        try:
            pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
        except ValueError as exc:
            raise ConfigurationError(f"cannot parse the query string {query!r} of {uri!r}: {exc}") from exc
        params: dict[str, str] = {}
        for key, value in pairs:
            if key in params:
                # a bound given twice (a copy-paste) must not silently become its last value
                given = [v for k, v in pairs if k == key]
                raise ConfigurationError(
                    f"device URI {uri!r} gives {key!r} {len(given)} times ("
                    + ", ".join(f"{key}={v}" for v in given)
                    + "); keep the one you mean and delete the others"
                )
            params[key] = value
        return scheme, target, params

    def parse(self, uri: str) -> tuple[Backend, str, Any]:
        """(backend, target, options): the URI parsed and every parameter validated."""
        scheme, target, params = self.split(uri)
        backend = self.get(scheme)
        return backend, target, backend.options.from_query(target, params)

    def open(self, uri: str) -> Device:
        backend, target, options = self.parse(uri)
        return backend.opener(target, options)

    def replace_params(self, uri: str, /, **params: object) -> str:
        """`uri` with `params` set (added or replaced), validated by the backend's options and
        written back in its canonical form. Values may be text or typed (numbers, booleans,
        None for ``none``, a collection for a comma-separated list)."""
        scheme, target, old = self.split(uri)
        backend = self.get(scheme)
        merged = {**old, **{k: format_value(v) for k, v in params.items()}}
        return format_uri(scheme, target, backend.options.from_query(target, merged))


def format_uri(scheme: str, target: str, options: BackendOptions) -> str:
    """``scheme://target?query`` (no ``?`` when the options are all defaults)."""
    query = options.to_query()
    return f"{scheme}://{target}" + (f"?{query}" if query else "")


REGISTRY = BackendRegistry()


def register_backend(
    scheme: str,
    opener: Callable[[str, Any], Device],
    options: type[BackendOptions] | None = None,
    *,
    replace: bool = False,
) -> Backend:
    """Make `scheme://...` URIs open with `opener(target, options)`; see `BackendRegistry.register`."""
    return REGISTRY.register(scheme, opener, options, replace=replace)


def unregister_backend(scheme: str) -> None:
    REGISTRY.unregister(scheme)


def known_schemes() -> list[str]:
    return REGISTRY.schemes()


def parse_uri(uri: str) -> tuple[str, str, dict[str, str]]:
    """Split a device URI into (scheme, target, query parameters as text)."""
    return REGISTRY.split(uri)


def parse_options(uri: str) -> tuple[str, str, Any]:
    """(scheme, target, typed options) of a device URI, every parameter validated."""
    backend, target, options = REGISTRY.parse(uri)
    return backend.scheme, target, options


def replace_params(uri: str, /, **params: object) -> str:
    """`uri` with `params` set: ``replace_params("emulator://?preset=rram&seed=0", seed=3)``."""
    return REGISTRY.replace_params(uri, **params)


def looking_uri(uri: str) -> str:
    """`uri` with ``lock=0`` where its backend has that option: a session that only looks at a
    board (`hil info`, `hil lock`, a URI check) must neither wait for nor take a board another
    host owns (docs/protocol.md, "Ownership")."""
    _, _, options = parse_options(uri)
    return replace_params(uri, lock=False) if hasattr(options, "lock") else uri


def open_device(uri: str) -> Device:
    """Open the board `uri` names (see the module docstring for the schemes)."""
    return REGISTRY.open(uri)
