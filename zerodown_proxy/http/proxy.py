"""The HTTP proxy: listener, routing decision, upstream pools, passive ejection, timeouts.

Per request: read the routing snapshot once, pick the app by Host/path, pick an Active instance
(round-robin or least-connections, skipping ejected ones), reuse a pooled connection or open one.
Errors become explicit answers: 502 (backend failed), 503 (nobody to send to), 504 (backend too
slow), each with a plain-text body that says why.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import os
import sys
import time
from typing import Any

import orjson

from ..config import HttpSection
from ..metrics import Registry
from ..routing import Instance, Router, Snapshot
from .balancer import Balancer
from .downstream import IDEMPOTENT, ClientProtocol, RequestCycle, build_upstream_head
from .headers import PREVIEW_HEADER, TOKEN_HEADER
from .upstream import UpstreamProtocol

log = logging.getLogger("zerodown.http")

SWEEP_INTERVAL = 0.25
_SPECIAL_REQUEST_HEADERS = frozenset(
    {b"transfer-encoding", b"content-length", PREVIEW_HEADER, TOKEN_HEADER}
)


class HttpProxy:
    def __init__(
        self,
        router: Router,
        cfg: HttpSection,
        metrics: Registry,
        admin_token: str = "",
        access_log: bool = False,
    ) -> None:
        self.router = router
        self.cfg = cfg
        self.admin_token = admin_token.encode()
        self.access_log = access_log
        self.loop = asyncio.get_event_loop()
        self.clients: set[ClientProtocol] = set()
        self.idle: dict[tuple[str, int], list[UpstreamProtocol]] = {}
        self.balancer = Balancer(cfg, metrics)
        self.routable: frozenset[tuple[str, int]] = frozenset()
        self.draining = False
        self.port = 0
        self._rid_prefix = os.urandom(4).hex().encode()
        self._rid = 0
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.connections_opened = 0

        m = metrics
        self.m_requests = m.counter(
            "zerodown_http_requests_total",
            "HTTP responses sent, by app and status",
            ("app", "code"),
        )
        self.m_latency = m.histogram(
            "zerodown_http_request_duration_seconds",
            "Time from request head to last response byte",
            ("app",),
        )
        self.m_upstream_errors = m.counter(
            "zerodown_http_upstream_errors_total",
            "Backend failures by kind (connect, reset, timeout, protocol)",
            ("app", "kind"),
        )
        self.m_retries = m.counter(
            "zerodown_http_retries_total", "Requests retried on another instance", ("app",)
        )
        self.m_client_errors = m.counter(
            "zerodown_http_client_errors_total", "Requests refused for bad input", ("code",)
        )
        self.m_client_aborts = m.counter(
            "zerodown_http_client_aborts_total", "Clients that left before their response", ("app",)
        )
        m.gauge(
            "zerodown_http_client_connections",
            "Open client connections",
            fn=lambda: len(self.clients),
        )
        m.gauge(
            "zerodown_http_upstream_idle_connections",
            "Idle pooled backend connections",
            fn=lambda: sum(len(v) for v in self.idle.values()),
        )
        router.subscribe(self._on_snapshot)
        self._on_snapshot(router.snapshot, router.snapshot)

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self, host: str, port: int, reuse_port: bool = False) -> None:
        self.loop = asyncio.get_running_loop()
        self._server = await self.loop.create_server(
            lambda: ClientProtocol(self),
            host,
            port,
            backlog=2048,
            reuse_address=True,
            reuse_port=reuse_port or None,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._sweeper = self.loop.create_task(self._sweep_forever())

    async def close(self, grace: float) -> None:
        """Stop accepting, let requests in flight finish (up to `grace` s), then cut the rest."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        for c in list(self.clients):
            if c.idle():
                c.close()
        deadline = time.monotonic() + grace
        while any(not c.idle() for c in self.clients) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for c in list(self.clients):
            if c.transport is not None:
                c.transport.abort()
        for conns in self.idle.values():
            for up in conns:
                up.close()
        self.idle.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()

    # -- per request --------------------------------------------------------------------------

    def new_request_id(self) -> bytes:
        self._rid += 1
        return b"%s-%x" % (self._rid_prefix, self._rid)

    def prepare(
        self,
        client: ClientProtocol,
        parser: Any,
        url: bytes,
        headers: list[tuple[bytes, bytes]],
        lnames: list[bytes] | None = None,
    ) -> RequestCycle:
        cycle = RequestCycle(client)
        method = parser.get_method()
        cycle.method = method
        cycle.http11 = parser.get_http_version() == "1.1"
        cycle.keep_alive = parser.should_keep_alive()
        cycle.upgrade = parser.should_upgrade()
        chunked = False
        length = 0
        preview = False
        token = b""
        if lnames is None:
            lnames = [name.lower() for name, _ in headers]
        # Most requests carry none of these; a C-level set test skips the Python loop for them.
        if not _SPECIAL_REQUEST_HEADERS.isdisjoint(lnames):
            for (_, value), ln in zip(headers, lnames, strict=True):
                if ln == b"transfer-encoding":
                    chunked = b"chunked" in value.lower()
                elif ln == b"content-length":
                    length = int(value)
                elif ln == PREVIEW_HEADER:
                    preview = value.strip().lower() == b"standby"
                elif ln == TOKEN_HEADER:
                    token = value.strip()
        cycle.chunked = chunked
        cycle.preview = preview
        q = url.find(b"?")
        cycle.path = url if q < 0 else url[:q]
        cycle.retained = [] if method in IDEMPOTENT else None
        cycle.head = build_upstream_head(self, cycle, method, url, headers, client.peer, lnames)
        if length > self.cfg.max_body_bytes:
            cycle.local = (413, f"request body of {length} bytes exceeds the limit of "
                                f"{self.cfg.max_body_bytes} bytes")  # fmt: skip
            self.count_client_error(413)
        elif preview and not (self.admin_token and hmac.compare_digest(token, self.admin_token)):
            cycle.local = (403, "standby preview needs a valid X-Zerodown-Token")
            self.count_client_error(403)
        return cycle

    def send_request(self, cycle: RequestCycle) -> None:
        snap: Snapshot = self.router.current()  # read once: this request's routing
        host = cycle.host.decode("latin-1") if cycle.host else None
        app = snap.route(host, cycle.path.decode("latin-1"))
        if app is None:
            cycle.client.respond_error(
                cycle, 503, f"no app is routed for host {host or '-'} path {cycle.path.decode()}"
            )
            return
        cycle.app = app
        self._attempt(cycle)

    def _attempt(self, cycle: RequestCycle) -> None:
        app = cycle.app
        assert app is not None
        inst = self.balancer.pick(app.standby if cycle.preview else app.active, cycle.tried)
        if inst is None:
            if cycle.preview:
                msg = f"app {app.name}: Standby group {app.standby_group} has no healthy instance"
            else:
                msg = f"app {app.name}: Active group {app.active_group} has no healthy instance"
            cycle.client.respond_error(cycle, 503, msg)
            return
        prev = cycle.instance
        if prev is not None:
            self.balancer.finished(prev, 0)
        cycle.instance = inst
        cycle.tried.append(inst)
        cycle.attempts += 1
        self.balancer.started(inst, retry=prev is not None)
        key = inst.http_key
        conns = self.idle.get(key)
        while conns:
            up = conns.pop()
            if not up.closed:
                up.reused = True
                up.attach(cycle)
                return
        self._connect(cycle, inst)

    def _connect(self, cycle: RequestCycle, inst: Instance) -> None:
        loop = self.loop
        task = loop.create_task(
            loop.create_connection(
                lambda: UpstreamProtocol(self, inst.http_key, inst.id),
                inst.address,
                inst.http_port,
            )
        )
        timer = loop.call_later(self.cfg.connect_timeout, task.cancel)
        task.add_done_callback(functools.partial(self._connected, cycle, inst, timer))

    def _connected(
        self, cycle: RequestCycle, inst: Instance, timer: asyncio.TimerHandle, task: asyncio.Task
    ) -> None:
        timer.cancel()
        err = None
        if task.cancelled():
            err = f"connect timed out after {self.cfg.connect_timeout:g}s"
        elif (exc := task.exception()) is not None:
            err = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        if err is not None:
            self._connect_failed(cycle, inst, err)
            return
        _, up = task.result()
        self.connections_opened += 1
        if cycle.aborted:
            self.pool_release(up)
            return
        up.attach(cycle)

    def _connect_failed(self, cycle: RequestCycle, inst: Instance, err: str) -> None:
        app = cycle.app.name if cycle.app else "-"
        self.m_upstream_errors.inc((app, "connect"))
        self.balancer.failed(inst, "connect")
        log.warning("connect to %s (%s:%s) failed: %s", inst.id, inst.address, inst.http_port, err)
        if cycle.aborted:
            return
        if (
            cycle.attempts < 2
            and self._has_alternative(cycle)
            and self.balancer.retries.try_retry()
        ):
            # Nothing reached any backend yet, so any method may go elsewhere.
            self.m_retries.inc((app,))
            self._attempt(cycle)
            return
        cycle.client.respond_error(cycle, 502, f"could not connect to backend {inst.id}: {err}")

    def _has_alternative(self, cycle: RequestCycle) -> bool:
        app = cycle.app
        assert app is not None
        instances = app.standby if cycle.preview else app.active
        return any(i not in cycle.tried for i in instances)

    def upstream_lost_before_response(self, cycle: RequestCycle, up: UpstreamProtocol) -> None:
        """The backend closed without sending a byte. A reused pooled connection may simply
        have hit the backend's keep-alive timeout: retry idempotent requests once."""
        up.cycle = None
        cycle.upstream = None
        app = cycle.app.name if cycle.app else "-"
        if cycle.aborted:
            return
        if up.reused and cycle.retained is not None and cycle.attempts < 2 and cycle.status == 0:
            # A pool artifact, not a sign of a slow backend: outside the retry budget.
            self.m_retries.inc((app,))
            self._attempt(cycle)
            return
        self.upstream_error(cycle, up, "reset", "backend closed the connection before answering")

    def upstream_error(
        self, cycle: RequestCycle, up: UpstreamProtocol, kind: str, message: str
    ) -> None:
        up.cycle = None
        up.abort()
        cycle.upstream = None
        inst = cycle.instance
        app = cycle.app.name if cycle.app else "-"
        self.m_upstream_errors.inc((app, kind))
        if inst is not None:
            self.balancer.failed(inst, kind)
            log.warning("backend %s: %s (%s)", inst.id, message, kind)
        if cycle.aborted:
            return
        client = cycle.client
        if cycle.status == 0:
            status = 504 if kind == "timeout" else 502
            who = inst.id if inst else "backend"
            client.respond_error(cycle, status, f"backend {who}: {message}")
        else:
            # Headers already went out: the only honest signal left is cutting the connection.
            self.count_response(cycle)
            client.current = None
            if client.transport is not None:
                client.transport.abort()

    # -- pool ---------------------------------------------------------------------------------

    def pool_release(self, up: UpstreamProtocol) -> None:
        if up.closed or self.draining or up.key not in self.routable:
            up.close()
            return
        conns = self.idle.get(up.key)
        if conns is None:
            conns = self.idle[up.key] = []
        if len(conns) >= self.cfg.max_idle_per_instance:
            up.close()
            return
        up.idle_since = time.monotonic()
        conns.append(up)

    def pool_discard(self, up: UpstreamProtocol) -> None:
        conns = self.idle.get(up.key)
        if conns and up in conns:
            conns.remove(up)

    def _on_snapshot(self, old: Snapshot, new: Snapshot) -> None:
        keys = set()
        for app in new.apps.values():
            keys.update(i.http_key for i in app.active)
            keys.update(i.http_key for i in app.standby)
        self.routable = frozenset(keys)
        active = {i.http_key for app in new.apps.values() for i in app.active}
        # Demoted instances keep their in-flight requests but lose their idle connections, so
        # the next request cannot land on them through the pool.
        for key in list(self.idle):
            if key not in active:
                for up in self.idle.pop(key):
                    up.close()

    # -- accounting ---------------------------------------------------------------------------

    def count_response(self, cycle: RequestCycle) -> None:
        app = cycle.app.name if cycle.app is not None else "-"
        inst = cycle.instance
        if inst is not None:
            self.balancer.finished(inst, cycle.status)
            cycle.instance = None
        elapsed = time.perf_counter() - cycle.start
        self.m_requests.inc((app, str(cycle.status)))
        self.m_latency.observe(elapsed, (app,))
        if self.access_log:
            sys.stdout.buffer.write(
                orjson.dumps(
                    {
                        "ts": time.time(),
                        "event": "access",
                        "id": cycle.request_id,
                        "client": cycle.client.peer,
                        "method": cycle.method.decode("latin-1"),
                        "path": cycle.path.decode("latin-1"),
                        "status": cycle.status,
                        "app": app,
                        "instance": inst.id if inst else None,
                        "version": inst.version if inst else None,
                        "ms": round(elapsed * 1000, 3),
                    }
                )
                + b"\n"
            )

    def count_client_error(self, status: int) -> None:
        self.m_client_errors.inc((str(status),))

    def count_client_abort(self, cycle: RequestCycle) -> None:
        inst = cycle.instance
        if inst is not None:
            self.balancer.finished(inst, 0)
            cycle.instance = None
        self.m_client_aborts.inc((cycle.app.name if cycle.app else "-",))

    # -- timeouts -----------------------------------------------------------------------------

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            try:
                self.sweep(time.monotonic())
            except Exception:
                log.exception("timeout sweep failed")

    def sweep(self, now: float) -> None:
        cfg = self.cfg
        for c in list(self.clients):
            cur = c.current
            if c.tunnel is not None:
                continue
            if cur is not None:
                up = cur.upstream
                if not cur.request_done and now - c.last_activity > cfg.read_timeout:
                    self.count_client_error(408)
                    if c.transport is not None:
                        c.transport.abort()
                elif (
                    up is not None
                    and up.cycle is cur
                    and not c.write_paused
                    and now - up.last_activity > cfg.read_timeout
                ):
                    self.upstream_error(
                        cur, up, "timeout", f"no response within {cfg.read_timeout:g}s"
                    )
            elif c.in_head and now - c.head_started > cfg.client_header_timeout:
                c.reject(408, "timed out waiting for the request headers")
            elif c.idle() and now - c.last_activity > cfg.client_idle_timeout:
                c.close()
        limit = now - cfg.upstream_idle_timeout
        for key, conns in list(self.idle.items()):
            keep = [up for up in conns if up.idle_since > limit and not up.closed]
            for up in conns:
                if up not in keep:
                    up.close()
            self.idle[key] = keep
        self.balancer.sweep(now)

    def status(self) -> dict[str, Any]:
        return {
            "port": self.port,
            "client_connections": len(self.clients),
            "idle_upstream_connections": {
                f"{k[0]}:{k[1]}": len(v) for k, v in self.idle.items() if v
            },
            **self.balancer.status(),
        }
