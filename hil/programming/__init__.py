"""Weights on devices: the weight <-> conductance mapping (`mapping`) and the programming
schemes that turn host weight changes into writes and pulses (`schemes`)."""

from hil.programming.mapping import LinearMapping, WriteResult, read_weights, write_weights
from hil.programming.schemes import (
    SCHEMES,
    Programmed,
    ProgrammingScheme,
    StepModel,
    TileState,
    UpdateReport,
    make_scheme,
    measure_steps,
)

__all__ = [
    "SCHEMES",
    "LinearMapping",
    "Programmed",
    "ProgrammingScheme",
    "StepModel",
    "TileState",
    "UpdateReport",
    "WriteResult",
    "make_scheme",
    "measure_steps",
    "read_weights",
    "write_weights",
]
