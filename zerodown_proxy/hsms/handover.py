"""Tools' backend sessions: opening, the session-preserving switch (handover), failover, closing.

For each selected tool the proxy keeps one *current* backend session on an Active instance
(choice.py picks it). On a snapshot swap that demotes that instance the tool is *handed over*: a
new session is opened and selected on the new Active group, every primary from the tool from
that instant on waits for it (queued, bounded by T3 and `max_queued`), transactions already open
finish on the old session (bounded by T3), a new primary from the old backend gets Reject.req
(reason 4) and is never forwarded, and the drained old session is deselected and separated. The
tool's connection and SELECTED state are never touched. A backend session that dies (closed,
or found hung by the linktest) is replaced the same way (failover); the tool primaries it had
open are answered with SxF0 so nothing times out silently, and its instance is avoided for T5.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import TYPE_CHECKING

from . import codec
from .backend_link import BackendLink
from .choice import Wait
from .placement import place
from .tool_link import ToolLink

if TYPE_CHECKING:
    from ..routing import Instance, Snapshot
    from .proxy import HsmsProxy

log = logging.getLogger("zerodown.hsms")


def _ev(event: str, **fields: object) -> dict[str, object]:
    return {"fields": {"event": event, **fields}}


class BackendSessions:
    def __init__(self, proxy: HsmsProxy) -> None:
        self.proxy = proxy

    # -- opening --------------------------------------------------------------------------------

    def open(self, tool: ToolLink) -> None:
        p = self.proxy
        if p.closing or tool.closed or not tool.session.selected or tool.current is not None:
            return
        if tool.holding is not None:
            return  # being handed to a new proxy process: it opens its own session
        if tool.retry is not None:
            tool.retry.cancel()
            tool.retry = None
        choice = p.choice.pick(
            p.router.current(), time.monotonic(), tool.app, tool.address, tool.sid
        )
        if isinstance(choice, Wait):
            if not tool.warned_no_backend:  # once per outage, not every retry
                tool.warned_no_backend = True
                log.warning(
                    "tool %s: %s; primaries wait (at most T3)", tool.peer, choice.reason,
                    extra=_ev("hsms_no_backend", tool=tool.peer, reason=choice.reason),
                )  # fmt: skip
            tool.retry = p.loop.call_later(choice.seconds, self._retry, tool)
            return
        tool.warned_no_backend = False
        tool.pilot = choice.pilot
        inst = choice.instance
        link = BackendLink(p, tool, inst, choice.device_id)
        tool.current = link
        loop = p.loop
        task = loop.create_task(loop.create_connection(lambda: link, inst.address, inst.hsms_port))
        timer = loop.call_later(p.cfg.t6, task.cancel)
        task.add_done_callback(functools.partial(self._connected, link, timer))

    def _retry(self, tool: ToolLink) -> None:
        tool.retry = None
        self.open(tool)

    def _connected(self, link: BackendLink, timer: asyncio.TimerHandle, task: asyncio.Task) -> None:
        timer.cancel()
        err = None
        if task.cancelled():
            err = f"connect timed out after {self.proxy.cfg.t6:g}s (T6)"
        elif (exc := task.exception()) is not None:
            err = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        tool = link.tool
        if err is not None:
            link.closed = True
            tool.tx.remove_link(link)  # nothing was sent on it
            self.instance_failed(link.instance, f"connect failed: {err}")
            if tool.current is link:
                tool.current = None
                self.open(tool)
            return
        transport, _ = task.result()
        if link.expected_close or tool.closed:
            link.run(link.session.separate(link.close_reason or "not needed any more"))
            transport.close()

    def instance_failed(self, inst: Instance, err: str) -> None:
        p = self.proxy
        p.choice.failed(inst, time.monotonic())
        p.m.backend_errors.inc((inst.id,))
        log.warning(
            "backend %s (%s:%s): %s; not retried for T5 (%gs)",
            inst.id, inst.address, inst.hsms_port, err, p.cfg.t5,
            extra=_ev("hsms_backend_failed", instance=inst.id, error=err),
        )  # fmt: skip

    def selected(self, link: BackendLink) -> None:
        p = self.proxy
        tool = link.tool
        if tool.current is not link or tool.closed:
            self.drop(link, "not needed any more")
            return
        inst = link.instance
        p.choice.succeeded(inst)
        kind = tool.switch_kind
        took = time.monotonic() - tool.switch_started
        p.m.handover_s.observe(took, (kind,))
        if kind == "handover":
            p.m.handovers.inc()
        elif kind == "pilot":
            p.m.pilot_moves.inc()
        elif kind == "failover":
            p.m.failovers.inc()
        log.info(
            "tool %s -> %s selected (%s, %.1f ms)", tool.peer, link.label, kind, took * 1000,
            extra=_ev("hsms_backend_selected", tool=tool.peer, instance=inst.id,
                      version=inst.version, kind=kind, ms=round(took * 1000, 3),
                      queued=len(tool.queue), draining=len(tool.draining)),
        )  # fmt: skip
        while tool.queue and link.selected and not link.closed:
            link.send_primary(tool.pop())

    # -- losing and closing ---------------------------------------------------------------------

    def lost(self, link: BackendLink, exc: Exception | None) -> None:
        p = self.proxy
        tool = link.tool
        reason = link.close_reason or (
            f"connection lost: {exc}" if exc else "backend closed the connection"
        )
        up, _ = tool.tx.remove_link(link)  # its host primaries have nobody to answer any more
        for rec in up:  # tool primaries open on it: each answered SxF0 now
            if tool.session.selected:
                tool.write(codec.abort_reply(rec.header()))
            p.m.aborted.inc(("backend_lost",))
        if link in tool.draining:
            tool.draining.remove(link)
        fields = _ev(
            "hsms_backend_closed", tool=tool.peer, instance=link.instance.id,
            version=link.instance.version, reason=reason, expected=link.expected_close,
            aborted=len(up),
        )  # fmt: skip
        if link.expected_close or p.closing:
            log.info("tool %s: session to %s closed: %s", tool.peer, link.label, reason,
                     extra=fields)  # fmt: skip
        else:
            p.m.closed.inc(("backend", "lost"))
            log.warning("tool %s: session to %s lost: %s", tool.peer, link.label, reason,
                        extra=fields)  # fmt: skip
        if tool.current is link:
            tool.current = None
            if not link.expected_close and not p.closing and not tool.closed:
                # Not back to this instance for T5 while another Active instance exists.
                self.instance_failed(link.instance, reason)
                if link.selected:
                    tool.switch_kind = "failover"
                    tool.switch_started = time.monotonic()
                self.open(tool)
        tool.backend_pressure()  # it may have been what held the tool back

    def drop(self, b: BackendLink, reason: str) -> None:
        """Close a backend session on purpose (not a failure: no failover)."""
        b.expected_close = True
        b.close_reason = b.close_reason or reason
        if b.transport is None:
            return  # still connecting: _connected closes it
        if not b.closed:
            b.run(b.session.separate(reason))

    def release(self, tool: ToolLink, reason: str) -> None:
        """The tool deselected or left: end its host transactions and close its sessions."""
        p = self.proxy
        for rec in tool.tx.drop_host_primaries():
            rec.link.write(codec.abort_reply(rec.header()))
            p.m.aborted.inc(("tool_gone",))
        links = tool.backends()
        # Forget them now: a tool that selects again gets a fresh backend session at once.
        tool.current = None
        tool.draining = []
        for b in links:
            self.drop(b, reason)

    # -- switch ---------------------------------------------------------------------------------

    def on_snapshot(self, old: Snapshot, new: Snapshot) -> None:
        for tool in list(self.proxy.tools):
            if tool.closed or not tool.session.selected:
                continue
            if tool.current is None:
                self.open(tool)
            else:
                self.place(tool, new)

    def place(self, tool: ToolLink, snap: Snapshot) -> None:
        """Hand the tool over if its current session is not where `snap` places it: its app's
        Active group, or the Standby group while it is a pilot (pilot add / remove, a switch,
        or a device id learnt from its first data message)."""
        cur = tool.current
        if cur is None:
            return
        placed = place(snap, tool.app, tool.address, tool.sid)
        was_pilot, tool.pilot = tool.pilot, placed.pilot
        if cur.instance in placed.instances:
            return
        app = placed.app
        # A pilot move: the tool goes between the two groups while neither changed role.
        pilot_move = (
            (placed.pilot or was_pilot)
            and app is not None
            and (cur.instance.group in (app.active_group, app.standby_group))
        )
        self.handover(tool, snap.generation, "pilot" if pilot_move else "handover")

    def handover(self, tool: ToolLink, generation: int = 0, kind: str = "handover") -> None:
        """Move the tool's new primaries to a session where it belongs now (placement.py)."""
        old = tool.current
        tool.current = None
        tool.switch_kind = kind
        tool.switch_started = time.monotonic()
        if old is not None:
            if old.selected:
                old.draining = True
                old.drain_started = tool.switch_started
                tool.draining.append(old)
                n = tool.tx.open_on(old)
                log.info(
                    "tool %s: draining %s (%d open)", tool.peer, old.label, n,
                    extra=_ev("hsms_handover", tool=tool.peer, instance=old.instance.id,
                              version=old.instance.version, generation=generation, open=n),
                )  # fmt: skip
                old.maybe_finish()
            else:
                self.drop(old, "superseded before it was selected")
        self.open(tool)
