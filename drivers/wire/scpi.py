"""SCPI vocabulary shared by the VISA client and the SCPI server: command headers, the
mapping of each Device operation onto one command, IEEE 488.2 blocks, error strings.

Headers are written here in SCPI's mixed-case notation (``SYSTem:ERRor[:NEXT]?``: the
upper-case part is the short form, ``[...]`` is optional). Clients send short forms.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import NamedTuple

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


# ---- program messages: the grammar both the SCPI server and the VISA client parse with


class ParseError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class Param(NamedTuple):
    kind: str  # "block", "string" or "token"
    value: bytes | str


class Unit(NamedTuple):
    header: str
    params: list[Param]


_HEADER_CHARS = re.compile(rb"[0-9A-Za-z*:?_]*")  # what a header may hold (IEEE 488.2 program mnemonics)


def parse_message(msg: bytes) -> list[Unit]:
    """Split a program message into units; raises ParseError on the first malformed one
    (`MessageParser` does the same and remembers short messages)."""
    units: list[Unit] = []
    i, n = 0, len(msg)
    while True:
        while i < n and msg[i] in b" \t\r":
            i += 1
        if i >= n:
            return units
        start = i
        i = _HEADER_CHARS.match(msg, i).end()  # type: ignore[union-attr]  # matches the empty string too
        header = msg[start:i].decode("ascii")
        if not header:
            c = msg[i]
            code = codes.INVALID_CHARACTER if not 0x20 < c < 0x7F else codes.SYNTAX_ERROR
            raise ParseError(code, f"unexpected {bytes([c])!r} where a header should start")
        params: list[Param] = []
        if i < n and msg[i] not in b" \t\r;":
            raise ParseError(codes.HEADER_SEPARATOR_ERROR, f"{bytes([msg[i]])!r} after header {header!r}")
        while i < n and msg[i] in b" \t\r":
            i += 1
        while i < n and msg[i] != 0x3B:  # ';'
            param, i = _param(msg, i)
            params.append(param)
            while i < n and msg[i] in b" \t\r":
                i += 1
            if i < n and msg[i] == 0x2C:  # ','
                i += 1
                while i < n and msg[i] in b" \t\r":
                    i += 1
                if i >= n or msg[i] == 0x3B:
                    raise ParseError(codes.MISSING_PARAMETER, f"{header}: nothing after ','")
            elif i < n and msg[i] != 0x3B:
                raise ParseError(codes.INVALID_SEPARATOR, f"{header}: {bytes([msg[i]])!r} between parameters")
        units.append(Unit(header, params))
        i += 1


def _param(msg: bytes, i: int) -> tuple[Param, int]:
    c = msg[i]
    if c == 0x23:  # '#'
        try:
            extent = block_extent(msg, i)
        except BlockError as exc:
            raise ParseError(exc.code, str(exc)) from None
        if extent is None or extent[1] > len(msg):
            raise ParseError(codes.INVALID_BLOCK_DATA, "block shorter than its header says")
        return Param("block", msg[extent[0] : extent[1]]), extent[1]
    if c in (0x22, 0x27):
        j, out = i + 1, bytearray()
        while True:
            k = msg.find(bytes([c]), j)
            if k < 0:
                raise ParseError(codes.INVALID_STRING_DATA, "unterminated string")
            out += msg[j:k]
            if k + 1 < len(msg) and msg[k + 1] == c:
                out.append(c)
                j = k + 2
                continue
            try:
                return Param("string", out.decode("utf-8")), k + 1
            except UnicodeDecodeError:
                raise ParseError(codes.INVALID_STRING_DATA, "string is not UTF-8") from None
    j = i
    while j < len(msg) and msg[j] not in b",; \t\r":
        j += 1
    token = msg[i:j]
    if not all(0x20 < b < 0x7F for b in token):
        raise ParseError(codes.INVALID_CHARACTER, f"invalid character in parameter {token!r}")
    return Param("token", token.decode("ascii")), j


# ---- raw SCPI from a lab user (`VisaDevice.query` / `VisaDevice.write`)

# what a user may send as raw text: commands and queries that read the board, its identity and
# its status registers, and drive no line and change no device, topology, owner or link mode
RAW_ALLOWED: tuple[Header, ...] = tuple(
    Header(spec)
    for spec in (
        IDN, OPC, OPC_Q, WAI, CLS, STB_Q, ESR_Q, ESE, ESE_Q, SRE, SRE_Q, ERROR_Q, ERROR_COUNT_Q,
        INFO_Q, SAFETY_Q, TOPOLOGY_Q, STATE_Q, METER_Q, WEAR_Q, LOCK_OWNER_Q, CHECK_MODE_Q, FETCH_DATA_Q,
    )
)  # fmt: skip

# the rest of the protocol's commands, each with what to call instead: the typed operation runs
# the host's limit checks before anything is sent, and keeps the session's own state (topology,
# request ids, owner, wear, checked mode) true
RAW_INSTEAD: tuple[tuple[Header, str], ...] = tuple(
    (Header(spec), instead)
    for spec, instead in (
        (PROGRAM_Q, "dev.program(tile, g_plus, g_minus, verify=..., tol=..., max_iters=...)"),
        (PULSE_Q, "dev.pulse(tile, counts_plus, counts_minus)"),
        (MVM_Q, "dev.mvm(tile, x, transpose=...)"),
        (CONDUCTANCE_Q, "dev.read_conductance(tile) (a read drives every row at v_read)"),
        (SETTLE_Q, "dev.settle(clamp, nudge=..., init=...)"),
        (TOPOLOGY, "dev.configure(topology)"),
        (WAIT, "dev.wait(seconds)"),
        (RST, "dev.reset()"),
        (SAFE, "dev.safe_state()"),
        (BEGIN, "dev.begin(tag)"),
        (COMMIT, "dev.commit(tag)"),
        (LOCK_ACQUIRE_Q, "the URI's lock=1 (the default: the session takes the board when it opens)"),
        (LOCK_RELEASE, "dev.close() (it releases the board)"),
        (LOCK_BREAK, "dev.break_lock()"),
        (CHECK_MODE, "the URI's check=1 (checked mode is set when the session opens)"),
        (CHECKSUM, "the URI's check=1 (the session seals every message itself)"),
        (TST_Q, "`hil conformance URI` (a self-test may drive the arrays)"),
    )
)


def raw_refusal(text: str) -> str | None:
    """Why the raw program message `text` may not be sent, or None when every unit of it is
    in `RAW_ALLOWED`. Parsed with the board's own grammar (`parse_message`), so what is
    checked is what runs: a message that does not parse, holds a character outside printable
    ASCII (a newline would end it early and start a message this check never saw), or names a
    header outside this protocol (a vendor command may drive the arrays) is refused too."""
    try:
        units = parse_message(text.encode("latin-1"))
    except UnicodeEncodeError:
        return "it holds characters that are not bytes; a raw message is one line of printable ASCII"
    except ParseError as exc:
        return f"it does not parse as SCPI ({exc})"
    if not units:
        return "it is empty"
    for unit in units:
        if any(h.matches(unit.header) for h in RAW_ALLOWED):
            continue
        instead = next((use for h, use in RAW_INSTEAD if h.matches(unit.header)), None)
        if instead is not None:
            return (
                f"{unit.header} drives the board or changes its state, and raw text skips the host's "
                f"limit checks: call {instead}"
            )
        return (
            f"{unit.header} is not a command of this protocol (docs/protocol.md), so the host cannot "
            "tell what it drives; raw text may only read (*IDN?, SYST:ERR?, SYST:INFO?, SYST:SAF?, "
            "SYST:STAT?, SYST:WEAR? ...). A vendor query you know only reads (a temperature, a "
            "firmware status) goes through query_unchecked, which sends it with no check at all"
        )
    bad = next((ch for ch in text if not " " <= ch <= "~"), None)
    if bad is not None:  # a board cuts a message at a newline, even inside a string
        return (
            f"it holds {bad!r}: a raw message is one line of printable ASCII (a newline would end "
            "it there and start a message this check never saw); send one message per call"
        )
    return None
