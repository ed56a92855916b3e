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
import socket
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiohttp import web

from .config import parse_addr
from .metrics import Registry, register_process_info
from .supervisor_merge import merge_hsms, merge_metrics

if TYPE_CHECKING:
    from .supervisor import Supervisor

WORKER_TIMEOUT = 1.0  # a hung worker must not make the supervisor's own answers time out


class SupervisorAdmin:
    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        # The supervisor's own process (memory, CPU, fds) and build, next to its workers'.
        self.own = Registry()
        register_process_info(self.own)
        self.session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None

    async def start(self) -> tuple[str, int]:
        """Listen on [proxy] admin_listen; (host, port) it listens on. OSError if it cannot."""
        self.session = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_get("/v1/status", self.status)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/v1/reload", self.reload)
        runner = self._runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        host, port = parse_addr(self.sup.cfg.proxy.admin_listen, "127.0.0.1")
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        return host, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def close_session(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def cleanup(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

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

    async def health(self, request: web.Request) -> web.Response:
        results = await asyncio.gather(*(self._get(a, "/health") for a in self.sup.admins))
        ok = all(r and r.get("status") == "ok" for r in results)
        return web.json_response(
            {"status": "ok" if ok else "degraded", "workers": results}, status=200 if ok else 503
        )

    async def metrics(self, request: web.Request) -> web.Response:
        texts = await asyncio.gather(*(self._get(a, "/metrics") for a in self.sup.admins))
        labels = [str(i) for i in range(len(texts))] + ["supervisor"]
        merged = merge_metrics([t or "" for t in texts] + [self.own.render()], labels)
        return web.Response(text=merged, content_type="text/plain")

    async def reload(self, request: web.Request) -> web.Response:
        supplied = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        token = self.sup.cfg.proxy.admin_token
        if not token or not hmac.compare_digest(supplied.encode(), token.encode()):
            return web.json_response(
                {"error": "this call needs 'Authorization: Bearer <admin token>'"}, status=401
            )
        results = []
        assert self.session is not None
        for admin in self.sup.admins:
            async with self.session.post(
                f"http://{admin}/v1/reload", headers={"Authorization": f"Bearer {token}"}
            ) as r:
                results.append(await r.json())
        return web.json_response({"workers": results})
