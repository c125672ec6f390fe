"""Protocol conformance of any board: checks of the specification, not of the emulator.

`run_conformance(dev)` drives a board through every operation of `drivers.base.Device` that
its `info.capabilities` declare, on a tiny layered network well inside its `info.limits`,
and checks each reply against the spec (docs/protocol.md and the Device docstrings):
shapes, dtypes and ranges, and values against what the board's own conductances predict,
within tolerances built from its converters (DAC/ADC LSBs from the limits) and its noise
(measured by repeating the operation). A capability the board does not declare is SKIPPED,
and calling it must raise `NotSupported`. `tests/test_conformance.py` compares transports
bit for bit against the in-process emulator; these checks are what a lab's own firmware can
pass. `hil conformance URI` prints them.

Modules: `report` (the results), `session` (options, test network, one check at a time),
then one module per family of operations (`board`, `arrays`, `mvm`, `settle`, `refusals`,
then the board-side checks past the host's own: `scpi`, `framed`, `replay` (request ids),
`fragments` (messages over one frame), `lines` (the line-current limit), `wear` (the wear
query of a board that declares a pulse endurance), `ownership`, `owner_gone` (the lease of an
owner whose connection closed without a release) and `lifecycle`), run in that order by `suite`.
"""

from hil.conformance.report import Check, Report
from hil.conformance.session import Options, plan_topology
from hil.conformance.suite import run_conformance

__all__ = ["Check", "Options", "Report", "plan_topology", "run_conformance"]
