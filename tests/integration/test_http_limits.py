"""Request-path timeouts and resource bounds of the HTTP side, through a real proxy process:
first_byte_timeout (with one retry elsewhere for idempotent requests), read_timeout only
between body bytes, the client-connection cap, and file descriptors kept for HSMS tools."""

from __future__ import annotations

import asyncio
import resource
import time
import urllib.request

import aiohttp

from ..helpers import async_wait_until, instance, registry, write_registry
from ..hsmspeers import RawHost, RawTool
from ..rawhttp import closed_by_peer, read_response, request
from .test_http_framing_edge import LoggingBackend


def metric(proxy, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{proxy.admin}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and line[len(name)] in " {"
    )


async def test_first_byte_timeout_retries_idempotent_requests_elsewhere(tmp_path, start_proxy):
    hung = LoggingBackend(lambda head: None)  # accepts, reads, never answers
    live = LoggingBackend()
    await hung.start()
    await live.start()
    reg = tmp_path / "registry.json"
    write_registry(
        reg,
        registry(
            1,
            "blue",
            [instance("hung", "blue", "v1", hung.port), instance("live", "blue", "v1", live.port)],
        ),
    )
    proxy = start_proxy(
        reg, "[http]\nfirst_byte_timeout = 0.5\n[outlier_detection]\nenabled = false"
    )
    for _ in range(4):  # round robin: at least two of these go to the hung instance first
        start = time.monotonic()
        r = await request(proxy.http, b"GET /g HTTP/1.1\r\nHost: x\r\n\r\n", timeout=10)
        assert r.status == 200 and r.body == b"ok"
        assert time.monotonic() - start < 4  # 0.5 s + one retry + a busy machine
    assert metric(proxy, 'zerodown_http_upstream_errors_total{app="drimeap",kind="first_byte_timeout"}') >= 2  # fmt: skip
    # A POST is not replayed: it gets 504, with the reason.
    statuses = []
    for _ in range(4):
        r = await request(
            proxy.http, b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx", timeout=10
        )
        statuses.append(r.status)
        if r.status == 504:
            assert b"no response within 0.5s" in r.body
    assert 504 in statuses and 200 in statuses
    st = proxy.status()["http"]
    assert st["inflight"] == {}


async def test_read_timeout_applies_between_body_bytes_not_first_byte(tmp_path, start_proxy):
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nabc")
        await writer.drain()
        await asyncio.sleep(1.2)  # longer than first_byte_timeout, shorter than read_timeout
        writer.write(b"def")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    reg = tmp_path / "registry.json"
    port = server.sockets[0].getsockname()[1]
    write_registry(reg, registry(1, "blue", [instance("blue-0", "blue", "v1", port)]))
    proxy = start_proxy(reg, "[http]\nfirst_byte_timeout = 0.3\nread_timeout = 10")
    r = await request(proxy.http, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", timeout=10)
    server.close()
    assert r.status == 200 and r.body == b"abcdef"


async def test_client_over_the_cap_gets_503_and_is_closed(tmp_path, start_proxy, backend_factory):
    port = await backend_factory("v1", "blue-0")
    reg = tmp_path / "registry.json"
    write_registry(reg, registry(1, "blue", [instance("blue-0", "blue", "v1", port)]))
    proxy = start_proxy(reg, "[http]\nmax_client_connections = 3")
    held = []
    for _ in range(3):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.http)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_response(reader)).status == 200
        held.append((reader, writer))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.http)
    r = await read_response(reader)
    assert r.status == 503 and b"limit of 3 client connections" in r.body
    assert await closed_by_peer(reader)
    writer.close()
    st = proxy.status()["http"]
    assert st["client_connections"] == 3 and st["client_connection_limit"] == 3
    assert metric(proxy, "zerodown_http_client_connections_refused_total") == 1
    held.pop()[1].close()  # a slot frees up: the next client is served
    await async_wait_until(lambda: proxy.status()["http"]["client_connections"] == 2, 10)
    r = await request(proxy.http, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert r.status == 200
    for _, w in held:
        w.close()


async def test_hsms_tools_connect_while_http_clients_exhaust_the_fd_limit(
    tmp_path, start_proxy, backend_factory
):
    """With 600 fds, 700 idle HTTP sockets used to take every descriptor and new HSMS tools
    could not connect. The HTTP side now stops at its budget and keeps fd_reserve free."""
    http_port = await backend_factory("v1", "blue-0")
    host = RawHost("v1")
    await host.start()
    reg = tmp_path / "registry.json"
    write_registry(
        reg,
        registry(
            1,
            "blue",
            [instance("blue-0", "blue", "v1", http_port, hsms=host.port)],
            hsms_device_id=0,
        ),
    )
    proxy = start_proxy(reg, "[hsms]\nenabled = true\nt3 = 5.0\nt6 = 5.0\nt7 = 10.0")
    resource.prlimit(proxy.proc.pid, resource.RLIMIT_NOFILE, (600, 600))
    await async_wait_until(
        lambda: proxy.status()["http"]["open_files_limit"] == 600, 10, "the new fd limit"
    )
    socks = []
    refused = 0
    try:
        for _ in range(700):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.http)
            socks.append((reader, writer))
        await async_wait_until(
            lambda: proxy.status()["http"]["refused_connections"] >= 700 - 172, 30, "refusals"
        )
        for reader, _ in socks[-20:]:  # the last ones were over the cap: told why
            r = await read_response(reader, timeout=10)
            assert r.status == 503
            refused += 1
        tools = [RawTool(proxy.hsms) for _ in range(20)]
        for tool in tools:
            await tool.connect()
            assert await tool.select(timeout=10) == 0
        for tool in tools:
            tool.writer.close()  # type: ignore[union-attr]
        # HTTP still serves within its budget.
        async with aiohttp.ClientSession() as s:
            for _, writer in socks[:5]:
                writer.close()
            await async_wait_until(
                lambda: proxy.status()["http"]["client_connections"] < 172, 10, "free slots"
            )
            async with s.get(f"http://127.0.0.1:{proxy.http}/") as resp:
                assert resp.status == 200
    finally:
        for _, writer in socks:
            writer.close()
        await host.stop()
    assert refused == 20


async def test_non_ascii_authorization_on_admin_is_401(tmp_path, start_proxy):
    proxy = start_proxy(tmp_path / "missing.json")
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.admin)
    writer.write(
        b"POST /v1/reload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xe9\xff\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    r = await read_response(reader)
    writer.close()
    assert r.status == 401
