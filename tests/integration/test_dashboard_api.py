"""The dashboard's HTTP side on real proxies: the page and its assets, the traffic series (one
worker and merged over a supervisor's workers), and the release actions: refused without the
admin token or from another origin, and run as `zerodown switch|rollback` (audited) with it."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import aiohttp
import orjson

from ..helpers import instance, registry, wait_until, write_registry
from .test_consul_discovery import KEY, backends, config, proxies, register_backends  # noqa: F401

TOKEN = "test-token"  # ProxyProc's admin token


async def _two_groups(tmp_path: Path, backend_factory) -> Path:  # type: ignore[no-untyped-def]
    blue = await backend_factory("v1", "blue-0")
    green = await backend_factory("v2", "green-0")
    insts = [instance("blue-0", "blue", "v1", blue), instance("green-0", "green", "v2", green)]
    reg = tmp_path / "registry.json"
    write_registry(reg, registry(1, "blue", insts))
    return reg


def _history(tmp_path: Path) -> list[dict]:
    path = tmp_path / "history.jsonl"
    return [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


async def _series_total(s: aiohttp.ClientSession, admin: str, version: str) -> float:
    async with s.get(f"http://{admin}/v1/dashboard/series") as r:
        body = await r.json()
    return sum(p[1] for p in body["apps"].get("drimeap", {}).get(version, []))


async def test_page_assets_and_series_of_one_proxy(tmp_path, backend_factory, start_proxy):
    reg = await _two_groups(tmp_path, backend_factory)
    proxy = start_proxy(reg)
    admin = f"127.0.0.1:{proxy.admin}"
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://{admin}/") as r:
            page = await r.text()
            assert r.status == 200 and r.content_type == "text/html"
            assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
            assert r.headers["X-Frame-Options"] == "DENY"
        assert '<script src="/dashboard/dashboard.js"' in page
        assets = [("dashboard.js", "text/javascript"), ("charts.js", "text/javascript"),
                  ("dashboard.css", "text/css")]  # fmt: skip
        for name, kind in assets:
            async with s.get(f"http://{admin}/dashboard/{name}") as r:
                assert r.status == 200 and r.content_type == kind and len(await r.read()) > 1000
        async with s.get(f"http://{admin}/dashboard/index.py") as r:
            assert r.status == 404
        async with s.get(f"http://{admin}/v1/dashboard/series?since=x") as r:
            assert r.status == 400
        for _ in range(25):
            async with s.get(f"http://127.0.0.1:{proxy.http}/") as r:
                assert r.status == 200
        # Each second's sample holds that second's responses: over the ring they add up.
        deadline = asyncio.get_running_loop().time() + 15
        while (total := await _series_total(s, admin, "v1")) < 25:
            assert asyncio.get_running_loop().time() < deadline, f"series saw {total}/25"
            await asyncio.sleep(0.2)
        assert total == 25
        assert await _series_total(s, admin, "v2") == 0


async def test_supervisor_series_merge_every_workers_traffic(
    tmp_path, backend_factory, start_proxy
):
    reg = await _two_groups(tmp_path, backend_factory)
    proxy = start_proxy(reg, "workers = 2")
    admin = f"127.0.0.1:{proxy.admin}"
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://{admin}/") as r:
            assert r.status == 200 and "zerodown dashboard" in await r.text()
        for _ in range(40):  # new connections each time: both workers get some
            async with s.get(
                f"http://127.0.0.1:{proxy.http}/", headers={"Connection": "close"}
            ) as r:
                assert r.status == 200
        per_worker = []
        for w in proxy.status()["workers"]:
            async with s.get(f"http://{w['admin']}/v1/dashboard/samples") as r:
                samples = (await r.json())["samples"]
            per_worker.append(sum(x["apps"].get("drimeap", {}).get("v1", {}).get("n", 0)
                                  for x in samples))  # fmt: skip
        deadline = asyncio.get_running_loop().time() + 15
        while (total := await _series_total(s, admin, "v1")) < 40:
            assert asyncio.get_running_loop().time() < deadline, f"series saw {total}/40"
            await asyncio.sleep(0.2)
        assert total == 40, per_worker


async def test_actions_need_the_token_and_the_same_origin_then_run_the_cli(
    tmp_path, backend_factory, start_proxy
):
    reg = await _two_groups(tmp_path, backend_factory)
    proxy = start_proxy(reg)
    admin = f"127.0.0.1:{proxy.admin}"
    url = f"http://{admin}/v1/dashboard/switch"
    body = orjson.dumps({"app": "drimeap"})
    json_type = {"Content-Type": "application/json"}
    same = {"Origin": f"http://{admin}"}
    auth = {"Authorization": f"Bearer {TOKEN}"}
    refused = [
        ({**json_type, **auth}, 403, "no Origin header"),
        ({**json_type, **auth, "Origin": "http://evil.example"}, 403, "cross-origin"),
        ({**json_type, **auth, **same, "Sec-Fetch-Site": "cross-site"}, 403, "cross-site"),
        ({**json_type, **same}, 401, "needs the admin token"),
        ({**json_type, **same, "Authorization": "Bearer wrong"}, 401, "needs the admin token"),
        ({**auth, **same, "Content-Type": "text/plain"}, 415, "application/json"),
    ]
    async with aiohttp.ClientSession() as s:
        for headers, status, why in refused:
            async with s.post(url, data=body, headers=headers) as r:
                assert r.status == status and why in (await r.json())["error"], headers
        assert proxy.status()["generation"] == 1 and _history(tmp_path) == []

        ok = {**json_type, **same, **auth}
        # The CLI's own refusal, word for word, and audited as the CLI audits.
        async with s.post(url, data=orjson.dumps({"app": "nope"}), headers=ok) as r:
            assert r.status == 409
            assert (await r.json())["error"] == (
                "app nope is not in the local registry (known: drimeap)"
            )
        async with s.post(url, data=body, headers=ok) as r:
            answer = await r.json()
            assert r.status == 200 and answer["ok"], answer
        assert "switched drimeap to green (v2)" in answer["message"]
        st = proxy.wait_generation(2)
        assert st["apps"]["drimeap"]["active"]["version"] == "v2"
        records = _history(tmp_path)
        assert [(r["action"], r["result"]) for r in records] == [
            ("switch", "refused"),
            ("switch", "ok"),
        ]
        assert all(r["via"] == "dashboard (client 127.0.0.1)" for r in records)
        assert (records[1]["from"], records[1]["to"]) == ("blue", "green")

        async with s.post(f"http://{admin}/v1/dashboard/rollback", data=body, headers=ok) as r:
            assert r.status == 200 and (await r.json())["ok"]
        assert proxy.wait_generation(3)["apps"]["drimeap"]["active"]["group"] == "blue"
        async with s.get(f"http://{admin}/v1/dashboard/history?app=drimeap&generation=3") as r:
            shown = (await r.json())["records"]
        assert [x["action"] for x in shown] == ["switch", "rollback"]  # this app's only
        assert shown[-1]["result"] == "ok" and shown[-1]["to"] == "blue"


def test_consul_proxies_listed_with_generation(consul, backends, proxies) -> None:  # noqa: F811
    """With the Consul provider: every registered proxy and the generation it has applied."""
    register_backends(consul, backends)
    gen = consul.kv_set(KEY, "blue")
    ps = [proxies(config(consul, wait=30.0), f"p{n}") for n in range(2)]
    for p in ps:
        p.wait_generation(gen)

    def listed() -> list[dict] | None:
        url = f"http://127.0.0.1:{ps[0].admin}/v1/dashboard/proxies"
        with urllib.request.urlopen(url, timeout=10) as r:
            found = orjson.loads(r.read())["proxies"]
        return found if len(found) == 2 and all(x["generation"] == gen for x in found) else None

    found = wait_until(listed, 20, "both registered proxies with their generation")
    assert sorted(x["admin"] for x in found) == sorted(f"127.0.0.1:{p.admin}" for p in ps)
    assert all(x["error"] is None for x in found)


async def test_history_is_one_cli_run_however_many_pages_ask(tmp_path: Path) -> None:
    """Pages asking at once, even naming different generations, share one `zerodown history`
    run: the admin API cannot be made to start processes at the rate it is asked."""
    from zerodown_proxy.config import Config, DiscoverySection
    from zerodown_proxy.dashboard.release import ReleaseDesk

    rec = {"app": "drimeap", "action": "switch", "result": "ok", "time_ns": 1}
    (tmp_path / "history.jsonl").write_bytes(orjson.dumps(rec) + b"\n")
    desk = ReleaseDesk(
        Config(discovery=DiscoverySection(file=str(tmp_path / "registry.json"))), None
    )
    runs: list[list[str]] = []
    real = desk._run

    async def counted(argv: list[str], timeout: float, via: str | None = None):  # type: ignore[no-untyped-def]
        runs.append(argv)
        return await real(argv, timeout, via)

    desk._run = counted  # type: ignore[method-assign]
    answers = await asyncio.gather(*(desk.history("drimeap", g) for g in range(5)))
    assert answers == [[rec]] * 5
    assert runs == [["history", "--app", "drimeap", "--json"]]
