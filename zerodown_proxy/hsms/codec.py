"""HSMS (SEMI E37) frame codec, sans-I/O: bytes in, frames out; frames in, bytes out.

A message on the wire is a 4-byte big-endian length followed by a 10-byte header and the body:

    session id (2) | byte 2 | byte 3 | PType (1) | SType (1) | system bytes (4) | body

Data messages (SType 0) carry the W-bit and the stream in byte 2 and the function in byte 3.
Control messages put their own values there: Select.rsp/Deselect.rsp carry a status in byte 3,
Reject.req carries the SType (or PType) of the rejected message in byte 2 and the reason code in
byte 3 (E37 and secsgem agree on this layout).

Only headers are decoded: the proxy forwards bodies as opaque bytes, so the hot path is one
`struct.unpack_from` per message and, when forwarding, one `struct.pack` of a new header.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

HEADER = struct.Struct(">IHBBBBI")  # length, session id, byte 2, byte 3, PType, SType, system
HEADER_SIZE = 10  # without the 4-byte length
FRAME_OVERHEAD = 14
_LENGTH = struct.Struct(">I")

CONTROL_SESSION = 0xFFFF

# SType values (E37 table "SType")
DATA = 0
SELECT_REQ = 1
SELECT_RSP = 2
DESELECT_REQ = 3
DESELECT_RSP = 4
LINKTEST_REQ = 5
LINKTEST_RSP = 6
REJECT_REQ = 7
SEPARATE_REQ = 9
KNOWN_STYPES = frozenset({0, 1, 2, 3, 4, 5, 6, 7, 9})

STYPE_NAMES = {
    DATA: "data",
    SELECT_REQ: "Select.req",
    SELECT_RSP: "Select.rsp",
    DESELECT_REQ: "Deselect.req",
    DESELECT_RSP: "Deselect.rsp",
    LINKTEST_REQ: "Linktest.req",
    LINKTEST_RSP: "Linktest.rsp",
    REJECT_REQ: "Reject.req",
    SEPARATE_REQ: "Separate.req",
}

# Select.rsp status (E37 "SelectStatus")
SELECT_OK = 0
SELECT_ALREADY_ACTIVE = 1
SELECT_NOT_READY = 2
SELECT_EXHAUSTED = 3
SELECT_STATUS_TEXT = {
    0: "communication established",
    1: "communication already active",
    2: "connection not ready",
    3: "connect exhaust (connection already used by another entity)",
}

# Deselect.rsp status (E37 "DeselectStatus")
DESELECT_OK = 0
DESELECT_NOT_ESTABLISHED = 1
DESELECT_BUSY = 2

# Reject.req reason codes (E37 "ReasonCode"); 128..255 are local (entity-specific) codes.
REJECT_STYPE_NOT_SUPPORTED = 1
REJECT_PTYPE_NOT_SUPPORTED = 2
REJECT_TRANSACTION_NOT_OPEN = 3
REJECT_ENTITY_NOT_SELECTED = 4
REJECT_REASON_TEXT = {
    1: "SType not supported",
    2: "PType not supported",
    3: "transaction not open",
    4: "entity not selected",
}


class Frame(NamedTuple):
    """One decoded HSMS message: the header fields and the body as bytes (never parsed here)."""

    session_id: int
    byte2: int
    byte3: int
    ptype: int
    stype: int
    system: int
    body: bytes = b""

    @property
    def stream(self) -> int:
        return self.byte2 & 0x7F

    @property
    def function(self) -> int:
        return self.byte3

    @property
    def wbit(self) -> bool:
        return bool(self.byte2 & 0x80)

    def encode(self) -> bytes:
        return HEADER.pack(
            HEADER_SIZE + len(self.body),
            self.session_id,
            self.byte2,
            self.byte3,
            self.ptype,
            self.stype,
            self.system,
        ) + bytes(self.body)

    def describe(self) -> str:
        """Short human form for logs: 'S6F11 W sys=0x0000002a' or 'Linktest.req sys=...'."""
        if self.stype == DATA and self.ptype == 0:
            w = " W" if self.byte2 & 0x80 else ""
            return f"S{self.byte2 & 0x7F}F{self.byte3}{w} sys=0x{self.system:08x}"
        name = STYPE_NAMES.get(self.stype, f"SType {self.stype}")
        return f"{name} sys=0x{self.system:08x}"


@dataclass(frozen=True, slots=True)
class DecodeError:
    """The byte stream cannot be framed any more (the connection must be closed).

    kind: "too_short" (a declared length below the 10-byte header) or "too_long" (a declared
    length above the configured maximum). The decoder stops producing frames after one of these.
    """

    kind: str
    length: int
    detail: str


class FrameDecoder:
    """Incremental decoder: `feed(chunk)` returns the complete frames it now holds, in order.

    Any chunking of the same byte stream yields the same frames. A frame's body is copied once
    out of the receive buffer (it has to outlive it); nothing else is copied.
    """

    __slots__ = ("max_message_bytes", "_buf", "failed", "consumed")

    def __init__(self, max_message_bytes: int = 16 * 1024 * 1024) -> None:
        # E37 counts the message length as header + body; we bound exactly that number.
        self.max_message_bytes = max(HEADER_SIZE, max_message_bytes)
        self._buf = bytearray()
        self.failed: DecodeError | None = None
        # Bytes of the stream taken by complete frames so far: the offset at which the incomplete
        # frame held (if any) starts, so a caller can tell one incomplete frame from the next.
        self.consumed = 0

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held (non-zero means T8 applies)."""
        return len(self._buf)

    def unconsumed(self) -> bytes:
        """The bytes of the incomplete frame held (what a takeover hands on with the socket)."""
        return bytes(self._buf)

    @property
    def expected(self) -> int:
        """Wire size (length field included) of the incomplete frame held, as its length field
        declares it; FRAME_OVERHEAD while the length field itself is incomplete; 0 if none."""
        buf = self._buf
        if len(buf) >= 4:
            return 4 + _LENGTH.unpack_from(buf)[0]
        return FRAME_OVERHEAD if buf else 0

    def feed(self, data: bytes) -> list[Frame | DecodeError]:
        if self.failed is not None:
            return []
        buf = self._buf
        if not buf and len(data) >= FRAME_OVERHEAD:
            # Fast path: the chunk is exactly one message (the usual case for request/reply).
            length, sid, b2, b3, pt, st, system = HEADER.unpack_from(data)
            if len(data) == length + 4 and HEADER_SIZE <= length <= self.max_message_bytes:
                self.consumed += length + 4
                return [Frame(sid, b2, b3, pt, st, system, data[FRAME_OVERHEAD:])]
        if buf:
            buf += data
            view: bytes | bytearray = buf
        else:
            view = data  # common case: whole frames in one chunk, decode straight from it
        out: list[Frame | DecodeError] = []
        pos = 0
        n = len(view)
        unpack = HEADER.unpack_from
        limit = self.max_message_bytes
        mv = memoryview(view)  # slices of it are views; bytes() below is the single copy
        try:
            while n - pos >= 4:
                length = _LENGTH.unpack_from(mv, pos)[0]
                if length < HEADER_SIZE or length > limit:
                    out.append(self._fail(length))
                    return out
                end = pos + 4 + length
                if end > n:
                    break
                _, sid, b2, b3, pt, st, system = unpack(mv, pos)
                out.append(
                    Frame(sid, b2, b3, pt, st, system, bytes(mv[pos + FRAME_OVERHEAD : end]))
                )
                pos = end
        finally:
            mv.release()  # a live export would forbid resizing the bytearray below
        self.consumed += pos
        if view is buf:
            if pos:
                del buf[:pos]
        elif pos < n:
            buf += memoryview(data)[pos:]
        return out

    def _fail(self, length: int) -> DecodeError:
        self._buf = bytearray()
        if length < HEADER_SIZE:
            err = DecodeError(
                "too_short",
                length,
                f"message length {length} is shorter than the {HEADER_SIZE}-byte HSMS header",
            )
        else:
            err = DecodeError(
                "too_long",
                length,
                f"message length {length} exceeds the maximum of {self.max_message_bytes} bytes",
            )
        self.failed = err
        return err


# -- encoders ---------------------------------------------------------------------------------


def control(stype: int, system: int, byte2: int = 0, byte3: int = 0,
            session_id: int = CONTROL_SESSION) -> bytes:  # fmt: skip
    return HEADER.pack(HEADER_SIZE, session_id, byte2, byte3, 0, stype, system)


def select_req(system: int) -> bytes:
    return control(SELECT_REQ, system)


def select_rsp(system: int, status: int = SELECT_OK) -> bytes:
    return control(SELECT_RSP, system, 0, status)


def deselect_req(system: int) -> bytes:
    return control(DESELECT_REQ, system)


def deselect_rsp(system: int, status: int = DESELECT_OK) -> bytes:
    return control(DESELECT_RSP, system, 0, status)


def linktest_req(system: int) -> bytes:
    return control(LINKTEST_REQ, system)


def linktest_rsp(system: int) -> bytes:
    return control(LINKTEST_RSP, system)


def separate_req(system: int) -> bytes:
    return control(SEPARATE_REQ, system)


def reject_req(frame: Frame, reason: int) -> bytes:
    """Reject `frame`: same session id and system bytes; byte 2 names what is rejected (its
    PType for reason 2, otherwise its SType), byte 3 the reason code."""
    what = frame.ptype if reason == REJECT_PTYPE_NOT_SUPPORTED else frame.stype
    return control(REJECT_REQ, frame.system, what & 0xFF, reason, frame.session_id)


def data_message(session_id: int, stream: int, function: int, wbit: bool, system: int,
                 body: bytes = b"") -> bytes:  # fmt: skip
    b2 = (stream & 0x7F) | (0x80 if wbit else 0)
    return HEADER.pack(HEADER_SIZE + len(body), session_id, b2, function, 0, DATA, system) + body


def abort_reply(frame: Frame, session_id: int | None = None) -> bytes:
    """SxF0 (E5 "abort transaction") answering the primary `frame`: same stream and system
    bytes, function 0, no body. The proxy's explicit answer when a primary cannot be delivered."""
    sid = frame.session_id if session_id is None else session_id
    return HEADER.pack(HEADER_SIZE, sid, frame.byte2 & 0x7F, 0, 0, DATA, frame.system)


def rewrite(frame: Frame, session_id: int, system: int) -> bytes:
    """Re-encode `frame` with another session id and system bytes; byte 2/3 and the body are
    kept as they are (the body is not parsed)."""
    return (
        HEADER.pack(
            HEADER_SIZE + len(frame.body),
            session_id,
            frame.byte2,
            frame.byte3,
            frame.ptype,
            frame.stype,
            system,
        )
        + frame.body
    )
