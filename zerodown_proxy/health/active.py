"""Active health checks: the proxy's own `GET /health` of every routed instance.

One asyncio task runs every probe: a heap of due times, each probe a request on a kept-alive
connection to its instance (one per instance, as Envoy's reuse_connection does), timeouts
checked by the same loop. Nothing here blocks and nothing runs per request: the data path only
reads the verdicts, through the balancer (`Balancer.pick`) and `is_down` (the HSMS proxy).

Verdicts follow the routing snapshots (subscribed to the router): new instances are probed,
removed ones dropped; the snapshot itself is never changed. An instance starts "unknown" (the
registry or Consul already says it is healthy, so it is routable), goes "down" after
unhealthy_threshold failed probes in a row and "up" after healthy_threshold passes in a row (one
pass from unknown). A probe passes on a complete 2xx/3xx answer within `timeout`.

Cost (measured: 2000 instances on 127.0.0.1, 1 s interval, uvloop): ~26 us of event-loop CPU
per probe, so 100 apps x 20 instances at the default 1 s interval is ~2000 probes/s, ~5 % of one
core, and 2000 connections held open (one per instance); first probes are spread over the
interval, so they never come in one burst. Every worker of a multi-worker proxy probes too.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import HealthCheckSection
from ..metrics import Registry
from ..routing import Instance, Router, Snapshot
from .probe import ProbeConnection

log = logging.getLogger("zerodown.health")

Key = tuple[str, int]
MAX_SLEEP = 1.0  # the loop re-reads its heap at least this often


@dataclass(frozen=True, slots=True)
class ProbeResult:
    key: Key
    passed: bool
    started: float  # monotonic time the probe was sent
    detail: str  # "200" or why it failed
    down: bool  # the verdict after this probe
    changed: bool  # the verdict changed with this probe


Listener = Callable[[ProbeResult], None]


class _Target:
    """One instance being probed (keyed by its HTTP endpoint)."""

    __slots__ = ("key", "instance", "cfg", "request", "state", "since", "passes", "failures",
                 "detail", "checked_at", "conn", "started", "deadline", "due", "seq")  # fmt: skip

    def __init__(self, inst: Instance, cfg: HealthCheckSection) -> None:
        self.key: Key = inst.http_key
        self.instance = inst
        self.cfg = cfg
        addr = f"[{inst.address}]" if ":" in inst.address else inst.address  # IPv6 literal
        host = cfg.host or f"{addr}:{inst.http_port}"
        self.request = (
            f"GET {cfg.path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: zerodown-health-check\r\n"
            "Accept: */*\r\n\r\n"
        ).encode("latin-1")
        self.state = "unknown"  # unknown | up | down
        self.since = time.time()
        self.passes = self.failures = 0
        self.detail = ""
        self.checked_at = 0.0
        self.conn: ProbeConnection | None = None
        self.started = 0.0  # > 0 while a probe is in flight
        self.deadline = 0.0
        self.due = 0.0
        self.seq = 0  # heap entries with an older seq are stale


class ActiveHealthChecker:
    def __init__(self, router: Router, cfg: HealthCheckSection, metrics: Registry) -> None:
        self.router = router
        self.cfg = cfg
        self.targets: dict[Key, _Target] = {}
        self.down: set[Key] = set()  # read by the data path; owned here
        self._listeners: list[Listener] = []
        self._heap: list[tuple[float, int, Key]] = []
        self._seq = 0
        self._inflight: set[_Target] = set()  # probes sent, not answered yet
        self._next_wake = 0.0  # when the loop will look again on its own
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._connecting: set[asyncio.Task[Any]] = set()
        self.m_checks = metrics.counter(
            "zerodown_health_checks_total",
            "Active health probes by instance and result (pass, fail)",
            ("instance", "result"),
        )
        self.m_transitions = metrics.counter(
            "zerodown_health_transitions_total",
            "Instances marked down or up by the proxy's own health checks",
            ("instance", "to"),
        )
        metrics.gauge(
            "zerodown_health_instances_down",
            "Routed instances the proxy's own health checks mark down",
            fn=lambda: len(self.down),
        )
        router.subscribe(self._on_snapshot)
        self._on_snapshot(router.snapshot, router.snapshot)

    # -- the read-only view -----------------------------------------------------------------

    def is_down(self, instance: Instance) -> bool:
        """True when the proxy's own checks mark `instance` down (for the HSMS proxy's choice of
        a backend: an instance's HTTP health speaks for the process)."""
        return instance.http_key in self.down

    def subscribe(self, listener: Listener) -> None:
        """Called with every probe's result (the balancer ends ejections and tracks verdicts)."""
        self._listeners.append(listener)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for t in list(self._connecting):
            t.cancel()
        for target in self.targets.values():
            if target.conn is not None:
                target.conn.close()

    # -- following the routing --------------------------------------------------------------

    def _on_snapshot(self, old: Snapshot, new: Snapshot) -> None:
        wanted: dict[Key, tuple[Instance, HealthCheckSection]] = {}
        for app in new.apps.values():
            app_cfg = self.cfg.for_app(app.name)
            if not app_cfg.enabled:
                continue
            for inst in app.active + app.standby:
                wanted.setdefault(inst.http_key, (inst, app_cfg))
        now = time.monotonic()
        for key in [k for k in self.targets if k not in wanted]:
            self._drop(self.targets.pop(key))
        for key, (inst, app_cfg) in wanted.items():
            target = self.targets.get(key)
            if target is not None and target.cfg == app_cfg:
                target.instance = inst
                continue
            if target is not None:
                self._drop(target)
            target = self.targets[key] = _Target(inst, app_cfg)
            # Spread first probes over the interval: a fleet does not get probed in one burst.
            self._schedule(target, now + random.uniform(0, app_cfg.interval))
        self._wake.set()

    def _drop(self, target: _Target) -> None:
        target.seq = -1  # its heap entries are stale now
        target.started = 0.0  # a probe in flight no longer counts
        self._inflight.discard(target)
        if target.conn is not None:
            target.conn.close()
        if target.key in self.down:
            self.down.discard(target.key)
            self._notify(ProbeResult(target.key, True, 0.0, "no longer routed", False, True))

    def _schedule(self, target: _Target, due: float) -> None:
        self._seq += 1
        target.seq = self._seq
        target.due = due
        heapq.heappush(self._heap, (due, self._seq, target.key))
        if due < self._next_wake:
            self._wake.set()

    # -- the loop ---------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            self._wake.clear()  # before the tick: a probe ending meanwhile wakes the next one
            try:
                delay = self._tick(time.monotonic())
            except Exception:  # a bug here must not stop health checking for good
                log.exception("health check loop failed")
                delay = MAX_SLEEP
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except TimeoutError:
                pass

    def _tick(self, now: float) -> float:
        """Fail late probes, start due ones; returns seconds until the next thing to do."""
        next_at = now + MAX_SLEEP
        for target in list(self._inflight):
            if target.deadline <= now:
                self._timed_out(target)
            else:
                next_at = min(next_at, target.deadline)
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, seq, key = heapq.heappop(heap)
            target = self.targets.get(key)
            if target is None or target.seq != seq or target.started:
                continue  # stale, or in flight (its end schedules the next probe)
            self._probe(target, now)
            next_at = min(next_at, target.deadline)
        if heap:
            next_at = min(next_at, heap[0][0])
        delay = min(max(next_at - now, 0.001), MAX_SLEEP)
        self._next_wake = now + delay
        return delay

    def _probe(self, target: _Target, now: float) -> None:
        target.started = now
        target.deadline = now + target.cfg.timeout
        self._inflight.add(target)
        conn = target.conn
        if conn is not None and not conn.closed and not conn.busy:
            conn.send()
            return
        loop = asyncio.get_running_loop()
        inst = target.instance
        conn = ProbeConnection(target.request, lambda c, ok, why: self._finished(target, ok, why))
        target.conn = conn
        task = loop.create_task(loop.create_connection(lambda: conn, inst.address, inst.http_port))
        self._connecting.add(task)
        conn.connecting = task
        task.add_done_callback(lambda t: self._connected(target, conn, t))

    def _connected(self, target: _Target, conn: ProbeConnection, task: asyncio.Task[Any]) -> None:
        self._connecting.discard(task)
        conn.connecting = None
        if task.cancelled():
            conn.closed = True
            return  # timed out (already counted) or shutting down
        exc = task.exception()
        if exc is not None:
            conn.closed = True
            if target.conn is conn:
                target.conn = None
            why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            self._finished(target, False, f"connect failed: {why}")
            return
        if target.conn is not conn or not target.started or conn.closed:
            conn.close()  # the probe timed out or the target went away meanwhile
            return
        conn.send()

    def _timed_out(self, target: _Target) -> None:
        if target.conn is not None:
            target.conn.abandon()
        target.conn = None
        timeout = target.cfg.timeout
        self._finished(target, False, f"no answer within {timeout:g}s")

    def _finished(self, target: _Target, passed: bool, detail: str) -> None:
        if not target.started or self.targets.get(target.key) is not target:
            return
        started = target.started
        target.started = 0.0
        self._inflight.discard(target)
        # At most one probe per instance in flight; the next starts one interval after this one
        # started, or now if this one took longer (a timeout longer than the interval).
        self._schedule(target, max(started + target.cfg.interval, time.monotonic()))
        target.checked_at = time.time()
        target.detail = detail
        cfg = target.cfg
        was = target.state
        if passed:
            target.passes += 1
            target.failures = 0
            if was != "up" and (was == "unknown" or target.passes >= cfg.healthy_threshold):
                target.state = "up"
        else:
            target.failures += 1
            target.passes = 0
            if was != "down" and target.failures >= cfg.unhealthy_threshold:
                target.state = "down"
        inst = target.instance
        self.m_checks.inc((inst.id, "pass" if passed else "fail"))
        changed = (target.state == "down") != (was == "down")
        if changed:
            target.since = time.time()
            if target.state == "down":
                self.down.add(target.key)
                log.warning("health check: %s (%s:%s) is down after %d failed probes: %s",
                            inst.id, inst.address, inst.http_port, target.failures, detail)  # fmt: skip
            else:
                self.down.discard(target.key)
                log.info("health check: %s (%s:%s) is up again after %d passed probes",
                         inst.id, inst.address, inst.http_port, target.passes)  # fmt: skip
            self.m_transitions.inc((inst.id, target.state))
        elif target.state != was:
            target.since = time.time()
        result = ProbeResult(target.key, passed, started, detail, target.state == "down", changed)
        self._notify(result)

    def _notify(self, result: ProbeResult) -> None:
        for listener in self._listeners:
            try:
                listener(result)
            except Exception:
                log.exception("health check listener failed")

    # -- status -----------------------------------------------------------------------------

    def verdict(self, key: Key) -> dict[str, Any] | None:
        """This instance's check, for /v1/status (None: not checked)."""
        t = self.targets.get(key)
        if t is None:
            return None
        return {
            "status": t.state,
            "since": round(t.since, 3),
            "last": t.detail or None,
            "checked_at": round(t.checked_at, 3) if t.checked_at else None,
            "consecutive_passes": t.passes,
            "consecutive_failures": t.failures,
            "path": t.cfg.path,
        }

    def verdicts(self) -> list[tuple[Instance, str]]:
        """Every checked instance with its state (unknown, up, down), for /metrics."""
        return [(t.instance, t.state) for t in self.targets.values()]

    def status(self) -> dict[str, Any]:
        return {
            "enabled": self.cfg.enabled,
            "instances": len(self.targets),
            "down": sorted(self.targets[k].instance.id for k in self.down if k in self.targets),
        }
