"""One session from the proxy to a backend instance (HSMS active side); see links.py."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from ..flow import Pause
from . import codec
from .codec import Frame
from .links import Link
from .session import Close, Deselected, HsmsSession, PeerRejected, Refused, Selected
from .transactions import HostPrimary, ToolPrimary

if TYPE_CHECKING:
    from ..routing import Instance
    from .proxy import HsmsProxy
    from .tool_link import ToolLink

_now = time.monotonic


class BackendLink(Link):
    """One session from the proxy to a backend instance (HSMS active side)."""

    def __init__(
        self, proxy: HsmsProxy, tool: ToolLink, instance: Instance, device_id: int | None
    ) -> None:
        super().__init__()
        self.proxy = proxy
        self.tool = tool
        self.tx = tool.tx
        self.tx.add_link(self)
        self.instance = instance
        self.device_id = device_id  # None: forward the tool's session id unchanged
        cfg = proxy.cfg
        self.session = HsmsSession(
            "active", cfg.t6, cfg.t7, cfg.linktest_interval, cfg.max_message_bytes
        )
        self.selected = False
        self.draining = False
        self.drain_started = 0.0
        self.finishing = False
        self.expected_close = False  # we closed it on purpose: not a failover
        self.opened_at = _now()
        self.close_reason = ""
        if tool.flow.write_paused:
            self.pause(Pause.PEER)  # applied to the transport when it arrives

    @property
    def label(self) -> str:
        i = self.instance
        return f"{i.id} ({i.version}) {i.address}:{i.hsms_port}"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.flow.attach(transport)  # type: ignore[arg-type]
        self.run(self.session.connection_made())

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.cancel_timers()
        self.proxy.sessions.lost(self, exc)

    def pause_writing(self) -> None:
        # The backend does not read what we send: stop reading it, and stop reading its tool.
        self.flow.pause_writing()
        self.pause(Pause.BUFFER)
        self.tool.backend_pressure()

    def resume_writing(self) -> None:
        self.flow.resume_writing()
        self.resume(Pause.BUFFER)
        self.tool.backend_pressure()

    # -- session events -----------------------------------------------------------------------

    def on_event(self, ev: Any) -> None:
        t = type(ev)
        if t is Selected:
            self.selected = True
            self.proxy.sessions.selected(self)
        elif t is Deselected:
            self.selected = False
            if self.finishing:
                self.run(self.session.separate("session handed over"))
            else:
                # The backend ended the session; treat it like a lost backend.
                self.close_reason = "backend deselected the session"
                self.run(self.session.separate(self.close_reason))
        elif t is Refused:
            self.proxy.refused("backend", self, ev)
        elif t is PeerRejected:
            rec = self.tx.tool_reply(self, ev.system)
            self.proxy.peer_rejected("backend", self, ev)
            if rec is not None:
                self.tool.write(codec.abort_reply(rec.header()))
                self.proxy.m.aborted.inc(("backend_rejected",))
                self.maybe_finish()

    def on_close(self, close: Close) -> None:
        if not self.close_reason:
            self.close_reason = close.reason

    # -- data path ----------------------------------------------------------------------------

    def send_primary(self, f: Frame) -> None:
        sb = self.session.next_system()
        if f.byte2 & 0x80:
            rec = ToolPrimary(f.system, f.session_id, f.byte2, f.byte3, _now())
            self.tx.tool_primary(self, sb, rec)
        did = self.device_id
        self.write(codec.rewrite(f, f.session_id if did is None else did, sb))
        if self.tool.msglog is not None:
            self.tool.msglog.up(f, self, sb)
        self.proxy.m.fwd_primary_up.inc()

    def on_data(self, f: Frame) -> None:
        tool = self.tool
        if not f.byte3 & 1:  # even function: the reply to a tool primary
            rec = self.tx.tool_reply(self, f.system)
            if rec is None:
                self.proxy.not_open("backend", self, f)
                return
            tool.write(codec.rewrite(f, rec.session_id, rec.system))
            r = tool.recent
            r.replies[rec.system % r.size] = (rec.system, self, f.system, f.session_id)
            if tool.msglog is not None:
                tool.msglog.down(f, self, rec.system, rec.session_id)
            self.proxy.m.fwd_reply_down.inc()
            if self.draining:
                self.maybe_finish()
            return
        self.proxy.router.current()  # a committed switch drains this session first
        if self.draining or not tool.session.selected or tool.closed:
            # Principle: after a switch the old version opens no new transaction.
            self.reject(f, codec.REJECT_ENTITY_NOT_SELECTED)
            self.proxy.old_primary_rejected(self, f)
            return
        tsb = tool.session.next_system()
        if f.byte2 & 0x80:
            self.tx.host_primary(tsb, HostPrimary(self, f.system, f.session_id, f.byte2, _now()))
        tsid = tool.sid
        tool.write(codec.rewrite(f, f.session_id if tsid is None else tsid, tsb))
        r = tool.recent
        r.primaries[tsb % r.size] = (tsb, self, f.system, f.session_id)
        if tool.msglog is not None:
            tool.msglog.down(f, self, tsb, f.session_id if tsid is None else tsid)
        self.proxy.m.fwd_primary_down.inc()

    def maybe_finish(self) -> None:
        """A draining session with nothing open any more is deselected and separated."""
        if self.draining and not self.finishing and not self.tx.open_on(self):
            self.finish()

    def finish(self) -> None:
        self.finishing = True
        self.expected_close = True
        if self.closed:
            return
        if self.selected:
            actions = self.session.deselect()
            if actions:
                self.run(actions)
                return
        self.run(self.session.separate("session handed over"))
