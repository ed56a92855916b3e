"""The HTTP data plane through a real proxy process, against real backends on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import aiohttp
import orjson
from aiohttp import web

from ..helpers import instance, registry, write_registry
from ..rawhttp import closed_by_peer, read_response, request


async def _one_group(tmp_path: Path, backend_factory, start_proxy, config: str = "", n: int = 2):
    ports = [await backend_factory("v1", f"blue-{i}") for i in range(n)]
    reg = tmp_path / "registry.json"
    write_registry(
        reg,
        registry(1, "blue", [instance(f"blue-{i}", "blue", "v1", p) for i, p in enumerate(ports)]),
    )
    proxy = start_proxy(reg, config)
    return proxy, ports, reg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_get_sets_forwarding_headers_and_strips_hop_by_hop(
    tmp_path, backend_factory, start_proxy
):
    proxy, _, _ = await _one_group(tmp_path, backend_factory, start_proxy)
    r = await request(
        proxy.http,
        b"GET /info?x=1 HTTP/1.1\r\nHost: eap.fab.local\r\nConnection: keep-alive, X-Secret\r\n"
        b"X-Secret: drop-me\r\nKeep-Alive: timeout=5\r\nX-Forwarded-For: 10.1.2.3\r\n"
        b"X-Forwarded-Proto: https\r\nX-Custom: kept\r\n\r\n",
    )
    assert r.status == 200
    assert r.header("X-Backend-Version") == "v1"
    seen = {k.lower(): v for k, v in orjson.loads(r.body)["headers"].items()}
    assert seen["x-custom"] == "kept"
    assert "x-secret" not in seen and "keep-alive" not in seen
    assert seen["x-forwarded-for"] == "10.1.2.3, 127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"  # a client cannot claim https on a plain listener
    assert seen["x-forwarded-host"] == "eap.fab.local"
    assert seen["x-request-id"]


async def test_client_request_id_is_kept(tmp_path, backend_factory, start_proxy):
    proxy, _, _ = await _one_group(tmp_path, backend_factory, start_proxy)
    async with aiohttp.ClientSession() as s:
        async with s.get(
            f"http://127.0.0.1:{proxy.http}/info", headers={"X-Request-Id": "abc"}
        ) as r:
            body = await r.json()
    seen = {k.lower(): v for k, v in body["headers"].items()}
    assert seen["x-request-id"] == "abc"


async def test_keep_alive_reuses_client_and_upstream_connections(
    tmp_path, backend_factory, start_proxy
):
    peers: set[int] = set()

    async def who(request: web.Request) -> web.Response:
        peers.add(request.transport.get_extra_info("peername")[1])
        return web.Response(text="ok", headers={"X-Backend-Version": "v1"})

    app = web.Application()
    app.router.add_get("/", who)
    port = await backend_factory("v1", "blue-0", app)
    reg = tmp_path / "registry.json"
    write_registry(reg, registry(1, "blue", [instance("blue-0", "blue", "v1", port)]))
    proxy = start_proxy(reg)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.http)
    for _ in range(20):
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        r = await read_response(reader)
        assert r.status == 200 and r.body == b"ok"
    writer.close()
    assert len(peers) == 1  # twenty requests, one pooled backend connection


async def test_pipelined_requests_answered_in_order(tmp_path, backend_factory, start_proxy):
    proxy, _, _ = await _one_group(tmp_path, backend_factory, start_proxy)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.http)
    writer.write(
        b"GET /sleep?s=0.2 HTTP/1.1\r\nHost: x\r\n\r\nHEAD / HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
    )
    first = await read_response(reader)
    second = await read_response(reader, head_only=True)
    third = await read_response(reader)
    writer.close()
    assert first.status == 200 and b"drimeap" in first.body
    assert second.status == 200 and int(second.header("Content-Length")) > 0
    assert third.body == b"hello"


async def test_head_response_has_no_body_and_connection_stays_usable(
    tmp_path, backend_factory, start_proxy
):
    proxy, _, _ = await _one_group(tmp_path, backend_factory, start_proxy, n=1)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.http)
    for _ in range(3):
        writer.write(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await read_response(reader, head_only=True)
        assert head.status == 200 and int(head.header("Content-Length")) > 0
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        r = await read_response(reader)
        # No stray HEAD body bytes in between: the GET body is exactly what HEAD announced.
        assert r.status == 200 and len(r.body) == int(head.header("Content-Length"))
    writer.close()


async def test_expect_100_continue_is_relayed(tmp_path, backend_factory, start_proxy):
    proxy, _, _ = await _one_group(tmp_path, backend_factory, start_proxy, n=1)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.http)
    writer.write(
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
    )
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim.startswith(b"HTTP/1.1 100")
    writer.write(b"ping")
    r = await read_response(reader)
    writer.close()
    assert r.status == 200 and r.body == b"ping"


async def test_chunked_request_and_response_stream_through(tmp_path, backend_factory, start_proxy):
    proxy, _, _ = await _one_group(tmp_path, backend_factory, start_proxy, n=1)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.http)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    writer.write(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    r = await read_response(reader)
    writer.close()
    assert r.status == 200 and r.body == b"hello world"
    assert r.header("Transfer-Encoding") == "chunked"


async def test_http10_client_gets_close_delimited_body(tmp_path, backend_factory, start_proxy):
    proxy, _, _ = await _one_group(tmp_path, backend_factory, start_proxy, n=1)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.http)
    writer.write(b"POST /echo HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc")
    data = await asyncio.wait_for(reader.read(), 5)  # the proxy closes to end the body
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0]
    assert b"chunked" not in head.lower()
    assert body == b"abc"


async def test_websocket_upgrade_is_tunnelled(tmp_path, backend_factory, start_proxy):
    async def ws(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        async for msg in sock:
            await sock.send_str("echo:" + msg.data)
        return sock

    app = web.Application()
    app.router.add_get("/ws", ws)
    port = await backend_factory("v1", "blue-0", app)
    reg = tmp_path / "registry.json"
    write_registry(reg, registry(1, "blue", [instance("blue-0", "blue", "v1", port)]))
    proxy = start_proxy(reg)
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(f"http://127.0.0.1:{proxy.http}/ws") as sock:
            for i in range(3):
                await sock.send_str(f"m{i}")
                msg = await asyncio.wait_for(sock.receive(), 5)
                assert msg.data == f"echo:m{i}"


async def test_connect_failure_is_retried_elsewhere_and_instance_ejected(
    tmp_path, backend_factory, start_proxy
):
    live = await backend_factory("v1", "blue-live")
    dead = _free_port()
    reg = tmp_path / "registry.json"
    write_registry(
        reg,
        registry(
            1,
            "blue",
            [instance("blue-dead", "blue", "v1", dead), instance("blue-live", "blue", "v1", live)],
        ),
    )
    proxy = start_proxy(
        reg, "[outlier_detection]\nconsecutive_connect_failures = 2\nbase_ejection_time = 30"
    )
    async with aiohttp.ClientSession() as s:
        for method in ("GET", "POST", "GET", "POST", "GET", "GET"):
            url = f"http://127.0.0.1:{proxy.http}/" + ("echo" if method == "POST" else "")
            async with s.request(method, url, data=b"x" if method == "POST" else None) as r:
                assert r.status == 200, await r.text()
        async with s.get(f"http://127.0.0.1:{proxy.admin}/metrics") as r:
            metrics = await r.text()
    assert (
        'zerodown_http_ejections_total{instance="blue-dead",reason="consecutive_connect_failures"} 1'
        in metrics
    )
    assert "zerodown_http_retries_total" in metrics
    status = proxy.status()
    assert f"127.0.0.1:{dead}" in status["http"]["ejected"]


async def test_pooled_connection_closed_by_backend_is_retried(tmp_path, start_proxy):
    """The backend answers each request on a connection, then closes that connection without
    saying so (like a keep-alive timeout racing a new request). The proxy retries once."""
    served = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        await reader.readuntil(b"\r\n\r\n")
        served += 1
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Backend-Version: v1\r\n\r\nok")
        await writer.drain()
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)  # next request: drop it
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reg = tmp_path / "registry.json"
    write_registry(reg, registry(1, "blue", [instance("blue-0", "blue", "v1", port)]))
    proxy = start_proxy(reg)
    async with aiohttp.ClientSession() as s:
        for _ in range(4):
            async with s.get(f"http://127.0.0.1:{proxy.http}/") as r:
                assert r.status == 200 and await r.read() == b"ok"
        # A POST is not idempotent: the same situation must give a 502, not a silent replay.
        async with s.post(f"http://127.0.0.1:{proxy.http}/", data=b"x") as r:
            assert r.status == 502
            assert "closed the connection before answering" in await r.text()
    server.close()


async def test_no_backend_gives_503_with_reason(tmp_path, start_proxy):
    proxy = start_proxy(tmp_path / "missing.json")
    r = await request(proxy.http, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert r.status == 503
    assert b"no app is routed" in r.body


async def test_dead_backends_give_502(tmp_path, start_proxy):
    reg = tmp_path / "registry.json"
    write_registry(reg, registry(1, "blue", [instance("blue-0", "blue", "v1", _free_port())]))
    proxy = start_proxy(reg)
    r = await request(proxy.http, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert r.status == 502
    assert b"could not connect to backend blue-0" in r.body


async def test_slow_backend_gives_504(tmp_path, backend_factory, start_proxy):
    proxy, _, _ = await _one_group(
        tmp_path, backend_factory, start_proxy, "[http]\nread_timeout = 0.5", n=1
    )
    r = await request(proxy.http, b"GET /sleep?s=3 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert r.status == 504
    assert b"no response within 0.5s" in r.body


async def test_bad_input_gets_4xx_and_proxy_keeps_serving(tmp_path, backend_factory, start_proxy):
    proxy, _, _ = await _one_group(
        tmp_path,
        backend_factory,
        start_proxy,
        "[http]\nmax_body_bytes = 1000\nclient_header_timeout = 0.5\nmax_header_bytes = 4096",
    )
    cases = [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n", 431),
        (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n", 413),
        (
            b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"3e8\r\n" + b"z" * 1000 + b"\r\n3e8\r\n" + b"z" * 1000 + b"\r\n",
            413,
        ),
    ]  # fmt: skip
    for raw, status in cases:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.http)
        writer.write(raw)
        r = await read_response(reader)
        assert r.status == status, (raw[:40], r.status, r.body)
        assert r.header("Connection") == "close"
        assert await closed_by_peer(reader)
        writer.close()
    # Slow headers: 408 after client_header_timeout.
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.http)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
    r = await read_response(reader, timeout=5)
    assert r.status == 408
    writer.close()
    # Everyone else is still served.
    r = await request(proxy.http, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert r.status == 200
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{proxy.admin}/metrics") as resp:
            metrics = await resp.text()
    for code in ("400", "408", "413", "431"):
        assert f'zerodown_http_client_errors_total{{code="{code}"}}' in metrics


async def test_standby_preview_needs_token(tmp_path, backend_factory, start_proxy):
    blue = await backend_factory("v1", "blue-0")
    green = await backend_factory("v2", "green-0")
    reg = tmp_path / "registry.json"
    write_registry(
        reg,
        registry(
            1,
            "blue",
            [instance("blue-0", "blue", "v1", blue), instance("green-0", "green", "v2", green)],
        ),
    )
    proxy = start_proxy(reg)
    url = f"http://127.0.0.1:{proxy.http}/info"
    async with aiohttp.ClientSession() as s:
        async with s.get(url) as r:
            assert r.headers["X-Backend-Version"] == "v1"
        async with s.get(url, headers={"X-Zerodown-Preview": "standby"}) as r:
            assert r.status == 403
        preview = {"X-Zerodown-Preview": "standby", "X-Zerodown-Token": "test-token"}
        async with s.get(url, headers=preview) as r:
            assert r.headers["X-Backend-Version"] == "v2"
            seen = (await r.json())["headers"]
    assert "X-Zerodown-Token" not in seen and "X-Zerodown-Preview" not in seen


async def test_admin_api(tmp_path, backend_factory, start_proxy):
    proxy, ports, _ = await _one_group(tmp_path, backend_factory, start_proxy)
    base = f"http://127.0.0.1:{proxy.admin}"
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{proxy.http}/") as r:
            assert r.status == 200
        async with s.get(f"{base}/health") as r:
            assert r.status == 200 and (await r.json())["generation"] == 1
        async with s.get(f"{base}/v1/status") as r:
            st = await r.json()
        assert st["generation"] == 1
        app = st["apps"]["drimeap"]
        assert app["active"]["group"] == "blue" and app["active"]["version"] == "v1"
        assert {i["http_port"] for i in app["active"]["instances"]} == set(ports)
        assert st["discovery"]["provider"] == "file" and st["discovery"]["errors"] == 0
        async with s.get(f"{base}/metrics") as r:
            text = await r.text()
        assert 'zerodown_http_requests_total{app="drimeap",version="v1",code="200"} 1' in text
        assert "zerodown_http_request_duration_seconds_bucket" in text
        assert "zerodown_routing_generation 1" in text
        async with s.post(f"{base}/v1/reload") as r:
            assert r.status == 401
        async with s.post(f"{base}/v1/reload", headers={"Authorization": "Bearer test-token"}) as r:
            assert r.status == 200


async def test_sigterm_lets_in_flight_requests_finish(tmp_path, backend_factory, start_proxy):
    proxy, _, _ = await _one_group(tmp_path, backend_factory, start_proxy, n=1)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.http)
    writer.write(b"GET /sleep?s=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.sleep(0.2)  # the request is now in flight at the backend
    proxy.proc.terminate()  # SIGTERM
    r = await read_response(reader)
    assert r.status == 200 and r.header("Connection") == "close"
    writer.close()
    rc = await asyncio.to_thread(proxy.proc.wait, 10)
    assert rc == 0
    try:
        await request(proxy.http, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", timeout=2)
        raise AssertionError("the proxy still accepts after SIGTERM")
    except (ConnectionError, OSError):
        pass


async def test_deep_pipeline_is_bounded_and_answered_in_order(
    tmp_path, backend_factory, start_proxy
):
    proxy, _, _ = await _one_group(tmp_path, backend_factory, start_proxy, n=1)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.http)
    n = 200
    writer.write(b"".join(b"GET /info?n=%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(n)))
    for _ in range(n):
        r = await read_response(reader)
        assert r.status == 200
    writer.close()


async def test_access_log_lines_are_json(tmp_path, backend_factory, start_proxy):
    proxy, _, _ = await _one_group(tmp_path, backend_factory, start_proxy, "access_log = true", n=1)
    r = await request(proxy.http, b"GET /info HTTP/1.1\r\nHost: x\r\nX-Request-Id: rid-1\r\n\r\n")
    assert r.status == 200
    proxy.terminate()
    lines = [orjson.loads(x) for x in proxy.output().splitlines() if x.startswith("{")]
    access = [x for x in lines if x.get("event") == "access"]
    assert access and access[0]["id"] == "rid-1" and access[0]["status"] == 200
    assert access[0]["version"] == "v1" and access[0]["path"] == "/info"
