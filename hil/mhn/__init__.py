"""Modern Hopfield network (MHN) blocks on crossbars: `core` (the pure-torch update, energy and
retrieval budget), `tile` (patterns on a tile through the converters), `block` (retrieval
iterated on the host through `Device.mvm`), `phase` (the temperature transition, derived and
measured), `digits` (stored digits), `learn` (EP gradients of the patterns), `classifier` (a digits
classifier learned by EP), `layer` (the block in an ff-EBM). docs/mhn.md."""

from hil.mhn.block import ElasticNudge, MHNBlock, Retrieval
from hil.mhn.core import MAX_BETA, MAX_RETRIEVAL_STEPS, RetrievalBudget, energy, retrieve, update
from hil.mhn.layer import MHNLayer
from hil.mhn.phase import Critical, PhasePoint, critical_beta, equidistant_patterns, measured_critical, sweep

__all__ = [
    "MAX_BETA",
    "MAX_RETRIEVAL_STEPS",
    "Critical",
    "ElasticNudge",
    "MHNBlock",
    "MHNLayer",
    "PhasePoint",
    "Retrieval",
    "RetrievalBudget",
    "critical_beta",
    "energy",
    "equidistant_patterns",
    "measured_critical",
    "retrieve",
    "sweep",
    "update",
]
