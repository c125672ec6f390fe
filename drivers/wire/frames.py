"""The framed binary protocol's frames: COBS-encoded, 0x00-delimited, CRC-32 checked.

On the wire a frame is ``00 | COBS(header | payload | crc32) | 00``. The header is
little-endian ``version u8, flags u8, opcode u8, ref u8, seq u16, length u16``;
the CRC-32 (zlib) covers header and payload. `ref` is the low byte of the sequence number
of the first frame of the request a response answers (0 in requests), so a late reply to an abandoned request
is never taken for the current one. The leading zero flushes whatever garbage a
receiver holds, so it resynchronises on the next frame. See docs/protocol.md.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import asdict, dataclass
from enum import IntEnum, IntFlag
from typing import NamedTuple

from cobs import cobs

from drivers.errors import ProtocolError

VERSION = 1
HEADER = struct.Struct("<BBBBHH")
CRC = struct.Struct("<I")
MAX_FRAGMENT = 32768  # payload bytes per frame; longer messages are fragmented
MAX_MESSAGE = 8 << 20  # bytes of one reassembled message a board accepts (4 x a 512x512 f4 tile pair)
MAX_FRAME = HEADER.size + MAX_FRAGMENT + CRC.size
MAX_ENCODED = MAX_FRAME + MAX_FRAME // 254 + 2  # COBS overhead bound
SEQ_MOD = 1 << 16
CRC_RESIDUE = 0x2144DF1C  # zlib.crc32(data + CRC.pack(zlib.crc32(data))), whatever the data


class Flag(IntFlag):
    RESPONSE = 0x01  # sent by the board
    MORE = 0x02  # more fragments of this message follow
    ERROR = 0x04  # the reply is an error: payload is JSON {"code": int, "message": str}
    START = 0x08  # first fragment of a message


class LinkOp(IntEnum):
    """Link-level opcodes (device operations use `drivers.wire.payload.Op`, 0x10 and up)."""

    ACK = 0x01  # seq: the frame acknowledged; never acknowledged itself
    NACK = 0x02  # seq: the frame rejected (0xFFFF: header unreadable); payload: 1 reason byte
    PING = 0x03  # request; the reply echoes the payload
    HELLO = 0x04  # request; resets the board's duplicate filter; reply: JSON link parameters
    STATS = 0x05  # request; reply: the board's link statistics as JSON


class Reason(IntEnum):
    """Why a frame was rejected (NACK payload)."""

    COBS = 1
    SHORT = 2
    LENGTH = 3
    CRC = 4
    VERSION = 5
    OVERSIZE = 6


NO_SEQ = 0xFFFF


class Frame(NamedTuple):
    """One frame (immutable; a named tuple: a frozen dataclass costs a microsecond more to
    build, twice per frame)."""

    opcode: int
    seq: int
    flags: int = 0
    payload: bytes = b""
    ref: int = 0


class FrameError(ProtocolError):
    """A received chunk is not a valid frame; `reason` goes into the NACK."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"bad frame ({reason.name}): {detail}")
        self.reason = reason


def encode(frame: Frame) -> bytes:
    if len(frame.payload) > MAX_FRAGMENT:
        raise ProtocolError(f"frame payload of {len(frame.payload)} bytes exceeds {MAX_FRAGMENT}")
    body = HEADER.pack(
        VERSION, frame.flags, frame.opcode, frame.ref & 0xFF, frame.seq % SEQ_MOD, len(frame.payload)
    )
    body += frame.payload
    return b"\x00" + cobs.encode(body + CRC.pack(zlib.crc32(body))) + b"\x00"


def decode(chunk: bytes) -> Frame:
    """Decode the bytes between two delimiters (without them)."""
    if len(chunk) > MAX_ENCODED:
        raise FrameError(Reason.OVERSIZE, f"{len(chunk)} bytes")
    try:
        body = cobs.decode(chunk)
    except cobs.DecodeError as exc:
        raise FrameError(Reason.COBS, str(exc)) from None
    if len(body) < HEADER.size + CRC.size:
        raise FrameError(Reason.SHORT, f"{len(body)} bytes")
    # the CRC-32 of the bytes and their own CRC-32 (little-endian) is a constant: one pass over
    # the frame, no slice, and true exactly when the CRC matches (the map from the last four
    # bytes to the CRC of the whole is a bijection)
    if zlib.crc32(body) != CRC_RESIDUE:
        raise FrameError(Reason.CRC, "checksum mismatch")
    version, flags, opcode, ref, seq, length = HEADER.unpack_from(body)
    if length != len(body) - HEADER.size - CRC.size:
        raise FrameError(Reason.LENGTH, f"header says {length} bytes, frame holds {len(body) - 12}")
    if version != VERSION:
        raise FrameError(Reason.VERSION, f"version {version}, this side speaks {VERSION}")
    return Frame(opcode, seq, flags, bytes(body[HEADER.size : -CRC.size]), ref)


def ack(seq: int) -> Frame:
    return Frame(LinkOp.ACK, seq)


def nack(seq: int, reason: Reason) -> Frame:
    return Frame(LinkOp.NACK, seq, 0, bytes([int(reason)]))


def fragments(payload: bytes, size: int = MAX_FRAGMENT) -> list[bytes]:
    """Split a message payload into frame payloads (at least one, possibly empty)."""
    if not payload:
        return [b""]
    return [payload[i : i + size] for i in range(0, len(payload), size)]


class Deframer:
    """Splits a byte stream at 0x00 delimiters; counts bytes dropped as garbage.

    `feed` returns the chunks between delimiters. A run longer than any valid frame is
    dropped up to the next delimiter (it cannot be a frame), so memory stays bounded.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._overflow = False
        self.dropped = 0

    def feed(self, data: bytes) -> list[bytes]:
        n = len(data)
        if (  # the usual read: one whole frame, delimiters on both sides, nothing held over
            not self._buf
            and not self._overflow
            and 2 < n <= MAX_ENCODED + 2
            and data[0] == 0
            and data[-1] == 0
            and data.find(b"\x00", 1, n - 1) < 0
        ):
            return [data[1:-1]]
        chunks: list[bytes] = []
        start = 0
        while True:
            end = data.find(b"\x00", start)
            if end < 0:
                self._append(data[start:])
                return chunks
            self._append(data[start:end])
            if self._overflow:
                self._overflow = False
            elif self._buf:
                chunks.append(bytes(self._buf))
            self._buf.clear()
            start = end + 1

    def _append(self, data: bytes) -> None:
        if self._overflow:
            self.dropped += len(data)
            return
        self._buf += data
        if len(self._buf) > MAX_ENCODED:
            self.dropped += len(self._buf)
            self._buf.clear()
            self._overflow = True


@dataclass
class LinkStats:
    """Counters of one end of a framed link."""

    frames_sent: int = 0
    frames_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    acks_sent: int = 0
    acks_received: int = 0
    nacks_sent: int = 0
    nacks_received: int = 0
    retransmissions: int = 0
    timeouts: int = 0
    bad_frames: int = 0  # chunks that failed COBS, length, version or CRC checks
    crc_errors: int = 0
    garbage_bytes: int = 0  # bytes dropped by the deframer (runs too long to be frames)
    duplicates: int = 0  # frames received twice (their ACK was lost); acknowledged, not re-executed
    stale: int = 0  # frames of an abandoned exchange, acknowledged and dropped
    oversize: int = 0  # fragments dropped because their message grew past max_message

    def as_dict(self) -> dict[str, int]:
        return asdict(self)
