"""The routines of a calibration session, in running order, what each needs first and the
capability it needs, and the bounds of the pulse routine's budget: plain data, importable
without numpy, torch or zarr (`hil calibrate --help` names them). `calibration.session` runs
the routines (its docstring says what each measures), `calibration.pulse` spends the budget."""

ROUTINES = ("adc", "dac", "mvm", "stuck", "gmap", "pulse", "settle")
REQUIRES = {"dac": ("adc",), "mvm": ("dac",)}

# the capability each routine needs beyond reading conductances (adc and dac read node states
# through a settle; stuck and gmap only read)
NEEDS = {"adc": "settle", "dac": "settle", "mvm": "mvm", "pulse": "pulse", "settle": "settle"}

# The pulse budget of a calibration session, per device (`default_pulse_budget`): on a board
# that declares its devices' endurance (`Limits.pulse_endurance`), ENDURANCE_SHARE of it, so a
# session's worst case wears at most 1 % of a device's rated life; on one that declares none,
# the worst case of the default sequence at the board's own max_pulses (`pulse_worst_case`),
# FALLBACK_PULSE_BUDGET on a board of max_pulses 1000 or more (442 007; the emulator's
# presets), less on one of smaller calls: a figure of the routine, not of any device, which the
# default routine always fits and which sets its bound where the board gives none. No session
# may declare more than PULSE_BUDGET_MAX.
ENDURANCE_SHARE = 0.01
FALLBACK_PULSE_BUDGET = 442_007
PULSE_BUDGET_MAX = 1_000_000
