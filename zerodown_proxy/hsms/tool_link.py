"""One tool's connection (the proxy is HSMS passive toward tools); see links.py."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING, Any, NamedTuple

from ..contract.pilots import canonical_address
from ..flow import Pause
from . import codec
from .codec import Frame, FrameDecoder
from .links import Link
from .loglimit import LogLimiter
from .msglog import ToolLog
from .session import Close, Deselected, HsmsSession, PeerRejected, Refused, Selected
from .stream9 import Recent, route
from .transactions import Transactions

if TYPE_CHECKING:
    from .backend_link import BackendLink
    from .proxy import HsmsProxy

_now = time.monotonic

QUEUE_PAUSE_BYTES = 1024 * 1024  # stop reading a tool whose queued primaries hold more


class Queued(NamedTuple):
    """A tool primary waiting for a selected backend session."""

    frame: Frame
    since: float


class ToolLink(Link):
    """One tool connection (HSMS passive side)."""

    def __init__(self, proxy: HsmsProxy, app: str | None = None) -> None:
        super().__init__()
        self.proxy = proxy
        self.app = app  # the app whose listener accepted it (None: [proxy] hsms_listen's)
        self.address = ""  # the tool's IP address, as pilots name it
        self.pilot = False  # served by the Standby group as a pilot
        cfg = proxy.cfg
        self.session = HsmsSession("passive", cfg.t6, cfg.t7, 0.0, cfg.max_message_bytes)
        self.peer = "-"
        self.current: BackendLink | None = None
        self.draining: list[BackendLink] = []
        self.queue: deque[Queued] = deque()
        self.queued_bytes = 0
        self.tx: Transactions[BackendLink] = Transactions()
        self.recent = Recent(cfg.stream9_memory)  # what was sent to it, for Stream 9 headers
        self.sid: int | None = None  # the tool's device id, as seen in its data messages
        self.addr = "-"
        self.msglog: ToolLog | None = None  # the message log (msglog.py), None when off
        self.connected_at = time.time()
        self.selected_at: float | None = None
        self.switch_kind = "startup"  # why the next backend session is being opened
        self.switch_started = 0.0
        self.retry: asyncio.TimerHandle | None = None
        self.warned_no_backend = False
        self.warnings = LogLimiter(cfg.warn_limit, cfg.warn_interval, _now())
        # Decoder offset of the incomplete message that holds a partial-budget reservation.
        self.partial_at = -1
        # A takeover is handing this connection to a new process (takeover/tools.py): the
        # tool's new primaries are kept here, encoded, for the new process; not forwarded.
        self.holding: list[bytes] | None = None
        self.handed_over = False

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.flow.attach(transport)  # type: ignore[arg-type]
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "-"
        self.address = canonical_address(peer[0]) if peer else ""
        self.addr = peer[0] if peer else "-"
        if self.proxy.msglog is not None:
            self.msglog = self.proxy.msglog.for_tool(self, self.addr)
        self.proxy.tool_connected(self)
        self.run(self.session.connection_made())

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.cancel_timers()
        if self.retry is not None:
            self.retry.cancel()
        self.proxy.tool_lost(self, exc)
        if self.msglog is not None:
            self.msglog.close()
            self.msglog = None

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        d = self.session.decoder
        if d.pending or self.partial_at >= 0:
            self._partial(d)

    def _partial(self, d: FrameDecoder) -> None:
        if not d.pending:
            self.partial_at = -1
            self.proxy.budget.release(self, _now())
        elif d.consumed != self.partial_at and not self.closed:  # a new incomplete message
            self.partial_at = d.consumed
            if not self.proxy.budget.reserve(self, d.expected, _now()):
                self.pause(Pause.LIMIT)
                self.proxy.m.budget_waits.inc()

    def pause_writing(self) -> None:
        # The tool does not read what we send: stop reading it (its replies would pile up here)
        # and every backend session that feeds it.
        self.flow.pause_writing()
        self.pause(Pause.BUFFER)
        for b in self.backends():
            b.pause(Pause.PEER)

    def resume_writing(self) -> None:
        self.flow.resume_writing()
        self.resume(Pause.BUFFER)
        for b in self.backends():
            b.resume(Pause.PEER)

    def backend_pressure(self) -> None:
        """Read the tool only while every backend session it feeds can take more."""
        if any(b.flow.write_paused and not b.closed for b in self.backends()):
            self.pause(Pause.PEER)
        else:
            self.resume(Pause.PEER)

    # -- queue of primaries waiting for a backend session ---------------------------------------

    def push(self, f: Frame) -> None:
        self.queue.append(Queued(f, _now()))
        self.queued_bytes += len(f.body)
        if self.queued_bytes > QUEUE_PAUSE_BYTES:
            self.pause(Pause.PIPELINE)

    def pop(self) -> Frame:
        f = self.queue.popleft().frame
        self.queued_bytes -= len(f.body)
        if self.queued_bytes <= QUEUE_PAUSE_BYTES:
            self.resume(Pause.PIPELINE)
        return f

    # -- session events -----------------------------------------------------------------------

    def on_event(self, ev: Any) -> None:
        t = type(ev)
        if t is Selected:
            self.selected_at = time.time()
            self.proxy.tool_selected(self)
        elif t is Deselected:
            self.proxy.tool_deselected(self)
        elif t is Refused:
            self.proxy.refused("tool", self, ev)
        elif t is PeerRejected:
            rec = self.tx.host_reply(ev.system)
            self.proxy.peer_rejected("tool", self, ev)
            if rec is not None:
                # The tool refused the host's primary: end the host's transaction explicitly.
                backend = rec.link
                backend.write(codec.abort_reply(rec.header()))
                self.proxy.m.aborted.inc(("tool_rejected",))
                backend.maybe_finish()

    def on_close(self, close: Close) -> None:
        self.proxy.tool_closing(self, close)

    # -- data path ----------------------------------------------------------------------------

    def on_data(self, f: Frame) -> None:
        if f.session_id != self.sid:
            self._session_id(f.session_id)
            self.proxy.device_learnt(self)  # a pilot by device id moves before this message
        if not f.byte3 & 1:  # even function: a reply (or SxF0) to a host primary
            rec = self.tx.host_reply(f.system)
            if rec is None:
                self.proxy.not_open("tool", self, f)
                return
            backend = rec.link
            backend.write(codec.rewrite(f, rec.session_id, rec.system))
            if self.msglog is not None:
                self.msglog.up(f, backend, rec.system)
            self.proxy.m.fwd_reply_up.inc()
            if backend.draining:
                backend.maybe_finish()
            return
        if self.holding is not None:
            self.holding.append(f.encode())
            return
        self.proxy.router.current()  # a committed switch hands this tool over first
        if f.byte2 & 0x7F == 9:
            route(self, f)
            return
        cur = self.current
        if cur is not None and cur.selected and not self.queue:
            cur.send_primary(f)
        else:
            self.proxy.enqueue(self, f)

    def _session_id(self, sid: int) -> None:
        self.sid = sid
        ml = self.proxy.msglog
        if ml is not None and self.msglog is None:  # a message_log_tools rule by device id
            self.msglog = ml.for_tool(self, self.addr)

    def backends(self) -> list[BackendLink]:
        return ([self.current] if self.current is not None else []) + self.draining

    def in_flight(self) -> int:
        return len(self.queue) + len(self.tx)
