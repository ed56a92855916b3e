"""A takeover with several EAP apps, each on its own HSMS listener, and a pilot; a takeover
that moves a listening address.

A real proxy process; raw HSMS hosts and tools in the test process (tests/hsmspeers.py). Tools
connect from 127.0.0.2, ... so the pilot can name one by its IP address.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
import urllib.request

import orjson
import pytest

from ..helpers import async_wait_until, instance, registry, wait_until, write_registry
from ..hsmsload import SOURCES, connect_tools, start_hosts
from ..hsmspeers import RawHost, RawTool, s6f11_body
from ..rawhttp import read_response
from .test_hsms_apps import HSMS_CFG, app_entry, sessions_by_tool, write_apps
from .test_takeover import _gone, _taken_over

REQUEST_TIMEOUT = 20.0  # a held primary waits for the drain and the new backend session


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listener_errors(proxy) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Every process's HSMS listener errors (each worker's own status: the merged one shows the
    first worker's listeners only)."""
    st = proxy.status()
    parts = [st]
    for w in st.get("workers", []):
        with urllib.request.urlopen(f"http://{w['admin']}/v1/status", timeout=5) as r:
            parts.append(orjson.loads(r.read()))
    return {
        f"{n}:{app}": lst["error"]
        for n, part in enumerate(parts)
        for app, lst in part["hsms"]["listeners"].items()
        if lst["error"]
    }


class S6F11Load:
    """Each tool sends S6F11 back to back (bounded); the DATAIDs answered S6F12 per tool."""

    def __init__(self, tools: list[RawTool]) -> None:
        self.answered: list[list[int]] = [[] for _ in tools]
        self.failures: list[str] = []
        self.stop = asyncio.Event()
        self.tasks = [asyncio.create_task(self._run(k, t)) for k, t in enumerate(tools)]

    async def _run(self, k: int, tool: RawTool) -> None:
        deadline = time.monotonic() + 120
        n = 0
        while not self.stop.is_set() and time.monotonic() < deadline and n < 100_000:
            n += 1
            dataid = (k + 1) * 1_000_000 + n
            try:
                rsp = await tool.request(6, 11, s6f11_body(dataid), timeout=REQUEST_TIMEOUT)
            except TimeoutError:
                self.failures.append(f"tool {k}: no reply to DATAID {dataid}")
                continue
            if (rsp.stype, rsp.stream, rsp.function) != (0, 6, 12):
                self.failures.append(f"tool {k}: DATAID {dataid} answered {rsp.describe()}")
                continue
            self.answered[k].append(dataid)
            await asyncio.sleep(0.005)

    async def wait_more(self, k: int, than: int, what: str) -> None:
        await async_wait_until(lambda: len(self.answered[k]) >= than + 10, 60, what)

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.wait_for(asyncio.gather(*self.tasks), REQUEST_TIMEOUT + 10)


@pytest.mark.parametrize("workers", [1, 2], ids=["single", "two-workers"])
async def test_takeover_hands_over_each_apps_listener_and_its_tools_pilot_included(
    tmp_path, start_proxy, workers
):
    drim = await start_hosts(["v1", "v2"])
    etch = await start_hosts(["e1", "e2"])
    hosts: list[RawHost] = drim + etch
    reg = tmp_path / "registry.json"
    # One app on a fixed address (the new process could not bind it while the old one holds
    # it), one on port 0 (a new bind would get another port): both must be the same sockets.
    # With workers every one binds the same address (SO_REUSEPORT): no port 0 there.
    etch_listen = f"127.0.0.1:{free_port()}" if workers > 1 else "127.0.0.1:0"
    apps = {
        "drimeap": app_entry(
            "drimeap", "blue", drim, ["v1", "v2"], hsms_listen=f"127.0.0.1:{free_port()}",
            pilots={"group": "green", "tools": [SOURCES[1]]},
        ),
        "etcheap": app_entry("etcheap", "blue", etch, ["e1", "e2"], hsms_listen=etch_listen),
    }  # fmt: skip
    write_apps(reg, 1, apps)
    proxy = start_proxy(reg, config=f"workers = {workers}\n{HSMS_CFG}")
    old_workers = {w["pid"] for w in proxy.status().get("workers", [])}
    assert len(old_workers) == (workers if workers > 1 else 0)
    listeners = await async_wait_until(
        lambda: (
            (ls := proxy.status()["hsms"]["listeners"])
            and all(ls.get(a, {}).get("port") for a in apps)
            and ls
        ),
        10,
        "both apps' HSMS listeners",
    )
    ports = {a: listeners[a]["port"] for a in apps}
    assert listener_errors(proxy) == {}
    # drimeap: a tool on Active (v1) and the pilot on Standby (v2); etcheap: one tool (e1).
    tools = await connect_tools(ports["drimeap"], SOURCES[:2])
    tools += await connect_tools(ports["etcheap"], SOURCES[2:3])
    expected = [drim[0], drim[1], etch[0]]
    old_pid = proxy.pid
    load = S6F11Load(tools)
    new_tools: list[RawTool] = []
    new_pid = 0
    try:
        for k in range(3):
            await load.wait_more(k, 0, f"tool {k} answered before the takeover")
        before = sessions_by_tool(proxy)
        sessions_before = [h.sessions for h in hosts]
        counts = [len(a) for a in load.answered]
        os.kill(old_pid, signal.SIGUSR2)
        new_pid = await _taken_over(proxy, old_pid)
        await asyncio.to_thread(
            wait_until, lambda: all(_gone(p) for p in old_workers), 60, "old workers to exit"
        )
        for k in range(3):
            await load.wait_more(k, counts[k], f"tool {k} answered after the takeover")
        await load.finish()
        disconnected = [k for k, t in enumerate(tools) if t.closed.is_set() or t.separated]
        after = sessions_by_tool(proxy)
        sessions_after = [h.sessions for h in hosts]
        listeners_after = proxy.status()["hsms"]["listeners"]
        assert {a: listeners_after[a]["port"] for a in apps} == ports, listeners_after
        assert listener_errors(proxy) == {}
        # The old process has exited: each app's listener (the same port) takes a new tool.
        for app, src, host in (
            ("drimeap", "127.0.0.6", drim[0]),
            ("etcheap", "127.0.0.7", etch[0]),
        ):
            (t,) = await connect_tools(listeners_after[app]["port"], [src])
            new_tools.append(t)
            base = len(host.received)
            rsp = await t.request(6, 11, s6f11_body(9_000_000 + len(new_tools)), timeout=10)
            assert (rsp.stream, rsp.function) == (6, 12)
            assert host.received[base:] == [9_000_000 + len(new_tools)]
    finally:
        load.stop.set()
        for t in tools + new_tools:
            await t.close()
        for h in hosts:
            await h.stop()
        if new_pid and not _gone(new_pid):
            os.kill(new_pid, signal.SIGTERM)
            await asyncio.to_thread(wait_until, lambda: _gone(new_pid), 30, "proxy to stop")
    log = proxy.output(20000)
    assert new_pid != old_pid and _gone(old_pid)
    assert load.failures == [], (load.failures[:5], log)
    # 0 disconnects: the same connections, never closed or separated, no new Select.
    assert disconnected == [], log
    # The proxy opened each tool's backend session again in the new process, on the same host.
    assert sessions_after == [s + 1 if h in expected else s
                                           for h, s in zip(hosts, sessions_before, strict=True)]  # fmt: skip
    # Nothing lost or duplicated, and each tool answered only by its own app and version.
    received = [d for h in hosts for d in h.received]
    assert len(received) == len(set(received)), "a message was delivered twice"
    for k, host in enumerate(expected):
        assert set(load.answered[k]) <= set(host.received), (k, host.version)
    for src, app, pilot in ((SOURCES[0], "drimeap", False), (SOURCES[1], "drimeap", True),
                            (SOURCES[2], "etcheap", False)):  # fmt: skip
        assert (before[src]["app"], before[src]["pilot"]) == (app, pilot)
        assert (after[src]["app"], after[src]["pilot"]) == (app, pilot), after[src]


async def test_a_takeover_applies_a_changed_listen_address(tmp_path, backend_factory, start_proxy):
    port = await backend_factory("v1", "i0")
    reg = tmp_path / "registry.json"
    write_registry(reg, registry(1, "blue", [instance("b1", "blue", "v1", port)]))
    proxy = start_proxy(reg)
    old_pid, old_http = proxy.pid, proxy.http
    cfg = tmp_path / "proxy.toml"
    new_http = free_port()
    cfg.write_text(
        cfg.read_text().replace(
            'http_listen = "127.0.0.1:0"', f'http_listen = "127.0.0.1:{new_http}"'
        )
    )
    os.kill(old_pid, signal.SIGUSR2)
    new_pid = await _taken_over(proxy, old_pid)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", new_http)
        writer.write(b"GET /info HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_response(reader)).status == 200
        writer.close()
        with pytest.raises(ConnectionRefusedError):  # the old address went with the old process
            await asyncio.open_connection("127.0.0.1", old_http)
        assert "inherited on" in proxy.output(20000)
    finally:
        os.kill(new_pid, signal.SIGTERM)
        await asyncio.to_thread(wait_until, lambda: _gone(new_pid), 30, "proxy to stop")


async def test_a_tool_logged_by_device_id_is_still_logged_after_a_takeover(tmp_path, start_proxy):
    host = RawHost("v1")
    await host.start()
    reg = tmp_path / "registry.json"
    write_registry(reg, registry(1, "blue", [instance("b1", "blue", "v1", 1, hsms=host.port)],
                                 hsms_device_id=0))  # fmt: skip
    logdir = tmp_path / "msglog"
    cfg = f'{HSMS_CFG}message_log_dir = "{logdir}"\nmessage_log_tools = "5"\n'
    proxy = start_proxy(reg, config=cfg)
    tool = RawTool(proxy.hsms, device_id=5)
    new_pid = 0
    try:
        await tool.connect()
        assert await tool.select() == 0
        assert (await tool.request(6, 11, s6f11_body(1))).function == 12
        os.kill(proxy.pid, signal.SIGUSR2)
        new_pid = await _taken_over(proxy, proxy.pid)
        assert (await tool.request(6, 11, s6f11_body(2))).function == 12
        path = logdir / "127.0.0.1.sml"
        await async_wait_until(
            lambda: path.exists() and "<U4 2>" in path.read_text(), 10, "DATAID 2 logged"
        )
        assert not tool.closed.is_set() and not tool.separated
    finally:
        await tool.close()
        await host.stop()
        if new_pid and not _gone(new_pid):
            os.kill(new_pid, signal.SIGTERM)
            await asyncio.to_thread(wait_until, lambda: _gone(new_pid), 30, "proxy to stop")


async def test_listeners_the_new_process_does_not_serve_are_closed_not_left_to_queue(
    tmp_path, start_proxy
):
    host = RawHost("v1")
    await host.start()
    reg = tmp_path / "registry.json"
    apps = {"drimeap": app_entry("drimeap", "blue", [host], ["v1"], hsms_listen="127.0.0.1:0")}
    write_apps(reg, 1, apps)
    proxy = start_proxy(reg, config=HSMS_CFG)
    app_port = (
        await async_wait_until(
            lambda: proxy.status()["hsms"]["listeners"].get("drimeap", {}).get("port"), 10,
            "drimeap's listener",
        )
    )  # fmt: skip
    old_hsms = proxy.hsms
    cfg = tmp_path / "proxy.toml"  # HSMS off: a setting that needs a takeover
    cfg.write_text(cfg.read_text().replace("[hsms]\n", "[hsms]\nenabled = false\n"))
    os.kill(proxy.pid, signal.SIGUSR2)
    new_pid = await _taken_over(proxy, proxy.pid)
    try:
        assert "hsms" not in proxy.status()
        for port in (old_hsms, app_port):  # refused, not accepted into a backlog nobody reads
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection("127.0.0.1", port)
        assert "listener hsms:drimeap inherited but not served here: closed" in proxy.output()
    finally:
        await host.stop()
        os.kill(new_pid, signal.SIGTERM)
        await asyncio.to_thread(wait_until, lambda: _gone(new_pid), 30, "proxy to stop")
