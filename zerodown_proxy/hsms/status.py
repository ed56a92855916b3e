"""The `hsms` section of the admin API's /v1/status: every tool session and its backend."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .backend_link import BackendLink
    from .proxy import HsmsProxy


def status(p: HsmsProxy) -> dict[str, Any]:
    sessions = []
    default = p.router.snapshot.hsms_app(None)
    for t in sorted(p.tools, key=lambda t: t.connected_at):
        sessions.append(
            {
                "tool": t.peer,
                # Which app it is on: its listener's, or the app [proxy] hsms_listen serves.
                "app": t.app if t.app is not None else (default.name if default else None),
                "pilot": t.pilot,
                "state": t.session.state.value,
                "device_id": t.sid,
                "connected_at": round(t.connected_at, 6),
                "backend": link_status(t.current) if t.current is not None else None,
                "draining": [link_status(b) for b in t.draining],
                "queued": len(t.queue),
                "in_flight": t.in_flight(),
                "paused": [r.name.lower() for r in type(t.flow.reasons) if r in t.flow.reasons],
            }
        )
    return {
        "port": p.port,
        "listeners": p.listeners.status(),
        "tool_sessions": len(p.tools),
        "handovers": int(p.m.handovers.get()),
        "failovers": int(p.m.failovers.get()),
        "partial_budget": {
            "limit": p.budget.limit,
            "reserved": p.budget.used,
            "waiting": p.budget.waiting,
        },
        "sessions": sessions,
    }


def link_status(b: BackendLink) -> dict[str, Any]:
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
        "in_flight": b.tx.open_on(b),
    }
