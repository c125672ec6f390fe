"""Weights on devices: the weight <-> conductance mapping (`mapping`), the programming
schemes that turn host weight changes into writes and pulses (`schemes`: one class per
scheme behind the `ProgrammingScheme` protocol of `scheme`), the pulse-response model they
use without a calibration record (`steps`) and the closed-loop tuning of pairs that
refreshes a tile from the state it is in (`tune`)."""

from hil.programming.mapping import (
    ClippedWeightsWarning,
    LinearMapping,
    StuckDevices,
    WriteResult,
    read_weights,
    write_weights,
)
from hil.programming.pulsed import MixedPrecision, PulsedUpdates
from hil.programming.scheme import (
    REFRESH_MODES,
    Programmed,
    ProgrammingScheme,
    RefreshPolicy,
    SchemeBase,
    TileState,
    UpdateReport,
)
from hil.programming.schemes import SCHEME_CLASSES, SCHEMES, make_scheme
from hil.programming.steps import StepModel, measure_steps, probe_steps
from hil.programming.tune import TuneResult, tune_pairs
from hil.programming.writes import IdealWrites, VerifiedWrites

__all__ = [
    "REFRESH_MODES",
    "SCHEMES",
    "SCHEME_CLASSES",
    "ClippedWeightsWarning",
    "IdealWrites",
    "LinearMapping",
    "MixedPrecision",
    "Programmed",
    "ProgrammingScheme",
    "PulsedUpdates",
    "RefreshPolicy",
    "SchemeBase",
    "StepModel",
    "StuckDevices",
    "TileState",
    "TuneResult",
    "UpdateReport",
    "VerifiedWrites",
    "WriteResult",
    "make_scheme",
    "measure_steps",
    "probe_steps",
    "read_weights",
    "tune_pairs",
    "write_weights",
]
