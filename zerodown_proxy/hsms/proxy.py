"""The HSMS proxy (:5000): the listener, the tools' lifecycle, and what the proxy says about them.

Tools connect and select here; for each selected tool the proxy opens one backend session to an
Active instance and forwards data messages (links.py moves the bytes and maps system bytes;
handover.py owns the backend sessions: switch, failover; choice.py picks instances; sweep.py
enforces the timers; budget.py bounds memory held in incomplete messages).

A tool primary that cannot be delivered (no backend within T3, queue full, backend lost, no reply
within T3) is answered with SxF0: E5's "abort transaction" reply, valid from a host, that the
tool sees at once instead of waiting out its own T3. Every such answer is counted; per-frame
warnings are logged within a per-tool allowance (loglimit.py).

Backend device id: secsgem ignores data messages whose session id differs from its own, so the
session id of messages sent to a backend is the app's `hsms_device_id` (registry / Consul), else
`[hsms] device_id`, else the tool's own session id unchanged. Messages sent to a tool carry the
tool's session id (from its primaries).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from ..config import HsmsSection
from ..flow import Pause
from ..metrics import Registry
from ..routing import Instance, Router
from . import codec, secs2, sweep
from .backend_link import BackendLink
from .budget import PartialBudget
from .choice import BackendChoice, never_down
from .codec import Frame
from .handover import BackendSessions
from .listeners import AppListeners
from .metrics import HsmsMetrics
from .msglog import MessageLog
from .session import Close, PeerRejected, Refused
from .status import status
from .tool_link import ToolLink

log = logging.getLogger("zerodown.hsms")


def _ev(event: str, **fields: Any) -> dict[str, Any]:
    return {"fields": {"event": event, **fields}}


class HsmsProxy:
    def __init__(
        self,
        router: Router,
        cfg: HsmsSection,
        metrics: Registry,
        instance_down: Callable[[Instance], bool] = never_down,
    ) -> None:
        """`instance_down(instance)`: True for an instance that new backend sessions must skip
        (the proxy's own health checks); consulted each time a session is opened."""
        self.router = router
        self.cfg = cfg
        self.loop = asyncio.get_event_loop()
        self.tools: set[ToolLink] = set()
        self.closing = False
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.Task[None] | None = None
        # Write batching inside one read callback (see links._Link.write).
        self.batching = False
        self.dirty: list[Any] = []
        self.choice = BackendChoice(cfg, instance_down)
        self.msglog = MessageLog.from_config(cfg)  # None: off (the default)
        self.sessions = BackendSessions(self)
        self.budget: PartialBudget[ToolLink] = PartialBudget(
            cfg.max_partial_bytes, lambda tool: tool.resume(Pause.LIMIT)
        )
        tools = self.tools
        self.m = HsmsMetrics(
            metrics,
            tools=lambda: len(tools),
            selected=lambda: sum(1 for t in tools if t.session.selected),
            backends=lambda: sum(len(t.backends()) for t in tools),
            in_flight=lambda: sum(t.in_flight() for t in tools),
            partial_bytes=lambda: self.budget.used,
            pilots=lambda: sum(1 for t in tools if t.pilot),
        )
        router.subscribe(self.sessions.on_snapshot)
        self.listeners = AppListeners(self)
        router.subscribe(self.listeners.on_snapshot)

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(
        self, host: str, port: int, reuse_port: bool = False, sock: socket.socket | None = None
    ) -> None:
        """Listen on host:port, or serve on `sock` (already listening: takeover/listeners.py)."""
        self.loop = asyncio.get_running_loop()
        if sock is not None:
            self._server = await self.loop.create_server(lambda: ToolLink(self), sock=sock)
        else:
            self._server = await self.loop.create_server(
                lambda: ToolLink(self),
                host,
                port,
                backlog=1024,
                reuse_address=True,
                reuse_port=reuse_port or None,
            )
        self.port = self._server.sockets[0].getsockname()[1]
        self._sweeper = self.loop.create_task(self._sweep_forever())
        self.listeners.reuse_port = reuse_port
        await self.listeners.reconcile(self.router.current())

    async def close(self, grace: float) -> None:
        """Stop accepting; let open transactions finish (up to `grace` s); then Separate every
        backend and tool session and close."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        self.listeners.close()
        deadline = time.monotonic() + grace
        while any(t.in_flight() for t in self.tools) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for tool in list(self.tools):
            for b in tool.backends():
                self.sessions.drop(b, "proxy shutting down")
            tool.run(tool.session.separate("proxy shutting down"))
        if self._sweeper is not None:
            self._sweeper.cancel()
        # Let the Separate.req bytes reach the sockets before the loop stops.
        end = time.monotonic() + 1.0
        while self.tools and time.monotonic() < end:
            await asyncio.sleep(0.01)
        if self.msglog is not None:
            self.msglog.close()

    def flush(self) -> None:
        self.batching = False
        dirty = self.dirty
        if dirty:
            self.dirty = []
            for link in dirty:
                link.flush()

    async def _sweep_forever(self) -> None:
        every = sweep.interval(self.cfg.t3, self.cfg.t8)
        while True:
            await asyncio.sleep(every)
            try:
                sweep.sweep(self, time.monotonic())
            except Exception:
                log.exception("HSMS timeout sweep failed")

    def status(self) -> dict[str, Any]:
        return status(self)

    # -- tool side ----------------------------------------------------------------------------

    def tool_connected(self, tool: ToolLink) -> None:
        if self.closing:
            tool.transport.abort()  # type: ignore[union-attr]
            return
        self.tools.add(tool)
        log.debug("tool connected", extra=_ev("hsms_tool_connected", tool=tool.peer))

    def tool_selected(self, tool: ToolLink) -> None:
        log.info("tool %s selected", tool.peer, extra=_ev("hsms_tool_selected", tool=tool.peer))
        tool.switch_kind = "startup"
        tool.switch_started = time.monotonic()
        self.sessions.open(tool)

    def device_learnt(self, tool: ToolLink) -> None:
        """The tool's device id is known (or changed): a pilot by device id moves now."""
        if tool.current is not None and tool.session.selected:
            self.sessions.place(tool, self.router.current())

    def tool_deselected(self, tool: ToolLink) -> None:
        log.info("tool %s deselected", tool.peer, extra=_ev("hsms_tool_deselected", tool=tool.peer))
        self.sessions.release(tool, "tool deselected")
        while tool.queue:
            tool.pop()
            self.m.aborted.inc(("tool_deselected",))

    def tool_closing(self, tool: ToolLink, close: Close) -> None:
        self.m.closed.inc(("tool", close.kind))
        fields = _ev("hsms_tool_closed", tool=tool.peer, reason=close.reason, kind=close.kind)
        if close.error:
            log.warning("tool %s: %s; closing", tool.peer, close.reason, extra=fields)
        else:
            log.info("tool %s: %s", tool.peer, close.reason, extra=fields)

    def tool_lost(self, tool: ToolLink, exc: Exception | None) -> None:
        self.tools.discard(tool)
        self.budget.release(tool, time.monotonic())
        self.sessions.release(tool, "tool disconnected")
        if tool.queue:
            self.m.aborted.inc(("tool_disconnected",), len(tool.queue))
            tool.queue.clear()
        sweep.summarize(self, tool, time.monotonic(), final=True)
        if tool.handed_over:  # its connection lives on in the new proxy process
            log.info("tool %s handed over", tool.peer, extra=_ev("hsms_tool_handed_over",
                                                                 tool=tool.peer))  # fmt: skip
            return
        log.info(
            "tool %s disconnected", tool.peer,
            extra=_ev("hsms_tool_disconnected", tool=tool.peer, error=str(exc) if exc else None),
        )  # fmt: skip

    def enqueue(self, tool: ToolLink, f: Frame) -> None:
        if len(tool.queue) >= self.cfg.max_queued:
            self.abort(tool, f, "queue_full")
            return
        tool.push(f)
        if tool.current is None and tool.retry is None and tool.session.selected:
            self.sessions.open(tool)

    def abort(self, tool: ToolLink, f: Frame, reason: str) -> None:
        """Explicit end of a tool primary the proxy could not deliver or get answered."""
        self.m.aborted.inc((reason,))
        if f.byte2 & 0x80:
            tool.write(codec.abort_reply(f))
            if tool.msglog is not None:
                tool.msglog.proxy_reply(f)
            what = f"answered S{f.byte2 & 0x7F}F0"
        else:
            what = "dropped (no W-bit: nothing to answer)"
        if self._allow(tool, "abort"):
            desc = f.describe()
            log.warning(
                "tool %s: %s %s: %s", tool.peer, desc, what, reason,
                extra=_ev("hsms_abort", tool=tool.peer, message=desc, reason=reason,
                          body=secs2.to_sml(f.body)),
            )  # fmt: skip

    # -- what the proxy says about per-frame events (counted always, logged within limits) -----

    def _allow(self, tool: ToolLink, kind: str) -> bool:
        if tool.warnings.allow(kind):
            return True
        self.m.log_suppressed.inc()
        return False

    def refused(self, side: str, link: ToolLink | BackendLink, ev: Refused) -> None:
        """The session answered a peer's message with Reject.req."""
        self.m.rejected.inc((side, str(ev.reason)))
        if self._allow(_tool_of(link), f"reject_{ev.reason}"):
            log.warning(
                "%s %s: %s", side, _who(link), ev.describe(),
                extra=_ev("hsms_reject", side=side, peer=_who(link), message=ev.frame_desc,
                          reason=ev.reason),
            )  # fmt: skip

    def not_open(self, side: str, link: ToolLink | BackendLink, f: Frame) -> None:
        """A data reply that matches no open transaction (late after T3, or never asked for):
        Reject.req reason 3, as E37 says, instead of a silent drop."""
        link.reject(f, codec.REJECT_TRANSACTION_NOT_OPEN)
        self.m.orphans.inc((side,))
        self.m.rejected.inc((side, str(codec.REJECT_TRANSACTION_NOT_OPEN)))
        if self._allow(_tool_of(link), "orphan_reply"):
            log.warning(
                "%s %s: reply %s matches no open transaction (late after T3?); answered "
                "Reject.req (transaction not open)", side, _who(link), f.describe(),
                extra=_ev("hsms_orphan_reply", side=side, peer=_who(link), message=f.describe(),
                          body=secs2.to_sml(f.body)),
            )  # fmt: skip

    def peer_rejected(self, side: str, link: ToolLink | BackendLink, ev: PeerRejected) -> None:
        self.m.peer_rejects.inc((side, str(ev.reason)))
        if self._allow(_tool_of(link), "peer_reject"):
            log.warning(
                "%s %s: %s", side, _who(link), ev.describe(),
                extra=_ev("hsms_peer_reject", side=side, peer=_who(link), reason=ev.reason),
            )  # fmt: skip

    def old_primary_rejected(self, link: BackendLink, f: Frame) -> None:
        self.m.rejected.inc(("backend", str(codec.REJECT_ENTITY_NOT_SELECTED)))
        self.m.old_primary.inc()
        if self._allow(link.tool, "old_version_primary"):
            log.warning(
                "backend %s: %s rejected (session %s)", link.label, f.describe(),
                "draining after a switch" if link.draining else "has no selected tool",
                extra=_ev("hsms_reject", side="backend", instance=link.instance.id,
                          version=link.instance.version, message=f.describe(), reason=4,
                          body=secs2.to_sml(f.body)),
            )  # fmt: skip


def _tool_of(link: ToolLink | BackendLink) -> ToolLink:
    return link if isinstance(link, ToolLink) else link.tool


def _who(link: ToolLink | BackendLink) -> str:
    return link.peer if isinstance(link, ToolLink) else link.label
