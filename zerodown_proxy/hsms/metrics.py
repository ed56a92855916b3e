"""The HSMS proxy's Prometheus series (`zerodown_hsms_*`), defined once, in one place."""

from __future__ import annotations

from collections.abc import Callable

from ..metrics import Registry


class HsmsMetrics:
    def __init__(
        self,
        m: Registry,
        tools: Callable[[], int],
        selected: Callable[[], int],
        backends: Callable[[], int],
        in_flight: Callable[[], int],
        partial_bytes: Callable[[], int],
        pilots: Callable[[], int] = lambda: 0,
    ) -> None:
        fwd = m.counter(
            "zerodown_hsms_forwarded_total",
            "Data messages forwarded, by direction (up: tool to backend) and kind",
            ("direction", "kind"),
        )
        # Bound label sets: the hot path pays one dict update, no tuple building.
        self.fwd_primary_up = fwd.bind(("up", "primary"))
        self.fwd_reply_up = fwd.bind(("up", "reply"))
        self.fwd_primary_down = fwd.bind(("down", "primary"))
        self.fwd_reply_down = fwd.bind(("down", "reply"))
        self.rejected = m.counter(
            "zerodown_hsms_rejected_total",
            "Reject.req sent by the proxy, by side and E37 reason code",
            ("side", "reason"),
        )
        self.peer_rejects = m.counter(
            "zerodown_hsms_peer_rejects_total",
            "Reject.req received from a peer, by side and E37 reason code",
            ("side", "reason"),
        )
        self.old_primary = m.counter(
            "zerodown_hsms_old_version_primaries_rejected_total",
            "Primaries from a backend session being drained after a switch (answered Reject.req)",
        )
        self.aborted = m.counter(
            "zerodown_hsms_aborted_total",
            "Transactions ended by the proxy with SxF0 (or dropped, for primaries without W-bit)",
            ("reason",),
        )
        self.orphans = m.counter(
            "zerodown_hsms_orphan_replies_total",
            "Replies that matched no open transaction (answered Reject.req reason 3)",
            ("side",),
        )
        self.stream9 = m.counter(
            "zerodown_hsms_stream9_total",
            "Stream 9 from tools, by function and outcome (routed: to the backend session the "
            "quoted header names; successor: that session was gone, sent to the tool's current "
            "one; plain: no header inside; unmatched, malformed: not forwarded, logged)",
            ("function", "outcome"),
        )
        self.handovers = m.counter(
            "zerodown_hsms_handovers_total", "Tool sessions moved to a new backend on a switch"
        )
        self.failovers = m.counter(
            "zerodown_hsms_failovers_total", "Tool sessions moved after their backend session died"
        )
        self.pilot_moves = m.counter(
            "zerodown_hsms_pilot_moves_total",
            "Tool sessions moved between Active and Standby by a pilot add or remove",
        )
        m.gauge("zerodown_hsms_pilot_sessions", "Tool sessions served by Standby as pilots",
                fn=pilots)  # fmt: skip
        self.handover_s = m.histogram(
            "zerodown_hsms_handover_seconds",
            "From the switch, pilot change (kind=pilot) or failure to the new backend session "
            "being selected",
            ("kind",),
        )
        self.closed = m.counter(
            "zerodown_hsms_sessions_closed_total",
            "Sessions closed, by side and cause (peer_separate, t6, t7, t8, framing, budget, ...)",
            ("side", "kind"),
        )
        self.backend_errors = m.counter(
            "zerodown_hsms_backend_connect_errors_total",
            "Backend sessions that could not be opened or selected",
            ("instance",),
        )
        self.log_suppressed = m.counter(
            "zerodown_hsms_log_lines_suppressed_total",
            "Per-frame warning lines not written (over [hsms] warn_limit per tool and interval)",
        )
        self.budget_waits = m.counter(
            "zerodown_hsms_partial_budget_waits_total",
            "Tools paused because the partial-frame budget ([hsms] max_partial_bytes) was full",
        )
        m.gauge("zerodown_hsms_tool_sessions", "Tool connections", fn=tools)
        m.gauge("zerodown_hsms_tool_sessions_selected", "Tool connections in SELECTED", fn=selected)
        m.gauge(
            "zerodown_hsms_backend_sessions", "Backend sessions (current and draining)", fn=backends
        )
        m.gauge(
            "zerodown_hsms_transactions_in_flight",
            "Open transactions plus queued tool primaries",
            fn=in_flight,
        )
        m.gauge(
            "zerodown_hsms_partial_bytes_reserved",
            "Bytes of the partial-frame budget reserved by tools' incomplete messages",
            fn=partial_bytes,
        )
