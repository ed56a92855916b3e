"""Multi-worker mode (`[proxy] workers = N`): N proxy processes share the listening ports with
SO_REUSEPORT; each follows the registry itself (one routing follower per worker), so the data
path never crosses a process boundary.

The supervisor reserves the ports (bound, not listening, so it never receives a connection),
starts the workers as `zerodown proxy ... --reuse-port`, restarts one that dies, and serves the
admin API for the whole proxy: /v1/status reports the *lowest* generation any worker has applied
(a switch counts as applied only when every worker has it), /metrics merges the workers' metrics
with a `worker` label.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from .config import Config, parse_addr

log = logging.getLogger("zerodown.workers")


def reserve_port(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((host, port))
    return s


def merge_metrics(texts: list[str]) -> str:
    """Merge Prometheus text from several workers: one HELP/TYPE per family, samples labelled
    with the worker index, families kept contiguous."""
    families: dict[str, tuple[list[str], list[str]]] = {}
    for index, text in enumerate(texts):
        current: list[str] | None = None
        for line in text.splitlines():
            if not line:
                continue
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                name = line.split(" ", 3)[2]
                meta, samples = families.setdefault(name, ([], []))
                if line not in meta:
                    meta.append(line)
                current = samples
                continue
            if current is None:
                continue
            name, _, rest = line.partition(" ")
            if "{" in name:
                base, _, labels = name.partition("{")
                name = f'{base}{{worker="{index}",{labels}'
            else:
                name = f'{name}{{worker="{index}"}}'
            current.append(f"{name} {rest}")
    out: list[str] = []
    for meta, samples in families.values():
        out.extend(meta)
        out.extend(samples)
    return "\n".join(out) + "\n"


class Supervisor:
    def __init__(self, cfg: Config, config_path: str | None, ready_file: str | None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.ready_file = ready_file
        self.n = cfg.proxy.workers
        self.run_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"zerodown-{os.getpid()}"
        self.procs: list[asyncio.subprocess.Process | None] = [None] * self.n
        self.admins: list[str | None] = [None] * self.n
        self.stopping = False
        self.restarts = 0
        self.reserved: list[socket.socket] = []
        self.listen: dict[str, str] = {}
        self.session: aiohttp.ClientSession | None = None

    def reserve(self) -> dict[str, int]:
        ports = {}
        keys = [("http", self.cfg.proxy.http_listen)]
        if self.cfg.hsms.enabled:
            keys.append(("hsms", self.cfg.proxy.hsms_listen))
        for key, addr in keys:
            host, port = parse_addr(addr)
            s = reserve_port(host, port)
            self.reserved.append(s)
            ports[key] = s.getsockname()[1]
            self.listen[key] = f"[{host}]:{ports[key]}" if ":" in host else f"{host}:{ports[key]}"
        return ports

    async def spawn(self, index: int) -> None:
        ready = self.run_dir / f"worker-{index}.ready"
        ready.unlink(missing_ok=True)
        args = [sys.executable, "-m", "orchestrator", "proxy", "--reuse-port", "--workers", "1"]
        if self.config_path:
            args += ["--config", self.config_path]
        args += ["--http-listen", self.listen["http"], "--admin-listen", "127.0.0.1:0"]
        if "hsms" in self.listen:
            args += ["--hsms-listen", self.listen["hsms"]]
        args += ["--name", f"{self.cfg.proxy.name or socket.gethostname()}-w{index}"]
        if index > 0:
            args.append("--no-register")  # one registration (the supervisor's admin) is enough
        args += ["--ready-file", str(ready)]
        proc = await asyncio.create_subprocess_exec(*args, stdin=asyncio.subprocess.DEVNULL)
        self.procs[index] = proc
        deadline = time.monotonic() + 30
        while not ready.exists():
            if proc.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {index} did not start (exit code {proc.returncode})")
            await asyncio.sleep(0.02)
        ports = orjson.loads(ready.read_bytes())
        self.admins[index] = f"127.0.0.1:{ports['admin']}"
        asyncio.get_running_loop().create_task(self.watch(index, proc))

    async def watch(self, index: int, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if self.stopping or self.procs[index] is not proc:
            return
        self.restarts += 1
        log.error("worker %d exited with code %s; restarting it", index, code)
        self.admins[index] = None
        while not self.stopping:
            try:
                await self.spawn(index)
                return
            except RuntimeError as exc:
                log.error("restart failed: %s", exc)
                await asyncio.sleep(1)

    # -- admin --------------------------------------------------------------------------------

    async def _get(self, admin: str | None, path: str) -> Any:
        if admin is None or self.session is None:
            return None
        try:
            async with self.session.get(
                f"http://{admin}{path}", timeout=aiohttp.ClientTimeout(total=2)
            ) as r:
                return await (r.text() if path == "/metrics" else r.json())
        except (TimeoutError, aiohttp.ClientError, ValueError):
            return None

    async def status(self, request: web.Request) -> web.Response:
        results = await asyncio.gather(*(self._get(a, "/v1/status") for a in self.admins))
        gens = [r["generation"] if r else None for r in results]
        known = [g for g in gens if g is not None]
        body = dict(results[0] or {})
        body.update(
            {
                "name": self.cfg.proxy.name or socket.gethostname(),
                "generation": min(known) if len(known) == self.n else 0,
                "workers": [
                    {"index": i, "pid": p.pid if p else None, "admin": a, "generation": g}
                    for i, (p, a, g) in enumerate(zip(self.procs, self.admins, gens, strict=True))
                ],
                "worker_restarts": self.restarts,
            }
        )
        return web.json_response(body, dumps=lambda o: orjson.dumps(o).decode())

    async def health(self, request: web.Request) -> web.Response:
        results = await asyncio.gather(*(self._get(a, "/health") for a in self.admins))
        ok = all(r and r.get("status") == "ok" for r in results)
        return web.json_response(
            {"status": "ok" if ok else "degraded", "workers": results}, status=200 if ok else 503
        )

    async def metrics(self, request: web.Request) -> web.Response:
        texts = await asyncio.gather(*(self._get(a, "/metrics") for a in self.admins))
        return web.Response(text=merge_metrics([t or "" for t in texts]), content_type="text/plain")

    async def reload(self, request: web.Request) -> web.Response:
        supplied = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        token = self.cfg.proxy.admin_token
        if not token or not hmac.compare_digest(supplied.encode(), token.encode()):
            return web.json_response(
                {"error": "this call needs 'Authorization: Bearer <admin token>'"}, status=401
            )
        results = []
        assert self.session is not None
        for admin in self.admins:
            async with self.session.post(
                f"http://{admin}/v1/reload", headers={"Authorization": f"Bearer {token}"}
            ) as r:
                results.append(await r.json())
        return web.json_response({"workers": results})

    # -- lifecycle ----------------------------------------------------------------------------

    async def run(self) -> int:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ports = self.reserve()
        self.session = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_get("/v1/status", self.status)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/v1/reload", self.reload)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        host, port = parse_addr(self.cfg.proxy.admin_listen, "127.0.0.1")
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        ports["admin"] = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        os.environ["ZERODOWN_SUPERVISOR_ADMIN"] = f"{host}:{ports['admin']}"
        try:
            await asyncio.gather(*(self.spawn(i) for i in range(self.n)))
        except RuntimeError as exc:
            log.error("%s", exc)
            await self.stop()
            await runner.cleanup()
            return 1
        ports["pid"] = os.getpid()
        if self.ready_file:
            tmp = Path(self.ready_file + ".tmp")
            tmp.write_bytes(orjson.dumps(ports))
            os.replace(tmp, self.ready_file)
        log.info("supervising %d workers", self.n, extra={"fields": {"ports": ports}})
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await self.stop()
        await runner.cleanup()
        return 0

    async def stop(self) -> None:
        self.stopping = True
        for p in self.procs:
            if p is not None and p.returncode is None:
                p.send_signal(signal.SIGTERM)
        grace = self.cfg.proxy.shutdown_grace + 5
        for p in self.procs:
            if p is None:
                continue
            try:
                await asyncio.wait_for(p.wait(), grace)
            except TimeoutError:
                p.kill()
        if self.session is not None:
            await self.session.close()
        for s in self.reserved:
            s.close()


def run_supervisor(cfg: Config, config_path: str | None, ready_file: str | None) -> int:
    import uvloop

    return uvloop.run(Supervisor(cfg, config_path, ready_file).run())
