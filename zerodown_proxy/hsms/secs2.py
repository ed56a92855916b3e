"""SECS-II (SEMI E5) item decoder, for logs and inspection only: never on the forwarding path.

The proxy forwards message bodies as opaque bytes. When it has to log a message (a Reject, an
SxF0 it answered, a reply that matched nothing), `to_sml` renders the body in SML-like text so an
operator can see which report or command it was. Decoding is bounded (depth, items, characters)
and never raises: malformed input is rendered as such.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# format code (6 bits, octal as in E5) -> (SML name, struct format of one element or None)
FORMATS: dict[int, tuple[str, str | None]] = {
    0o00: ("L", None),
    0o10: ("B", None),
    0o11: ("BOOLEAN", None),
    0o20: ("A", None),
    0o21: ("J", None),
    0o22: ("C2", None),
    0o30: ("I8", ">q"),
    0o31: ("I1", ">b"),
    0o32: ("I2", ">h"),
    0o34: ("I4", ">i"),
    0o40: ("F8", ">d"),
    0o44: ("F4", ">f"),
    0o50: ("U8", ">Q"),
    0o51: ("U1", ">B"),
    0o52: ("U2", ">H"),
    0o54: ("U4", ">I"),
}

MAX_DEPTH = 16
MAX_ITEMS = 10_000


class Malformed(ValueError):
    """The body is not a well-formed SECS-II item."""


@dataclass(frozen=True, slots=True)
class Item:
    """One SECS-II item: its SML format name and value (a tuple of Items for a list, str for
    A/J, bytes for B, tuple of numbers or booleans otherwise)."""

    format: str
    value: object


def decode(body: bytes) -> Item | None:
    """Decode a whole message body (None for an empty body). Raises Malformed."""
    if not body:
        return None
    budget = [MAX_ITEMS]
    item, end = _item(memoryview(body), 0, 0, budget)
    if end != len(body):
        raise Malformed(f"{len(body) - end} trailing bytes after the item")
    return item


def _item(mv: memoryview, pos: int, depth: int, budget: list[int]) -> tuple[Item, int]:
    if depth > MAX_DEPTH:
        raise Malformed(f"lists nested deeper than {MAX_DEPTH}")
    budget[0] -= 1
    if budget[0] < 0:
        raise Malformed(f"more than {MAX_ITEMS} items")
    if pos >= len(mv):
        raise Malformed("item header missing")
    fb = mv[pos]
    nlen = fb & 0x03
    code = fb >> 2
    if nlen == 0:
        raise Malformed(f"item at byte {pos} has zero length bytes")
    if pos + 1 + nlen > len(mv):
        raise Malformed("item length truncated")
    length = int.from_bytes(mv[pos + 1 : pos + 1 + nlen], "big")
    pos += 1 + nlen
    fmt = FORMATS.get(code)
    if fmt is None:
        raise Malformed(f"unknown item format 0o{code:02o}")
    name, elem = fmt
    if name == "L":
        items = []
        for _ in range(length):
            sub, pos = _item(mv, pos, depth + 1, budget)
            items.append(sub)
        return Item("L", tuple(items)), pos
    end = pos + length
    if end > len(mv):
        raise Malformed(f"{name} item of {length} bytes runs past the end of the body")
    raw = bytes(mv[pos:end])
    if name == "B":
        return Item(name, raw), end
    if name == "BOOLEAN":
        return Item(name, tuple(b != 0 for b in raw)), end
    if name in ("A", "J"):
        return Item(name, raw.decode("latin-1")), end
    if name == "C2":
        return Item(name, raw.decode("utf-16-be", errors="replace")), end
    assert elem is not None
    size = struct.calcsize(elem)
    if length % size:
        raise Malformed(f"{name} item of {length} bytes is not a multiple of {size}")
    return Item(name, tuple(v[0] for v in struct.iter_unpack(elem, raw))), end


def sml(item: Item | None) -> str:
    if item is None:
        return ""
    v = item.value
    if item.format == "L":
        assert isinstance(v, tuple)
        return f"<L[{len(v)}]" + "".join(" " + sml(i) for i in v) + ">"
    if item.format in ("A", "J", "C2"):
        return f'<{item.format} "{v}">'
    if item.format == "B":
        assert isinstance(v, bytes)
        return "<B" + "".join(f" 0x{b:02x}" for b in v) + ">"
    assert isinstance(v, tuple)
    if item.format == "BOOLEAN":
        return "<BOOLEAN" + "".join(" T" if b else " F" for b in v) + ">"
    return f"<{item.format}" + "".join(f" {n}" for n in v) + ">"


def to_sml(body: bytes, max_chars: int = 300) -> str:
    """Body as SML text, cut to max_chars; never raises (for log lines)."""
    try:
        text = sml(decode(body))
    except Malformed as exc:
        text = f"<malformed SECS-II: {exc}; {len(body)} bytes>"
    if len(text) > max_chars:
        text = text[: max_chars - 3] + "..."
    return text
