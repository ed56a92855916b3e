"""Overload: bounded waiting for a backend instance, and shedding with an explicit answer.

An instance carries at most `max_requests_per_instance` requests at once. A request whose
group has no instance under that limit waits here, in arrival order, for one to finish; if none
does within `max_queue_time` it is shed: 503 with `Retry-After`, counted in
`zerodown_http_shed_total`. So when more arrives than the backends (or the proxy) can carry,
every request is answered or shed within a bounded time instead of piling up on the backends
until first_byte_timeout, and the queue empties as soon as the load drops.

The other places a request can wait are bounded elsewhere: the accept backlog by the
client-connection cap (503 + Retry-After at once, capacity.py), pipelined requests by the
timeouts of the ones before them (at most PIPELINE_LIMIT, downstream.py), a connect by
connect_timeout, a backend's answer by first_byte_timeout and read_timeout (timeouts.py).
The expiry runs on the timeout sweep's tick, so a shed request waited at most
`max_queue_time` plus one SWEEP_INTERVAL.
"""

from __future__ import annotations

import asyncio
import sys
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..config import HttpSection
from ..metrics import Registry

if TYPE_CHECKING:
    from ..routing import Instance
    from .cycle import RequestCycle

Key = tuple[str, int]
RETRY_AFTER = 1  # seconds, in every overload 503: a short, honest "come back soon"


class WaitQueue:
    """Requests waiting for an instance of their group to fall under the in-flight limit, one
    FIFO per (app, preview) so that a saturated app never holds up another's requests."""

    __slots__ = ("limit", "max_wait", "waiting", "m_shed", "_loop", "_drain", "_scheduled")

    def __init__(self, cfg: HttpSection, metrics: Registry) -> None:
        # 0: no limit (nothing ever waits); a number never reached keeps one test on the hot path.
        self.limit = cfg.max_requests_per_instance or sys.maxsize
        self.max_wait = cfg.max_queue_time
        self.waiting: dict[tuple[str, bool], deque[tuple[float, RequestCycle]]] = {}
        self.m_shed = metrics.counter(
            "zerodown_http_shed_total",
            "Requests answered 503 + Retry-After because the proxy or its backends are at "
            "capacity, by app and reason (queue_full: max_queue_time is 0; queue_timeout: no "
            "instance fell under max_requests_per_instance within max_queue_time)",
            ("app", "reason"),
        )
        metrics.gauge("zerodown_http_queued_requests",
                      "Requests waiting for an instance under max_requests_per_instance",
                      fn=self.size)  # fmt: skip
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: Callable[[RequestCycle, Instance], None] | None = None
        self._scheduled = False

    def start(
        self, loop: asyncio.AbstractEventLoop, drain: Callable[[RequestCycle, Instance], None]
    ) -> None:
        """`drain(cycle, instance)` sends a waiting request once an instance has room."""
        self._loop = loop
        self._drain = drain

    @staticmethod
    def room(
        instances: tuple[Instance, ...],
        inflight: dict[Key, int],
        limit: int,
        avoid: frozenset[Key],
        tried: list[Instance],
    ) -> Instance | None:
        """The least loaded instance under `limit`, preferring those neither avoided (ejected,
        down) nor tried yet; None when every instance is at the limit."""
        best: Instance | None = None
        best_rank: tuple[bool, bool, int] | None = None
        for inst in instances:
            n = inflight.get(inst.http_key, 0)
            if n >= limit:
                continue
            rank = (inst.http_key in avoid, inst in tried, n)
            if best_rank is None or rank < best_rank:
                best, best_rank = inst, rank
        return best

    def wait(self, cycle: RequestCycle, now: float) -> bool:
        """Queue `cycle`; False when it must be shed at once (max_queue_time = 0)."""
        if self.max_wait <= 0:
            return False
        app = cycle.app
        assert app is not None
        key = (app.name, cycle.preview)
        q = self.waiting.get(key)
        if q is None:
            q = self.waiting[key] = deque()
        q.append((now, cycle))
        return True

    def freed(self, inst: Instance) -> None:
        """An attempt on `inst` ended (Balancer.on_free): serve waiting requests, soon (not
        from inside the caller, which is in the middle of finishing an exchange)."""
        if not self._scheduled and self.waiting and self._loop is not None:
            self._scheduled = True
            self._loop.call_soon(self._serve_waiting)

    def _serve_waiting(self) -> None:
        self._scheduled = False
        drain = self._drain
        assert drain is not None
        for key, q in list(self.waiting.items()):
            while q:
                _, cycle = q[0]
                if cycle.aborted or cycle.client.current is not cycle:
                    q.popleft()  # the client left (or was answered) while it waited
                    continue
                app = cycle.app
                assert app is not None
                group = app.standby if cycle.preview else app.active
                bal = cycle.client.proxy.balancer
                inst = self.room(group, bal.inflight, self.limit, bal.avoid, cycle.tried)
                if inst is None:
                    break
                q.popleft()
                drain(cycle, inst)
            if not q:
                del self.waiting[key]

    def expire(self, now: float) -> list[RequestCycle]:
        """Take the requests that have waited longer than max_queue_time (still to answer)."""
        limit = now - self.max_wait
        out: list[RequestCycle] = []
        for key, q in list(self.waiting.items()):
            while q and q[0][0] <= limit:
                cycle = q.popleft()[1]
                if not cycle.aborted and cycle.client.current is cycle:
                    out.append(cycle)
            if not q:
                del self.waiting[key]
        return out

    def shed(self, cycle: RequestCycle, reason: str) -> None:
        """Answer 503 + Retry-After and count it (reason: queue_full, queue_timeout)."""
        app = cycle.app
        name = app.name if app is not None else "-"
        self.m_shed.inc((name, reason))
        why = f" and none had room within {self.max_wait:g}s" if reason == "queue_timeout" else ""
        cycle.client.respond_error(
            cycle, 503, f"app {name}: every instance is at max_requests_per_instance "
                        f"({self.limit}){why}; try again later", RETRY_AFTER,
        )  # fmt: skip

    def size(self) -> int:
        return sum(len(q) for q in self.waiting.values())
