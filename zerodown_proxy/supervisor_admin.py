"""The supervisor's admin API: one view of all its workers, served on the proxy's admin address.

/v1/status reports the *lowest* generation any worker has applied (a switch counts as applied
only when every worker has it) with each worker's pid, admin address and pending switch, and
the switch gate's state; /health is ok only when every worker is; /metrics merges the workers'
metrics with a `worker` label; /v1/reload (admin token) reloads every worker. A worker that does
not answer within WORKER_TIMEOUT counts as absent, so a hung one never hangs these answers.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import socket
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiohttp import web

from .config import parse_addr
from .dashboard.release import ReleaseDesk
from .dashboard.routes import Dashboard
from .dashboard.series import merge as merge_samples
from .supervisor_merge import merge_hsms, merge_metrics
from .takeover.donor import TakeoverFailed
from .takeover.listeners import bind

if TYPE_CHECKING:
    from .supervisor import Supervisor

WORKER_TIMEOUT = 1.0  # a hung worker must not make the supervisor's own answers time out


class SupervisorAdmin:
    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.SockSite | None = None
        self._sock: socket.socket | None = None

    async def start(self, sock: socket.socket | None = None) -> tuple[str, int]:
        """Listen on [proxy] admin_listen (or serve on `sock`, inherited from the supervisor this
        one replaces); (host, port) it listens on. OSError if it cannot."""
        self.session = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_get("/v1/status", self.status)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/v1/reload", self.reload)
        sup = self.sup
        dashboard = Dashboard(
            lambda: sup.cfg.proxy.admin_token,
            ReleaseDesk(sup.cfg, sup.config_path),
            self.samples,
            self.proxies,
        )
        dashboard.register(app)  # the web dashboard at /, over all workers (dashboard/)
        app.router.add_post("/v1/takeover", self.takeover)
        runner = self._runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        host, port = parse_addr(self.sup.cfg.proxy.admin_listen, "127.0.0.1")
        if sock is None:
            sock = bind(host, port)
        self._sock = sock  # kept: a takeover hands this very socket over
        site = self._site = web.SockSite(runner, sock.dup())
        await site.start()
        return sock.getsockname()[0], sock.getsockname()[1]

    def listening_fd(self) -> int:
        assert self._sock is not None
        return self._sock.fileno()

    async def stop_listening(self) -> None:
        """Takeover: the new supervisor serves the admin address now."""
        if self._site is not None:
            await self._site.stop()

    async def close_session(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def cleanup(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._sock is not None:
            self._sock.close()

    async def _get(self, admin: str | None, path: str) -> Any:
        if admin is None or self.session is None:
            return None
        try:
            async with self.session.get(
                f"http://{admin}{path}", timeout=aiohttp.ClientTimeout(total=WORKER_TIMEOUT)
            ) as r:
                return await (r.text() if path == "/metrics" else r.json())
        except (TimeoutError, aiohttp.ClientError, ValueError):
            return None

    async def status(self, request: web.Request) -> web.Response:
        sup = self.sup
        results = await asyncio.gather(*(self._get(a, "/v1/status") for a in sup.admins))
        gens = [r["generation"] if r else None for r in results]
        known = [g for g in gens if g is not None]
        body = dict(results[0] or {})
        hsms = merge_hsms([r.get("hsms") if r else None for r in results])
        if hsms is not None:
            body["hsms"] = hsms
        body.update(
            {
                "name": sup.cfg.proxy.name or socket.gethostname(),
                "pid": os.getpid(),  # the supervisor's: a takeover changes it
                "generation": min(known) if len(known) == sup.n else 0,
                "workers": [
                    {
                        "index": i,
                        "pid": p.pid if p else None,
                        "admin": a,
                        "generation": g,
                        "switch_pending": r.get("switch_pending") if r else None,
                    }
                    for i, (p, a, g, r) in enumerate(
                        zip(sup.procs, sup.admins, gens, results, strict=True)
                    )
                ],
                "worker_restarts": sup.restarts,
                "switch": sup.switch_status(),
            }
        )
        return web.json_response(body, dumps=lambda o: orjson.dumps(o).decode())

    async def samples(self, since: int) -> dict[str, Any]:
        """Every worker's per-second traffic samples, summed (dashboard/series.py)."""
        path = f"/v1/dashboard/samples?since={since}"
        return merge_samples(await asyncio.gather(*(self._get(a, path) for a in self.sup.admins)))

    async def proxies(self) -> dict[str, Any] | None:
        """The proxies registered in Consul, as the first worker that answers sees them."""
        for admin in self.sup.admins:
            found = await self._get(admin, "/v1/dashboard/proxies")
            if found is not None:
                return found
        return {"error": "no worker answered"}

    async def health(self, request: web.Request) -> web.Response:
        results = await asyncio.gather(*(self._get(a, "/health") for a in self.sup.admins))
        ok = all(r and r.get("status") == "ok" for r in results)
        return web.json_response(
            {"status": "ok" if ok else "degraded", "workers": results}, status=200 if ok else 503
        )

    async def metrics(self, request: web.Request) -> web.Response:
        texts = await asyncio.gather(*(self._get(a, "/metrics") for a in self.sup.admins))
        return web.Response(text=merge_metrics([t or "" for t in texts]), content_type="text/plain")

    def unauthorized(self, request: web.Request) -> web.Response | None:
        supplied = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        token = self.sup.cfg.proxy.admin_token
        if not token or not hmac.compare_digest(supplied.encode(), token.encode()):
            return web.json_response(
                {"error": "this call needs 'Authorization: Bearer <admin token>'"}, status=401
            )
        return None

    async def takeover(self, request: web.Request) -> web.Response:
        """Replace the supervisor and all its workers (takeover/supervisor_takeover.py)."""
        if (refused := self.unauthorized(request)) is not None:
            return refused
        try:
            result = await self.sup.donor.takeover()
        except TakeoverFailed as exc:
            return web.json_response({"error": f"takeover failed: {exc}"}, status=409)
        return web.json_response(result)

    async def reload(self, request: web.Request) -> web.Response:
        if (refused := self.unauthorized(request)) is not None:
            return refused
        token = self.sup.cfg.proxy.admin_token
        results = []
        assert self.session is not None
        for admin in self.sup.admins:
            async with self.session.post(
                f"http://{admin}/v1/reload", headers={"Authorization": f"Bearer {token}"}
            ) as r:
                results.append(await r.json())
        return web.json_response({"workers": results})
