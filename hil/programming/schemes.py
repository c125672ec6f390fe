"""The programming schemes by name: how a change of the host weights reaches the devices.

An `EBBlock` keeps full-precision weights on the host and hands every changed tile to its
scheme (`ProgrammingScheme.program`, the protocol in `hil.programming.scheme`). One small
class per scheme:

- ``ideal`` (`IdealWrites`): every change is a direct write of the whole tile (a write
  costs one pulse per device and lands with the device's write noise);
- ``verify`` (`VerifiedWrites`): every change is a write-verify of the whole tile;
- ``pulsed`` (`PulsedUpdates`): a first write-verify, then signed pulse counts per device,
  rounded stochastically; what a count cannot express is lost;
- ``mixed`` (`MixedPrecision`): as ``pulsed``, with a digital accumulator that carries what
  was not applied into the next update.

What they share (first write, refresh, commit, drift) is `SchemeBase`; the refresh policy
is a `RefreshPolicy`. `make_scheme(name, **options)` builds one from its name.
"""

from __future__ import annotations

from typing import Any

from hil.programming.pulsed import MixedPrecision, PulsedUpdates
from hil.programming.scheme import ProgrammingScheme, RefreshPolicy, SchemeBase
from hil.programming.writes import IdealWrites, VerifiedWrites

SCHEME_CLASSES: dict[str, type[SchemeBase]] = {
    cls.name: cls for cls in (IdealWrites, VerifiedWrites, PulsedUpdates, MixedPrecision)
}
SCHEMES: tuple[str, ...] = tuple(SCHEME_CLASSES)

# flat option names accepted by `make_scheme` for the fields of RefreshPolicy
_REFRESH_OPTIONS = {
    "refresh_every": "every",
    "refresh_mode": "mode",
    "refresh_tol": "tol",
    "tune_tol": "tune_tol",
    "tune_reads": "tune_reads",
    "tune_iters": "tune_iters",
    "drift_tol": "drift_tol",
}


def make_scheme(name: str | ProgrammingScheme | None = None, **options: Any) -> ProgrammingScheme:
    """A scheme from its name (None: ``ideal``); a scheme passes through unchanged (then no
    options may be given). `options`: the scheme class's own (`record`, `tol`, `max_iters`,
    `seed`; for pulsed schemes `max_update_pulses`, `calibration_pulses`, `rounding`) and
    the refresh policy's, flat (`refresh_every`, `refresh_mode`, `refresh_tol`, `tune_tol`,
    `tune_reads`, `tune_iters`, `drift_tol`)."""
    if name is not None and not isinstance(name, str):
        return name
    name = name or "ideal"
    cls = SCHEME_CLASSES.get(name)
    if cls is None:
        raise ValueError(f"programming scheme must be one of {SCHEMES}, got {name!r}")
    policy = {field: options.pop(key) for key, field in _REFRESH_OPTIONS.items() if key in options}
    if policy:
        options["refresh"] = RefreshPolicy(**policy)
    try:
        return cls(**options)  # type: ignore[return-value]
    except TypeError as exc:
        raise TypeError(f"programming scheme {name!r}: {exc}") from None
