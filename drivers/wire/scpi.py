"""SCPI vocabulary shared by the VISA client and the SCPI server: command headers, the
mapping of each Device operation onto one command, IEEE 488.2 blocks, error strings.

Headers are written here in SCPI's mixed-case notation (``SYSTem:ERRor[:NEXT]?``: the
upper-case part is the short form, ``[...]`` is optional). Clients send short forms.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

from drivers.wire import codes
from drivers.wire.payload import Op

# IEEE 488.2 common commands
IDN = "*IDN?"
RST = "*RST"
CLS = "*CLS"
OPC = "*OPC"
OPC_Q = "*OPC?"
WAI = "*WAI"
STB_Q = "*STB?"
ESR_Q = "*ESR?"
ESE = "*ESE"
ESE_Q = "*ESE?"
SRE = "*SRE"
SRE_Q = "*SRE?"
TST_Q = "*TST?"

# device commands, one per Device operation (Op.RESET is *RST)
ERROR_Q = "SYSTem:ERRor[:NEXT]?"
ERROR_COUNT_Q = "SYSTem:ERRor:COUNt?"
INFO_Q = "SYSTem:INFO?"
SAFETY_Q = "SYSTem:SAFety?"
SAFE = "SYSTem:SAFE"
WAIT = "SYSTem:WAIT"
TOPOLOGY = "CONFigure:TOPology"
TOPOLOGY_Q = "CONFigure:TOPology?"
PROGRAM_Q = "TILE:PROGram?"
PULSE_Q = "TILE:PULSe?"
CONDUCTANCE_Q = "TILE:CONDuctance?"
MVM_Q = "TILE:MVM?"
SETTLE_Q = "NETwork:SETTle?"
FETCH_DATA_Q = "FETCh:DATA?"
STATE_Q = "SYSTem:STATe?"
METER_Q = "SYSTem:METer?"
WEAR_Q = "SYSTem:WEAR?"
BEGIN = "SYSTem:TRANsaction:BEGin"
COMMIT = "SYSTem:TRANsaction:COMMit"
# ownership (capability "lock"; docs/protocol.md, "Ownership")
LOCK_ACQUIRE_Q = "SYSTem:LOCK:ACQuire?"
LOCK_OWNER_Q = "SYSTem:LOCK:OWNer?"
LOCK_RELEASE = "SYSTem:LOCK:RELease"
LOCK_BREAK = "SYSTem:LOCK:BREak"
CHECK_MODE = "SYSTem:COMMunicate:CHECk"
CHECK_MODE_Q = "SYSTem:COMMunicate:CHECk?"
CHECKSUM = "SYSTem:CHECksum"
# checked mode (docs/protocol.md, section 2): a message ends with this trailer and the CRC-32
# (decimal) of the bytes before it; a response ends with ';' (if not empty) and its CRC-32
CHECK_TRAILER = b";SYST:CHEC "
# bytes of non-block text before a line's terminator, both ways: the SCPI server drops a longer
# message whole, the VISA client's fast path refuses a longer reply line (a board sending more
# is broken)
MAX_LINE = 1 << 20

OP_HEADERS: dict[Op, str] = {
    Op.INFO: INFO_Q,
    Op.TOPOLOGY: TOPOLOGY_Q,
    Op.CONFIGURE: TOPOLOGY,
    Op.PROGRAM: PROGRAM_Q,
    Op.PULSE: PULSE_Q,
    Op.READ_CONDUCTANCE: CONDUCTANCE_Q,
    Op.MVM: MVM_Q,
    Op.SETTLE: SETTLE_Q,
    Op.WAIT: WAIT,
    Op.SAFETY: SAFETY_Q,
    Op.RESET: RST,
    Op.SAFE_STATE: SAFE,
    Op.STATUS: STATE_Q,
    Op.BEGIN: BEGIN,
    Op.COMMIT: COMMIT,
    Op.METER: METER_Q,
    Op.ACQUIRE: LOCK_ACQUIRE_Q,
    Op.OWNER: LOCK_OWNER_Q,
    Op.RELEASE: LOCK_RELEASE,
    Op.BREAK: LOCK_BREAK,
    Op.WEAR: WEAR_Q,
}

TERMINATOR = b"\n"
MAX_BLOCK = 1 << 28  # bytes; a larger block is refused with -223 Too much data
STATUS_EAV = 0x04  # STB bit: error/event queue not empty
STATUS_MAV = 0x10  # STB bit: message available
STATUS_ESB = 0x20  # STB bit: a bit of ESR enabled by *ESE is set
ESR_OPC, ESR_QYE, ESR_DDE, ESR_EXE, ESR_CME = 0x01, 0x04, 0x08, 0x10, 0x20


def short_form(spec: str) -> str:
    """``SYSTem:ERRor[:NEXT]?`` -> ``SYST:ERR?``."""
    text = re.sub(r"\[[^\]]*\]", "", spec)
    return "".join(ch for ch in text if not ch.islower())


@dataclass(frozen=True)
class _Node:
    short: str
    long: str
    optional: bool

    def matches(self, token: str) -> bool:
        t = token.upper()
        return t in (self.short, self.long)


class Header:
    """A header pattern; `matches` accepts short or long forms, any case, optional nodes."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.query = spec.endswith("?")
        body = spec.removesuffix("?")
        self.common = body.startswith("*")
        nodes: list[_Node] = []
        for part in re.findall(r"\[:?[^\]]+\]|[^:\[\]]+", body.lstrip(":")):
            optional = part.startswith("[")
            name = part.strip("[]:")
            short = "".join(ch for ch in name if not ch.islower())
            nodes.append(_Node(short.upper(), name.upper(), optional))
        self.nodes = tuple(nodes)

    def matches(self, header: str) -> bool:
        if header.endswith("?") != self.query:
            return False
        body = header.removesuffix("?")
        if self.common:
            return body.upper() == self.nodes[0].long
        tokens = body.lstrip(":").split(":")
        return self._match(tokens, 0, 0)

    def _match(self, tokens: list[str], i: int, j: int) -> bool:
        if j == len(self.nodes):
            return i == len(tokens)
        node = self.nodes[j]
        if i < len(tokens) and node.matches(tokens[i]) and self._match(tokens, i + 1, j + 1):
            return True
        return node.optional and self._match(tokens, i, j + 1)


def block(data: bytes | bytearray | memoryview) -> bytes:
    """An IEEE 488.2 definite-length arbitrary block: ``#<d><length><data>``."""
    n = len(data)
    digits = str(n)
    if len(digits) > 9:
        raise ValueError(f"a definite-length block holds at most 999999999 bytes, got {n}")
    return b"#" + str(len(digits)).encode() + digits.encode() + bytes(data)


def block_header(n: int) -> bytes:
    digits = str(n)
    return b"#" + str(len(digits)).encode() + digits.encode()


class BlockError(ValueError):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def block_extent(buf: bytes | bytearray | memoryview, pos: int) -> tuple[int, int] | None:
    """For a block starting at ``buf[pos] == '#'``: (data start, data end), or None when more
    bytes are needed. Raises BlockError for a malformed or oversized header."""
    if len(buf) < pos + 2:
        return None
    d = buf[pos + 1]
    if not 0x31 <= d <= 0x39:  # indefinite (#0) blocks are not supported
        raise BlockError(codes.INVALID_BLOCK_DATA, f"block header '#{chr(d)}' is not definite-length")
    ndigits = d - 0x30
    start = pos + 2 + ndigits
    if len(buf) < start:
        return None
    digits = bytes(buf[pos + 2 : start])
    if not digits.isdigit():
        raise BlockError(codes.INVALID_BLOCK_DATA, f"block length {digits!r} is not a number")
    n = int(digits)
    if n > MAX_BLOCK:
        raise BlockError(codes.TOO_MUCH_DATA, f"block of {n} bytes exceeds {MAX_BLOCK}")
    return start, start + n


def parse_block(data: bytes | bytearray | memoryview) -> memoryview:
    """The payload of a complete block (a trailing terminator is allowed)."""
    view = memoryview(data)
    if not view or view[0] != 0x23:
        raise BlockError(codes.INVALID_BLOCK_DATA, "a block starts with '#'")
    extent = block_extent(view, 0)
    if extent is None or extent[1] > len(view):
        raise BlockError(codes.INVALID_BLOCK_DATA, "the block is truncated")
    return view[extent[0] : extent[1]]


def quote(text: str) -> str:
    """A SCPI string parameter (embedded quotes doubled)."""
    return '"' + text.replace('"', '""') + '"'


def number(x: float) -> str:
    """Shortest exact decimal form (NRf), so values round-trip bit for bit."""
    return repr(float(x))


def error_string(code: int, message: str) -> str:
    """``-113,"Undefined header;FOO:BAR"`` (SCPI-99 21.8: the description, then detail)."""
    text = codes.describe(code) + (f";{message}" if message else "")
    return f"{code},{quote(text)}"


def parse_error(text: str) -> tuple[int, str]:
    """(code, message) from a ``SYST:ERR?`` reply; the message drops the standard description."""
    head, _, rest = text.strip().partition(",")
    try:
        code = int(head)
    except ValueError:
        return codes.COMMUNICATION_ERROR, f"unreadable error reply {text!r}"
    msg = rest.strip()
    if len(msg) >= 2 and msg[0] == msg[-1] == '"':
        msg = msg[1:-1].replace('""', '"')
    desc, sep, detail = msg.partition(";")
    return code, detail if sep and desc == codes.describe(code) else msg


_ERROR_LINE = re.compile(rb'(-\d{1,9}),"((?:[^"\n]|"")*)"\r?\n?')


def error_line(data: bytes | bytearray) -> tuple[int, str] | None:
    """(code, message) if `data` is one unsealed error string, ``-360,"..."`` (terminator
    optional), else None: what a board writes in place of a response when it will not serve a
    connection (over its connection limit, say), where a conforming response would be a
    block or a sealed line."""
    if not _ERROR_LINE.fullmatch(bytes(data)):
        return None
    return parse_error(bytes(data).decode("ascii", "replace"))


def seal_request(message: bytes) -> bytes:
    """A program message (without terminator) in checked form, terminator included."""
    return message + CHECK_TRAILER + str(zlib.crc32(message)).encode() + TERMINATOR


def response_check(crc: int, empty: bool) -> bytes:
    """The check unit ending a response whose bytes have CRC-32 `crc`, terminator included."""
    return (b"" if empty else b";") + str(crc).encode() + TERMINATOR


def open_response(data: bytes | bytearray | memoryview) -> bytes:
    """The response units of a checked response message (without its terminator); raises
    ValueError if the check is missing or wrong."""
    raw = bytes(data)
    body, sep, check = raw.rpartition(b";")
    if not check.isdigit():
        raise ValueError(f"no check value at the end of the response ({raw[-40:]!r})")
    if int(check) != zlib.crc32(body):
        raise ValueError("response check mismatch: the reply was corrupted on the way")
    if not sep and body:
        raise ValueError("malformed checked response")
    return body
