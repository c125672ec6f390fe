"""Weights on devices: the weight <-> conductance mapping (`mapping`), the programming
schemes that turn host weight changes into writes and pulses (`schemes`), the pulse-response
model they use without a calibration record (`steps`) and the closed-loop tuning of pairs
that refreshes a tile from the state it is in (`tune`)."""

from hil.programming.mapping import LinearMapping, StuckDevices, WriteResult, read_weights, write_weights
from hil.programming.schemes import (
    REFRESH_MODES,
    SCHEMES,
    Programmed,
    ProgrammingScheme,
    TileState,
    UpdateReport,
    make_scheme,
)
from hil.programming.steps import StepModel, measure_steps, probe_steps
from hil.programming.tune import TuneResult, tune_pairs

__all__ = [
    "REFRESH_MODES",
    "SCHEMES",
    "LinearMapping",
    "Programmed",
    "ProgrammingScheme",
    "StepModel",
    "StuckDevices",
    "TileState",
    "TuneResult",
    "UpdateReport",
    "WriteResult",
    "make_scheme",
    "measure_steps",
    "probe_steps",
    "read_weights",
    "tune_pairs",
    "write_weights",
]
