"""The HTTP proxy: listener, routing decision, backend choice, connect, retries, errors.

Per request: read the routing snapshot once, pick the app by Host/path, pick an Active instance
(round-robin or least-connections, skipping ejected ones), reuse a pooled connection or open one.
Errors become explicit answers: 502 (backend failed), 503 (nobody to send to), 504 (backend too
slow), each with a plain-text body that says why.

Its parts live beside it: the idle pool in pool.py, the counters and access log in
accounting.py, the periodic timeout sweep in timeouts.py, fd accounting in capacity.py.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import os
import socket
import time
from typing import Any

from ..config import HttpSection
from ..contract.pilots import canonical_address
from ..metrics import Registry
from ..routing import Instance, Router, Snapshot
from .access_log import AccessLog, LoggedUpstream
from .accounting import HttpAccounting, register_gauges
from .balancer import Balancer
from .capacity import Capacity, nofile_limit, raise_nofile_limit
from .cycle import RequestCycle
from .downstream import ClientProtocol
from .framing import LENGTH, RequestFrame
from .headers import PREVIEW_HEADER, TOKEN_HEADER, upstream_head
from .overload import RETRY_AFTER, WaitQueue
from .pool import IdlePool
from .timeouts import sweep_forever
from .upstream import UpstreamProtocol

log = logging.getLogger("zerodown.http")


class HttpProxy:
    def __init__(
        self,
        router: Router,
        cfg: HttpSection,
        metrics: Registry,
        admin_token: str = "",
        access_log: AccessLog | None = None,
    ) -> None:
        self.router = router
        self.cfg = cfg
        self.admin_token = admin_token.encode()
        self.loop = asyncio.get_event_loop()
        self.clients: set[ClientProtocol] = set()
        self.pool = pool = IdlePool(cfg)
        # The pool's own dict and methods, bound once for the hot path (_attempt, upstream).
        self.idle = pool.idle
        self.pool_release = pool.release
        self.pool_discard = pool.discard
        self.balancer = Balancer(cfg, metrics)
        # Overload: at most max_requests_per_instance per instance, the rest wait (bounded).
        self.queue = WaitQueue(cfg, metrics)
        self.balancer.waiting = self.queue.waiting
        self.balancer.on_free = self.queue.freed
        self.draining = False
        self.port = 0
        self._rid_prefix = os.urandom(4).hex().encode()
        self._rid = 0
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.connections_opened = 0
        # Sized from the open-files limit at start(); until then from the current one.
        self.capacity = Capacity(cfg.max_client_connections, cfg.fd_reserve, nofile_limit())

        self.upstream_class: type[UpstreamProtocol] = UpstreamProtocol
        self.acc = acc = HttpAccounting(metrics, self.balancer, access_log)
        self.set_access_log(access_log)
        # Bound once: the hot path calls proxy.count_response etc. with no extra lookup.
        self.count_response = acc.count_response
        self.count_client_error = acc.count_client_error
        self.count_client_abort = acc.count_client_abort
        register_gauges(metrics, self)
        router.subscribe(pool.on_snapshot)
        pool.on_snapshot(router.snapshot, router.snapshot)

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(
        self, host: str, port: int, reuse_port: bool = False, sock: socket.socket | None = None
    ) -> None:
        """Listen on host:port, or serve on `sock` (already listening: takeover/listeners.py)."""
        self.loop = asyncio.get_running_loop()
        self.capacity = Capacity(
            self.cfg.max_client_connections, self.cfg.fd_reserve, raise_nofile_limit()
        )
        if sock is not None:
            self._server = await self.loop.create_server(lambda: ClientProtocol(self), sock=sock)
        else:
            self._server = await self.loop.create_server(
                lambda: ClientProtocol(self),
                host,
                port,
                backlog=2048,
                reuse_address=True,
                reuse_port=reuse_port or None,
            )
        self.port = self._server.sockets[0].getsockname()[1]
        self.queue.start(self.loop, self._resume)
        self._sweeper = self.loop.create_task(sweep_forever(self))

    async def close(self, grace: float) -> None:
        """Stop accepting, let requests in flight finish (up to `grace` s), then cut the rest."""
        self.draining = True
        self.pool.closing = True
        if self._server is not None:
            self._server.close()
        for c in list(self.clients):
            if c.idle():
                c.close()
        deadline = time.monotonic() + grace
        while any(not c.idle() for c in self.clients) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for c in list(self.clients):
            c.abort()
        self.pool.close_all()
        if self._sweeper is not None:
            self._sweeper.cancel()

    # -- per request --------------------------------------------------------------------------

    def set_access_log(self, access_log: AccessLog | None) -> None:
        """With the access log on, backend connections also note what it reports (time to the
        response head, body bytes); off, the data path runs exactly as without it."""
        cls = UpstreamProtocol if access_log is None else LoggedUpstream
        if cls is not self.upstream_class:
            # Idle connections of the other kind are closed (a live reload), so the next
            # requests get connections that note what the log reports.
            self.pool.close_all()
        self.acc.access_log = access_log
        self.upstream_class = cls

    def new_request_id(self) -> bytes:
        self._rid += 1
        return b"%s-%x" % (self._rid_prefix, self._rid)

    def prepare(
        self,
        client: ClientProtocol,
        method: bytes,
        frame: RequestFrame,
        headers: list[tuple[bytes, bytes]],
        lnames: list[bytes],
    ) -> RequestCycle:
        """A RequestCycle for an accepted head: its upstream head built, or a local answer."""
        cycle = RequestCycle(client, self.cfg, method, frame)
        cycle.head, rid = upstream_head(
            method, frame, headers, lnames, client.peer_b, client.local_host,
            self.new_request_id,
        )  # fmt: skip
        cycle.request_id = rid.decode("latin-1")
        if not cycle.host:
            cycle.host = client.local_host
        if frame.body == LENGTH and frame.length > self.cfg.max_body_bytes:
            cycle.local = (413, f"request body of {frame.length} bytes exceeds the limit of "
                                f"{self.cfg.max_body_bytes} bytes")  # fmt: skip
            self.count_client_error(413)
        elif PREVIEW_HEADER in lnames:
            value = headers[lnames.index(PREVIEW_HEADER)][1]
            cycle.preview = value.strip().lower() == b"standby"
            token = (
                headers[lnames.index(TOKEN_HEADER)][1].strip() if TOKEN_HEADER in lnames else b""
            )
            if cycle.preview and not (
                self.admin_token and hmac.compare_digest(token, self.admin_token)
            ):
                cycle.local = (403, "standby preview needs a valid X-Zerodown-Token")
                self.count_client_error(403)
        wanted = self.router.snapshot.pilot_headers
        if wanted:
            cycle.pilot_headers = {n: headers[k][1] for k, n in enumerate(lnames) if n in wanted}
        return cycle

    def send_request(self, cycle: RequestCycle) -> None:
        router = self.router
        # Read once: this request's routing (Router.current(), its common case inlined).
        snap: Snapshot = router.snapshot if router.pending is None else router.current()
        host = cycle.host.decode("latin-1")
        path = cycle.path.decode("latin-1")
        app = snap.route(host, path if path != "*" else "/")
        if app is None:
            cycle.client.respond_error(
                cycle, 503, f"no app is routed for host {host or '-'} path {path}"
            )
            return
        cycle.app = app
        if app.pilots is not None and not cycle.preview:
            # A pilot (client address or header rule) goes where the Standby preview goes.
            addr = canonical_address(cycle.client.peer)
            cycle.preview = app.pilots.http(addr, cycle.pilot_headers) and bool(app.standby)
        self._attempt(cycle)

    def _attempt(self, cycle: RequestCycle, inst: Instance | None = None) -> None:
        """Pick an instance and send `cycle` to it (`inst`: already picked, by the queue)."""
        bal = self.balancer
        if inst is None:
            app = cycle.app
            assert app is not None
            group = app.standby if cycle.preview else app.active
            inst = bal.pick(group, cycle.tried)
            if inst is None:
                role, name = (
                    ("Standby", app.standby_group)
                    if cycle.preview
                    else ("Active", app.active_group)
                )
                cycle.client.respond_error(
                    cycle, 503, f"app {app.name}: {role} group {name} has no healthy instance"
                )
                return
            queue = self.queue
            if queue.waiting or bal.inflight.get(inst.http_key, 0) >= queue.limit:
                inst = self._no_room(cycle, group)
                if inst is None:
                    return
        prev = cycle.instance
        if prev is not None:
            bal.finished(prev, 0)
        cycle.instance = inst
        # A retry when an attempt came before (it may have waited in the queue since).
        bal.started(inst, retry=bool(cycle.tried))
        cycle.tried.append(inst)
        conns = self.idle.get(inst.http_key)
        while conns:
            up = conns.pop()
            if not up.closed:
                up.reused = True
                up.attach(cycle)
                return
        self._connect(cycle, inst)

    def _resume(self, cycle: RequestCycle, inst: Instance) -> None:
        """A waiting request has room on `inst`; if the routing changed while it waited (a
        switch), it is routed again instead, as a request arriving now (it may wait once more)."""
        router = self.router
        snap = router.snapshot if router.pending is None else router.current()
        app = cycle.app
        if app is not None and snap.apps.get(app.name) is app:
            self._attempt(cycle, inst)
        else:
            self.send_request(cycle)

    def _no_room(self, cycle: RequestCycle, group: tuple[Instance, ...]) -> Instance | None:
        """Requests are waiting, or the picked instance is at max_requests_per_instance: another
        instance with room, or None: `cycle` waits behind the others (FIFO) or, with
        max_queue_time 0, is shed."""
        app = cycle.app
        assert app is not None
        queue = self.queue
        bal = self.balancer
        if (app.name, cycle.preview) not in queue.waiting:
            inst = queue.room(group, bal.inflight, queue.limit, bal.avoid, cycle.tried)
            if inst is not None:
                return inst
        prev, cycle.instance = cycle.instance, None
        if prev is not None:
            bal.finished(prev, 0)  # a retry: its failed attempt holds no slot while it waits
        if not queue.wait(cycle, time.monotonic()):
            queue.shed(cycle, "queue_full")
        return None

    def _connect(self, cycle: RequestCycle, inst: Instance) -> None:
        cap = self.capacity
        if not cap.upstream_room(len(self.clients)) and not self.pool.evict_one():
            self.balancer.finished(inst, 0)
            cycle.instance = None
            cycle.client.respond_error(
                cycle, 503, f"the proxy has no file descriptor left for a backend connection "
                            f"(budget {cap.fd_budget}); try again later", RETRY_AFTER,
            )  # fmt: skip
            return
        cap.upstreams += 1
        loop = self.loop
        task = loop.create_task(
            loop.create_connection(
                lambda: self.upstream_class(self, inst.http_key, inst.id),
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
            self.capacity.upstreams -= 1
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
        self.acc.m_upstream_errors.inc((app, "connect"))
        self.balancer.failed(inst, "connect")
        log.warning("connect to %s (%s:%s) failed: %s", inst.id, inst.address, inst.http_port, err)
        if cycle.aborted:
            return
        if self._may_retry(cycle):
            # Nothing reached any backend yet, so any method may go elsewhere.
            self.acc.m_retries.inc((app,))
            self._attempt(cycle)
            return
        cycle.client.respond_error(cycle, 502, f"could not connect to backend {inst.id}: {err}")

    def _may_retry(self, cycle: RequestCycle) -> bool:
        """One retry per request, on an instance not tried yet, within the retry budget."""
        app = cycle.app
        assert app is not None
        if len(cycle.tried) >= 2:
            return False
        instances = app.standby if cycle.preview else app.active
        if all(i in cycle.tried for i in instances):
            return False
        return self.balancer.retries.try_retry()

    def upstream_lost_before_response(self, cycle: RequestCycle, up: UpstreamProtocol) -> None:
        """The backend closed without sending a byte. A reused pooled connection may simply
        have hit the backend's keep-alive timeout: retry idempotent requests once."""
        up.detach()
        app = cycle.app.name if cycle.app else "-"
        if cycle.aborted:
            return
        if up.reused and cycle.retained is not None and len(cycle.tried) < 2 and not cycle.status:
            # A pool artifact, not a sign of a slow backend: outside the retry budget.
            self.acc.m_retries.inc((app,))
            self._attempt(cycle)
            return
        self.upstream_error(cycle, up, "reset", "backend closed the connection before answering")

    def upstream_error(
        self, cycle: RequestCycle, up: UpstreamProtocol, kind: str, message: str
    ) -> None:
        up.detach()
        up.abort()
        inst = cycle.instance
        app = cycle.app.name if cycle.app else "-"
        self.acc.m_upstream_errors.inc((app, kind))
        if inst is not None:
            self.balancer.failed(inst, kind)
            log.warning("backend %s: %s (%s)", inst.id, message, kind)
        if cycle.aborted:
            return
        if cycle.status == 0:
            status = 504 if kind == "timeout" else 502
            who = inst.id if inst else "backend"
            cycle.client.respond_error(cycle, status, f"backend {who}: {message}")
        else:
            # Headers already went out: the only honest signal left is cutting the connection.
            self.abandon(cycle)
            cycle.client.abort()

    def first_byte_timeout(self, cycle: RequestCycle, up: UpstreamProtocol) -> None:
        """No response head within first_byte_timeout after the request was sent: the instance
        is hung or overloaded. An idempotent request whose body was kept is retried once
        elsewhere (within the retry budget); anything else gets 504."""
        up.detach()
        up.abort()
        inst = cycle.instance
        app = cycle.app.name if cycle.app else "-"
        limit = min(self.cfg.first_byte_timeout, self.cfg.read_timeout)
        self.acc.m_upstream_errors.inc((app, "first_byte_timeout"))
        who = inst.id if inst is not None else "backend"
        if inst is not None:
            self.balancer.failed(inst, "first_byte_timeout")
        log.warning("backend %s: no response head within %gs (first_byte_timeout)", who, limit)
        if cycle.aborted:
            return
        if cycle.retained is not None and self._may_retry(cycle):
            self.acc.m_retries.inc((app,))
            self._attempt(cycle)
            return
        cycle.client.respond_error(
            cycle, 504, f"backend {who}: no response within {limit:g}s (no response head)"
        )

    def upstream_extra_bytes(self, cycle: RequestCycle, up: UpstreamProtocol) -> None:
        """The backend sent bytes after a complete response (a body longer than announced, a
        body on 204/304, a response nobody asked for): this exchange is answered, the
        connection is closed instead of pooled, and the event is counted."""
        app = cycle.app.name if cycle.app else "-"
        self.acc.m_upstream_errors.inc((app, "protocol"))
        inst = cycle.instance
        if inst is not None:
            self.balancer.failed(inst, "protocol")
        log.warning("backend %s sent bytes after a complete response; connection closed",
                    up.instance_id)  # fmt: skip

    def abandon(self, cycle: RequestCycle) -> None:
        """The client connection is cut mid-response: count it and free its slot."""
        self.count_response(cycle)
        client = cycle.client
        if client.current is cycle:
            client.current = None

    # -- capacity -----------------------------------------------------------------------------

    def admit(self, client: ClientProtocol) -> str | None:
        refusal = self.capacity.admit(len(self.clients))
        if refusal is None:
            self.clients.add(client)
        else:
            self.count_client_error(503)
        return refusal

    def client_gone(self, client: ClientProtocol) -> None:
        self.clients.discard(client)

    def upstream_gone(self, up: UpstreamProtocol) -> None:
        self.capacity.upstreams -= 1

    def status(self) -> dict[str, Any]:
        return {
            "port": self.port,
            "client_connections": len(self.clients),
            **self.capacity.status(),
            "idle_upstream_connections": self.pool.status(),
            **self.balancer.status(),
        }
