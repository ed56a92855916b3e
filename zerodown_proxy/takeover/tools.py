"""HSMS tool connections across a takeover: what the old process does before it hands one over,
and how the new process continues the session on the connection it receives.

Old process, per tool (`hold`, then `release_for_handover` once `ready` says so):
1. the tool's new primaries stop being forwarded: each is kept, encoded, in `tool.holding`
   (primaries still queued for a backend session go there first, in order); replies from the
   tool still flow, control messages are still answered, so transactions the backend opened
   can finish;
2. its backend sessions drain like after a switch (handover.py): transactions open on them finish,
   a new primary from a backend gets Reject.req (reason 4); no new backend session is opened;
3. when nothing is open (bounded by T3; anything still open then is answered SxF0 both ways, as
   T3 would) and everything written to the tool has left, reading stops and the state is taken:
   SELECTED or not, the tool's session id, the control system-byte counter, and the bytes read
   but not yet acted on (held primaries, then the incomplete frame in the decoder).

New process (`AdoptedToolLink`): the received socket becomes a ToolLink whose session starts in
the state handed over, its backend session is opened and selected at once (through the normal
path), and the bytes handed over are fed in before anything newly read, so the tool sees one
continuous session: same TCP connection, no Select, every primary answered once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from ..flow import Pause
from ..hsms import codec
from ..hsms.session import T7, Selected, State
from ..hsms.tool_link import ToolLink

if TYPE_CHECKING:
    from ..hsms.proxy import HsmsProxy

log = logging.getLogger("zerodown.takeover")

DRAIN_MARGIN = 1.0  # beyond T3: the sweep answers what T3 expired, give it one tick
WRITE_FLUSH_TIMEOUT = 5.0


def hold(proxy: HsmsProxy, tool: ToolLink) -> None:
    """Stop forwarding the tool's primaries and start draining its backend sessions."""
    if tool.holding is not None:
        return
    held = [q.frame.encode() for q in tool.queue]
    tool.queue.clear()
    tool.queued_bytes = 0
    tool.resume(Pause.PIPELINE)
    tool.holding = held
    if tool.retry is not None:
        tool.retry.cancel()
        tool.retry = None
    cur, tool.current = tool.current, None
    if cur is None:
        return
    if cur.selected:
        cur.draining = True
        cur.drain_started = time.monotonic()
        tool.draining.append(cur)
        cur.maybe_finish()
    else:
        proxy.sessions.drop(cur, "proxy replaced by a new process")


def ready(tool: ToolLink) -> bool:
    """Nothing open through the tool and nothing left unsent to it."""
    tr = tool.transport
    return not tool.tx and (tr is None or not tr.get_write_buffer_size())


async def drained(proxy: HsmsProxy, tool: ToolLink) -> None:
    """Wait until `ready(tool)`, at most T3 (+ a margin); then end what is still open."""
    deadline = time.monotonic() + proxy.cfg.t3 + DRAIN_MARGIN
    while not tool.closed and tool.tx and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    for b in tool.backends():
        up, down = tool.tx.remove_link(b)
        for rec in up:  # a tool primary its backend did not answer in time
            tool.write(codec.abort_reply(rec.header()))
            proxy.m.aborted.inc(("takeover",))
        for hrec in down:  # a host primary the tool did not answer in time
            b.write(codec.abort_reply(hrec.header()))
            proxy.m.aborted.inc(("takeover",))
    tr = tool.transport
    end = time.monotonic() + WRITE_FLUSH_TIMEOUT
    while not tool.closed and tr is not None and tr.get_write_buffer_size():
        if time.monotonic() > end:
            break
        await asyncio.sleep(0.005)


def export(proxy: HsmsProxy, tool: ToolLink) -> tuple[dict[str, Any], int, bytes] | None:
    """Stop reading the tool and take its state: (state, socket fd, unprocessed bytes), or None
    when the connection cannot be handed over (closed meanwhile, or unsent bytes left)."""
    tr = tool.transport
    if tool.closed or tr is None or tr.is_closing() or tr.get_write_buffer_size():
        return None
    sock = tr.get_extra_info("socket")
    if sock is None or sock.fileno() < 0:
        return None
    tool.pause(Pause.DRAIN)
    s = tool.session
    state = {
        "peer": tool.peer,
        "selected": s.selected,
        "sid": tool.sid,
        "system": s._system,
        "connected_at": tool.connected_at,
        "selected_at": tool.selected_at,
        "generation": proxy.router.snapshot.generation,
    }
    blob = b"".join(tool.holding or ()) + s.decoder.unconsumed()
    return state, sock.fileno(), blob


def let_go(proxy: HsmsProxy, tool: ToolLink) -> None:
    """After the new process has the connection: close this process's side without a word."""
    tool.handed_over = True
    tool.holding = None
    proxy.sessions.release(tool, "tool handed over to the new proxy process")
    tool.cancel_timers()
    if tool.transport is not None:
        tool.transport.abort()  # closes our descriptor only: the connection lives on


def unhold(proxy: HsmsProxy, tool: ToolLink) -> None:
    """The takeover failed: carry on serving the tool here, its held primaries first."""
    held, tool.holding = tool.holding or [], None
    tool.resume(Pause.DRAIN)
    for raw in held:
        for f in codec.FrameDecoder(len(raw)).feed(raw):
            if type(f) is codec.Frame and not tool.closed:
                tool.on_data(f)
    proxy.sessions.open(tool)


class AdoptedToolLink(ToolLink):
    """A tool connection received from the process this one replaces."""

    def __init__(self, proxy: HsmsProxy, state: dict[str, Any], pending: bytes) -> None:
        super().__init__(proxy)
        self.state = state
        self.pending = pending

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        st = self.state
        self.peer = st.get("peer") or self.peer
        self.connected_at = st.get("connected_at") or self.connected_at
        s = self.session
        if st.get("selected"):
            self.sid = st.get("sid")
            s.state = State.SELECTED
            s._system = int(st.get("system") or 0)
            self._cancel(T7)
            self.on_event(Selected())  # opens and selects its backend session
            self.selected_at = st.get("selected_at") or self.selected_at
        pending, self.pending = self.pending, b""
        if pending:
            self.data_received(pending)
