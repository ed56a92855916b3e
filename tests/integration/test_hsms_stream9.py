"""Stream 9 through a real proxy process, raw-socket peers: the header inside an S9 body is
rewritten to the numbering of the backend session that sent (or received) the message it names,
and the S9 goes to that session, across a switch too; what maps to nothing is counted, logged and
not forwarded; the proxy never sends Stream 9 to a tool."""

from __future__ import annotations

import asyncio

import pytest

from zerodown_proxy.hsms import codec
from zerodown_proxy.hsms.codec import Frame

from ..helpers import async_wait_until
from ..hsmspeers import RawHost, RawTool, metric, s9_header
from .test_hsms_proxy import HSMS_CFG, SPECS, _hosts, _reg, _switch

S9 = "zerodown_hsms_stream9_total"
MEMORY = 4  # [hsms] stream9_memory: host primaries (and replies) remembered per tool


@pytest.fixture
async def hsms_stack(tmp_path, start_proxy):
    hosts = await _hosts(SPECS)
    reg = tmp_path / "registry.json"
    _reg(reg, 1, "blue", SPECS, hosts, hsms_device_id=0)
    proxy = start_proxy(reg, config=HSMS_CFG + f"stream9_memory = {MEMORY}\n")
    yield proxy, hosts, reg
    for h in hosts:
        await h.stop()


async def _tool(proxy, **kw) -> RawTool:  # type: ignore[no-untyped-def]
    tool = RawTool(proxy.hsms, **kw)
    await tool.connect()
    assert await tool.select() == codec.SELECT_OK
    await tool.request(1, 1)  # a backend session is selected
    return tool


def _serving(hosts: list[RawHost]) -> RawHost:
    (host,) = [h for h in hosts if h.selected_conns()]
    return host


def _no_stream9_to(tool: RawTool) -> None:
    assert not [f.describe() for f in tool.data if f.stream == 9], "the proxy sent S9 to a tool"


async def test_s9_for_a_host_primary_quotes_the_hosts_own_header(hsms_stack):
    proxy, hosts, _ = hsms_stack
    tool = await _tool(proxy)
    tool.s9_for[(2, 99)] = 5  # "unrecognized function": S9F5 instead of an answer
    host = _serving(hosts)
    got = await host.send_primary(2, 99, b"\x01\x00")  # resolved by the S9 that names it
    assert (got.stream, got.function, got.wbit) == (9, 5, False)
    h = s9_header(got.body)
    assert (h.session_id, h.byte2, h.byte3, h.stype) == (host.device_id, 0x80 | 2, 99, 0)
    assert h.system == host._sys  # the host's numbering, not the one the tool saw
    (seen,) = [f for f in tool.host_primaries if f.stream == 2]
    assert seen.system != h.system  # the tool quoted the proxy's numbering: it was rewritten
    # The tool will not answer it: the proxy's transaction is closed, nothing left open.
    st = proxy.status()["hsms"]["sessions"][0]
    assert st["in_flight"] == 0
    assert metric(proxy, S9, 'outcome="routed"') == 1
    _no_stream9_to(tool)
    await tool.close()


async def test_s9_after_a_switch_goes_to_the_old_version_that_sent_the_message(hsms_stack):
    proxy, hosts, reg = hsms_stack
    tool = await _tool(proxy, reply_delay=60)  # holds the host primary unanswered
    old = _serving(hosts)
    call = asyncio.create_task(old.send_primary(2, 41, b"\x01\x00", timeout=15))
    await async_wait_until(lambda: tool.host_primaries, 5, "S2F41 to reach the tool")
    await _switch(proxy, reg, 2, "green", SPECS, hosts)
    assert b"v2" in (await tool.request(1, 1)).body  # new primaries: the new version
    tool.send_s9(7, tool.host_primaries[-1])  # "illegal data" about the old version's S2F41
    got = await asyncio.wait_for(call, 10)
    assert (got.stream, got.function) == (9, 7)
    assert s9_header(got.body).system == old._sys
    new = [h for (_, grp, _), h in zip(SPECS, hosts, strict=True) if grp == "green"]
    assert not any(h.stream9 for h in new), "the S9 went to the new version"
    # The S9 closed the transaction: the old session drains at once, not after T3.
    await async_wait_until(lambda: not old.selected_conns(), 10, "old session to close")
    assert metric(proxy, "zerodown_hsms_aborted_total", "tool_no_reply_within_t3") == 0
    assert metric(proxy, S9, 'outcome="routed"') == 1
    _no_stream9_to(tool)
    await tool.close()


async def test_s9_naming_a_message_of_a_closed_session_goes_to_its_successor(hsms_stack):
    proxy, hosts, reg = hsms_stack
    tool = await _tool(proxy)
    old = _serving(hosts)
    # A host primary without W-bit: nothing stays open, the old session closes at the switch.
    old.selected_conns()[-1].writer.write(codec.data_message(0, 10, 3, False, 5000, b"\x01\x00"))
    await async_wait_until(lambda: tool.host_primaries, 5, "S10F3 to reach the tool")
    await _switch(proxy, reg, 2, "green", SPECS, hosts)
    await async_wait_until(lambda: not old.selected_conns(), 10, "old session to close")
    await tool.request(1, 1)
    new = _serving(hosts)
    assert new.version == "v2"
    tool.send_s9(5, tool.host_primaries[-1])
    await async_wait_until(lambda: new.stream9, 5, "S9F5 at the successor")
    h = s9_header(new.stream9[0].body)
    assert (h.system, h.byte2, h.byte3) == (5000, 10, 3)  # the old session's numbering
    assert metric(proxy, S9, 'outcome="successor"') == 1
    assert not old.stream9
    await tool.close()


async def test_s9_during_a_failover_waits_for_the_successor_session(hsms_stack):
    proxy, hosts, _ = hsms_stack
    tool = await _tool(proxy)
    dead = _serving(hosts)
    spare = next(h for (_, grp, _), h in zip(SPECS, hosts, strict=True)
                 if grp == "blue" and h is not dead)  # fmt: skip
    spare_id = next(i for (i, _, _), h in zip(SPECS, hosts, strict=True) if h is spare)
    dead.selected_conns()[-1].writer.write(codec.data_message(0, 10, 3, False, 6000, b"\x01\x00"))
    await async_wait_until(lambda: tool.host_primaries, 5, "S10F3 to reach the tool")
    spare.select_delay = 1.5
    dead.kill()  # the proxy fails over to `spare`, which takes 1.5 s to answer Select
    await async_wait_until(
        lambda: (b := proxy.status()["hsms"]["sessions"][0]["backend"])
        and b["instance"] == spare_id and b["state"] != "selected",
        5, "the failover to start",
    )  # fmt: skip
    tool.send_s9(5, tool.host_primaries[-1])
    await async_wait_until(lambda: spare.stream9, 10, "S9F5 at the successor")
    h = s9_header(spare.stream9[0].body)
    assert (h.system, h.byte2, h.byte3) == (6000, 10, 3)
    assert metric(proxy, S9, 'outcome="successor"') == 1
    assert metric(proxy, S9, 'outcome="unmatched"') == 0
    _no_stream9_to(tool)
    await tool.close()


async def test_s9_naming_a_host_reply_and_s9f9_naming_a_tool_primary(hsms_stack):
    proxy, hosts, _ = hsms_stack
    tool = await _tool(proxy)
    host = _serving(hosts)
    # S9F7 about the reply to the tool's S1F1: the host sees the header of its own S1F2.
    await tool.request(1, 1)
    reply = tool.data[-1]
    host_s1f1 = host.frames[-1]
    tool.send_s9(7, reply)
    await async_wait_until(lambda: host.stream9, 5, "S9F7 at the host")
    h = s9_header(host.stream9[-1].body)
    assert (h.system, h.byte2, h.byte3) == (host_s1f1.system, 1, 2)
    # S9F9 (T3 timeout at the tool) about a primary the host has not answered yet.
    host.answer_data = False
    sb = tool.next_sys()
    tool.send_raw(codec.data_message(0, 1, 3, True, sb, b"\x01\x00"))
    await async_wait_until(lambda: host.frames[-1].function == 3, 5, "S1F3 at the host")
    host_s1f3 = host.frames[-1]
    assert proxy.status()["hsms"]["sessions"][0]["in_flight"] == 1
    tool.send_s9(9, Frame(0, 0x81, 3, 0, 0, sb))
    await async_wait_until(lambda: len(host.stream9) == 2, 5, "S9F9 at the host")
    h = s9_header(host.stream9[-1].body)
    assert (h.system, h.byte2, h.byte3) == (host_s1f3.system, 0x81, 3)
    assert proxy.status()["hsms"]["sessions"][0]["in_flight"] == 0  # the tool gave up on it
    assert metric(proxy, S9, 'outcome="routed"') == 2
    _no_stream9_to(tool)
    await tool.close()


async def test_s9_that_names_nothing_is_counted_and_logged_never_forwarded(hsms_stack):
    proxy, hosts, _ = hsms_stack
    tool = await _tool(proxy)
    host = _serving(hosts)
    tool.send_s9(7, Frame(0, 0x82, 41, 0, 0, 0xDEAD))  # never sent to this tool
    sb = tool.next_sys()
    tool.send_raw(codec.data_message(0, 9, 1, False, sb, b"\x41\x01x"))  # not a <B[10]>
    # S9F13 (conversation timeout) carries no header: forwarded as it is.
    tool.send_raw(codec.data_message(0, 9, 13, False, tool.next_sys(), b"\x01\x00"))
    await async_wait_until(lambda: host.stream9, 5, "S9F13 at the host")
    await tool.request(1, 1)  # everything before it has been handled
    assert [f.function for f in host.stream9] == [13]
    assert metric(proxy, S9, 'outcome="unmatched"') == 1
    assert metric(proxy, S9, 'outcome="malformed"') == 1
    assert metric(proxy, S9, 'outcome="plain"') == 1
    out = proxy.output(20000)
    assert "S9F7 sys=" in out and "names no message the proxy remembers" in out
    assert "S9F1 sys=" in out and "not one <B[10]> header" in out
    _no_stream9_to(tool)
    await tool.close()


async def test_the_memory_is_bounded_an_older_message_is_unmatched(hsms_stack):
    proxy, hosts, _ = hsms_stack
    tool = await _tool(proxy)
    w = _serving(hosts).selected_conns()[-1].writer
    for k in range(MEMORY + 1):  # host primaries without W-bit: only the memory knows them
        w.write(codec.data_message(0, 10, 3, False, 7000 + k, b"\x01\x00"))
    await async_wait_until(lambda: len(tool.host_primaries) == MEMORY + 1, 5, "S10F3 x5")
    first, last = tool.host_primaries[0], tool.host_primaries[-1]
    tool.send_s9(5, first)  # pushed out by the newer ones
    tool.send_s9(5, last)
    host = _serving(hosts)
    await async_wait_until(lambda: host.stream9, 5, "S9F5 at the host")
    await tool.request(1, 1)
    assert [s9_header(f.body).system for f in host.stream9] == [7000 + MEMORY]
    assert metric(proxy, S9, 'outcome="unmatched"') == 1
    await tool.close()
