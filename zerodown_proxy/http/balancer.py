"""Which instance gets the next HTTP request: load balancing over a group, requests in flight per
instance, and passive ejection of instances that fail.

The HTTP proxy asks `pick(instances, tried)` once per attempt and reports what happened:
`started` when an attempt is sent, `finished` when its response ended (with the status), and
`failed(kind)` when the instance failed it (connect, reset, timeout, first_byte_timeout,
protocol). Everything is keyed by the instance's HTTP endpoint (`Instance.http_key`), the one key
the pools use too.

Retries are bounded by a budget (Envoy's retry budget, Finagle's RetryBudget): over a sliding
window, retries may be at most `retry_budget_ratio` of the requests plus a small floor, so a slow
or failing cluster is not hit with twice the load exactly when it can least take it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ..config import HttpSection
from ..metrics import Registry
from ..routing import Instance

log = logging.getLogger("zerodown.http")

Key = tuple[str, int]


class Balancer:
    def __init__(self, cfg: HttpSection, metrics: Registry) -> None:
        self.cfg = cfg
        self.inflight: dict[Key, int] = {}
        self.failures: dict[Key, int] = {}
        self.ejected: dict[Key, float] = {}  # key -> monotonic time the ejection ends
        self._rr = 0
        self.retries = RetryBudget(cfg.retry_budget_ratio, cfg.retry_budget_min)
        self.m_ejections = metrics.counter(
            "zerodown_http_ejections_total", "Instances ejected after failures", ("instance",)
        )

    def pick(self, instances: tuple[Instance, ...], tried: list[Instance]) -> Instance | None:
        """The instance for the next attempt: not ejected and not tried yet when possible."""
        n = len(instances)
        if n == 0:
            return None
        round_robin = self.cfg.balance == "round_robin"
        if not self.ejected and not tried and round_robin:
            self._rr += 1
            return instances[self._rr % n]
        now = time.monotonic()
        ejected = self.ejected
        candidates = [i for i in instances if ejected.get(i.http_key, 0) <= now and i not in tried]
        if not candidates:
            candidates = [i for i in instances if i not in tried] or list(instances)
        if not round_robin:
            inflight = self.inflight
            return min(candidates, key=lambda i: inflight.get(i.http_key, 0))
        self._rr += 1
        return candidates[self._rr % len(candidates)]

    def started(self, inst: Instance, retry: bool = False) -> None:
        """An attempt goes to `inst` (`retry`: not the request's first attempt)."""
        if not retry:
            self.retries.request()
        key = inst.http_key
        self.inflight[key] = self.inflight.get(key, 0) + 1

    def finished(self, inst: Instance, status: int) -> None:
        """The attempt on `inst` ended (answered, failed or abandoned)."""
        key = inst.http_key
        self.inflight[key] -= 1
        if self.failures and 0 < status < 500:
            self.failures.pop(key, None)

    def failed(self, inst: Instance, kind: str) -> None:
        key = inst.http_key
        n = self.failures.get(key, 0) + 1
        if n >= self.cfg.eject_after_failures:
            self.failures.pop(key, None)
            self.ejected[key] = time.monotonic() + self.cfg.eject_seconds
            self.m_ejections.inc((inst.id,))
            log.warning("ejected %s for %gs after %d failures (last: %s)",
                        inst.id, self.cfg.eject_seconds, n, kind)  # fmt: skip
        else:
            self.failures[key] = n

    def sweep(self, now: float) -> None:
        for key, until in list(self.ejected.items()):
            if until <= now:
                del self.ejected[key]

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "ejected": {f"{k[0]}:{k[1]}": round(t - now, 1) for k, t in self.ejected.items()},
            "inflight": {f"{k[0]}:{k[1]}": v for k, v in self.inflight.items() if v},
        }


class RetryBudget:
    """At most `ratio` x requests + `floor` retries over the last WINDOW seconds (two half-window
    buckets, so the budget slides without a timestamp per request)."""

    WINDOW = 10.0

    __slots__ = ("ratio", "floor", "_bucket_start", "_requests", "_retries", "_prev_requests",
                 "_prev_retries", "refused")  # fmt: skip

    def __init__(self, ratio: float, floor: int) -> None:
        self.ratio = ratio
        self.floor = floor
        self._bucket_start = time.monotonic()
        self._requests = self._retries = 0
        self._prev_requests = self._prev_retries = 0
        self.refused = 0

    def _roll(self, now: float) -> None:
        half = self.WINDOW / 2
        if now - self._bucket_start >= half:
            if now - self._bucket_start >= self.WINDOW:
                self._prev_requests = self._prev_retries = 0
            else:
                self._prev_requests, self._prev_retries = self._requests, self._retries
            self._requests = self._retries = 0
            self._bucket_start = now

    def request(self) -> None:
        self._requests += 1

    def try_retry(self) -> bool:
        """Take one retry from the budget; False (and counted) when it is spent."""
        self._roll(time.monotonic())
        requests = self._requests + self._prev_requests
        retries = self._retries + self._prev_retries
        if retries >= self.floor + self.ratio * requests:
            self.refused += 1
            return False
        self._retries += 1
        return True
