"""The Python cost of zerodown's HTTP data path per request, without sockets.

The real ClientProtocol, HttpProxy and UpstreamProtocol handle a keep-alive GET and an nginx-like
response through in-memory transports, so what is timed is only the proxy's own Python work
(parsing callbacks, routing, head rewriting, pooling, metrics): the part an optimisation of
zerodown_proxy/http/ can change. CPU time (process_time), best of several rounds, so it is far
less sensitive to a busy machine than a load test. The kernel and event-loop share of a real
request comes on top (see the proxy CPU per request in the load tests).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

REQUEST = b"GET / HTTP/1.1\r\nHost: drimeap\r\nUser-Agent: zerodown-bench\r\n\r\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Thu, 26 Nov 2026 04:41:23 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 18\r\nConnection: keep-alive\r\n"
    b"X-Backend-Version: v1\r\nX-Instance: blue-1\r\n\r\ndrimeap v1 blue-1\n"
)


class _MemoryTransport:
    """Collects what the proxy writes; enough of asyncio.Transport for the data path."""

    def __init__(self, peer: tuple[str, int]) -> None:
        self.peer = peer
        self.out: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def writelines(self, parts: Any) -> None:
        self.out.extend(parts)

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def measure(requests: int = 50000, rounds: int = 7) -> dict[str, float]:
    """Best-of-`rounds` CPU microseconds per proxied request."""
    from zerodown_proxy.config import HttpSection
    from zerodown_proxy.discovery.file import parse_registry
    from zerodown_proxy.http.downstream import ClientProtocol
    from zerodown_proxy.http.proxy import HttpProxy
    from zerodown_proxy.http.upstream import UpstreamProtocol
    from zerodown_proxy.metrics import Registry
    from zerodown_proxy.routing import Router
    from zerodown_proxy.watcher import Watcher

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        router = Router()
        instances = [
            {"id": f"drimeap-{g}-{i}", "group": g, "version": v, "address": "127.0.0.1",
             "http_port": 9000 + n, "hsms_port": None, "healthy": True}
            for n, (g, v, i) in enumerate(
                [("blue", "v1", 1), ("blue", "v1", 2), ("green", "v2", 1), ("green", "v2", 2)]
            )
        ]  # fmt: skip
        doc = {"generation": 1, "apps": {"drimeap": {"active": "blue", "instances": instances}}}
        Watcher(router).submit(parse_registry(orjson.dumps({**doc, "proxies": []})))
        proxy = HttpProxy(router, HttpSection(), Registry())
        for inst in router.snapshot.apps["drimeap"].active:
            up = UpstreamProtocol(proxy, inst.http_key, inst.id)
            up.connection_made(_MemoryTransport(("127.0.0.1", inst.http_port)))  # type: ignore[arg-type]
            proxy.idle[inst.http_key] = [up]
        client = ClientProtocol(proxy)
        transport = _MemoryTransport(("127.0.0.1", 40000))
        client.connection_made(transport)  # type: ignore[arg-type]

        def one() -> None:
            client.data_received(REQUEST)
            up = client.current.upstream  # type: ignore[union-attr]
            up.data_received(RESPONSE)  # type: ignore[union-attr]

        for _ in range(2000):
            one()
        if not transport.out[-1].startswith(b"HTTP/1.1 200"):
            raise RuntimeError(
                f"unexpected response from the data path: {transport.out[-1][:80]!r}"
            )
        best = float("inf")
        for _ in range(rounds):
            transport.out.clear()
            t = time.process_time()
            for _ in range(requests):
                one()
            best = min(best, (time.process_time() - t) / requests)
        return {"us_per_request": best * 1e6, "requests": requests, "rounds": rounds}
    finally:
        loop.close()
        asyncio.set_event_loop(None)
