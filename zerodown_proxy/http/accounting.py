"""What the HTTP side counts: its metrics, the per-response accounting and the access log hook
(the lines themselves: access_log.py).

`HttpAccounting` owns the counters and histograms; `count_response` runs once per response on
the hot path (label sets bound once per app and status, no tuple built per response).
`register_gauges` adds the gauges read from the proxy's live state at scrape time.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ..metrics import BoundCounter, Registry
from .balancer import Balancer

if TYPE_CHECKING:
    from .access_log import AccessLog
    from .cycle import RequestCycle
    from .proxy import HttpProxy


class HttpAccounting:
    __slots__ = (
        "balancer", "access_log", "_answered", "m_requests", "m_latency", "m_upstream_errors",
        "m_retries", "m_client_errors", "m_client_aborts", "m_loop_lag",
    )  # fmt: skip

    def __init__(self, metrics: Registry, balancer: Balancer, access_log: AccessLog | None) -> None:
        self.balancer = balancer
        self.access_log = access_log
        # (app, version) -> status -> its bound counter: one small key per response, no label
        # tuple of three and no string of the status built on the hot path.
        self._answered: dict[tuple[str, str], dict[int, BoundCounter]] = {}
        m = metrics
        self.m_requests = m.counter(
            "zerodown_http_requests_total",
            "HTTP responses sent, by app, version served ('-': no backend answered) and status",
            ("app", "version", "code"),
        )
        self.m_latency = m.histogram(
            "zerodown_http_request_duration_seconds",
            "Time from request head to last response byte, by app and version served",
            ("app", "version"),
        )
        self.m_upstream_errors = m.counter(
            "zerodown_http_upstream_errors_total",
            "Backend failures by kind (connect, reset, timeout, first_byte_timeout, protocol)",
            ("app", "kind"),
        )
        self.m_retries = m.counter(
            "zerodown_http_retries_total", "Requests retried on another instance", ("app",)
        )
        self.m_client_errors = m.counter(
            "zerodown_http_client_errors_total", "Requests refused for bad input", ("code",)
        )
        self.m_loop_lag = m.histogram(
            "zerodown_http_loop_lag_seconds",
            "How late the event loop ran each periodic sweep (0.25 s apart): how long a ready "
            "socket may have waited before the proxy read it",
        )
        self.m_client_aborts = m.counter(
            "zerodown_http_client_aborts_total", "Clients that left before their response", ("app",)
        )

    def count_response(self, cycle: RequestCycle) -> None:
        app = cycle.app.name if cycle.app is not None else "-"
        inst = cycle.instance
        if inst is not None:
            self.balancer.finished(inst, cycle.status)
            cycle.instance = None
        elapsed = time.perf_counter() - cycle.start
        key = (app, inst.version if inst is not None else "-")
        by_status = self._answered.get(key)
        if by_status is None:
            by_status = self._answered[key] = {}
        bound = by_status.get(cycle.status)
        if bound is None:
            bound = by_status[cycle.status] = self.m_requests.bind(key + (str(cycle.status),))
        bound.inc()
        self.m_latency.observe(elapsed, key)
        if self.access_log is not None:
            self.access_log.request(cycle, app, inst, elapsed)

    def count_client_error(self, status: int) -> None:
        self.m_client_errors.inc((str(status),))

    def log_refused(self, peer: str, status: int, body_bytes: int) -> None:
        """Bad input answered without a request cycle: an access line too, when it is on."""
        if self.access_log is not None:
            self.access_log.refused(peer, status, body_bytes)

    def count_client_abort(self, cycle: RequestCycle) -> None:
        inst = cycle.instance
        if inst is not None:
            self.balancer.finished(inst, 0)
            cycle.instance = None
        self.m_client_aborts.inc((cycle.app.name if cycle.app else "-",))


def register_gauges(m: Registry, proxy: HttpProxy) -> None:
    """Gauges read from the proxy at scrape time (capacity is replaced at start: read late)."""
    m.gauge(
        "zerodown_http_client_connections",
        "Open client connections",
        fn=lambda: len(proxy.clients),
    )
    m.gauge(
        "zerodown_http_client_connection_limit",
        "Client connections accepted at most (max_client_connections, file descriptors)",
        fn=lambda: proxy.capacity.client_limit,
    )
    m.counter_fn(
        "zerodown_http_client_connections_refused_total",
        "Client connections answered 503 and closed because the proxy was at its limit",
        lambda: proxy.capacity.refused,
    )
    m.gauge(
        "zerodown_http_upstream_connections",
        "Backend connections open or being opened",
        fn=lambda: proxy.capacity.upstreams,
    )
    m.gauge(
        "zerodown_http_fd_budget",
        "File descriptors the HTTP side may hold (open-files limit minus fd_reserve)",
        fn=lambda: proxy.capacity.fd_budget,
    )
    m.gauge(
        "zerodown_http_upstream_idle_connections",
        "Idle pooled backend connections",
        fn=proxy.pool.size,
    )
