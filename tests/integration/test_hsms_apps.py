"""Several EAP apps, each on its own HSMS listener, and pilots, through a real proxy process.

Raw HSMS peers run in the test process (tests/hsmspeers.py); tools connect from 127.0.0.2,
127.0.0.3, ... so a pilot can name a tool by its IP address.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from ..helpers import ProxyProc, async_wait_until, instance, write_registry
from ..hsmsload import SOURCES, Load, connect_tools, start_hosts, version_of
from ..hsmspeers import RawHost, metric

HSMS_CFG = """[hsms]
t3 = 5.0
t5 = 0.5
t6 = 3.0
t7 = 2.0
t8 = 1.0
linktest_interval = 1.0
"""


def app_entry(
    name: str, active: str, hosts: list[RawHost], versions: list[str], **extra: Any
) -> dict[str, Any]:
    groups = ["blue", "green"]
    insts = [
        instance(f"{name}-{groups[n]}", groups[n], versions[n], 1, hsms=h.port)
        for n, h in enumerate(hosts)
    ]
    return {"active": active, "instances": insts, "hsms_device_id": 0, **extra}


def write_apps(path: Path, generation: int, apps: dict[str, dict[str, Any]], proxies=()) -> None:
    write_registry(path, {"generation": generation, "apps": apps, "proxies": list(proxies)})


def sessions_by_tool(proxy) -> dict[str, dict[str, Any]]:  # type: ignore[no-untyped-def]
    return {s["tool"].rsplit(":", 1)[0]: s for s in proxy.status()["hsms"]["sessions"]}


async def test_two_apps_each_on_its_own_listener_switch_one_only_its_tools_move(
    tmp_path, start_proxy
):
    drim = await start_hosts(["v1", "v2"])
    etch = await start_hosts(["e1", "e2"])
    reg = tmp_path / "registry.json"
    listen = {"hsms_listen": "127.0.0.1:0"}
    apps = {
        "drimeap": app_entry("drimeap", "blue", drim, ["v1", "v2"], **listen),
        "etcheap": app_entry("etcheap", "blue", etch, ["e1", "e2"], **listen),
    }
    write_apps(reg, 1, apps)
    proxy = start_proxy(reg, config=HSMS_CFG)
    listeners = (
        await async_wait_until(
            lambda: (ls := proxy.status()["hsms"]["listeners"])
            and all(ls.get(a, {}).get("port") for a in apps)
            and ls,
            10,
            "both apps' HSMS listeners",
        )
    )  # fmt: skip
    ports = {a: listeners[a]["port"] for a in apps}
    assert len(set(ports.values()) | {proxy.hsms}) == 3  # two own listeners + the global one
    drim_tools = await connect_tools(ports["drimeap"], SOURCES[:2])
    etch_tools = await connect_tools(ports["etcheap"], SOURCES[2:])
    load = Load(drim_tools + etch_tools)
    try:
        t0 = time.monotonic()
        for k in range(4):
            await load.wait_answers(k, t0, 20, f"tool {k} answered before the switch")
        assert [load.since(k, t0) for k in range(4)] == [{"v1"}, {"v1"}, {"e1"}, {"e1"}]
        by_tool = sessions_by_tool(proxy)
        assert {by_tool[s]["app"] for s in SOURCES[:2]} == {"drimeap"}
        assert {by_tool[s]["app"] for s in SOURCES[2:]} == {"etcheap"}
        etch_sessions_before = [h.sessions for h in etch]

        apps["drimeap"]["active"] = "green"  # switch drimeap only
        write_apps(reg, 2, apps)
        await asyncio.to_thread(proxy.wait_generation, 2)
        switched = time.monotonic()
        for k in range(4):
            await load.wait_answers(k, switched, 20, f"tool {k} answered after the switch")
    finally:
        await load.finish()
    assert [load.since(k, switched) for k in range(4)] == [{"v2"}, {"v2"}, {"e1"}, {"e1"}]
    # etcheap's tools kept their backend sessions: no new session was opened on its hosts.
    assert [h.sessions for h in etch] == etch_sessions_before
    for t in drim_tools + etch_tools:
        assert not t.closed.is_set() and not t.separated
    assert metric(proxy, "zerodown_hsms_handovers_total") == 2
    took = metric(proxy, 'zerodown_hsms_handover_seconds_sum{kind="handover"}') / 2
    print(f"per-app switch: {took * 1000:.1f} ms mean, applied -> new session selected")
    for t in drim_tools + etch_tools:
        await t.close()
    for h in drim + etch:
        await h.stop()


async def test_two_apps_with_the_same_hsms_listen_are_refused_and_routing_stays(
    tmp_path, start_proxy
):
    hosts = await start_hosts(["v1", "v2"])
    reg = tmp_path / "registry.json"
    one = {"drimeap": app_entry("drimeap", "blue", hosts, ["v1", "v2"])}
    write_apps(reg, 1, one)
    proxy = start_proxy(reg, config=HSMS_CFG)
    clash = {"hsms_listen": "127.0.0.1:15999"}
    bad = {
        "drimeap": app_entry("drimeap", "blue", hosts, ["v1", "v2"], **clash),
        "etcheap": app_entry("etcheap", "blue", hosts, ["v1", "v2"], **clash),
    }
    write_apps(reg, 2, bad)
    st = await async_wait_until(
        lambda: (s := proxy.status())["discovery"]["last_error"] and s, 10, "the refusal"
    )
    assert "hsms_listen 127.0.0.1:15999 is also app drimeap's" in st["discovery"]["last_error"]
    assert st["generation"] == 1
    for h in hosts:
        await h.stop()


@pytest.fixture
async def four_tools(tmp_path, start_proxy):
    hosts = await start_hosts(["v1", "v2"])
    reg = tmp_path / "registry.json"
    apps = {"drimeap": app_entry("drimeap", "blue", hosts, ["v1", "v2"])}
    write_apps(reg, 1, apps)
    proxy = start_proxy(reg, config=HSMS_CFG)
    tools = await connect_tools(proxy.hsms, SOURCES)
    yield proxy, hosts, reg, apps, tools
    for t in tools:
        await t.close()
    for h in hosts:
        await h.stop()


async def test_pilot_one_of_four_tools_under_load_then_switch_all_on_the_new_version(four_tools):
    proxy, hosts, reg, apps, tools = four_tools
    load = Load(tools)
    try:
        t0 = time.monotonic()
        for k in range(4):
            await load.wait_answers(k, t0, 10, f"tool {k} before the pilot")
        # Pilot the tool at 127.0.0.3 (the file format of contract/pilots.py).
        apps["drimeap"]["pilots"] = {"group": "green", "tools": ["127.0.0.3"]}
        write_apps(reg, 2, apps)
        await asyncio.to_thread(proxy.wait_generation, 2)
        piloted = time.monotonic()
        for k in range(4):
            await load.wait_answers(k, piloted, 20, f"tool {k} with the pilot")
        during = [load.since(k, piloted) for k in range(4)]
        by_tool = sessions_by_tool(proxy)
        assert by_tool["127.0.0.3"]["pilot"] is True
        assert by_tool["127.0.0.2"]["pilot"] is False

        apps["drimeap"]["active"] = "green"  # the switch moves the rest, clears the pilots
        del apps["drimeap"]["pilots"]
        write_apps(reg, 3, apps)
        await asyncio.to_thread(proxy.wait_generation, 3)
        switched = time.monotonic()
        for k in range(4):
            await load.wait_answers(k, switched, 20, f"tool {k} after the switch")
    finally:
        await load.finish()
    assert during == [{"v1"}, {"v2"}, {"v1"}, {"v1"}]
    assert [load.since(k, switched) for k in range(4)] == [{"v2"}] * 4
    for t in tools:
        assert not t.closed.is_set() and not t.separated
    assert metric(proxy, "zerodown_hsms_pilot_moves_total") == 1
    assert metric(proxy, "zerodown_hsms_handovers_total") == 3  # the three others, at the switch
    assert metric(proxy, "zerodown_hsms_tool_sessions") == 4


async def test_pilot_by_device_id_moves_that_tool_and_remove_moves_it_back(four_tools):
    proxy, hosts, reg, apps, tools = four_tools
    tools[2].device_id = 7  # its data messages carry session id 7 (the backend expects 0)
    for t in tools:
        await t.request(1, 1)
    apps["drimeap"]["pilots"] = {"group": "green", "tools": ["device:7"]}
    write_apps(reg, 2, apps)
    await asyncio.to_thread(proxy.wait_generation, 2)
    got = [version_of((await t.request(1, 1)).body) for t in tools]
    assert got == ["v1", "v1", "v2", "v1"]
    # An open transaction at the pilot's removal finishes where it started (on v2).
    hosts[1].reply_delay = 1.0
    base = len(hosts[1].primaries)
    open_call = asyncio.create_task(tools[2].request(1, 1, timeout=8))
    await async_wait_until(lambda: len(hosts[1].primaries) > base, 5, "the S1F1 to reach v2")
    del apps["drimeap"]["pilots"]
    write_apps(reg, 3, apps)
    await asyncio.to_thread(proxy.wait_generation, 3)
    assert version_of((await tools[2].request(1, 1)).body) == "v1"
    assert version_of((await open_call).body) == "v2"
    assert metric(proxy, "zerodown_hsms_pilot_moves_total") == 2
    assert not any(t.closed.is_set() or t.separated for t in tools)


async def test_a_pilot_that_connects_later_starts_on_standby_and_is_shown_as_pilot(
    tmp_path, start_proxy
):
    hosts = await start_hosts(["v1", "v2"])
    reg = tmp_path / "registry.json"
    apps = {"drimeap": app_entry("drimeap", "blue", hosts, ["v1", "v2"])}
    apps["drimeap"]["pilots"] = {"group": "green", "tools": ["127.0.0.3"]}
    write_apps(reg, 1, apps)
    proxy = start_proxy(reg, config=HSMS_CFG)
    tools = await connect_tools(proxy.hsms, SOURCES[:2])
    got = [version_of((await t.request(1, 1)).body) for t in tools]
    assert got == ["v1", "v2"]
    by_tool = sessions_by_tool(proxy)
    assert (by_tool["127.0.0.2"]["pilot"], by_tool["127.0.0.3"]["pilot"]) == (False, True)
    assert metric(proxy, "zerodown_hsms_pilot_sessions") == 1
    assert metric(proxy, 'zerodown_pilots{app="drimeap"}') == 1
    del apps["drimeap"]["pilots"]  # removed: it joins the others on Active, as a pilot move
    write_apps(reg, 2, apps)
    await asyncio.to_thread(proxy.wait_generation, 2)
    assert version_of((await tools[1].request(1, 1)).body) == "v1"
    assert metric(proxy, "zerodown_hsms_pilot_moves_total") == 1
    assert metric(proxy, "zerodown_hsms_pilot_sessions") == 0
    for t in tools:
        assert not t.closed.is_set()
        await t.close()
    for h in hosts:
        await h.stop()


async def test_two_apps_from_consul_meta_hsms_listen_switch_one_by_its_key(
    tmp_path, consul, backend_factory
):
    """The same with the Consul provider: `Meta["hsms_listen"]` on `<app>-hsms` gives each app
    its listener; a CAS of one app's Active key moves only that app's tools."""
    hosts = {"drimeap": await start_hosts(["v1", "v2"]), "etcheap": await start_hosts(["e1", "e2"])}
    versions = {"drimeap": ["v1", "v2"], "etcheap": ["e1", "e2"]}
    for app, hs in hosts.items():
        for n, group in enumerate(("blue", "green")):
            version = versions[app][n]
            port = await backend_factory(version, f"{app}-{group}")
            tags = [f"zerodown-group={group}", f"zerodown-version={version}"]
            meta = {"zerodown-instance": f"{app}-{group}"}
            consul.register(f"{app}-{group}", app, "127.0.0.1", port, tags=tags, meta=meta)
            consul.register(f"{app}-{group}-hsms", f"{app}-hsms", "127.0.0.1", hs[n].port,
                            tags=tags, meta={**meta, "hsms_listen": "127.0.0.1:0",
                                             "hsms_device_id": "0"})  # fmt: skip
        consul.kv_set(f"zerodown/{app}/active", "blue")
    cfg = "\n".join([
        "[proxy]", 'http_listen = "127.0.0.1:0"', 'hsms_listen = "127.0.0.1:0"',
        'admin_listen = "127.0.0.1:0"', 'admin_token = "test-token"', "shutdown_grace = 2.0",
        HSMS_CFG, "[health_check]", "enabled = false", "[discovery]", 'provider = "consul"',
        "[consul]", f'addr = "{consul.url}"', "wait = 1.0", 'apps = ["drimeap", "etcheap"]',
        "register_self = false", "",
    ])  # fmt: skip
    proxy = ProxyProc(tmp_path, tmp_path / "unused.json", cfg, "proxy")
    try:
        listeners = await async_wait_until(
            lambda: (ls := proxy.status()["hsms"]["listeners"])
            and all(ls.get(a, {}).get("port") for a in hosts) and ls,
            20, "both apps' HSMS listeners from Consul Meta",
        )  # fmt: skip
        drim = await connect_tools(listeners["drimeap"]["port"], SOURCES[:1])
        etch = await connect_tools(listeners["etcheap"]["port"], SOURCES[1:2])
        load = Load(drim + etch)
        try:
            t0 = time.monotonic()
            for k in range(2):
                await load.wait_answers(k, t0, 10, f"tool {k} before the switch")
            consul.kv_set("zerodown/etcheap/active", "green")
            await async_wait_until(
                lambda: proxy.status()["apps"]["etcheap"]["active"]["group"] == "green",
                20, "etcheap's switch applied",
            )  # fmt: skip
            switched = time.monotonic()
            for k in range(2):
                await load.wait_answers(k, switched, 10, f"tool {k} after the switch")
        finally:
            await load.finish()
        assert [load.since(k, switched) for k in range(2)] == [{"v1"}, {"e2"}]
        assert not any(t.closed.is_set() or t.separated for t in drim + etch)
        for t in drim + etch:
            await t.close()
    finally:
        proxy.terminate()
        for hs in hosts.values():
            for h in hs:
                await h.stop()
