"""Hyperparameter sweeps over `hil train` configs: Optuna ask/tell, in-process or on Ray.

`hil sweep SWEEP.toml` reads a `SweepSpec` (spec.py), creates an Optuna study whose storage
lives in the sweep's folder, and runs its trials in rounds (study.py) on an executor: one
board in this process (local.py) or one Ray actor per board across a cluster (ray_runner.py,
imported only when asked for). Each trial is an ordinary run log under ``trials/NNNN/``.
"""

from hil.sweep.spec import Param, SpecError, SweepSpec, load_spec, parse_spec
from hil.sweep.study import SweepError, SweepResult, TrialRecord, run_sweep

__all__ = [
    "Param",
    "SpecError",
    "SweepError",
    "SweepResult",
    "SweepSpec",
    "TrialRecord",
    "load_spec",
    "parse_spec",
    "run_sweep",
]
