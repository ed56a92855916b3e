"""The HSMS proxy (:5000): listener, backend choice, session-preserving switch, failover, T3/T8.

Tools connect and select here; for each selected tool the proxy opens one backend session to an
Active instance (round robin over the routing snapshot's HSMS app) and forwards data messages
(see links.py for the system-bytes mapping). On a snapshot swap that demotes a tool's backend
instance the proxy *hands the tool over*: a new session is opened and selected on the new Active
group, every primary from the tool from that instant on waits for it (queued, bounded by T3 and
`max_queued`), transactions already open finish on the old session (bounded by T3), a new primary
from the old backend gets Reject.req (reason 4, entity not selected) and is never forwarded, and
the drained old session is deselected and separated. The tool's connection and SELECTED state are
never touched. A backend session that dies is replaced the same way (failover); the tool
primaries it had open are answered with SxF0 (abort transaction) so nothing times out silently.

A tool primary that cannot be delivered (no backend within T3, queue full, backend lost, no reply
within T3) is answered with SxF0: E5's "abort transaction" reply, valid from a host, that the
tool sees at once instead of waiting out its own T3. Every such answer is logged and counted.

Backend device id: secsgem ignores data messages whose session id differs from its own, so the
session id of messages sent to a backend is the app's `hsms_device_id` (registry / Consul), else
`[hsms] device_id`, else the tool's own session id unchanged. Messages sent to a tool carry the
tool's session id (from its primaries).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any

from ..config import HsmsSection
from ..metrics import Registry
from ..routing import Instance, Router, Snapshot
from . import codec, secs2
from .codec import Frame
from .links import BackendLink, ToolLink
from .session import Close, Refused

log = logging.getLogger("zerodown.hsms")

NO_BACKEND_RETRY = 0.5  # re-check for a routable HSMS instance (a snapshot swap also triggers it)


def _ev(event: str, **fields: Any) -> dict[str, Any]:
    return {"fields": {"event": event, **fields}}


class HsmsProxy:
    def __init__(self, router: Router, cfg: HsmsSection, metrics: Registry) -> None:
        self.router = router
        self.cfg = cfg
        self.loop = asyncio.get_event_loop()
        self.tools: set[ToolLink] = set()
        self.failed_until: dict[tuple[str, int], float] = {}
        self.closing = False
        self.port = 0
        self._rr = 0
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.Task[None] | None = None
        # Write batching inside one read callback (see _Link.write).
        self.batching = False
        self.dirty: list[Any] = []

        m = metrics
        fwd = m.counter(
            "zerodown_hsms_forwarded_total",
            "Data messages forwarded, by direction (up: tool to backend) and kind",
            ("direction", "kind"),
        )
        # Bound label sets: the hot path pays one dict update, no tuple building.
        self.m_fwd_primary_up = fwd.bind(("up", "primary"))
        self.m_fwd_reply_up = fwd.bind(("up", "reply"))
        self.m_fwd_primary_down = fwd.bind(("down", "primary"))
        self.m_fwd_reply_down = fwd.bind(("down", "reply"))
        self.m_rejected = m.counter(
            "zerodown_hsms_rejected_total",
            "Reject.req sent by the proxy, by side and E37 reason code",
            ("side", "reason"),
        )
        self.m_old_primary = m.counter(
            "zerodown_hsms_old_version_primaries_rejected_total",
            "Primaries from a backend session being drained after a switch (answered Reject.req)",
        )
        self.m_aborted = m.counter(
            "zerodown_hsms_aborted_total",
            "Transactions ended by the proxy with SxF0 (or dropped, for primaries without W-bit)",
            ("reason",),
        )
        self.m_orphans = m.counter(
            "zerodown_hsms_orphan_replies_total",
            "Replies that matched no open transaction (late after T3, or their session is gone)",
            ("side",),
        )
        self.m_handovers = m.counter(
            "zerodown_hsms_handovers_total", "Tool sessions moved to a new backend on a switch"
        )
        self.m_failovers = m.counter(
            "zerodown_hsms_failovers_total", "Tool sessions moved after their backend session died"
        )
        self.m_handover_s = m.histogram(
            "zerodown_hsms_handover_seconds",
            "From the switch (or failure) to the new backend session being selected",
            ("kind",),
        )
        self.m_closed = m.counter(
            "zerodown_hsms_sessions_closed_total",
            "Sessions closed, by side and cause (peer_separate, t6, t7, t8, framing, ...)",
            ("side", "kind"),
        )
        self.m_backend_errors = m.counter(
            "zerodown_hsms_backend_connect_errors_total",
            "Backend sessions that could not be opened or selected",
            ("instance",),
        )
        m.gauge("zerodown_hsms_tool_sessions", "Tool connections", fn=lambda: len(self.tools))
        m.gauge(
            "zerodown_hsms_tool_sessions_selected",
            "Tool connections in SELECTED",
            fn=lambda: sum(1 for t in self.tools if t.session.selected),
        )
        m.gauge(
            "zerodown_hsms_backend_sessions",
            "Backend sessions (current and draining)",
            fn=lambda: sum(len(t.backends()) for t in self.tools),
        )
        m.gauge(
            "zerodown_hsms_transactions_in_flight",
            "Open transactions plus queued tool primaries",
            fn=lambda: sum(t.in_flight() for t in self.tools),
        )
        router.subscribe(self._on_snapshot)

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self, host: str, port: int, reuse_port: bool = False) -> None:
        self.loop = asyncio.get_running_loop()
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

    async def close(self, grace: float) -> None:
        """Stop accepting; let open transactions finish (up to `grace` s); then Separate every
        backend and tool session and close."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        deadline = time.monotonic() + grace
        while any(t.in_flight() for t in self.tools) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for tool in list(self.tools):
            for b in tool.backends():
                self._drop(b, "proxy shutting down")
            tool.run(tool.session.separate("proxy shutting down"))
        if self._sweeper is not None:
            self._sweeper.cancel()
        # Let the Separate.req bytes reach the sockets before the loop stops.
        end = time.monotonic() + 1.0
        while self.tools and time.monotonic() < end:
            await asyncio.sleep(0.01)

    def flush(self) -> None:
        self.batching = False
        dirty = self.dirty
        if dirty:
            self.dirty = []
            for link in dirty:
                link.flush()

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
        self.open_backend(tool)

    def tool_deselected(self, tool: ToolLink) -> None:
        log.info("tool %s deselected", tool.peer, extra=_ev("hsms_tool_deselected", tool=tool.peer))
        self._release_backends(tool, "tool deselected")
        while tool.queue:
            f, _ = tool.queue.popleft()
            self.m_aborted.inc(("tool_deselected",))

    def tool_closing(self, tool: ToolLink, close: Close) -> None:
        self.m_closed.inc(("tool", close.kind))
        fields = _ev("hsms_tool_closed", tool=tool.peer, reason=close.reason, kind=close.kind)
        if close.error:
            log.warning("tool %s: %s; closing", tool.peer, close.reason, extra=fields)
        else:
            log.info("tool %s: %s", tool.peer, close.reason, extra=fields)

    def tool_lost(self, tool: ToolLink, exc: Exception | None) -> None:
        self.tools.discard(tool)
        self._release_backends(tool, "tool disconnected")
        if tool.queue:
            self.m_aborted.inc(("tool_disconnected",), len(tool.queue))
            tool.queue.clear()
        log.info(
            "tool %s disconnected", tool.peer,
            extra=_ev("hsms_tool_disconnected", tool=tool.peer, error=str(exc) if exc else None),
        )  # fmt: skip

    def _release_backends(self, tool: ToolLink, reason: str) -> None:
        # The backend's primaries still waiting for this tool get an explicit abort.
        for backend, bsys, bsid, _, b2 in tool.host_open.values():
            backend.write(codec.abort_reply(Frame(bsid, b2, 0, 0, 0, bsys)))
            backend.host_open -= 1
            self.m_aborted.inc(("tool_gone",))
        tool.host_open.clear()
        links = tool.backends()
        # Forget them now: a tool that selects again gets a fresh backend session at once.
        tool.current = None
        tool.draining = []
        for b in links:
            self._drop(b, reason)

    def _drop(self, b: BackendLink, reason: str) -> None:
        """Close a backend session on purpose (not a failure: no failover)."""
        b.expected_close = True
        b.close_reason = b.close_reason or reason
        if b.transport is None:
            return  # still connecting: _connected closes it
        if not b.closed:
            b.run(b.session.separate(reason))
            b.transport.close()

    def enqueue(self, tool: ToolLink, f: Frame) -> None:
        if len(tool.queue) >= self.cfg.max_queued:
            self.abort(tool, f, "queue_full")
            return
        tool.queue.append((f, time.monotonic()))
        if tool.current is None and tool.retry is None and tool.session.selected:
            self.open_backend(tool)

    def abort(self, tool: ToolLink, f: Frame, reason: str) -> None:
        """Explicit end of a tool primary the proxy could not deliver or get answered."""
        self.m_aborted.inc((reason,))
        desc = f.describe()
        if f.byte2 & 0x80:
            tool.write(codec.abort_reply(f))
            what = f"answered S{f.byte2 & 0x7F}F0"
        else:
            what = "dropped (no W-bit: nothing to answer)"
        log.warning(
            "tool %s: %s %s: %s", tool.peer, desc, what, reason,
            extra=_ev("hsms_abort", tool=tool.peer, message=desc, reason=reason,
                      body=secs2.to_sml(f.body)),
        )  # fmt: skip

    # -- backend side -------------------------------------------------------------------------

    def open_backend(self, tool: ToolLink) -> None:
        if self.closing or tool.closed or not tool.session.selected or tool.current is not None:
            return
        if tool.retry is not None:
            tool.retry.cancel()
            tool.retry = None
        snap = self.router.current()
        app = snap.hsms_app()
        insts = [i for i in app.active if i.hsms_port] if app is not None else []
        now = time.monotonic()
        if not insts:
            if not tool.warned_no_backend:  # once per outage, not every retry
                tool.warned_no_backend = True
                log.warning(
                    "tool %s: no Active instance with an HSMS port; primaries wait (at most T3)",
                    tool.peer, extra=_ev("hsms_no_backend", tool=tool.peer),
                )  # fmt: skip
            tool.retry = self.loop.call_later(NO_BACKEND_RETRY, self._retry, tool)
            return
        failed = self.failed_until
        ok = [i for i in insts if failed.get((i.address, i.hsms_port), 0) <= now]  # type: ignore[arg-type]
        if not ok:
            # Every Active instance failed within T5: E37's minimum between connect attempts.
            wait = min(failed[(i.address, i.hsms_port)] for i in insts) - now  # type: ignore[index]
            tool.retry = self.loop.call_later(max(wait, 0.01), self._retry, tool)
            return
        tool.warned_no_backend = False
        self._rr += 1
        inst = ok[self._rr % len(ok)]
        device = app.hsms_device_id if app.hsms_device_id is not None else self.cfg.device_id  # type: ignore[union-attr]
        link = BackendLink(self, tool, inst, device)
        tool.current = link
        loop = self.loop
        task = loop.create_task(loop.create_connection(lambda: link, inst.address, inst.hsms_port))
        timer = loop.call_later(self.cfg.t6, task.cancel)
        task.add_done_callback(functools.partial(self._connected, link, timer))

    def _retry(self, tool: ToolLink) -> None:
        tool.retry = None
        self.open_backend(tool)

    def _connected(self, link: BackendLink, timer: asyncio.TimerHandle, task: asyncio.Task) -> None:
        timer.cancel()
        err = None
        if task.cancelled():
            err = f"connect timed out after {self.cfg.t6:g}s (T6)"
        elif (exc := task.exception()) is not None:
            err = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        tool = link.tool
        if err is not None:
            link.closed = True
            self.instance_failed(link.instance, f"connect failed: {err}")
            if tool.current is link:
                tool.current = None
                self.open_backend(tool)
            return
        transport, _ = task.result()
        if link.expected_close or tool.closed:
            link.run(link.session.separate(link.close_reason or "not needed any more"))
            transport.close()

    def instance_failed(self, inst: Instance, err: str) -> None:
        self.failed_until[(inst.address, inst.hsms_port)] = time.monotonic() + self.cfg.t5  # type: ignore[index]
        self.m_backend_errors.inc((inst.id,))
        log.warning(
            "backend %s (%s:%s): %s; not retried for T5 (%gs)",
            inst.id, inst.address, inst.hsms_port, err, self.cfg.t5,
            extra=_ev("hsms_backend_failed", instance=inst.id, error=err),
        )  # fmt: skip

    def backend_selected(self, link: BackendLink) -> None:
        tool = link.tool
        if tool.current is not link or tool.closed:
            self._drop(link, "not needed any more")
            return
        inst = link.instance
        self.failed_until.pop((inst.address, inst.hsms_port), None)  # type: ignore[arg-type]
        kind = tool.switch_kind
        took = time.monotonic() - tool.switch_started
        self.m_handover_s.observe(took, (kind,))
        if kind == "handover":
            self.m_handovers.inc()
        elif kind == "failover":
            self.m_failovers.inc()
        log.info(
            "tool %s -> %s selected (%s, %.1f ms)", tool.peer, link.label, kind, took * 1000,
            extra=_ev("hsms_backend_selected", tool=tool.peer, instance=inst.id,
                      version=inst.version, kind=kind, ms=round(took * 1000, 3),
                      queued=len(tool.queue), draining=len(tool.draining)),
        )  # fmt: skip
        q = tool.queue
        while q and link.selected and not link.closed:
            f, _ = q.popleft()
            link.send_primary(f)

    def backend_lost(self, link: BackendLink, exc: Exception | None) -> None:
        tool = link.tool
        reason = link.close_reason or (
            f"connection lost: {exc}" if exc else "backend closed the connection"
        )
        aborted = len(link.pending)  # tool primaries open on it: each answered SxF0 now
        for tsys, tsid, _, b2, _ in link.pending.values():
            if tool.session.selected:
                tool.write(codec.abort_reply(Frame(tsid, b2, 0, 0, 0, tsys)))
            self.m_aborted.inc(("backend_lost",))
        link.pending.clear()
        if link.host_open > 0:
            for k in [k for k, v in tool.host_open.items() if v[0] is link]:
                del tool.host_open[k]
            link.host_open = 0
        if link in tool.draining:
            tool.draining.remove(link)
        fields = _ev(
            "hsms_backend_closed", tool=tool.peer, instance=link.instance.id,
            version=link.instance.version, reason=reason, expected=link.expected_close,
            aborted=aborted,
        )  # fmt: skip
        if link.expected_close or self.closing:
            log.info(
                "tool %s: session to %s closed: %s", tool.peer, link.label, reason, extra=fields
            )
        else:
            self.m_closed.inc(("backend", "lost"))
            log.warning(
                "tool %s: session to %s lost: %s", tool.peer, link.label, reason, extra=fields
            )
        if tool.current is link:
            tool.current = None
            if not link.expected_close and not self.closing and not tool.closed:
                # Not back to this instance for T5 while another Active instance exists.
                self.instance_failed(link.instance, reason)
                if link.selected:
                    tool.switch_kind = "failover"
                    tool.switch_started = time.monotonic()
                self.open_backend(tool)

    # -- switch -------------------------------------------------------------------------------

    def _on_snapshot(self, old: Snapshot, new: Snapshot) -> None:
        app = new.hsms_app()
        active = frozenset(app.active) if app is not None else frozenset()
        for tool in list(self.tools):
            if tool.closed or not tool.session.selected:
                continue
            cur = tool.current
            if cur is None:
                self.open_backend(tool)
            elif cur.instance not in active:
                self.handover(tool, new.generation)

    def handover(self, tool: ToolLink, generation: int = 0) -> None:
        """Move the tool's new primaries to a session on the current Active group."""
        old = tool.current
        tool.current = None
        tool.switch_kind = "handover"
        tool.switch_started = time.monotonic()
        if old is not None:
            if old.selected:
                old.draining = True
                old.drain_started = tool.switch_started
                tool.draining.append(old)
                log.info(
                    "tool %s: draining %s (%d open)", tool.peer, old.label,
                    len(old.pending) + old.host_open,
                    extra=_ev("hsms_handover", tool=tool.peer, instance=old.instance.id,
                              version=old.instance.version, generation=generation,
                              open=len(old.pending) + old.host_open),
                )  # fmt: skip
                old.maybe_finish()
            else:
                self._drop(old, "superseded before it was selected")
        self.open_backend(tool)

    def old_primary_rejected(self, link: BackendLink, f: Frame) -> None:
        self.m_rejected.inc(("backend", str(codec.REJECT_ENTITY_NOT_SELECTED)))
        self.m_old_primary.inc()
        log.warning(
            "backend %s: %s rejected (session %s)", link.label, f.describe(),
            "draining after a switch" if link.draining else "has no selected tool",
            extra=_ev("hsms_reject", side="backend", instance=link.instance.id,
                      version=link.instance.version, message=f.describe(), reason=4,
                      body=secs2.to_sml(f.body)),
        )  # fmt: skip

    # -- accounting ---------------------------------------------------------------------------

    def count_refused(self, side: str, ev: Refused) -> None:
        self.m_rejected.inc((side, str(ev.reason)))
        log.warning(
            "%s: %s", side, ev.describe(),
            extra=_ev("hsms_reject", side=side, message=ev.frame_desc, reason=ev.reason),
        )  # fmt: skip

    def orphan(self, side: str, link: ToolLink | BackendLink, f: Frame) -> None:
        self.m_orphans.inc((side,))
        who = link.peer if isinstance(link, ToolLink) else link.label
        log.warning(
            "%s %s: reply %s matches no open transaction (late after T3?); dropped", side, who,
            f.describe(), extra=_ev("hsms_orphan_reply", side=side, message=f.describe(),
                                    body=secs2.to_sml(f.body)),
        )  # fmt: skip

    def reply_lost(self, backend: BackendLink, f: Frame) -> None:
        self.m_orphans.inc(("tool",))
        log.warning(
            "tool reply %s: session to %s is gone; dropped", f.describe(), backend.label,
            extra=_ev("hsms_orphan_reply", side="tool", message=f.describe()),
        )  # fmt: skip

    # -- timers (one sweep for every transaction, instead of a timer per message) --------------

    async def _sweep_forever(self) -> None:
        interval = max(0.01, min(0.1, self.cfg.t3 / 10, self.cfg.t8 / 5))
        while True:
            await asyncio.sleep(interval)
            try:
                self.sweep(time.monotonic())
            except Exception:
                log.exception("HSMS timeout sweep failed")

    def sweep(self, now: float) -> None:
        cfg = self.cfg
        t3 = cfg.t3
        for tool in list(self.tools):
            if tool.closed:
                continue
            if (
                tool.session.decoder.pending
                and not tool.reading_paused
                and now - tool.last_rx > cfg.t8
            ):
                tool.run(tool.session.separate(
                    f"incomplete message for longer than T8 ({cfg.t8:g}s)", error=True, kind="t8"
                ))  # fmt: skip
                continue
            q = tool.queue
            while q and now - q[0][1] > t3:
                f, _ = q.popleft()
                self.abort(tool, f, "no_backend_within_t3")
            for b in tool.backends():
                p = b.pending
                if p:
                    expired = []
                    for k, entry in p.items():  # insertion order is time order
                        if now - entry[2] <= t3:
                            break
                        expired.append(k)
                    for k in expired:
                        tsys, tsid, _, b2, b3 = p.pop(k)
                        self.abort(tool, Frame(tsid, b2, b3, 0, 0, tsys), "no_reply_within_t3")
                if (
                    not b.closed
                    and b.session.decoder.pending
                    and not b.reading_paused
                    and now - b.last_rx > cfg.t8
                ):
                    self.m_closed.inc(("backend", "t8"))
                    b.run(b.session.separate("incomplete message for longer than T8", True, "t8"))
                elif b.draining:
                    if now - b.drain_started > t3 + cfg.t6 and not b.closed:
                        self._drop(b, "drain deadline (T3 + T6) passed")
                    else:
                        b.maybe_finish()
            if tool.host_open:
                expired = []
                for k, entry in tool.host_open.items():
                    if now - entry[3] <= t3:
                        break
                    expired.append(k)
                for k in expired:
                    backend = tool.host_open.pop(k)[0]
                    backend.host_open -= 1
                    self.m_aborted.inc(("tool_no_reply_within_t3",))
                    backend.maybe_finish()

    def status(self) -> dict[str, Any]:
        sessions = []
        for t in sorted(self.tools, key=lambda t: t.connected_at):
            sessions.append(
                {
                    "tool": t.peer,
                    "state": t.session.state.value,
                    "device_id": t.sid,
                    "connected_at": round(t.connected_at, 6),
                    "backend": _link_status(t.current) if t.current is not None else None,
                    "draining": [_link_status(b) for b in t.draining],
                    "queued": len(t.queue),
                    "in_flight": t.in_flight(),
                }
            )
        return {
            "port": self.port,
            "tool_sessions": len(self.tools),
            "handovers": int(self.m_handovers.get()),
            "failovers": int(self.m_failovers.get()),
            "sessions": sessions,
        }


def _link_status(b: BackendLink) -> dict[str, Any]:
    i = b.instance
    state = (
        "draining" if b.draining
        else "selected" if b.selected
        else "connecting" if b.transport is None
        else "selecting"
    )  # fmt: skip
    return {
        "instance": i.id,
        "version": i.version,
        "group": i.group,
        "address": f"{i.address}:{i.hsms_port}",
        "state": state,
        "device_id": b.device_id,
        "in_flight": len(b.pending) + max(b.host_open, 0),
    }
