"""Atomic switching under load, through a real proxy process and sample-app processes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp

from ..helpers import SampleApp, instance, registry, write_registry
from ..rawhttp import read_response


def _start_groups(tmp_path: Path, sample_app) -> tuple[list[SampleApp], list[dict]]:
    apps, instances = [], []
    for group, version in (("blue", "v1"), ("green", "v2")):
        for n in (1, 2):
            iid = f"drimeap-{group}-{n}"
            app = sample_app(iid, version)
            apps.append(app)
            instances.append(instance(iid, group, version, app.port))
    return apps, instances


async def test_twenty_switches_under_load_lose_nothing_and_never_go_back(
    tmp_path, start_proxy, sample_app
):
    apps, instances = _start_groups(tmp_path, sample_app)
    reg = tmp_path / "registry.json"
    write_registry(reg, registry(1, "blue", instances))
    proxy = start_proxy(reg)
    url = f"http://127.0.0.1:{proxy.http}/"
    stop = asyncio.Event()
    # per client: (sent, received, version); errors
    seen: list[list[tuple[float, float, str]]] = [[] for _ in range(6)]
    errors: list[str] = []

    async def client(k: int) -> None:
        conn = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=conn) as s:
            deadline = time.monotonic() + 60  # bounded even if the test logic breaks
            while not stop.is_set() and time.monotonic() < deadline:
                sent = time.monotonic()
                try:
                    async with s.get(url) as r:
                        await r.read()
                        if r.status != 200:
                            errors.append(f"client {k}: HTTP {r.status}")
                        else:
                            seen[k].append((sent, time.monotonic(), r.headers["X-Backend-Version"]))
                except aiohttp.ClientError as exc:
                    errors.append(f"client {k}: {exc!r}")

    tasks = [asyncio.create_task(client(k)) for k in range(6)]
    switches: list[tuple[float, float, str]] = []  # (written, applied, new version)
    try:
        await asyncio.sleep(0.3)
        active = "blue"
        async with aiohttp.ClientSession() as admin:
            for gen in range(2, 22):
                active = "green" if active == "blue" else "blue"
                written = time.monotonic()
                write_registry(reg, registry(gen, active, instances))
                while True:
                    async with admin.get(f"http://127.0.0.1:{proxy.admin}/v1/status") as r:
                        if (await r.json())["generation"] >= gen:
                            break
                    assert time.monotonic() - written < 2, "switch not applied within 2 s"
                    await asyncio.sleep(0.002)
                switches.append((written, time.monotonic(), "v2" if active == "green" else "v1"))
                await asyncio.sleep(0.15)
    finally:
        stop.set()
        await asyncio.gather(*tasks)

    assert errors == []
    total = sum(len(s) for s in seen)
    assert total > 500, f"only {total} requests were made"
    for k, samples in enumerate(seen):
        for i, (written, applied, new) in enumerate(switches):
            next_written = switches[i + 1][0] if i + 1 < len(switches) else float("inf")
            # Requests sent and answered between this switch's write and the next one's: a
            # request still unanswered when the next switch is written may rightly be routed
            # by it (the proxy reads it after applying that one), so it belongs to neither.
            window = [s for s in samples if written <= s[0] and s[1] < next_written]
            # Every request sent after the proxy applied the switch got the new version...
            late = [s for s in window if s[0] >= applied and s[2] != new]
            assert not late, f"client {k} switch {i}: old version after apply: {late[:3]}"
            # ...and once this client saw the new version, it never saw the old one again.
            first_new = next((j for j, s in enumerate(window) if s[2] == new), None)
            if first_new is not None:
                back = [s for s in window[first_new:] if s[2] != new]
                assert not back, f"client {k} switch {i}: went back to the old version"
    status = proxy.status()
    assert status["switches"] == 20


async def test_idle_pooled_connections_to_demoted_instances_are_closed(
    tmp_path, start_proxy, sample_app
):
    apps, instances = _start_groups(tmp_path, sample_app)
    reg = tmp_path / "registry.json"
    write_registry(reg, registry(1, "blue", instances))
    proxy = start_proxy(reg)
    async with aiohttp.ClientSession() as s:
        for _ in range(10):
            async with s.get(f"http://127.0.0.1:{proxy.http}/") as r:
                assert r.headers["X-Backend-Version"] == "v1"
    blue_keys = {f"127.0.0.1:{i['http_port']}" for i in instances if i["group"] == "blue"}
    assert set(proxy.status()["http"]["idle_upstream_connections"]) & blue_keys
    write_registry(reg, registry(2, "green", instances))
    st = proxy.wait_generation(2)
    assert not set(st["http"]["idle_upstream_connections"]) & blue_keys


async def test_in_flight_request_finishes_on_the_old_version(tmp_path, start_proxy, sample_app):
    apps, instances = _start_groups(tmp_path, sample_app)
    reg = tmp_path / "registry.json"
    write_registry(reg, registry(1, "blue", instances))
    proxy = start_proxy(reg)
    async with aiohttp.ClientSession() as s:
        slow = asyncio.create_task(s.get(f"http://127.0.0.1:{proxy.http}/sleep?s=1"))
        await asyncio.sleep(0.3)
        write_registry(reg, registry(2, "green", instances))
        await asyncio.to_thread(proxy.wait_generation, 2)
        async with s.get(f"http://127.0.0.1:{proxy.http}/") as r:
            assert r.headers["X-Backend-Version"] == "v2"
        resp = await slow
        assert resp.status == 200 and resp.headers["X-Backend-Version"] == "v1"
        resp.release()


async def test_client_connection_survives_switches(tmp_path, start_proxy, sample_app):
    """One raw keep-alive connection: its next request after a switch goes to the new version,
    on the same TCP connection."""
    _, instances = _start_groups(tmp_path, sample_app)
    reg = tmp_path / "registry.json"
    write_registry(reg, registry(1, "blue", instances))
    proxy = start_proxy(reg)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.http)
    versions = []
    for gen, group in ((2, "green"), (3, "blue"), (4, "green")):
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        versions.append((await read_response(reader)).header("X-Backend-Version"))
        write_registry(reg, registry(gen, group, instances))
        await asyncio.to_thread(proxy.wait_generation, gen)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    versions.append((await read_response(reader)).header("X-Backend-Version"))
    writer.close()
    assert versions == ["v1", "v2", "v1", "v2"]
