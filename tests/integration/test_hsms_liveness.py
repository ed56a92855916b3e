"""HSMS liveness: a backend session that stops answering is found and the tool failed over
without a disconnect (issue 9, section 2), and the hook for the proxy's own health checks.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import orjson

from zerodown_proxy.config import HsmsSection, load_config
from zerodown_proxy.hsms.proxy import HsmsProxy
from zerodown_proxy.metrics import Registry
from zerodown_proxy.routing import AppState, Instance, RegistryState, Router
from zerodown_proxy.watcher import Watcher

from ..helpers import async_wait_until, instance, registry, write_registry
from ..hsmspeers import RawHost, RawTool, metric, s6f11_body


def _received(app) -> list[int]:  # type: ignore[no-untyped-def]
    with urllib.request.urlopen(f"http://127.0.0.1:{app.port}/hsms/received", timeout=10) as r:
        return orjson.loads(r.read())["s6f11"]


def _backend_events(proxy) -> list[str]:  # type: ignore[no-untyped-def]
    """The proxy's log lines about backend sessions, with their times (for failure messages)."""
    out = []
    for line in proxy.log_path.read_text(errors="replace").splitlines():
        if '"hsms_backend' in line:
            e = orjson.loads(line)
            out.append(f"{e['ts']:.3f} {e['msg']}")
    return out


async def _tool(port: int) -> RawTool:
    t = RawTool(port)
    await t.connect()
    assert await t.select() == 0
    return t


async def test_a_sigstopped_backend_is_failed_over_within_10_s_with_the_default_timers(
    tmp_path, start_proxy, sample_app
):
    h = load_config(env={}).hsms
    assert h.linktest_interval + h.t6 <= 10, "the defaults must find a hung backend in 10 s"
    with ThreadPoolExecutor(2) as ex:
        apps = list(ex.map(lambda k: sample_app(f"drimeap-blue-{k}", "v1", hsms=True), (1, 2)))
    reg = tmp_path / "registry.json"
    insts = [instance(a.ready_file.stem, "blue", "v1", a.port, hsms=a.hsms_port) for a in apps]
    write_registry(reg, registry(1, "blue", insts, hsms_device_id=0))
    proxy = start_proxy(reg, config="[hsms]\n")  # every HSMS timer at its default
    tool = await _tool(proxy.hsms)
    assert (await tool.request(6, 11, s6f11_body(1), timeout=10)).function == 12
    (sess,) = proxy.status()["hsms"]["sessions"]
    frozen = next(a for a in apps if a.ready_file.stem == sess["backend"]["instance"])
    alive = next(a for a in apps if a is not frozen)
    os.kill(frozen.pid, signal.SIGSTOP)  # the kernel still accepts its bytes: only HSMS can tell
    try:
        t0 = time.monotonic()
        rsp = await tool.request(6, 11, s6f11_body(2), timeout=20)
        took = time.monotonic() - t0
        # The open S6F11 is ended explicitly (S6F0) when the hung session is given up: by
        # design within linktest_interval + t6 (8 s) of the last byte it sent; the 10 s bound
        # (issue 9) leaves 2 s for a loaded machine's scheduling.
        assert rsp.function == 0, (rsp.describe(), took, _backend_events(proxy))
        assert took < 10.0, (f"a hung backend was found only after {took:.1f} s",
                             _backend_events(proxy))  # fmt: skip
        # The tool never noticed anything else: same connection, next event to the live one.
        rsp = await tool.request(6, 11, s6f11_body(3), timeout=10)
        assert rsp.function == 12 and 3 in _received(alive)
        assert not tool.closed.is_set() and not tool.separated
        assert metric(proxy, "zerodown_hsms_failovers_total") == 1
        assert (
            proxy.status()["hsms"]["sessions"][0]["backend"]["instance"] != frozen.ready_file.stem
        )
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    await tool.close()


async def test_a_backend_that_reads_but_never_answers_is_failed_over(tmp_path, start_proxy):
    hosts = [RawHost("v1"), RawHost("v1")]
    for host in hosts:
        await host.start()
    reg = tmp_path / "registry.json"
    insts = [
        instance(f"drimeap-blue-{k}", "blue", "v1", 1, hsms=h.port) for k, h in enumerate(hosts)
    ]
    write_registry(reg, registry(1, "blue", insts, hsms_device_id=0))
    proxy = start_proxy(
        reg, config="[hsms]\nt3 = 30.0\nt5 = 5.0\nt6 = 1.0\nlinktest_interval = 0.5\n"
    )
    try:
        tool = await _tool(proxy.hsms)
        await tool.request(1, 1)
        (mute,) = [h for h in hosts if h.selected_conns()]
        mute.answer_linktest = mute.answer_data = False
        t0 = time.monotonic()
        rsp = await tool.request(6, 11, s6f11_body(1), timeout=10)
        took = time.monotonic() - t0
        # It read the S6F11 (and the Linktest.req) and answered neither: SxF0 well before T3.
        assert rsp.function == 0 and took < 3.0, (rsp.describe(), took)
        assert (6, 11, len(s6f11_body(1))) in mute.primaries
        (other,) = [h for h in hosts if h is not mute]
        assert (await tool.request(6, 11, s6f11_body(2))).function == 12
        assert other.received == [2] and not tool.closed.is_set()
        await tool.close()
    finally:
        for host in hosts:
            await host.stop()


# -- the hook for the proxy's own health checks (in process: it is an injected callable) --------


async def test_new_backend_sessions_skip_instances_the_health_checker_says_are_down():
    hosts = [RawHost("v1"), RawHost("v1")]
    for host in hosts:
        await host.start()
    insts = tuple(
        Instance(f"drimeap-blue-{k}", "drimeap", "blue", "v1", "127.0.0.1", 1, h.port)
        for k, h in enumerate(hosts)
    )
    router = Router()
    Watcher(router).submit(
        RegistryState(1, (AppState("drimeap", "blue", insts, hsms_device_id=0),))
    )
    down = {insts[0].id}
    asked: list[str] = []

    def instance_down(inst: Instance) -> bool:
        asked.append(inst.id)
        return inst.id in down

    cfg = HsmsSection(t5=0.2, t6=1.0, linktest_interval=0)
    proxy = HsmsProxy(router, cfg, Registry(), instance_down=instance_down)
    await proxy.start("127.0.0.1", 0)
    tools = []
    try:
        for _ in range(4):  # round robin would put two on each instance
            tools.append(await _tool(proxy.port))
            assert (await tools[-1].request(1, 1)).function == 2
        assert len(hosts[0].conns) == 0 and len(hosts[1].selected_conns()) == 4
        assert set(asked) == {i.id for i in insts}
        # All down: sessions are not opened; primaries wait (then SxF0 at T3, as with no backend).
        down.add(insts[1].id)
        hosts[1].kill()
        await async_wait_until(lambda: not any(t.current for t in proxy.tools), 5, "sessions lost")
        n = len(hosts[0].conns)
        pending = asyncio.create_task(tools[0].request(1, 1, timeout=5))
        await asyncio.sleep(0.3)
        assert not pending.done() and len(hosts[0].conns) == n
        # Back up: the waiting primary is delivered to it.
        down.clear()
        assert (await pending).function == 2 and len(hosts[0].conns) > n
        for t in tools:
            assert not t.closed.is_set()
    finally:
        for t in tools:
            await t.close()
        await proxy.close(0.5)
        for host in hosts:
            await host.stop()
