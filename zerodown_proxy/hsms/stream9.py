"""Stream 9 from a tool: the header inside the body rewritten, the message sent where it belongs.

An equipment sends S9F1/F3/F5/F7/F11 (MHEAD) when it cannot handle a message it received and
S9F9 (SHEAD) when a transaction it opened timed out (E5). The body is one `<B[10]>` item: the
10-byte HSMS header of that message, system bytes included. The proxy renumbers system bytes
(links.py), so the header a tool quotes is in the numbering of the tool's connection, which no
backend knows. Here it is mapped back to the numbering of the backend session that sent (or
received) the offending message, and the S9 is sent on that session, even if it is draining
after a switch; if that session is gone, on its successor (the tool's current session, queued
while a failover opens it) with the old numbering, the best the proxy knows. The S9 message
itself has no reply.

Which message a header names, by its function:
- S9F9: a tool primary (the tool's own system bytes). Found among the open transactions (and
  closed there: the tool has given up on it), else among recent replies forwarded to the tool
  (the reply crossed the tool's timeout).
- other S9 with an odd function in the header: a host primary forwarded to the tool (system
  bytes the proxy gave it). The proxy's transaction for it is closed: the tool will not answer.
- other S9 with an even function in the header: a host reply to a tool primary.

The proxy remembers the last `[hsms] stream9_memory` host primaries and replies it sent to each
tool (two rings indexed by system bytes: a tuple store per forwarded message, no allocation
beyond it), so a header of a message already answered or expired still maps. An S9 that maps to
nothing, or whose body is not one 10-byte header, is not forwarded with a header no backend can
match: it is counted (zerodown_hsms_stream9_total) and logged with its body. The proxy itself
never sends Stream 9 to a tool.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from . import codec, secs2
from .codec import Frame

if TYPE_CHECKING:
    from .backend_link import BackendLink
    from .tool_link import ToolLink

log = logging.getLogger("zerodown.hsms")

HEADER_FUNCTIONS = frozenset({1, 3, 5, 7, 9, 11})  # the S9 functions whose body is a header
HEADER_LEN = 10


# One message the proxy sent to a tool: (its system bytes as the tool saw them, the BackendLink
# it came from, its system bytes and session id on that backend session). A plain tuple: the
# forwarding path builds one per message sent to a tool.
Sent = tuple[int, Any, int, int]


class Recent:
    """The last `size` host primaries and host replies sent to one tool (see the module doc).

    The forwarding path stores `Sent` tuples straight into `primaries` / `replies` at index
    `system % size`; a lookup checks the slot still holds the same system bytes."""

    __slots__ = ("size", "primaries", "replies")

    def __init__(self, size: int) -> None:
        self.size = max(1, size)
        self.primaries: list[Sent | None] = [None] * self.size
        self.replies: list[Sent | None] = [None] * self.size

    def primary(self, system: int) -> Sent | None:
        s = self.primaries[system % self.size]
        return s if s is not None and s[0] == system else None

    def reply(self, system: int) -> Sent | None:
        s = self.replies[system % self.size]
        return s if s is not None and s[0] == system else None


def quoted_header(body: bytes) -> Frame | None:
    """The header an S9F1..F11 body quotes (`<B[10]>`, any length-byte count), or None."""
    try:
        item = secs2.decode(body)
    except secs2.Malformed:
        return None
    if item is None or item.format != "B" or not isinstance(item.value, bytes):
        return None
    raw = item.value
    if len(raw) != HEADER_LEN:
        return None
    _, sid, b2, b3, pt, st, system = codec.HEADER.unpack(HEADER_LEN.to_bytes(4, "big") + raw)
    return Frame(sid, b2, b3, pt, st, system)


def header_body(h: Frame) -> bytes:
    """`<B[10]>` holding header `h`."""
    raw = codec.HEADER.pack(HEADER_LEN, h.session_id, h.byte2, h.byte3, h.ptype, h.stype, h.system)
    return b"\x21\x0a" + raw[4:]


def route(tool: ToolLink, f: Frame) -> None:
    """A Stream 9 message from `tool` (see the module docstring)."""
    fn = f.byte3
    if fn not in HEADER_FUNCTIONS:  # S9F13 and others: no header inside, an ordinary primary
        _forward_plain(tool, f)
        return
    h = quoted_header(f.body)
    if h is None:
        _refuse(tool, f, "malformed", "its body is not one <B[10]> header")
        return
    target = _find(tool, h, fn)
    if target is None:
        _refuse(tool, f, "unmatched", "it names no message the proxy remembers")
        return
    origin, host_system, host_session = target
    link = origin
    inner = Frame(host_session, h.byte2, h.byte3, h.ptype, h.stype, host_system)
    s9 = f._replace(body=header_body(inner))
    if not (link.closed or link.finishing or not link.selected):
        link.send_primary(s9)
        tool.proxy.m.stream9.inc((str(fn), "routed"))
        origin.maybe_finish()  # the S9 may have closed the last transaction of a draining session
        return
    # That session is gone: its successor, the tool's current one (queued like any primary
    # while it is being opened after a failover; bounded by T3 and max_queued like them).
    tool.proxy.m.stream9.inc((str(fn), "successor"))
    cur = tool.current
    log.info(
        "tool %s: %s names a message of %s, which is gone; sent to %s", tool.peer, f.describe(),
        link.label, cur.label if cur is not None else "the next session",
        extra=_ev("hsms_stream9", tool=tool.peer, message=f.describe(), outcome="successor",
                  gone=link.instance.id, version=link.instance.version),
    )  # fmt: skip
    if cur is not None and cur.selected and not cur.closed and not tool.queue:
        cur.send_primary(s9)
    else:
        tool.proxy.enqueue(tool, s9)


def _find(tool: ToolLink, h: Frame, fn: int) -> tuple[BackendLink, int, int] | None:
    tx = tool.tx
    if fn == 9:  # SHEAD: a primary the tool sent
        found = tx.find_tool_primary(h.system, h.session_id)
        if found is not None:
            link, psb, rec = found
            tx.tool_reply(link, psb)  # the tool aborted it (E5): nothing more to wait for
            return link, psb, _host_session(link, rec.session_id)
        s = tool.recent.reply(h.system)
    elif h.byte3 & 1:  # MHEAD of a host primary
        open_ = tx.host_reply(h.system)  # still open: the tool will not answer it now
        if open_ is not None:
            return open_.link, open_.system, open_.session_id
        s = tool.recent.primary(h.system)
    else:  # MHEAD of a host reply
        s = tool.recent.reply(h.system)
    return (s[1], s[2], s[3]) if s is not None else None


def _forward_plain(tool: ToolLink, f: Frame) -> None:
    tool.proxy.m.stream9.inc((str(f.byte3), "plain"))
    cur = tool.current
    if cur is not None and cur.selected and not tool.queue:
        cur.send_primary(f)
    else:
        tool.proxy.enqueue(tool, f)


def _refuse(tool: ToolLink, f: Frame, outcome: str, why: str) -> None:
    p = tool.proxy
    p.m.stream9.inc((str(f.byte3), outcome))
    if tool.warnings.allow("stream9"):
        desc = f.describe()
        log.warning(
            "tool %s: %s not forwarded: %s", tool.peer, desc, why,
            extra=_ev("hsms_stream9", tool=tool.peer, message=desc, outcome=outcome,
                      reason=why, body=secs2.to_sml(f.body)),
        )  # fmt: skip
    else:
        p.m.log_suppressed.inc()


def _host_session(link: BackendLink, tool_session: int) -> int:
    return tool_session if link.device_id is None else link.device_id


def _ev(event: str, **fields: Any) -> dict[str, Any]:
    return {"fields": {"event": event, **fields}}
