"""The two kinds of HSMS connection the proxy holds, as thin asyncio Protocols over HsmsSession.

`ToolLink` is one tool's connection (the proxy is HSMS passive). `BackendLink` is one session to
a backend instance (the proxy is HSMS active). A tool has at most one *current* backend link,
which receives its new primaries, plus *draining* links left over from a switch or still
finishing transactions they opened. Each link terminates its own control messages (the session
does that); data messages are forwarded with a new header only:

- tool primary -> current backend with proxy-allocated system bytes; the backend's reply comes
  back with those bytes and is re-headed with the tool's original session id and system bytes;
- backend primary -> tool with proxy-allocated system bytes (two backends may use the same
  numbers at a switch); the tool's reply goes back to the backend link that sent the primary.

No coroutine per message: `data_received` decodes headers and writes re-headed bytes directly.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections import deque
from typing import TYPE_CHECKING, Any

from . import codec
from .codec import Frame
from .session import (
    LINKTEST,
    T6,
    ArmTimer,
    CancelTimer,
    Close,
    Deselected,
    HsmsSession,
    PeerRejected,
    Refused,
    Selected,
    Send,
)

if TYPE_CHECKING:
    from ..routing import Instance
    from .proxy import HsmsProxy

log = logging.getLogger("zerodown.hsms")

_now = time.monotonic


class _Link(asyncio.Protocol, ABC):
    """What both sides share: the session, its timers, running actions, back-pressure hooks."""

    session: HsmsSession
    proxy: HsmsProxy

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.timers: dict[str, asyncio.TimerHandle] = {}
        self.closed = False
        self.last_rx = _now()
        self._out: list[bytes] = []
        self.reading_paused = False

    def data_received(self, data: bytes) -> None:
        self.last_rx = _now()
        proxy = self.proxy
        proxy.batching = True  # writes of this whole chunk go out in one flush per destination
        try:
            for ev in self.session.data_received(data):
                if type(ev) is Frame:
                    self.on_data(ev)
                else:
                    self.run([ev])
        finally:
            proxy.flush()

    @abstractmethod
    def on_data(self, f: Frame) -> None: ...

    def run(self, actions: list[Any]) -> None:
        for a in actions:
            t = type(a)
            if t is Send:
                self.write(a.data)
            elif t is ArmTimer:
                self._cancel(a.name)
                loop = self.proxy.loop
                self.timers[a.name] = loop.call_later(a.seconds, self._fire, a.name)
            elif t is CancelTimer:
                self._cancel(a.name)
            elif t is Close:
                self.on_close(a)
                self.flush()
                if self.transport is not None:
                    self.transport.close()
            else:
                self.on_event(a)

    def _cancel(self, name: str) -> None:
        h = self.timers.pop(name, None)
        if h is not None:
            h.cancel()

    def _fire(self, name: str) -> None:
        self.timers.pop(name, None)
        if self.closed:
            return
        if self.reading_paused and name in (T6, LINKTEST):
            # We are not reading the peer (back-pressure from the other side), so its answers
            # cannot arrive: the link is busy, not dead. Check again later.
            delay = self.session.t6 if name == T6 else self.session.linktest_interval
            self.timers[name] = self.proxy.loop.call_later(delay, self._fire, name)
            return
        self.run(self.session.timer_fired(name))

    def cancel_timers(self) -> None:
        for h in self.timers.values():
            h.cancel()
        self.timers.clear()

    @abstractmethod
    def on_event(self, event: Any) -> None: ...

    @abstractmethod
    def on_close(self, close: Close) -> None: ...

    def write(self, data: bytes) -> None:
        """Send bytes; inside a read callback they are collected and flushed once at its end,
        so a chunk carrying many messages costs one write per destination, not one each."""
        tr = self.transport
        if tr is None or self.closed or tr.is_closing():
            return  # its connection_lost will answer what was open on it
        if self.proxy.batching:
            out = self._out
            if not out:
                self.proxy.dirty.append(self)
            out.append(data)
        else:
            tr.write(data)

    def flush(self) -> None:
        out = self._out
        if out:
            self._out = []
            tr = self.transport
            if tr is not None and not self.closed and not tr.is_closing():
                if len(out) == 1:
                    tr.write(out[0])
                else:
                    tr.writelines(out)

    def pause_reading(self) -> None:
        self.reading_paused = True
        tr = self.transport
        if tr is not None and not self.closed and not tr.is_closing():
            tr.pause_reading()

    def resume_reading(self) -> None:
        self.reading_paused = False
        self.last_rx = _now()  # T8 counts from when we read again, not from our pause
        tr = self.transport
        if tr is not None and not self.closed and not tr.is_closing():
            tr.resume_reading()


class ToolLink(_Link):
    """One tool connection (HSMS passive side)."""

    def __init__(self, proxy: HsmsProxy) -> None:
        super().__init__()
        self.proxy = proxy
        cfg = proxy.cfg
        self.session = HsmsSession("passive", cfg.t6, cfg.t7, 0.0, cfg.max_message_bytes)
        self.peer = "-"
        self.current: BackendLink | None = None
        self.draining: list[BackendLink] = []
        # Tool primaries waiting for a selected backend session: (frame, time queued).
        self.queue: deque[tuple[Frame, float]] = deque()
        # Host (backend) primaries waiting for the tool's reply, by proxy-allocated system bytes:
        # -> (backend link, backend system bytes, backend session id, time sent, byte 2).
        self.host_open: dict[int, tuple[BackendLink, int, int, float, int]] = {}
        self.sid: int | None = None  # the tool's device id, as seen in its data messages
        self.connected_at = time.time()
        self.selected_at: float | None = None
        self.switch_kind = "startup"  # why the next backend session is being opened
        self.switch_started = 0.0
        self.retry: asyncio.TimerHandle | None = None
        self.warned_no_backend = False
        self.write_paused = False
        self._bp = 0  # backend links whose write buffer is full (we stop reading the tool)

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "-"
        self.proxy.tool_connected(self)
        self.run(self.session.connection_made())

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.cancel_timers()
        if self.retry is not None:
            self.retry.cancel()
        self.proxy.tool_lost(self, exc)

    def pause_writing(self) -> None:
        # The tool reads slowly: stop reading from every backend that feeds it.
        self.write_paused = True
        for b in self.backends():
            b.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        for b in self.backends():
            b.resume_reading()

    # -- session events -----------------------------------------------------------------------

    def on_event(self, ev: Any) -> None:
        t = type(ev)
        if t is Selected:
            self.selected_at = time.time()
            self.proxy.tool_selected(self)
        elif t is Deselected:
            self.proxy.tool_deselected(self)
        elif t is Refused:
            self.proxy.count_refused("tool", ev)
        elif t is PeerRejected:
            entry = self.host_open.pop(ev.system, None)
            log.warning(
                "tool %s: %s", self.peer, ev.describe(), extra={"fields": {"event": "hsms_peer_reject", "tool": self.peer}}
            )  # fmt: skip
            if entry is not None:
                backend, bsys, bsid, _, b2 = entry
                backend.host_open -= 1
                # The tool refused the host's primary: end the host's transaction explicitly.
                backend.write(codec.abort_reply(Frame(bsid, b2, 0, 0, 0, bsys)))
                self.proxy.m_aborted.inc(("tool_rejected",))
                backend.maybe_finish()

    def on_close(self, close: Close) -> None:
        self.proxy.tool_closing(self, close)

    # -- data path ----------------------------------------------------------------------------

    def on_data(self, f: Frame) -> None:
        self.sid = f.session_id
        if not f.byte3 & 1:  # even function: a reply (or SxF0) to a host primary
            entry = self.host_open.pop(f.system, None)
            if entry is None:
                self.proxy.orphan("tool", self, f)
                return
            backend, bsys, bsid, _, _ = entry
            backend.host_open -= 1
            if backend.closed:
                self.proxy.reply_lost(backend, f)
                return
            backend.write(codec.rewrite(f, bsid, bsys))
            self.proxy.m_fwd_reply_up.inc()
            if backend.draining:
                backend.maybe_finish()
            return
        self.proxy.router.current()  # a committed switch hands this tool over first
        cur = self.current
        if cur is not None and cur.selected and not self.queue:
            cur.send_primary(f)
        else:
            self.proxy.enqueue(self, f)

    def backends(self) -> list[BackendLink]:
        return ([self.current] if self.current is not None else []) + self.draining

    def in_flight(self) -> int:
        return len(self.queue) + len(self.host_open) + sum(len(b.pending) for b in self.backends())

    def backpressure(self, on: bool) -> None:
        if on:
            self._bp += 1
            if self._bp == 1:
                self.pause_reading()
        elif self._bp > 0:
            self._bp -= 1
            if self._bp == 0:
                self.resume_reading()


class BackendLink(_Link):
    """One session from the proxy to a backend instance (HSMS active side)."""

    def __init__(
        self, proxy: HsmsProxy, tool: ToolLink, instance: Instance, device_id: int | None
    ) -> None:
        super().__init__()
        self.proxy = proxy
        self.tool = tool
        self.instance = instance
        self.device_id = device_id  # None: forward the tool's session id unchanged
        cfg = proxy.cfg
        self.session = HsmsSession(
            "active", cfg.t6, cfg.t7, cfg.linktest_interval, cfg.max_message_bytes
        )
        # Tool primaries forwarded here and waiting for the backend's reply, by the system
        # bytes we allocated: -> (tool system bytes, tool session id, time sent, byte 2, byte 3).
        self.pending: dict[int, tuple[int, int, float, int, int]] = {}
        self.host_open = 0  # this backend's primaries waiting for the tool's reply
        self.selected = False
        self.draining = False
        self.drain_started = 0.0
        self.finishing = False
        self.expected_close = False  # we closed it on purpose: not a failover
        self.opened_at = _now()
        self.close_reason = ""
        self._paused = False

    @property
    def label(self) -> str:
        i = self.instance
        return f"{i.id} ({i.version}) {i.address}:{i.hsms_port}"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.tool.write_paused:
            self.pause_reading()
        self.run(self.session.connection_made())

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.cancel_timers()
        if self._paused:  # it can no longer resume the tool it paused
            self._paused = False
            self.tool.backpressure(False)
        self.proxy.backend_lost(self, exc)

    def pause_writing(self) -> None:
        self._paused = True
        self.tool.backpressure(True)

    def resume_writing(self) -> None:
        if self._paused:
            self._paused = False
            self.tool.backpressure(False)

    # -- session events -----------------------------------------------------------------------

    def on_event(self, ev: Any) -> None:
        t = type(ev)
        if t is Selected:
            self.selected = True
            self.proxy.backend_selected(self)
        elif t is Deselected:
            self.selected = False
            if self.finishing:
                self.run(self.session.separate("session handed over"))
            else:
                # The backend ended the session; treat it like a lost backend.
                self.close_reason = "backend deselected the session"
                self.run(self.session.separate(self.close_reason))
        elif t is Refused:
            self.proxy.count_refused("backend", ev)
        elif t is PeerRejected:
            entry = self.pending.pop(ev.system, None)
            log.warning(
                "backend %s: %s", self.label, ev.describe(), extra={"fields": {"event": "hsms_peer_reject", "instance": self.instance.id}}
            )  # fmt: skip
            if entry is not None:
                tsys, tsid, _, b2, _ = entry
                self.tool.write(codec.abort_reply(Frame(tsid, b2, 0, 0, 0, tsys)))
                self.proxy.m_aborted.inc(("backend_rejected",))
                self.maybe_finish()

    def on_close(self, close: Close) -> None:
        if not self.close_reason:
            self.close_reason = close.reason

    # -- data path ----------------------------------------------------------------------------

    def send_primary(self, f: Frame) -> None:
        sb = self.session.next_system()
        if f.byte2 & 0x80:
            self.pending[sb] = (f.system, f.session_id, _now(), f.byte2, f.byte3)
        did = self.device_id
        self.write(codec.rewrite(f, f.session_id if did is None else did, sb))
        self.proxy.m_fwd_primary_up.inc()

    def on_data(self, f: Frame) -> None:
        tool = self.tool
        if not f.byte3 & 1:  # even function: the reply to a tool primary
            entry = self.pending.pop(f.system, None)
            if entry is None:
                self.proxy.orphan("backend", self, f)
                return
            tsys, tsid = entry[0], entry[1]
            tool.write(codec.rewrite(f, tsid, tsys))
            self.proxy.m_fwd_reply_down.inc()
            if self.draining and not self.pending:
                self.maybe_finish()
            return
        self.proxy.router.current()  # a committed switch drains this session first
        if self.draining or not tool.session.selected or tool.closed:
            # Principle: after a switch the old version opens no new transaction.
            self.write(codec.reject_req(f, codec.REJECT_ENTITY_NOT_SELECTED))
            self.proxy.old_primary_rejected(self, f)
            return
        tsb = tool.session.next_system()
        if f.byte2 & 0x80:
            tool.host_open[tsb] = (self, f.system, f.session_id, _now(), f.byte2)
            self.host_open += 1
        tsid = tool.sid
        tool.write(codec.rewrite(f, f.session_id if tsid is None else tsid, tsb))
        self.proxy.m_fwd_primary_down.inc()

    def maybe_finish(self) -> None:
        """A draining session with nothing open any more is deselected and separated."""
        if self.draining and not self.pending and self.host_open <= 0 and not self.finishing:
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
        if self.transport is not None and not self.closed:
            self.transport.close()
