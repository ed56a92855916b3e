"""Overload through a real proxy process: more requests than a slow backend can carry are each
answered (200) or shed (503 + Retry-After, counted) within a bounded time, none hangs, and the
proxy serves normally as soon as the load is gone. Also: the GC settled after start-up."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from ..helpers import async_wait_until, instance, registry, write_registry
from ..rawhttp import read_response
from .test_http_limits import metric

SERVICE_TIME = 0.2  # the backend answers one request at a time, this long each


class SerialBackend:
    """Answers one request at a time (a saturated app server): a request waits for the ones
    before it. Records how many requests were inside it at once."""

    def __init__(self, name: bytes = b"ok", gate: asyncio.Event | None = None) -> None:
        self.name = name
        self.gate = gate  # when given, every answer waits for it to be set
        self.port = 0
        self.inside = 0
        self.most_inside = 0
        self.served = 0
        self._lock = asyncio.Lock()
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                self.inside += 1
                self.most_inside = max(self.most_inside, self.inside)
                async with self._lock:
                    await asyncio.sleep(SERVICE_TIME)
                    if self.gate is not None:
                        await self.gate.wait()
                self.inside -= 1
                self.served += 1
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(self.name), self.name))  # fmt: skip
                await writer.drain()
        finally:
            writer.close()


async def _one(port: int) -> tuple[int, str | None, float, bytes]:
    start = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /work HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        r = await read_response(reader, timeout=30)
    finally:
        writer.close()
    return r.status, r.header("Retry-After"), time.monotonic() - start, r.body


async def test_overloaded_proxy_answers_or_sheds_every_request_in_bounded_time(
    tmp_path, start_proxy
):
    backend = SerialBackend()
    await backend.start()
    reg = tmp_path / "registry.json"
    write_registry(reg, registry(1, "blue", [instance("slow", "blue", "v1", backend.port)]))
    proxy = start_proxy(
        reg,
        "[http]\nmax_requests_per_instance = 2\nmax_queue_time = 0.5\n"
        "[outlier_detection]\nenabled = false",
    )
    clients = 40  # 8 s of work for the backend: without a bound the last one waits that long
    results = await asyncio.wait_for(
        asyncio.gather(*(_one(proxy.http) for _ in range(clients))), 60
    )
    statuses = [s for s, _, _, _ in results]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 2 and statuses.count(503) >= 10, statuses
    for status, retry_after, _, body in results:
        if status == 503:
            assert retry_after == "1"
            assert b"max_requests_per_instance (2)" in body and b"0.5s" in body
    # Bound: max_queue_time + a sweep tick to be shed; a request let through waited at most
    # that long, then behind at most one other in the backend. Generous for a loaded machine.
    slowest = max(elapsed for _, _, elapsed, _ in results)
    assert slowest < 4.0, sorted(round(e, 2) for _, _, e, _ in results)
    assert backend.most_inside <= 2
    shed = metric(proxy, 'zerodown_http_shed_total{app="drimeap",reason="queue_timeout"}')
    assert shed == statuses.count(503)
    # The load is gone: normal service at once, nothing left waiting.
    for _ in range(3):
        status, _, elapsed, body = await _one(proxy.http)
        assert status == 200 and body == b"ok"
        assert elapsed < 3.0
    assert metric(proxy, "zerodown_http_queued_requests") == 0
    assert proxy.status()["http"]["inflight"] == {}
    await backend.stop()


async def test_max_queue_time_zero_sheds_at_once(tmp_path, start_proxy):
    backend = SerialBackend()
    await backend.start()
    reg = tmp_path / "registry.json"
    write_registry(reg, registry(1, "blue", [instance("slow", "blue", "v1", backend.port)]))
    proxy = start_proxy(
        reg,
        "[http]\nmax_requests_per_instance = 1\nmax_queue_time = 0\n"
        "[outlier_detection]\nenabled = false",
    )
    results = await asyncio.wait_for(asyncio.gather(*(_one(proxy.http) for _ in range(10))), 60)
    statuses = [s for s, _, _, _ in results]
    assert statuses.count(200) >= 1 and statuses.count(503) >= 5, statuses
    assert backend.most_inside == 1
    assert metric(proxy, 'zerodown_http_shed_total{app="drimeap",reason="queue_full"}') == (
        statuses.count(503)
    )
    await backend.stop()


async def test_a_request_waiting_across_a_switch_goes_to_the_new_group(tmp_path, start_proxy):
    gate = asyncio.Event()
    blue, green = SerialBackend(b"blue", gate), SerialBackend(b"green")
    await blue.start()
    await green.start()
    reg = tmp_path / "registry.json"
    both = [instance("b", "blue", "v1", blue.port), instance("g", "green", "v2", green.port)]
    write_registry(reg, registry(1, "blue", both))
    proxy = start_proxy(
        reg,
        "[http]\nmax_requests_per_instance = 1\nmax_queue_time = 30\n"
        "[outlier_detection]\nenabled = false",
    )
    first = asyncio.ensure_future(_one(proxy.http))  # holds blue's only slot until the gate
    await async_wait_until(lambda: blue.inside == 1, 10, "the first request at blue")
    second = asyncio.ensure_future(_one(proxy.http))  # waits in the proxy's queue
    await async_wait_until(
        lambda: metric(proxy, "zerodown_http_queued_requests") == 1, 10, "a queued request"
    )
    write_registry(reg, registry(2, "green", both))
    await asyncio.to_thread(proxy.wait_generation, 2, 10)
    gate.set()  # blue finishes the first request: the waiting one gets room...
    assert (await asyncio.wait_for(first, 30))[3] == b"blue"
    # ... and is routed again: the switch happened while it waited, so green answers it.
    assert (await asyncio.wait_for(second, 30))[3] == b"green"
    await blue.stop()
    await green.stop()


def test_gc_is_frozen_after_start_up(tmp_path, start_proxy):
    write_registry(tmp_path / "registry.json", registry(1, "blue", []))
    proxy = start_proxy()
    assert metric(proxy, "zerodown_gc_frozen_objects") > 10_000


def test_event_loop_lag_is_measured(tmp_path, start_proxy):
    write_registry(tmp_path / "registry.json", registry(1, "blue", []))
    proxy = start_proxy()

    def late_sweeps() -> float:  # sweeps that ran more than 0.5 s late
        le = metric(proxy, 'zerodown_http_loop_lag_seconds_bucket{le="0.5"}')
        return metric(proxy, "zerodown_http_loop_lag_seconds_count") - le

    before = late_sweeps()
    os.kill(proxy.proc.pid, signal.SIGSTOP)  # the loop is held: the next sweep runs ~1 s late
    time.sleep(1.0)
    os.kill(proxy.proc.pid, signal.SIGCONT)
    deadline = time.monotonic() + 10
    while late_sweeps() == before:
        assert time.monotonic() < deadline, "no sweep ran late after the proxy was stopped 1 s"
        time.sleep(0.1)
