"""The HSMS proxy's clock: one periodic sweep over every tool instead of a timer per message.

Each pass enforces T8 on incomplete messages, T3 on queued primaries and on open transactions
(both directions), the drain deadline of old sessions after a switch, the partial-frame budget's
loans (budget.py), and writes the per-interval summary of warnings left out of the log.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..flow import Pause

if TYPE_CHECKING:
    from .proxy import HsmsProxy
    from .tool_link import ToolLink

log = logging.getLogger("zerodown.hsms")


def interval(t3: float, t8: float) -> float:
    return max(0.01, min(0.1, t3 / 10, t8 / 5))


def sweep(p: HsmsProxy, now: float) -> None:
    cfg = p.cfg
    t3, t8 = cfg.t3, cfg.t8
    for tool in list(p.tools):
        if tool.closed:
            continue
        if tool.warnings.logged or tool.warnings.held:
            summarize(p, tool, now)
        d = tool.session.decoder
        if d.pending and not tool.flow.reasons and now - tool.last_rx > t8:
            tool.run(tool.session.separate(
                f"incomplete message for longer than T8 ({t8:g}s)", error=True, kind="t8"
            ))  # fmt: skip
            continue
        while tool.queue and now - tool.queue[0].since > t3:
            p.abort(tool, tool.pop(), "no_backend_within_t3")
        if tool.tx:
            up, down = tool.tx.expired(now, t3)
            for _link, rec in up:
                p.abort(tool, rec.header(), "no_reply_within_t3")
            for hrec in down:
                p.m.aborted.inc(("tool_no_reply_within_t3",))
                hrec.link.maybe_finish()
        for b in tool.backends():
            if b.closed:
                continue
            if b.session.decoder.pending and not b.flow.reasons and now - b.last_rx > t8:
                p.m.closed.inc(("backend", "t8"))
                b.run(b.session.separate("incomplete message for longer than T8", True, "t8"))
            elif b.draining:
                if now - b.drain_started > t3 + cfg.t6:
                    p.sessions.drop(b, "drain deadline (T3 + T6) passed")
                else:
                    b.maybe_finish()
    budget = p.budget
    if budget.waiting:
        for tool in budget.hogs(now, t8):
            if tool.closed or tool.flow.reasons & Pause.PEER:
                continue  # held back by its backend: not the tool's doing
            held = tool.session.decoder.pending
            tool.run(tool.session.separate(
                f"incomplete message ({held} of {budget.held_by(tool)} bytes) still incomplete "
                f"T8 ({t8:g}s) after other tools began waiting for the partial-frame budget "
                f"([hsms] max_partial_bytes = {budget.limit})", error=True, kind="budget",
            ))  # fmt: skip


def summarize(p: HsmsProxy, tool: ToolLink, now: float, final: bool = False) -> None:
    held = tool.warnings.roll(now, final)
    if held:
        n = sum(held.values())
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(held.items()))
        log.warning(
            "tool %s: %d more warnings in the last %gs not logged (%s); all are counted in "
            "/metrics", tool.peer, n, tool.warnings.interval, kinds,
            extra={"fields": {"event": "hsms_warnings_suppressed", "tool": tool.peer,
                              "suppressed": n, "kinds": held}},
        )  # fmt: skip
