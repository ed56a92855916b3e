"""Admin API (aiohttp, loopback by default): health, status, metrics, and the token-guarded
reload (configuration and registry) and takeover."""

from __future__ import annotations

import hmac
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from .dashboard.routes import Dashboard
from .metrics import Registry
from .routing import AppRoute, Instance, Router
from .watcher import Watcher

Checks = Callable[[tuple[str, int]], dict[str, Any] | None]


def _instance(i: Instance, ejected: dict[str, Any], checks: Checks) -> dict[str, Any]:
    addr = f"{i.address}:{i.http_port}"
    return {
        "id": i.id,
        "version": i.version,
        "address": i.address,
        "http_port": i.http_port,
        "hsms_port": i.hsms_port,
        "healthy": i.healthy,  # what the registry / Consul says
        "check": checks(i.http_key),  # the proxy's own active health check (None: off)
        "ejected": addr in ejected,
        "ejection": ejected.get(addr),  # reason, remaining_s, until, ejections (None: not)
    }


def _app(a: AppRoute, ejected: dict[str, Any], checks: Checks) -> dict[str, Any]:
    return {
        "hosts": list(a.hosts),
        "path_prefix": a.path_prefix,
        "active": {
            "group": a.active_group,
            "version": a.active_version,
            "instances": [_instance(i, ejected, checks) for i in a.active],
        },
        "standby": {
            "group": a.standby_group,
            "version": a.standby_version,
            "instances": [_instance(i, ejected, checks) for i in a.standby],
        },
        "hsms_listen": a.hsms_listen,
        # Pilots in force (on the Standby group): contract/pilots.py.
        "pilots": {"group": a.pilots.group, "tools": list(a.pilots.tools)} if a.pilots else None,
    }


class AdminApi:
    def __init__(
        self,
        router: Router,
        metrics: Registry,
        token: str,
        name: str,
        parts: dict[str, Callable[[], dict[str, Any]]],
        reload: Callable[[], bool] | None = None,
        watcher: Watcher | None = None,
        dashboard: Dashboard | None = None,
    ) -> None:
        self.router = router
        self.watcher = watcher if watcher is not None else Watcher(router)
        self.metrics = metrics
        self.token = token
        self.name = name
        self.parts = parts  # name -> status() of the http proxy, hsms proxy, discovery provider
        self.reload = reload
        self.checks: Checks = lambda key: None  # the active health checker's verdict per instance
        self.started = time.time()
        self.app = web.Application()
        self.app.router.add_get("/health", self.health)
        self.app.router.add_get("/v1/status", self.status)
        self.app.router.add_get("/metrics", self.prom)
        self.app.router.add_post("/v1/reload", self.do_reload)
        if dashboard is not None:  # the web dashboard at / (dashboard/routes.py)
            dashboard.register(self.app)
        self.app.router.add_post("/v1/takeover", self.do_takeover)
        self.takeover: Callable[[], Awaitable[dict[str, Any]]] | None = None
        self.reload_config: Callable[[], dict[str, Any]] | None = None  # live_config.py
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, host: str, port: int, sock: socket.socket | None = None) -> None:
        """Listen on host:port, or serve on `sock` (already listening: takeover/listeners.py)."""
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site: web.BaseSite
        if sock is not None:
            site = web.SockSite(self._runner, sock)
        else:
            site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        self.site = site
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def health(self, request: web.Request) -> web.Response:
        """200 "ok" while routing and discovery is current; 503 "no-routing" (nothing to route
        with) or "stale" (discovery has not confirmed its view for [discovery] stale_after: the
        routing may be behind the registry, e.g. a switch this proxy has not seen)."""
        snap = self.router.snapshot
        w = self.watcher
        body: dict[str, Any] = {"generation": snap.generation, "discovery_age_s": w.age()}
        if snap.generation == 0 or not all(a.active for a in snap.apps.values()):
            body["status"] = "no-routing"
            body["reason"] = w.last_error or "no routing snapshot applied yet"
        elif (stale := w.stale()) is not None:
            body["status"], body["reason"] = "stale", stale
        else:
            body["status"] = "ok"
        if w.last_error:
            body["last_error"] = w.last_error
        ok = body["status"] == "ok"
        return web.json_response(body, status=200 if ok else 503, dumps=_dumps)

    async def status(self, request: web.Request) -> web.Response:
        snap = self.router.current()
        w = self.watcher
        http = self.parts.get("http", dict)()
        ejected = http.get("ejected", {})
        body: dict[str, Any] = {
            "name": self.name,
            "pid": os.getpid(),  # a takeover changes it
            "generation": snap.generation,
            "snapshot_source": snap.source,
            "snapshot_age_s": round(time.time() - snap.created_at, 3) if snap.generation else None,
            "applied_at": w.applied_at or None,
            "switches": w.switches,
            "rejected_snapshots": w.rejected,
            "last_error": w.last_error,
            "switch_pending": w.pending_status(),
            "uptime_s": round(time.time() - self.started, 1),
            "apps": {name: _app(a, ejected, self.checks) for name, a in snap.apps.items()},
        }
        for part, fn in self.parts.items():
            body[part] = fn()
        return web.json_response(body, dumps=_dumps)

    async def prom(self, request: web.Request) -> web.Response:
        return web.Response(text=self.metrics.render(), content_type="text/plain", charset="utf-8")

    def unauthorized(self, request: web.Request) -> web.Response | None:
        """401 unless the request carries the admin token; None when it does."""
        supplied = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        # Header text may hold any byte (aiohttp decodes it with surrogateescape): compare as
        # bytes, so a non-ASCII value is a wrong token (401), not an encoding error (500).
        given = supplied.encode("utf-8", "surrogateescape")
        if not self.token or not hmac.compare_digest(given, self.token.encode()):
            return web.json_response(
                {"error": "this call needs 'Authorization: Bearer <admin token>'"}, status=401
            )
        return None

    async def do_takeover(self, request: web.Request) -> web.Response:
        """Replace this proxy by a new process (takeover/): 200 with the new pid once it serves,
        409 with the reason when it could not (this process keeps serving)."""
        if (refused := self.unauthorized(request)) is not None:
            return refused
        if self.takeover is None:
            return web.json_response({"error": "this process cannot be taken over"}, 409)
        from .takeover.donor import TakeoverFailed

        try:
            result = await self.takeover()
        except TakeoverFailed as exc:
            return web.json_response({"error": f"takeover failed: {exc}"}, status=409)
        return web.json_response(result, dumps=_dumps)

    async def do_reload(self, request: web.Request) -> web.Response:
        """Re-read the configuration file (live_config.py: `config` says what was applied and
        what needs a takeover) and make the discovery provider read its source now (file
        provider: `applied`, `generation`, as before)."""
        if (refused := self.unauthorized(request)) is not None:
            return refused
        if self.reload is None and self.reload_config is None:
            return web.json_response({"error": "this discovery provider cannot reload"}, 409)
        body: dict[str, Any] = {}
        if self.reload_config is not None:
            body["config"] = self.reload_config()
        if self.reload is not None:
            body["applied"] = self.reload()  # never raises: the watcher reports failures
        body["generation"] = self.router.snapshot.generation
        return web.json_response(body, dumps=_dumps)


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()
