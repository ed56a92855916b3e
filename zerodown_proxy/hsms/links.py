"""The two kinds of HSMS connection the proxy holds, as thin asyncio Protocols over HsmsSession:
what they share (`Link`, here), `ToolLink` (tool_link.py) and `BackendLink` (backend_link.py).

`ToolLink` is one tool's connection (the proxy is HSMS passive). `BackendLink` is one session to
a backend instance (the proxy is HSMS active). A tool has at most one *current* backend link,
which receives its new primaries, plus *draining* links left over from a switch or still
finishing transactions they opened. Each link terminates its own control messages (the session
does that); data messages are forwarded with a new header only:

- tool primary -> current backend with proxy-allocated system bytes; the backend's reply comes
  back with those bytes and is re-headed with the tool's original session id and system bytes;
- backend primary -> tool with proxy-allocated system bytes (two backends may use the same
  numbers at a switch); the tool's reply goes back to the backend link that sent the primary.

Both directions are recorded in the tool's one transaction table (transactions.py). A reply that
matches no open transaction is answered Reject.req reason 3 (transaction not open), either side.

Back-pressure (flow.py): a link stops reading its peer when
- PEER: where its messages go cannot take more (a tool whose write buffer is full stops every
  backend session feeding it; a backend session whose write buffer is full stops its tool);
- BUFFER: its own write buffer is full, the peer does not read what the proxy answers it (a peer
  flooding Linktest.req without reading the replies is simply not read any more);
- PIPELINE: a tool's primaries queued for a backend session exceed QUEUE_PAUSE_BYTES;
- LIMIT: a tool waits for the shared partial-frame budget (budget.py).

Liveness: a backend session silent for `linktest_interval` gets a Linktest.req; no answer within
T6 separates it and the tool fails over. A session not read because of PEER is busy, not dead, so
its T6 waits; one not read because of BUFFER is not reading us: exactly what a hung peer does.
A connection ended on an error with bytes still unsent is cut (a graceful close would wait for a
peer that reads nothing, and with it the failover).

No coroutine per message: `data_received` decodes headers and writes re-headed bytes directly.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

from ..flow import FlowControl, Pause
from . import codec
from .codec import Frame
from .session import LINKTEST, T6, ArmTimer, CancelTimer, Close, HsmsSession, Send

if TYPE_CHECKING:
    from .proxy import HsmsProxy

_now = time.monotonic


class Link(asyncio.Protocol, ABC):
    """What both sides share: the session, its timers, running actions, back-pressure."""

    session: HsmsSession
    proxy: HsmsProxy

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.flow = FlowControl()
        self.timers: dict[str, asyncio.TimerHandle] = {}
        self.closed = False
        self.last_rx = _now()
        self._out: list[bytes] = []

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
                self.timers[a.name] = self.proxy.loop.call_later(a.seconds, self._fire, a.name)
            elif t is CancelTimer:
                self._cancel(a.name)
            elif t is Close:
                self.on_close(a)
                self.flush()
                self.close_transport(a.error)
            else:
                self.on_event(a)

    def close_transport(self, error: bool) -> None:
        """Close after what is buffered was sent; but a peer that does not read would hold the
        connection (and its failover) open for ever: on an error it is cut at once, otherwise
        it gets T6 to take the rest."""
        tr = self.transport
        if tr is None or tr.is_closing():
            return
        if not tr.get_write_buffer_size():
            tr.close()
        elif error:
            tr.abort()
        else:
            tr.close()
            self.proxy.loop.call_later(self.session.t6, self._abort)

    def _abort(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.abort()

    def _cancel(self, name: str) -> None:
        h = self.timers.pop(name, None)
        if h is not None:
            h.cancel()

    def _later(self, delay: float, name: str) -> None:
        self.timers[name] = self.proxy.loop.call_later(delay, self._fire, name)

    def _fire(self, name: str) -> None:
        self.timers.pop(name, None)
        if self.closed:
            return
        s = self.session
        reasons = self.flow.reasons
        if reasons and not reasons & Pause.BUFFER and name in (T6, LINKTEST):
            # Not read because of the other side: its answers cannot arrive. Busy, not dead.
            self._later(s.t6 if name == T6 else s.linktest_interval, name)
            return
        if name == LINKTEST:
            quiet = _now() - self.last_rx
            if quiet < s.linktest_interval:  # it spoke recently: proof of life enough
                self._later(s.linktest_interval - quiet, name)
                return
        self.run(s.timer_fired(name))

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

    def pause(self, reason: Pause) -> None:
        self.flow.pause_reading(reason)

    def resume(self, reason: Pause) -> None:
        flow = self.flow
        if flow.reasons & reason:
            flow.resume_reading(reason)
            if not flow.reasons:
                self.last_rx = _now()  # T8 counts from when we read again, not from our pause

    def reject(self, f: Frame, reason: int) -> None:
        self.write(codec.reject_req(f, reason))
