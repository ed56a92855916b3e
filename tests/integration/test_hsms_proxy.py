"""HSMS proxy through a real `zerodown proxy` process: raw-socket peers first, then secsgem peers.

Backends (passive hosts) and tools (active equipment) run in the test process; the proxy runs as
a child process with an [hsms] section, reading a file registry with hsms_port per instance.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from pathlib import Path

import pytest

from zerodown_proxy.hsms import codec

from ..helpers import async_wait_until, instance, registry, write_registry
from ..hsmspeers import RawHost, RawTool, s6f11_body

HSMS_CFG = """[hsms]
t3 = 3.0
t5 = 0.5
t6 = 2.0
t7 = 1.0
t8 = 0.5
linktest_interval = 0.3
max_message_bytes = 65536
max_queued = 50
"""


async def _hosts(versions: list[tuple[str, str, str]], **kw) -> list[RawHost]:
    hosts = []
    for _iid, _group, version in versions:
        h = RawHost(version, **kw)
        await h.start()
        hosts.append(h)
    return hosts


def _reg(path: Path, generation: int, active: str, specs, hosts, **app) -> None:
    insts = [
        instance(iid, group, version, 1, hsms=h.port)
        for (iid, group, version), h in zip(specs, hosts, strict=True)
    ]
    write_registry(path, registry(generation, active, insts, **app))


SPECS = [
    ("drimeap-blue-1", "blue", "v1"),
    ("drimeap-blue-2", "blue", "v1"),
    ("drimeap-green-1", "green", "v2"),
    ("drimeap-green-2", "green", "v2"),
]


def metric(proxy, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{proxy.admin}/metrics", timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (len(line) == len(name) or line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture
async def stack(tmp_path, start_proxy):
    hosts = await _hosts(SPECS)
    reg = tmp_path / "registry.json"
    _reg(reg, 1, "blue", SPECS, hosts, hsms_device_id=0)
    proxy = start_proxy(reg, config=HSMS_CFG)
    yield proxy, hosts, reg
    for h in hosts:
        await h.stop()


async def test_select_linktest_and_transactions_both_ways(stack):
    proxy, hosts, _ = stack
    tool = RawTool(proxy.hsms)
    await tool.connect()
    assert await tool.select() == codec.SELECT_OK
    # Select again while selected: E37 status 1, still selected.
    assert await tool.select() == codec.SELECT_ALREADY_ACTIVE
    rsp = await tool.control(codec.linktest_req)
    assert rsp.stype == codec.LINKTEST_RSP
    reply = await tool.request(1, 1)
    assert (reply.stream, reply.function) == (1, 2) and b"v1" in reply.body
    reply = await tool.request(6, 11, s6f11_body(7))
    assert (reply.stream, reply.function, reply.body) == (6, 12, b"\x21\x01\x00")
    assert sum(h.received.count(7) for h in hosts) == 1
    # Host-initiated: the backend that serves this tool sends S2F41, the tool answers S2F42.
    (host,) = [h for h in hosts if h.selected_conns()]
    rsp = await host.send_primary(2, 41, b"\x01\x00")
    assert (rsp.stream, rsp.function) == (2, 42)
    # Proxy's linktests to the backend (interval 0.3 s) keep the backend session alive.
    await asyncio.sleep(0.8)
    assert (await tool.request(1, 1)).function == 2
    st = proxy.status()["hsms"]
    (sess,) = st["sessions"]
    assert sess["state"] == "SELECTED" and sess["backend"]["version"] == "v1"
    assert sess["backend"]["state"] == "selected"
    await tool.close()


async def _switch(proxy, reg: Path, generation: int, active: str, specs, hosts) -> float:
    _reg(reg, generation, active, specs, hosts, hsms_device_id=0)
    await asyncio.to_thread(proxy.wait_generation, generation)
    return time.monotonic()  # the switch is applied no later than this instant


async def test_ten_switches_under_load_lose_nothing_and_never_use_the_old_version(stack):
    proxy, hosts, reg = stack
    version_of = {id(h): v for (_, _, v), h in zip(SPECS, hosts, strict=True)}
    tools = [RawTool(proxy.hsms) for _ in range(4)]
    for t in tools:
        await t.connect()
        assert await t.select() == 0
    sent: dict[int, float] = {}  # dataid -> time the primary was written
    failures: list[str] = []
    stop = asyncio.Event()

    async def run(k: int, tool: RawTool) -> None:
        n = 0
        deadline = time.monotonic() + 40  # bounded even if the test logic breaks
        while not stop.is_set() and time.monotonic() < deadline and n < 5000:
            n += 1
            dataid = k * 100_000 + n
            sent[dataid] = time.monotonic()
            try:
                rsp = await tool.request(6, 11, s6f11_body(dataid), timeout=5)
            except TimeoutError:
                failures.append(f"tool {k}: DATAID {dataid} timed out")
                continue
            if rsp.stype != 0 or rsp.function != 12:
                failures.append(f"tool {k}: DATAID {dataid} answered {rsp.describe()}")

    tasks = [asyncio.create_task(run(k, t)) for k, t in enumerate(tools)]
    applied: list[tuple[float, str]] = []
    try:
        active = "blue"
        for g in range(2, 12):
            active = "green" if active == "blue" else "blue"
            applied.append((await _switch(proxy, reg, g, active, SPECS, hosts), active))
            new_hosts = [h for (_, grp, _), h in zip(SPECS, hosts, strict=True) if grp == active]
            base = sum(len(h.received) for h in new_hosts)
            await async_wait_until(
                lambda nh=new_hosts, b=base: sum(len(h.received) for h in nh) >= b + 20,
                10, f"traffic on {active} after switch {g}",
            )  # fmt: skip
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    assert not failures, failures[:5]
    got: dict[int, str] = {}
    dups = []
    for h in hosts:
        for d in h.received:
            if d in got:
                dups.append(d)
            got[d] = version_of[id(h)]
    assert not dups, f"duplicated DATAIDs: {dups[:10]}"
    assert set(got) == set(sent), f"lost: {sorted(set(sent) - set(got))[:10]}"
    # Every primary sent after a switch was applied went to the version it switched to.
    wrong = []
    for i, (t_applied, group) in enumerate(applied):
        until = applied[i + 1][0] if i + 1 < len(applied) else float("inf")
        want = "v2" if group == "green" else "v1"
        wrong += [d for d, t in sent.items() if t_applied < t < until - 0.5 and got[d] != want]
    assert not wrong, f"old version handled primaries sent after the switch: {wrong[:10]}"
    for t in tools:
        assert not t.closed.is_set() and not t.separated
    st = proxy.status()["hsms"]
    assert st["handovers"] >= 40 and all(s["state"] == "SELECTED" for s in st["sessions"])
    # Drained old sessions are deselected and closed: only the Active group keeps sessions.
    old = [h for (_, grp, _), h in zip(SPECS, hosts, strict=True) if grp != active]
    await async_wait_until(
        lambda: all(not h.selected_conns() for h in old), 5, "old-group sessions to close"
    )
    assert sum(h.deselects for h in hosts) >= 40
    for t in tools:
        await t.close()
