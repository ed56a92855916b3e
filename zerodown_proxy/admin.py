"""Admin API (aiohttp, loopback by default): health, status, metrics, and token-guarded reload."""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from .metrics import Registry
from .routing import AppRoute, Instance, Router


def _instance(i: Instance, ejected: dict[str, float]) -> dict[str, Any]:
    return {
        "id": i.id,
        "version": i.version,
        "address": i.address,
        "http_port": i.http_port,
        "hsms_port": i.hsms_port,
        "healthy": i.healthy,
        "ejected": f"{i.address}:{i.http_port}" in ejected,
    }


def _app(a: AppRoute, ejected: dict[str, float]) -> dict[str, Any]:
    return {
        "hosts": list(a.hosts),
        "path_prefix": a.path_prefix,
        "active": {
            "group": a.active_group,
            "version": a.active_version,
            "instances": [_instance(i, ejected) for i in a.active],
        },
        "standby": {
            "group": a.standby_group,
            "version": a.standby_version,
            "instances": [_instance(i, ejected) for i in a.standby],
        },
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
    ) -> None:
        self.router = router
        self.metrics = metrics
        self.token = token
        self.name = name
        self.parts = parts  # name -> status() of the http proxy, hsms proxy, discovery provider
        self.reload = reload
        self.started = time.time()
        self.app = web.Application()
        self.app.router.add_get("/health", self.health)
        self.app.router.add_get("/v1/status", self.status)
        self.app.router.add_get("/metrics", self.prom)
        self.app.router.add_post("/v1/reload", self.do_reload)
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def health(self, request: web.Request) -> web.Response:
        snap = self.router.snapshot
        ok = snap.generation > 0 and all(a.active for a in snap.apps.values())
        body = {"status": "ok" if ok else "no-routing", "generation": snap.generation}
        return web.json_response(body, status=200 if ok else 503, dumps=_dumps)

    async def status(self, request: web.Request) -> web.Response:
        snap = self.router.current()
        http = self.parts.get("http", dict)()
        ejected = http.get("ejected", {})
        body: dict[str, Any] = {
            "name": self.name,
            "generation": snap.generation,
            "snapshot_source": snap.source,
            "snapshot_age_s": round(time.time() - snap.created_at, 3) if snap.generation else None,
            "applied_at": self.router.applied_at or None,
            "switches": self.router.switches,
            "rejected_snapshots": self.router.rejected,
            "last_error": self.router.last_error,
            "switch_pending": _pending(self.router),
            "uptime_s": round(time.time() - self.started, 1),
            "apps": {name: _app(a, ejected) for name, a in snap.apps.items()},
        }
        for part, fn in self.parts.items():
            body[part] = fn()
        return web.json_response(body, dumps=_dumps)

    async def prom(self, request: web.Request) -> web.Response:
        return web.Response(text=self.metrics.render(), content_type="text/plain", charset="utf-8")

    async def do_reload(self, request: web.Request) -> web.Response:
        supplied = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        # Header text may hold any byte (aiohttp decodes it with surrogateescape): compare as
        # bytes, so a non-ASCII value is a wrong token (401), not an encoding error (500).
        given = supplied.encode("utf-8", "surrogateescape")
        if not self.token or not hmac.compare_digest(given, self.token.encode()):
            return web.json_response(
                {"error": "this call needs 'Authorization: Bearer <admin token>'"}, status=401
            )
        if self.reload is None:
            return web.json_response({"error": "this discovery provider cannot reload"}, 409)
        applied = self.reload()
        return web.json_response(
            {"applied": applied, "generation": self.router.snapshot.generation}, dumps=_dumps
        )


def _pending(router: Router) -> dict[str, Any] | None:
    """A switch this worker has prepared and is waiting to apply (multi-worker mode)."""
    snap = router.pending
    if snap is None:
        return None
    waited = time.monotonic() - router.pending_since
    return {"generation": snap.generation, "waiting_s": round(waited, 3)}


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()
