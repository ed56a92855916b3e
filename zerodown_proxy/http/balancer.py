"""Which instance gets the next HTTP request: load balancing over a group, requests in flight per
instance, and the instances to avoid (ejected as outliers or marked down by active health checks).

The HTTP proxy asks `pick(instances, tried)` once per attempt and reports what happened:
`started` when an attempt is sent, `finished` when its response ended (with the status), and
`failed(kind)` when the instance failed it (connect, reset, timeout, first_byte_timeout,
protocol). Everything is keyed by the instance's HTTP endpoint (`Instance.http_key`), the one key
the pools use too.

`pick` costs nothing extra while no instance is down: one empty-set test. When every instance of
a group is to be avoided it routes to all of them anyway (Envoy's panic mode): a group that is
all down by the proxy's own view is more likely a bad check than a dead fleet, and an explicit
attempt beats a certain 503. Each such request is counted and the first one logged.

Retries are bounded by a budget (Envoy's retry budget, Finagle's RetryBudget): over a sliding
window, retries may be at most `retry_budget_ratio` of the requests plus a small floor, so a slow
or failing cluster is not hit with twice the load exactly when it can least take it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..config import HttpSection, OutlierSection
from ..health.outlier import KIND_REASON, Ejection, OutlierDetector
from ..metrics import Registry
from ..routing import Instance, Router, Snapshot

if TYPE_CHECKING:
    from ..health.active import ActiveHealthChecker, ProbeResult

log = logging.getLogger("zerodown.http")

Key = tuple[str, int]


class Balancer:
    def __init__(
        self, cfg: HttpSection, metrics: Registry, outlier: OutlierSection | None = None
    ) -> None:
        self.cfg = cfg
        self.inflight: dict[Key, int] = {}
        # Attempts that failed() reported and whose finished() is still to come: the proxy's own
        # 502/504 for them is not a second failure, nor a success.
        self._faulted: dict[Key, int] = {}
        self.outliers = OutlierDetector(outlier or OutlierSection())
        self._counts = self.outliers.counts  # read on every answer: empty while all is well
        self.health_down: frozenset[Key] = frozenset()
        self.avoid: frozenset[Key] = frozenset()  # ejected or down: the one set pick() reads
        self.checker: ActiveHealthChecker | None = None
        self._panic: set[tuple[str, str]] = set()  # groups in panic mode (logged once each)
        self._rr = 0
        self.retries = RetryBudget(cfg.retry_budget_ratio, cfg.retry_budget_min)
        # Set by the proxy to its WaitQueue's dict and freed(): while requests wait for room,
        # every finished attempt tells the queue (one truth test per answer otherwise).
        self.waiting: dict[Any, Any] = {}
        self.on_free: Callable[[Instance], None] = lambda inst: None
        self.m_ejections = metrics.counter(
            "zerodown_http_ejections_total",
            "Instances ejected as outliers, by reason (consecutive_5xx, "
            "consecutive_connect_failures, consecutive_timeouts)",
            ("instance", "reason"),
        )
        metrics.gauge(
            "zerodown_http_ejected_instances",
            "Instances ejected right now",
            fn=lambda: len(self.outliers.ejected),
        )
        metrics.counter_fn(
            "zerodown_http_ejections_skipped_total",
            "Ejections not done because max_ejection_percent of the group is already ejected",
            lambda: self.outliers.skipped,
        )
        self.m_panic = metrics.counter(
            "zerodown_http_panic_routed_total",
            "Attempts routed to an avoided instance because every instance of the group is "
            "ejected or down (panic mode)",
            ("app",),
        )

    def attach(
        self,
        router: Router,
        outlier: OutlierSection | None = None,
        checker: ActiveHealthChecker | None = None,
    ) -> None:
        """Use the configured outlier detection, follow the routing (group sizes, forgetting
        removed instances) and the active health checks' verdicts."""
        if outlier is not None:
            self.outliers = OutlierDetector(outlier)
            self._counts = self.outliers.counts
        router.subscribe(self._on_snapshot)
        self._on_snapshot(router.snapshot, router.snapshot)
        if checker is not None:
            self.checker = checker
            checker.subscribe(self._on_probe)

    def pick(self, instances: tuple[Instance, ...], tried: list[Instance]) -> Instance | None:
        """The instance for the next attempt: neither avoided nor tried yet when possible."""
        n = len(instances)
        if n == 0:
            return None
        round_robin = self.cfg.balance == "round_robin"
        avoid = self.avoid
        if not avoid and not tried and round_robin:
            self._rr += 1
            return instances[self._rr % n]
        candidates = [i for i in instances if i.http_key not in avoid]
        if candidates:
            if self._panic:
                self._panic.discard((instances[0].app, instances[0].group))
            candidates = [i for i in candidates if i not in tried] or candidates
        else:
            candidates = [i for i in instances if i not in tried] or list(instances)
            self._panicking(instances[0])
        if not round_robin:
            inflight = self.inflight
            return min(candidates, key=lambda i: inflight.get(i.http_key, 0))
        self._rr += 1
        return candidates[self._rr % len(candidates)]

    def _panicking(self, inst: Instance) -> None:
        self.m_panic.inc((inst.app,))
        group = (inst.app, inst.group)
        if group not in self._panic:
            self._panic.add(group)
            log.warning("app %s: every instance of group %s is ejected or failing its health "
                        "check; routing to all of them (panic mode)", inst.app, inst.group)  # fmt: skip

    def started(self, inst: Instance, retry: bool = False) -> None:
        """An attempt goes to `inst` (`retry`: not the request's first attempt)."""
        if not retry:
            self.retries.requests += 1  # RetryBudget.request(), inlined: once per request
        key = inst.http_key
        self.inflight[key] = self.inflight.get(key, 0) + 1

    def finished(self, inst: Instance, status: int) -> None:
        """The attempt on `inst` ended (answered, failed or abandoned: status 0)."""
        key = inst.http_key
        self.inflight[key] -= 1
        if self.waiting:
            self.on_free(inst)
        faulted = self._faulted
        if faulted and key in faulted:
            if faulted[key] <= 1 or self.inflight[key] == 0:
                del faulted[key]
            else:
                faulted[key] -= 1
            return
        if status >= 500:
            self._failure(inst, "consecutive_5xx")
        elif self._counts and key in self._counts and status:
            self.outliers.success(key)

    def failed(self, inst: Instance, kind: str) -> None:
        """The attempt on `inst` failed (kind: connect, reset, timeout, first_byte_timeout,
        protocol); its finished() follows."""
        key = inst.http_key
        if self.inflight.get(key):
            self._faulted[key] = self._faulted.get(key, 0) + 1
        self._failure(inst, KIND_REASON.get(kind, "consecutive_5xx"))

    def _failure(self, inst: Instance, reason: str) -> None:
        ej = self.outliers.failure(inst.http_key, reason, inst.id, time.monotonic())
        if ej is not None:
            self._update_avoid()
            self.m_ejections.inc((inst.id, reason))
            log.warning("ejected %s (%s:%s) for %gs: %s (ejection %d)", inst.id, inst.address,
                        inst.http_port, ej.until - ej.since, reason, ej.count)  # fmt: skip

    def _on_probe(self, result: ProbeResult) -> None:
        if result.passed and result.key in self.outliers.ejected:
            ej = self.outliers.health_check_passed(result.key, result.started)
            if ej is not None:
                log.info("%s is back before its ejection ended: it passed a health check",
                         ej.instance)  # fmt: skip
                self._update_avoid()
        if result.changed and self.checker is not None:
            self.health_down = frozenset(self.checker.down)  # the checker owns the verdicts
            self._update_avoid()

    def _on_snapshot(self, old: Snapshot, new: Snapshot) -> None:
        if self.outliers.set_topology(new):
            self._update_avoid()

    def _update_avoid(self) -> None:
        # A new frozenset each time (a rare event): pick() reads one reference, no lock.
        self.avoid = self.health_down | frozenset(self.outliers.ejected)
        if not self.avoid:
            self._panic.clear()

    def sweep(self, now: float) -> None:
        if not self.outliers.ejected:
            return
        returned = self.outliers.expire(now)
        for _, ej in returned:
            log.info("%s returns after its %gs ejection (%s)", ej.instance,
                     ej.until - ej.since, ej.reason)  # fmt: skip
        if returned:
            self._update_avoid()

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        wall = time.time()
        return {
            "ejected": {
                _addr(k): _ejection(e, now, wall) for k, e in self.outliers.ejected.items()
            },
            "inflight": {_addr(k): v for k, v in self.inflight.items() if v},
            "panic": sorted(f"{app}/{group}" for app, group in self._panic),
        }


def _addr(key: Key) -> str:
    return f"{key[0]}:{key[1]}"


def _ejection(e: Ejection, now: float, wall: float) -> dict[str, Any]:
    left = max(e.until - now, 0.0)
    return {
        "instance": e.instance,
        "reason": e.reason,
        "remaining_s": round(left, 1),
        "until": round(wall + left, 3),
        "ejections": e.count,
    }


class RetryBudget:
    """At most `ratio` x requests + `floor` retries over the last WINDOW seconds (two half-window
    buckets, so the budget slides without a timestamp per request)."""

    WINDOW = 10.0

    __slots__ = ("ratio", "floor", "_bucket_start", "requests", "_retries", "_prev_requests",
                 "_prev_retries", "refused")  # fmt: skip

    def __init__(self, ratio: float, floor: int) -> None:
        self.ratio = ratio
        self.floor = floor
        self._bucket_start = time.monotonic()
        self.requests = self._retries = 0
        self._prev_requests = self._prev_retries = 0
        self.refused = 0

    def _roll(self, now: float) -> None:
        half = self.WINDOW / 2
        if now - self._bucket_start >= half:
            if now - self._bucket_start >= self.WINDOW:
                self._prev_requests = self._prev_retries = 0
            else:
                self._prev_requests, self._prev_retries = self.requests, self._retries
            self.requests = self._retries = 0
            self._bucket_start = now

    def request(self) -> None:
        self.requests += 1

    def try_retry(self) -> bool:
        """Take one retry from the budget; False (and counted) when it is spent."""
        self._roll(time.monotonic())
        requests = self.requests + self._prev_requests
        retries = self._retries + self._prev_retries
        if retries >= self.floor + self.ratio * requests:
            self.refused += 1
            return False
        self._retries += 1
        return True
