"""/metrics on a live proxy: promtool-clean (single process and the multi-worker supervisor's
merged answer), build info, routed groups and versions, per-instance health, process metrics."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time

import aiohttp
import pytest
from aiohttp import web

from zerodown_proxy.buildinfo import version

from ..helpers import instance, registry, write_registry

HEALTH = "[health_check]\nenabled = true\ninterval = 0.2\ntimeout = 1.0\n"


def promtool_check(text: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not found (Debian package prometheus; `make testdeps` installs it)")
    done = subprocess.run(
        [promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=60
    )
    assert done.returncode == 0, (done.stdout + done.stderr).decode()


def samples(text: str, name: str) -> dict[str, float]:
    """{label text: value} of one metric name."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            key, _, value = line.rpartition(" ")
            out[key[len(name) :]] = float(value)
    return out


def failing_health_app() -> web.Application:
    async def health(_: web.Request) -> web.Response:
        return web.Response(status=503, text="sick\n")

    async def index(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/", index)
    return app


async def fetch(url: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        assert r.status == 200
        return await r.text()


async def scrape_until(url: str, verdicts: int, timeout: float = 30.0) -> str:
    """/metrics once the proxy's health checks have a verdict for `verdicts` instances."""
    deadline = time.monotonic() + timeout
    while True:
        text = await fetch(url)
        if len(samples(text, "zerodown_health_check_up")) == verdicts:
            return text
        assert time.monotonic() < deadline, f"no {verdicts} health verdicts in:\n{text}"
        await asyncio.sleep(0.05)


async def test_metrics_of_a_proxy_pass_promtool_and_say_what_runs(
    tmp_path, backend_factory, start_proxy
):
    blue = await backend_factory("v1", "blue-0")
    green = await backend_factory("v2", "green-0")
    sick = await backend_factory("v2", "green-1", failing_health_app())
    insts = [
        instance("blue-0", "blue", "v1", blue),
        instance("green-0", "green", "v2", green),
        instance("green-1", "green", "v2", sick),
    ]
    reg = tmp_path / "registry.json"
    write_registry(reg, registry(1, "blue", insts))
    proxy = start_proxy(reg, HEALTH)
    proxy.wait_generation(1)
    metrics_url = f"http://127.0.0.1:{proxy.admin}/metrics"
    await fetch(f"http://127.0.0.1:{proxy.http}/?q=1")
    text = await scrape_until(metrics_url, 3)
    promtool_check(text)

    info = samples(text, "zerodown_build_info")
    assert len(info) == 1 and f'version="{version()}"' in next(iter(info)), info
    groups = samples(text, "zerodown_app_group_info")
    assert groups == {
        '{app="drimeap",role="active",group="blue",version="v1"}': 1,
        '{app="drimeap",role="standby",group="green",version="v2"}': 1,
    }
    up = samples(text, "zerodown_health_check_up")
    assert up['{app="drimeap",group="blue",instance="blue-0",version="v1"}'] == 1
    assert up['{app="drimeap",group="green",instance="green-1",version="v2"}'] == 0
    for name in (
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
    ):
        assert samples(text, name)[""] > 0, name
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name.endswith("_total") == (kind == "counter"), line

    # A switch shows in the groups at once.
    write_registry(reg, registry(2, "green", insts))
    proxy.wait_generation(2)
    groups = samples(await fetch(metrics_url), "zerodown_app_group_info")
    assert '{app="drimeap",role="active",group="green",version="v2"}' in groups, groups


async def test_merged_metrics_of_workers_pass_promtool(tmp_path, backend_factory, start_proxy):
    blue = await backend_factory("v1", "blue-0")
    reg = tmp_path / "registry.json"
    write_registry(reg, registry(1, "blue", [instance("blue-0", "blue", "v1", blue)]))
    proxy = start_proxy(reg, "workers = 2\n" + HEALTH)
    proxy.wait_generation(1)
    for _ in range(4):
        await fetch(f"http://127.0.0.1:{proxy.http}/")
    metrics_url = f"http://127.0.0.1:{proxy.admin}/metrics"
    text = await scrape_until(metrics_url, 2)  # one instance, seen by each worker
    promtool_check(text)
    info = samples(text, "zerodown_build_info")
    assert sorted(k.split(",")[0] for k in info) == [
        '{worker="0"', '{worker="1"', '{worker="supervisor"',
    ], info  # fmt: skip
    rss = samples(text, "process_resident_memory_bytes")
    assert sorted(rss) == ['{worker="0"}', '{worker="1"}', '{worker="supervisor"}'], rss


async def test_metrics_in_consul_mode_pass_promtool(consul, backend_factory, tmp_path):
    from ..helpers import ProxyProc
    from .test_consul_discovery import config

    blue = await backend_factory("v1", "blue-0")
    tags = ["zerodown-group=blue", "zerodown-version=v1"]
    consul.register("drimeap-blue-0", "drimeap", "127.0.0.1", blue, tags=tags)
    gen = consul.kv_set("zerodown/drimeap/active", "blue")
    proxy = ProxyProc(tmp_path, tmp_path / "unused.json", config(consul), "consul-proxy")
    try:
        proxy.wait_generation(gen, timeout=20)
        text = await fetch(f"http://127.0.0.1:{proxy.admin}/metrics")
    finally:
        proxy.terminate()
    assert "zerodown_consul_last_contact_age_seconds" in text
    promtool_check(text)
