"""Calibration sessions and records: measure a board through the Device interface, store what
was found, and correct for it on the host.

Run a session (any Device: emulator, VISA, serial)::

    from calibration import SessionOptions, run_session, write
    with open_device(uri) as dev:
        record = run_session(dev, SessionOptions(tile_shapes=((256, 256),)))
    write(record, "cal.zarr")          # or: hil calibrate URI --out cal.zarr

Load it for one board (refuses a record of another board, or of this board in another
configuration: converter bits or ranges, limits, the emulator's preset; naming both)::

    record = calibration.load("cal.zarr", board=dev.info)

Apply it (pure numpy; no device access). Channels: node k of the configured topology (groups
in declared order) is DAC channel k and state-ADC channel k; mvm input line i is DAC channel
i; mvm output line j is mvm-ADC channel j (`channel_offsets(topology)` gives each group's first
channel):

- ``dac_requests(record, values, start)``: what to request so that DAC channels start.. put
  out `values`: clamps, nudge targets and mvm inputs;
- ``correct_readings(record, readings, start)``: true node states from state-ADC readings;
- ``correct_mvm(record, outputs, start=0)``: true ``x @ W`` from mvm read-outs;
- ``weights_to_conductances(record, position, w, w_max, limits)`` and
  ``conductance_targets(record, position, g_plus, g_minus, limits)``: targets for the tile at
  `position` (its index in the topology's couplings; the shape must match the calibrated
  one) moved into each device's measured window, a stuck device's weight carried by its
  partner, unreachable cells flagged (`Targets`);
- ``pulses_needed(record, position, g_now, g_target)``: expected signed pulse counts per
  device under its fitted pulse-response model (for pulsed incremental updates);
- ``Corrections(record, topology)``: all of the above by group and tile name
  (``.clamp``, ``.nudge``, ``.states``, ``.mvm_inputs``, ``.mvm_outputs``, ``.weights``);
- ``CalibratedDevice(device, record)``: a Device decorator that applies all of it on the way
  in and out, so unchanged host code (an EBBlock, the trainer) runs calibrated.

Check whether a record still holds (re-measures a sample; reprograms the board)::

    report = drift_check(dev, record, max_age_s=7 * 86400)
    if report.recalibrate: print(report)

Import rule: this package uses only `drivers` (the Device interface), never `emulator` or `hil`.

The names below load on first use (`__getattr__`, PEP 562): importing the package, or
`calibration.routines` (the routine names and pulse-budget bounds `hil calibrate --help` shows),
imports none of numpy, torch and zarr.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from drivers.lazy import lazy_exports

if TYPE_CHECKING:
    from calibration.apply import (
        Corrections,
        Targets,
        channel_offsets,
        conductance_targets,
        correct_mvm,
        correct_readings,
        dac_requests,
        pulses_needed,
        weights_to_conductances,
    )
    from calibration.calibrated import CalibratedDevice
    from calibration.converters import ConverterOptions
    from calibration.drift import DriftReport, drift_check
    from calibration.record import (
        FORMAT_VERSION,
        CalibrationError,
        CalibrationMismatch,
        CalibrationRecord,
        ChannelCal,
        ConductanceMap,
        PulseModel,
        SettleProfile,
        StuckMap,
        TileCalibration,
        board_fingerprint,
        load,
        write,
    )
    from calibration.routines import ROUTINES
    from calibration.session import SessionOptions, resolve_routines, run_session, runnable

# The module each name of the package comes from, imported on the name's first use
_HOMES = {
    "calibration.routines": ("ROUTINES",),
    "calibration.apply": (
        "Corrections",
        "Targets",
        "channel_offsets",
        "conductance_targets",
        "correct_mvm",
        "correct_readings",
        "dac_requests",
        "pulses_needed",
        "weights_to_conductances",
    ),
    "calibration.calibrated": ("CalibratedDevice",),
    "calibration.converters": ("ConverterOptions",),
    "calibration.drift": ("DriftReport", "drift_check"),
    "calibration.record": (
        "FORMAT_VERSION",
        "CalibrationError",
        "CalibrationMismatch",
        "CalibrationRecord",
        "ChannelCal",
        "ConductanceMap",
        "PulseModel",
        "SettleProfile",
        "StuckMap",
        "TileCalibration",
        "board_fingerprint",
        "load",
        "write",
    ),
    "calibration.session": ("SessionOptions", "resolve_routines", "run_session", "runnable"),
}

__all__ = [
    "FORMAT_VERSION",
    "ROUTINES",
    "CalibratedDevice",
    "CalibrationError",
    "CalibrationMismatch",
    "CalibrationRecord",
    "ChannelCal",
    "ConductanceMap",
    "ConverterOptions",
    "Corrections",
    "DriftReport",
    "PulseModel",
    "SessionOptions",
    "SettleProfile",
    "StuckMap",
    "Targets",
    "TileCalibration",
    "board_fingerprint",
    "channel_offsets",
    "conductance_targets",
    "correct_mvm",
    "correct_readings",
    "dac_requests",
    "drift_check",
    "load",
    "pulses_needed",
    "resolve_routines",
    "run_session",
    "runnable",
    "weights_to_conductances",
    "write",
]


__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
