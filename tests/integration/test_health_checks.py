"""Active health checks against real sockets on 127.0.0.1: hostile and broken backends, verdicts
that follow the routing, and what a real proxy process routes and reports."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import aiohttp
from aiohttp import web

from zerodown_proxy.config import HealthCheckSection
from zerodown_proxy.health.active import ActiveHealthChecker
from zerodown_proxy.metrics import Registry
from zerodown_proxy.routing import AppState, Instance, RegistryState, Router
from zerodown_proxy.watcher import Watcher

from ..helpers import async_wait_until, instance, registry, write_registry

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n"


class RawBackend:
    """A TCP server that logs what it receives and answers each request head with `reply`
    (None: never answers)."""

    def __init__(self, reply: bytes | None, close: bool = False) -> None:
        self.reply = reply
        self.close_after = close  # close the connection after each answer
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> RawBackend:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests.append(head)
                if self.reply is not None:
                    writer.write(self.reply)
                    await writer.drain()
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:
            pass  # the test is over
        finally:
            writer.close()

    def close(self) -> None:
        assert self.server is not None
        self.server.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _state(gen: int, ports: dict[str, int]) -> RegistryState:
    insts = tuple(Instance(n, "a", "blue", "v1", "127.0.0.1", p) for n, p in ports.items())
    return RegistryState(gen, (AppState("a", "blue", insts),))


async def test_checker_marks_broken_backends_down_and_reuses_connections():
    good = await RawBackend(OK).start()
    bad = await RawBackend(b"HTTP/1.1 503 Unavailable\r\nContent-Length: 0\r\n\r\n").start()
    hang = await RawBackend(None).start()
    garbage = await RawBackend(b"SSH-2.0-OpenSSH\r\n\r\n").start()
    big_body = b"x" * (1024 * 1024)
    big = await RawBackend(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(big_body), big_body)).start()  # fmt: skip
    closer = await RawBackend(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nok", close=True).start()
    slam = await RawBackend(b"", close=True).start()  # reads the request, closes, no answer
    ports = {"good": good.port, "bad": bad.port, "hang": hang.port, "garbage": garbage.port,
             "big": big.port, "refused": _free_port(), "closer": closer.port,
             "slam": slam.port}  # fmt: skip
    router = Router()
    watcher = Watcher(router)
    watcher.submit(_state(1, ports))
    metrics = Registry()
    cfg = HealthCheckSection(interval=0.1, timeout=0.3, healthy_threshold=2, unhealthy_threshold=2)
    checker = ActiveHealthChecker(router, cfg, metrics)
    checker.start()
    newcomer = await RawBackend(None).start()
    try:
        key = {n: ("127.0.0.1", p) for n, p in ports.items()}
        want_down = {key[n] for n in ("bad", "hang", "garbage", "refused", "slam")}
        await async_wait_until(lambda: checker.down == want_down, 15, "broken backends down")
        await async_wait_until(lambda: len(good.requests) >= 5, 15, "five probes of good")
        assert checker.down == want_down  # and the good ones stayed up
        # Kept-alive probes: one connection for all of good's probes; each is a plain GET.
        assert good.connections == 1
        assert good.requests[0] == (
            b"GET /health HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUser-Agent: zerodown-health-check\r\n"
            b"Accept: */*\r\n\r\n" % good.port
        )
        # A backend that never answers: each probe times out, nothing piles up.
        assert len(checker._connecting) <= 1 and hang.connections <= len(hang.requests) + 1
        st = checker.verdict(key["hang"])
        assert st["status"] == "down" and "no answer within 0.3s" in st["last"]
        assert "answered 503" in checker.verdict(key["bad"])["last"]
        assert "malformed" in checker.verdict(key["garbage"])["last"]
        assert "connect failed" in checker.verdict(key["refused"])["last"]
        assert "connection lost" in checker.verdict(key["slam"])["last"]
        # A backend that closes after each answer: one connection per probe, still up.
        assert closer.connections >= len(closer.requests) >= 2
        assert checker.verdict(key["closer"])["status"] == "up"
        assert checker.verdict(key["big"])["status"] == "up"
        assert checker.is_down(Instance("x", "a", "blue", "v1", "127.0.0.1", bad.port))
        text = metrics.render()
        assert "zerodown_health_instances_down 5" in text
        assert 'zerodown_health_transitions_total{instance="bad",to="down"} 1' in text

        # bad recovers: up after healthy_threshold passes; a new instance is probed, a removed
        # one is dropped.
        bad.reply = OK
        newcomer.reply = OK
        ports2 = {**ports, "newcomer": newcomer.port}
        del ports2["refused"]
        watcher.submit(_state(2, ports2))
        assert key["refused"] not in checker.targets and key["refused"] not in checker.down
        await async_wait_until(lambda: key["bad"] not in checker.down, 15, "bad back up")
        await async_wait_until(lambda: newcomer.requests, 15, "newcomer probed")
        assert checker.verdict(key["bad"])["status"] == "up"
        assert checker.verdict(key["bad"])["consecutive_passes"] >= 2
    finally:
        await checker.close()
        for b in (good, bad, hang, garbage, big, closer, slam, newcomer):
            b.close()


def _app(health: dict[str, int], name: str) -> web.Application:
    async def index(request: web.Request) -> web.Response:
        return web.Response(text=name)

    async def check(request: web.Request) -> web.Response:
        return web.Response(status=health["status"], text="health\n")

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/healthz", check)
    return app


async def test_proxy_routes_around_an_instance_its_checks_mark_down(
    tmp_path: Path, backend_factory, start_proxy
):
    health_a, health_b = {"status": 200}, {"status": 200}
    port_a = await backend_factory("v1", "a", _app(health_a, "a"))
    port_b = await backend_factory("v1", "b", _app(health_b, "b"))
    reg = tmp_path / "registry.json"
    write_registry(
        reg,
        registry(1, "blue", [instance("a", "blue", "v1", port_a), instance("b", "blue", "v1", port_b)]),
    )  # fmt: skip
    proxy = start_proxy(
        reg,
        "[health_check]\ninterval = 0.1\ntimeout = 0.5\n"
        '[health_check.apps.drimeap]\npath = "/healthz"\n',
    )
    health_b["status"] = 503

    def b_down() -> bool:
        inst = proxy.status()["apps"]["drimeap"]["active"]["instances"][1]
        return inst["check"] is not None and inst["check"]["status"] == "down"

    await async_wait_until(b_down, 15, "b marked down by the proxy")
    async with aiohttp.ClientSession() as s:
        seen = set()
        for _ in range(10):
            async with s.get(f"http://127.0.0.1:{proxy.http}/") as r:
                assert r.status == 200
                seen.add(await r.text())
        assert seen == {"a"}
        status = proxy.status()
        b = status["apps"]["drimeap"]["active"]["instances"][1]
        assert b["healthy"] is True  # the registry's view is kept beside the proxy's own
        assert b["check"]["path"] == "/healthz" and "503" in b["check"]["last"]
        assert status["health_check"]["down"] == ["b"]
        async with s.get(f"http://127.0.0.1:{proxy.admin}/metrics") as r:
            assert "zerodown_health_instances_down 1" in await r.text()

        health_b["status"] = 200
        await async_wait_until(lambda: not b_down(), 15, "b back up")

        async def both() -> set[str]:
            got = set()
            for _ in range(6):
                async with s.get(f"http://127.0.0.1:{proxy.http}/") as r:
                    got.add(await r.text())
            return got

        assert await both() == {"a", "b"}
        # Both down: panic mode routes to both rather than answering 503.
        health_a["status"] = health_b["status"] = 500
        await async_wait_until(
            lambda: len(proxy.status()["health_check"]["down"]) == 2, 15, "both down"
        )
        assert await both() == {"a", "b"}
        assert proxy.status()["http"]["panic"] == ["drimeap/blue"]
        async with s.get(f"http://127.0.0.1:{proxy.admin}/metrics") as r:
            assert 'zerodown_http_panic_routed_total{app="drimeap"} 6' in await r.text()
