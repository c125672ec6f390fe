"""Typed URI options: one frozen dataclass per backend, parsed from a URI's query string and
written back to one, so a URI can be read, changed and re-written (`drivers.uri.replace_params`).

A backend's options class has ``from_query(target, params)`` (a classmethod that parses and
validates every parameter, raising ConfigurationError that names the parameter, the value and
what is accepted) and ``to_query()`` (the query string, without ``?``). `QueryOptions` does
both for a dataclass whose fields are the parameters; range checks come from the fields'
metadata (``gt``, ``ge``, ``le``).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, Literal, Protocol, Self
from urllib.parse import quote, urlencode

from drivers.errors import ConfigurationError

NONE_WORDS = ("none", "null", "off", "inf")  # for parameters that may be None (an ideal converter)
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


class BackendOptions(Protocol):
    """What `drivers.uri` needs of a backend's options class."""

    @classmethod
    def from_query(cls, target: str, params: Mapping[str, str]) -> Self: ...

    def to_query(self) -> str: ...


def encode_query(params: Mapping[str, str]) -> str:
    """A query string; commas, colons and slashes stay readable (``capabilities=mvm,pulse``)."""
    return urlencode(params, quote_via=quote, safe=",:/@")


def _split_optional(annotation: object) -> tuple[object, bool]:
    """(the type without None, whether None is allowed)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else annotation), len(rest) < len(args)
    return annotation, False


def describe(annotation: object) -> str:
    """What a parameter of type `annotation` accepts, in words."""
    base, optional = _split_optional(annotation)
    if typing.get_origin(base) is Literal:
        text = "one of " + ", ".join(repr(a) for a in typing.get_args(base))
    else:
        words: dict[object, str] = {bool: "0 or 1", int: "an integer", float: "a finite number", str: "text"}
        text = words.get(base, f"a {base}")
    return text + (" or none" if optional else "")


def settable(annotation: object) -> bool:
    """Whether a URI parameter can carry a value of this type."""
    base, _ = _split_optional(annotation)
    return base in (bool, int, float, str) or typing.get_origin(base) is Literal


def parse_value(label: str, name: str, text: str, annotation: object) -> Any:
    """`text` as a value of `annotation`: bool, int, float (finite), str, a Literal, or one of
    them | None (written none, null, off or inf)."""
    base, optional = _split_optional(annotation)
    word = text.strip().lower()
    if optional and word in NONE_WORDS:
        return None
    value: Any = None
    try:
        if base is bool:
            if word not in TRUE_WORDS + FALSE_WORDS:
                raise ValueError(text)
            value = word in TRUE_WORDS
        elif base is int:
            value = int(text)
        elif base is float:
            value = float(text)
            if not math.isfinite(value):
                raise ValueError(text)
        elif base is str:
            value = text
        elif typing.get_origin(base) is Literal:
            if text not in typing.get_args(base):
                raise ValueError(text)
            value = text
        else:
            raise ConfigurationError(f"{label} URI parameter {name!r} cannot be set from a URI")
    except ValueError:
        raise ConfigurationError(
            f"{label} URI parameter {name}={text!r}: expected {describe(annotation)}"
        ) from None
    return value


def format_value(value: object) -> str:
    """The text form of a parameter value that `parse_value` reads back to the same value."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return value
    if isinstance(value, Iterable):
        return ",".join(format_value(v) for v in value)
    return str(value)


def check_range(label: str, name: str, value: Any, meta: Mapping[str, Any]) -> None:
    """Raise ConfigurationError if `value` breaks a bound in `meta` (``gt``, ``ge``, ``le``)."""
    if value is None:
        return
    bounds = [
        ("gt", "> ", lambda v, b: v > b),
        ("ge", ">= ", lambda v, b: v >= b),
        ("le", "<= ", lambda v, b: v <= b),
    ]
    broken = [f"{sign}{meta[key]}" for key, sign, ok in bounds if key in meta and not ok(value, meta[key])]
    if broken:
        accepted = " and ".join(f"{sign}{meta[key]}" for key, sign, _ in bounds if key in meta)
        raise ConfigurationError(f"{label} URI parameter {name}={value!r}: must be {accepted}")


@dataclasses.dataclass(frozen=True)
class QueryOptions:
    """Base of a backend's options: every field is a URI parameter of the same name, typed
    (see `parse_value`); `to_query` writes the ones that differ from their defaults."""

    LABEL: ClassVar[str] = "device"  # the scheme's name in messages

    @classmethod
    def check_target(cls, target: str) -> None:
        """Raise ConfigurationError if `target` (what comes between ``://`` and ``?``) is unusable."""

    @classmethod
    def from_query(cls, target: str, params: Mapping[str, str]) -> Self:
        cls.check_target(target)
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in params if k not in names]
        if unknown:
            raise ConfigurationError(
                f"unknown {cls.LABEL} URI parameter{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(map(repr, unknown))}; known: {', '.join(names)}"
            )
        return cls(**{k: parse_value(cls.LABEL, k, v, hints[k]) for k, v in params.items()})

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check_range(self.LABEL, f.name, getattr(self, f.name), f.metadata)

    def params(self) -> dict[str, str]:
        """The text of every parameter that differs from its default."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.default is dataclasses.MISSING or value != f.default:
                out[f.name] = format_value(value)
        return out

    def to_query(self) -> str:
        return encode_query(self.params())


@dataclasses.dataclass(frozen=True)
class QueryParams:
    """Options of a backend registered without an options class: the parameters as text."""

    params: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_query(cls, target: str, params: Mapping[str, str]) -> Self:
        return cls(tuple(params.items()))

    def as_dict(self) -> dict[str, str]:
        return dict(self.params)

    def to_query(self) -> str:
        return encode_query(dict(self.params))
