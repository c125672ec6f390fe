"""COBS at its edges, on the framed link: PINGs whose frames hold runs of 253 to 509 non-zero
bytes, so that a board's decoder and encoder meet the 0xFF code (a block of 254 non-zero bytes
with no zero after it). A board that gets it wrong passes every PING and small message and
fails on the first frame with such a run, which most topologies and tiles bring (a JSON text of
a few hundred bytes is one run), with nothing but a CRC failure to show for it."""

from __future__ import annotations

from collections.abc import Callable

from drivers.errors import DeviceError
from hil.conformance.report import Mismatch
from hil.conformance.session import Session

RUNS = (253, 254, 255, 508, 509)  # non-zero bytes between two zeros in the PING payload
RULE = (
    "docs/protocol.md section 3, Frames (COBS as in the `cobs` package): a code byte n < 0xFF is "
    "followed by n - 1 bytes and a zero, 0xFF by 254 bytes and no zero; docs/bringup.md, COBS"
)


def checks(sess: Session) -> None:
    ping = getattr(sess.dev, "ping", None)
    if not callable(ping) or sess.report.uri.lower().startswith("visa://"):
        return
    sess.run(
        "link COBS runs",
        f"a PING with a run of {', '.join(map(str, RUNS))} non-zero bytes is echoed exactly ({RULE})",
        lambda sent: _runs(sent, ping),
    )


def _runs(sent: list[str], ping: Callable[[bytes], float]) -> str:
    sent.append(f"PING 0x00 + n x 0x5a + 0x00, n = {', '.join(map(str, RUNS))}")
    for n in RUNS:
        try:
            ping(b"\0" + b"\x5a" * n + b"\0")
        except DeviceError as exc:
            code = "a 0xFF code and a block of 254 bytes" if n >= 254 else "a code byte of 0xFE"
            raise Mismatch(
                f"a PING whose frame holds a run of {n} non-zero bytes ({code}) failed "
                f"({type(exc).__name__}: {exc}): the board's COBS decoder or encoder mishandles runs of "
                f"254 bytes or more (a zero after a 0xFF block, or none where one belongs); {RULE}"
            ) from exc
    return f"runs of {', '.join(map(str, RUNS))} non-zero bytes echoed"
