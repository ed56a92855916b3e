"""A second independent HSMS implementation, secs4js (TypeScript, npm), on both ends of a real
proxy process: selection, S1F1/S1F2, S6F11/S6F12, linktest, a host command, and switches under
load without a disconnect. secs4js hosts are HSMS-SS passive entities: one selected session
each (a second Select.req gets status 3), so each group here has one host and the test one tool.
"""

from __future__ import annotations

import asyncio
import re
import struct
import time
from pathlib import Path

import pytest

from ..helpers import async_wait_until, instance, registry, write_registry
from ..hsmspeers import metric
from ..secs4js_peer import Secs4js
from .test_hsms_proxy import HSMS_CFG, _http

GROUPS = {"blue": "v1", "green": "v2"}


def _event(dataid: int) -> str:
    return f"<L <U4 {dataid}> <U4 1000> <L>>"


@pytest.fixture
async def secs4js_stack(tmp_path, start_proxy):
    hosts = {g: await Secs4js.host(v) for g, v in GROUPS.items()}
    reg = tmp_path / "registry.json"

    def write(generation: int, active: str) -> None:
        insts = [instance(f"drimeap-{g}-1", g, v, 1, hsms=hosts[g].port) for g, v in GROUPS.items()]
        write_registry(reg, registry(generation, active, insts, hsms_device_id=0))

    write(1, "blue")
    proxy = start_proxy(reg, config=HSMS_CFG.replace("t3 = 3.0", "t3 = 8.0"))
    made: list[Secs4js] = []

    async def tool() -> Secs4js:
        t = await Secs4js.equipment(proxy.hsms, t3=8.0)
        made.append(t)
        return t

    yield proxy, hosts, write, tool
    for p in [*made, *hosts.values()]:
        await p.stop()


async def _switch(proxy, write, generation: int, active: str) -> float:  # type: ignore[no-untyped-def]
    write(generation, active)
    await asyncio.to_thread(proxy.wait_generation, generation)
    return time.monotonic()


async def test_secs4js_both_ends_select_transactions_linktest_and_host_command(secs4js_stack):
    proxy, hosts, _, tool = secs4js_stack
    t = await tool()  # selected through the proxy (the proxy answers Select itself)
    rsp = await t.send(1, 1)
    assert (rsp["s"], rsp["f"]) == (1, 2) and '"v1"' in rsp["sml"], rsp
    rsp = await t.send(6, 11, _event(7))
    assert (rsp["s"], rsp["f"]) == (6, 12) and rsp["sml"] == "<B [1] 0x00>", rsp
    assert await hosts["blue"].received() == [7]
    await t.call("linktest")  # answered by the proxy
    # The proxy's own linktests (every 0.3 s of silence) reach the secs4js host and are answered.
    await asyncio.sleep(1.0)
    rsp = await hosts["blue"].send(2, 41, '<L <A "START"> <L>>')
    assert (rsp["s"], rsp["f"]) == (2, 42), rsp
    (seen,) = [e for e in t.seen("message") if e["s"] == 2]
    assert seen["f"] == 41 and '"START"' in seen["sml"]
    sess = proxy.status()["hsms"]["sessions"]
    assert [(s["state"], s["backend"]["version"]) for s in sess] == [("SELECTED", "v1")]
    assert not t.seen("disconnected") and not hosts["green"].seen("selected")


async def test_secs4js_switches_under_load_lose_nothing_and_never_disconnect(secs4js_stack):
    proxy, hosts, write, tool = secs4js_stack
    t = await tool()
    sent: dict[int, float] = {}
    failures: list[str] = []
    stop = asyncio.Event()

    async def run(k: int) -> None:
        n = 0
        deadline = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < deadline and n < 5000:
            n += 1
            dataid = k * 100_000 + n
            sent[dataid] = time.monotonic()
            try:
                rsp = await t.send(6, 11, _event(dataid), timeout=20)
            except Exception as exc:  # noqa: BLE001 (recorded, asserted below)
                failures.append(f"DATAID {dataid}: {exc}")
                continue
            if (rsp.get("s"), rsp.get("f")) != (6, 12):
                failures.append(f"DATAID {dataid}: answered {rsp}")

    workers = [asyncio.create_task(run(k)) for k in range(1, 5)]  # 4 open transactions
    applied: list[tuple[float, str]] = []
    try:
        active = "blue"
        for g in range(2, 6):
            active = "green" if active == "blue" else "blue"
            applied.append((await _switch(proxy, write, g, active), active))
            base = len(await hosts[active].received())
            await async_wait_until(
                lambda a=active, b=base: _count(hosts[a]) >= b + 20, 20, f"traffic on {active}"
            )
    finally:
        stop.set()
        await asyncio.gather(*workers)
    assert not failures, failures[:5]
    got: dict[int, str] = {}
    dups = []
    for g, h in hosts.items():
        for d in await h.received():
            if d in got:
                dups.append(d)
            got[d] = GROUPS[g]
    assert not dups, dups[:10]
    assert set(got) == set(sent), sorted(set(sent) - set(got))[:10]
    wrong = []
    for i, (t_applied, group) in enumerate(applied):
        until = applied[i + 1][0] if i + 1 < len(applied) else float("inf")
        wrong += [d for d, ts in sent.items() if t_applied < ts < until - 0.5
                  and got[d] != GROUPS[group]]  # fmt: skip
    assert not wrong, wrong[:10]
    assert not t.seen("disconnected") and len(t.seen("selected")) == 1
    assert metric(proxy, "zerodown_hsms_handovers_total") >= 4
    assert metric(proxy, "zerodown_hsms_aborted_total") == 0


async def test_secs4js_equipment_against_secsgem_hosts_across_a_switch(
    tmp_path, start_proxy, sample_app
):
    """Mixed: secs4js in front, secsgem (the sample app) behind."""
    apps = {g: await asyncio.to_thread(sample_app, f"drimeap-{g}-1", v, True)
            for g, v in GROUPS.items()}  # fmt: skip
    reg = tmp_path / "registry.json"

    def write(generation: int, active: str) -> None:
        insts = [instance(f"drimeap-{g}-1", g, v, apps[g].port, hsms=apps[g].hsms_port)
                 for g, v in GROUPS.items()]  # fmt: skip
        write_registry(reg, registry(generation, active, insts, hsms_device_id=0))

    write(1, "blue")
    proxy = start_proxy(reg, config=HSMS_CFG.replace("t3 = 3.0", "t3 = 8.0"))
    t = await Secs4js.equipment(proxy.hsms, t3=8.0)
    try:
        rsp = await t.send(1, 1)
        assert (rsp["s"], rsp["f"]) == (1, 2) and '"v1"' in rsp["sml"], rsp
        for k in range(10):
            assert (await t.send(6, 11, _event(500 + k)))["f"] == 12
        code, body = await asyncio.to_thread(
            _http, "POST", apps["blue"].port, "/hsms/command?rcmd=START&timeout=5"
        )
        assert (code, body) == (200, {"hcack": 0, "version": "v1"})
        await _switch(proxy, write, 2, "green")
        rsp = await t.send(1, 1)
        assert '"v2"' in rsp["sml"], rsp
        code, body = await asyncio.to_thread(_http, "GET", apps["blue"].port, "/hsms/received")
        assert body["s6f11"] == [500 + k for k in range(10)]
        assert not t.seen("disconnected") and len(t.seen("selected")) == 1
    finally:
        await t.stop()


async def test_secs4js_equipment_s9_reaches_the_host_with_its_own_header(secs4js_stack):
    """Stream 9 with the second peer on both ends: the S9F5 the secs4js tool writes quotes the
    proxy's numbering; the secs4js host receives the header of its own primary."""
    proxy, hosts, _, tool = secs4js_stack
    t = await tool()
    await t.send(1, 1)
    host = hosts["blue"]
    sent = await host.send(2, 99, "<L>", w=False)
    (seen,) = await async_wait_until(lambda: _messages(t, 2), 10, "S2F99 at the tool")
    assert seen["f"] == 99 and not seen["w"]
    head = struct.pack(">HBBBBI", seen["session"], 2, 99, 0, 0, seen["sys"])
    await t.send(9, 5, "<B " + " ".join(f"0x{b:02x}" for b in head) + ">", w=False)
    (s9,) = await async_wait_until(lambda: _messages(host, 9), 10, "S9F5 at the host")
    assert s9["f"] == 5
    quoted = bytes(int(x, 16) for x in re.findall(r"0x([0-9a-fA-F]{2})", s9["sml"]))
    assert struct.unpack(">HBBBBI", quoted) == (0, 2, 99, 0, 0, sent["sent_sys"])
    assert metric(proxy, "zerodown_hsms_stream9_total", 'outcome="routed"') == 1


def _messages(peer: Secs4js, stream: int) -> list[dict]:
    return [e for e in peer.seen("message") if e["s"] == stream]


def _count(host: Secs4js) -> int:
    return sum(1 for e in host.seen("message") if (e["s"], e["f"]) == (6, 11))


def test_peer_files_are_committed_and_locked():
    d = Path(__file__).resolve().parent.parent / "peers" / "secs4js"
    lock = (d / "package-lock.json").read_text()
    assert '"secs4js": "0.4.7"' in (d / "package.json").read_text()
    assert '"node_modules/secs4js"' in lock and '"integrity": "sha512-' in lock
