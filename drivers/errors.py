"""One error hierarchy for every backend.

Each error says what went wrong and, where there is one, what to do about it.
"""

from __future__ import annotations

import math
import numbers


class DeviceError(Exception):
    """Base class of every error raised by a Device or by `open_device`.

    `not_run`: the request it ended provably did not run on the board (`Corrupted`: the board
    said so; a framed message given up before its last fragment went out, `Link.send`).
    `nacks`: the NACKs a framed link's give-up saw (`Link._deliver`), for the advice
    `RetriesExhausted` gives: a NACK comes from a board that is powered and connected."""

    not_run: bool = False
    nacks: int = 0


class DeviceTimeout(DeviceError):
    """The device did not answer within the configured timeout."""


class ProtocolError(DeviceError):
    """Malformed reply, bad framing, CRC mismatch or sequence error on the wire."""


class Corrupted(ProtocolError):
    """Checked mode (docs/protocol.md, section 2) caught bytes corrupted on the line: a request
    whose checksum failed on the board, which did not run it (it answered the empty response
    ``0`` and queued -360), or a reply that failed the host's check. A link failure: the host
    resends the request (a program, pulse or wait with its request id, so a copy that ran is
    answered from the board's record, never run twice). `not_run`: the board said it did not
    run the request (its checksum failed there), as opposed to a reply that failed the host's
    check (the request may have run): the host then counts that copy as not run."""

    def __init__(self, message: str, *, not_run: bool = False) -> None:
        super().__init__(message)
        self.not_run = not_run


class DeviceFault(DeviceError):
    """The device reported a fault; `code` is its error code (SCPI or device specific)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"device fault {code}: {message}")
        self.code = code
        self.message = message


class BoardLocked(DeviceFault):
    """Another host owns the board (docs/protocol.md, "Ownership"): the request was refused
    before it reached the array. `message` is the board's and names the owner; `uri`, where
    known, is the board's, for the command that breaks the lock."""

    def __init__(self, code: int, message: str, uri: str | None = None) -> None:
        super().__init__(code, message)
        self.uri = uri
        where = uri or "URI"
        self.args = (
            f"device fault {code}: {message} (to take a board whose owner is gone: hil lock break {where})",
        )


def distinct_numbers(a: float, b: float) -> tuple[str, str]:
    """`a` and `b` as text that differs whenever the numbers differ: 6 significant digits, more
    where those print alike (up to the shortest repr that round-trips); an integer (a count) in
    full up to 2**53. A state one float32 step past its limit was refused as "requested 0.25,
    limit 0.25"."""
    fa, fb = _real(a), _real(b)
    digits = 6
    if fa != fb and fa == fa and fb == fb:  # differ, neither a NaN
        for digits in (6, 9, 12, 0):
            if _number(fa, digits) != _number(fb, digits):
                break
    return _shown(a, fa, digits), _shown(b, fb, digits)


def _real(x: float) -> float:
    try:
        return float(x)
    except OverflowError:  # a Python int past float range
        return math.inf if x > 0 else -math.inf


def _number(x: float, digits: int) -> str:
    """`x` with `digits` significant digits (0: the shortest repr that round-trips)."""
    return repr(x) if digits == 0 else f"{x:.{digits}g}"


def _shown(x: float, real: float, digits: int) -> str:
    if isinstance(x, numbers.Integral) and not isinstance(x, bool) and abs(real) <= 2**53:
        return str(int(x))  # a count, exact
    return _number(real, digits)


class LimitViolation(DeviceError):
    """A request would exceed a device limit; it was refused before reaching the array. The
    message shows `value` and `bound` so that they differ whenever they do (`distinct_numbers`)."""

    def __init__(self, limit: str, value: float, bound: float, hint: str = "") -> None:
        shown, most = distinct_numbers(value, bound)
        text = f"{limit} exceeded: requested {shown}, limit {most}"
        super().__init__(f"{text}. {hint}" if hint else text)
        self.limit = limit
        self.value = value
        self.bound = bound
        # False where a remote driver's own check refused it (nothing went out); None otherwise
        # (a board's check, in this process or answered over the link)
        self.sent: bool | None = None


class NotSupported(DeviceError):
    """The device lacks the capability this call needs (see `DeviceInfo.capabilities`)."""


class ConfigurationError(DeviceError):
    """Bad topology, unknown tile or group, wrong array shape, or a bad URI."""


class Unreachable(ConfigurationError):
    """A first connection could not be made at all (refused, a host that does not resolve or
    answer, no such serial port). Raised at once, not retried: another try finds the same
    address. It is a ConfigurationError because a wrong URI looks the same; a board that is off
    or still starting looks the same too, so a command that can continue later says how."""


class PortInUse(ConfigurationError):
    """A local serial port (``serial://``) another process, or another device in this one,
    holds open (its exclusive lock): the board is there but busy, as one whose lock another
    host holds (`BoardLocked`); who waits for a busy board waits for this too."""


class BoardReset(DeviceError):
    """The board reset (its epoch changed) while an operation that must not be repeated
    blindly was in flight: whether it took effect is unknown. Re-read what it changed (e.g.
    `read_conductance` after a `pulse`) or re-program from the host's copy."""


class ArraysLost(BoardReset):
    """The board's arrays no longer hold what was programmed: its STATUS `arrays_id` value
    changed across a reconnect (arrays re-formed or erased at boot, a board or chip swapped,
    an emulator started again). The host configured its topology again, but the
    conductances are the devices' own: program every tile again from the host's weights
    before using the board (the trainers do, through `drivers.base.repair_lost_arrays`)."""


class BoardChanged(DeviceError):
    """A reconnect found a board that declares other limits than the one the device was
    opened on (another board or chip behind the same address, new firmware, an emulator
    started again with other settings). The host's checks use what the board declares now;
    the request in flight, checked against the old limits, was not sent again, and no
    topology was configured on it. Reopen the board (`open_device`) and start what was
    running again (a training run: its --resume command)."""


class RetriesExhausted(DeviceError):
    """An operation failed on the link on every attempt of its recovery budget; `op` names
    it, `attempts` counts the tries, `__cause__` is the last failure."""

    def __init__(self, op: str, attempts: int, seconds: float, last: BaseException) -> None:
        cause = str(last)
        # a cause that ends by asking what to check (a refused connection, a VISA timeout) is
        # not followed by the generic question; a malformed reply came from a board that
        # answers, so the question is its firmware's, not the cable's (as is one that names the
        # rule of docs/protocol.md the board breaks)
        nacks = last.nacks if isinstance(last, DeviceError) else 0
        if nacks:  # the framed link's give-up: the board answered, with NACKs (`Link._deliver`)
            hint = (
                f". The board answered with {nacks} NACK(s), so it is powered and connected, but it reads "
                "the frames damaged: a noisy or mis-set line. Check that both ends use the same line "
                "settings (URI baud=, 8N1 framing), the cable (short, shielded, seated) and a common "
                "ground; docs/reliability.md"
            )
        elif cause.rstrip().endswith("?"):
            hint = ""
        elif isinstance(last, ProtocolError) and cause.startswith("malformed"):
            hint = (
                ". The board answered, so the link works: its reply breaks docs/protocol.md at the field "
                "named (a reply that belongs to another request, e.g. an extra reply line sent earlier, "
                "shows the same way)"
            )
        elif isinstance(last, Corrupted):
            hint = (
                ". Checked mode caught bytes corrupted on the line: the link is too noisy for "
                "messages this long (one is resent whole). Check the cable (short, shielded, "
                "seated), lower the line rate (URI baud=), allow more tries (URI attempts=), or use the "
                "framed protocol (serial://), which resends single frames; docs/reliability.md"
            )
        elif "docs/protocol.md" in cause:
            hint = ""
        else:
            hint = ". Is the board powered and the link connected?"
        super().__init__(
            f"{op} failed {attempts} time(s) over {seconds:.2f} s; last cause: "
            f"{_public_name(type(last))}: {cause}{hint}"
        )
        self.op = op
        self.attempts = attempts
        self.last = last


def _public_name(kind: type) -> str:
    """The name of `kind`, or of its nearest base that is not private (a driver's
    ``_NotABlock`` shows as the ``ProtocolError`` a caller can catch)."""
    return next(c.__name__ for c in kind.__mro__ if not c.__name__.startswith("_"))


class OpenTransactionWarning(RuntimeWarning):
    """A board holds a programming transaction that was begun and never committed (a host
    stopped mid-sequence, or the board reset): its conductances may mix old and new targets
    until every tile is programmed again. Warned when a link opens to such a board, and by a
    trainer, which programs every tile again, in its stead."""


class SafeStateWarning(RuntimeWarning):
    """Leaving a Device's `with` block because of an exception, the board could not be put in
    its safe state either (its link is gone, say). The block's exception is raised as it
    was, with a note saying so; the board may still hold its lines driven. Also warned by a
    remote device's `close()` that could not send the safe state (nothing raised), saying
    whether and when the board's lease makes it safe."""
