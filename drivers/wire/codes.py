"""Error codes shared by both wire protocols, and their mapping to `drivers.errors`.

Negative codes are the standard SCPI-99 / IEEE 488.2 ones; positive codes are specific to
crossbar boards. A server turns an exception into ``(code, message)``; a client turns a
``(code, message)`` back into the exception class the in-process backend would have
raised, so user code catches the same errors whichever transport it runs over.
"""

from __future__ import annotations

import math

from drivers.errors import (
    BoardLocked,
    ConfigurationError,
    DeviceError,
    DeviceFault,
    LimitViolation,
    NotSupported,
)

NO_ERROR = 0
COMMAND_ERROR = -100
INVALID_CHARACTER = -101
SYNTAX_ERROR = -102
INVALID_SEPARATOR = -103
DATA_TYPE_ERROR = -104
PARAMETER_NOT_ALLOWED = -108
MISSING_PARAMETER = -109
HEADER_SEPARATOR_ERROR = -111
PROGRAM_MNEMONIC_TOO_LONG = -112
UNDEFINED_HEADER = -113
NUMERIC_DATA_ERROR = -120
INVALID_STRING_DATA = -151
INVALID_BLOCK_DATA = -161
EXECUTION_ERROR = -200
SETTINGS_CONFLICT = -221
DATA_OUT_OF_RANGE = -222
TOO_MUCH_DATA = -223
ILLEGAL_PARAMETER_VALUE = -224
DATA_STALE = -230
HARDWARE_ERROR = -240
QUEUE_OVERFLOW = -350
COMMUNICATION_ERROR = -360
INPUT_BUFFER_OVERRUN = -363
QUERY_INTERRUPTED = -410
QUERY_UNTERMINATED = -420

# device-specific codes
CONFIGURATION = 100  # unknown tile or group, wrong shape, no topology yet
NOT_SUPPORTED = 101  # the board lacks the capability the command needs
FRAME_ERROR = 110  # framed protocol: bad opcode, version or payload
LOCKED = 120  # another host owns the board: a request that drives or changes it was refused

MESSAGES = {
    NO_ERROR: "No error",
    COMMAND_ERROR: "Command error",
    INVALID_CHARACTER: "Invalid character",
    SYNTAX_ERROR: "Syntax error",
    INVALID_SEPARATOR: "Invalid separator",
    DATA_TYPE_ERROR: "Data type error",
    PARAMETER_NOT_ALLOWED: "Parameter not allowed",
    MISSING_PARAMETER: "Missing parameter",
    HEADER_SEPARATOR_ERROR: "Header separator error",
    PROGRAM_MNEMONIC_TOO_LONG: "Program mnemonic too long",
    UNDEFINED_HEADER: "Undefined header",
    NUMERIC_DATA_ERROR: "Numeric data error",
    INVALID_STRING_DATA: "Invalid string data",
    INVALID_BLOCK_DATA: "Invalid block data",
    EXECUTION_ERROR: "Execution error",
    SETTINGS_CONFLICT: "Settings conflict",
    DATA_OUT_OF_RANGE: "Data out of range",
    TOO_MUCH_DATA: "Too much data",
    ILLEGAL_PARAMETER_VALUE: "Illegal parameter value",
    DATA_STALE: "Data corrupt or stale",
    HARDWARE_ERROR: "Hardware error",
    QUEUE_OVERFLOW: "Queue overflow",
    COMMUNICATION_ERROR: "Communication error",
    INPUT_BUFFER_OVERRUN: "Input buffer overrun",
    QUERY_INTERRUPTED: "Query INTERRUPTED",
    QUERY_UNTERMINATED: "Query UNTERMINATED",
    CONFIGURATION: "Configuration error",
    NOT_SUPPORTED: "Not supported",
    FRAME_ERROR: "Frame error",
    LOCKED: "Board locked",
}


def describe(code: int) -> str:
    return MESSAGES.get(code, "Device-specific error" if code > 0 else "Error")


def code_for(exc: BaseException) -> tuple[int, str]:
    """The wire code and message a server reports for an exception raised by its Device."""
    if isinstance(exc, DeviceFault):
        return exc.code, exc.message
    if isinstance(exc, LimitViolation):
        return DATA_OUT_OF_RANGE, str(exc)
    if isinstance(exc, ConfigurationError):
        return CONFIGURATION, str(exc)
    if isinstance(exc, NotSupported):
        return NOT_SUPPORTED, str(exc)
    if isinstance(exc, DeviceError):
        return HARDWARE_ERROR, str(exc)
    if isinstance(exc, OverflowError):  # a number too large for its type
        return DATA_OUT_OF_RANGE, str(exc)
    if isinstance(exc, KeyError):
        return ILLEGAL_PARAMETER_VALUE, f"no {exc}"
    if isinstance(exc, ValueError | TypeError):  # the text says what was wrong; no Python names
        return ILLEGAL_PARAMETER_VALUE, str(exc) or "illegal parameter value"
    return EXECUTION_ERROR, f"{type(exc).__name__}: {exc}"


def _limit_violation(message: str) -> LimitViolation:
    """A LimitViolation carrying the server's text; the numbers stay in the text."""
    exc = LimitViolation("limit", math.nan, math.nan)
    exc.args = (message,)
    return exc


def error_for(code: int, message: str) -> DeviceError:
    """The exception a client raises for an error the device reported."""
    if code == DATA_OUT_OF_RANGE:
        return _limit_violation(message)
    if code == CONFIGURATION:
        return ConfigurationError(message)
    if code == NOT_SUPPORTED:
        return NotSupported(message)
    if code == LOCKED:
        return BoardLocked(code, message)
    return DeviceFault(code, message)
