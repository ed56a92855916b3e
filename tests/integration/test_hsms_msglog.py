"""The per-tool SML message log through a real proxy process: what an enabled log holds for a
known exchange (across a switch), the device-id filter, and that a proxy without it writes no
file at all."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ..helpers import async_wait_until
from ..hsmspeers import RawTool, s6f11_body
from .test_hsms_proxy import HSMS_CFG, SPECS, _hosts, _reg, _switch


async def _stack(tmp_path: Path, start_proxy, extra: str):  # type: ignore[no-untyped-def]
    hosts = await _hosts(SPECS)
    reg = tmp_path / "registry.json"
    _reg(reg, 1, "blue", SPECS, hosts, hsms_device_id=0)
    return start_proxy(reg, config=HSMS_CFG + extra), hosts, reg


@pytest.fixture
async def stacks(tmp_path, start_proxy):
    made = []

    async def make(extra: str = ""):  # type: ignore[no-untyped-def]
        s = await _stack(tmp_path, start_proxy, extra)
        made.append(s)
        return s

    yield make
    for _, hosts, _ in made:
        for h in hosts:
            await h.stop()


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def test_enabled_log_holds_the_exchange_in_sml_with_direction_and_version(tmp_path, stacks):
    logdir = tmp_path / "msglog"
    proxy, hosts, reg = await stacks(f'message_log_dir = "{logdir}"\n')
    tool = RawTool(proxy.hsms)
    await tool.connect()
    assert await tool.select() == 0
    port = tool.writer.get_extra_info("sockname")[1]
    await tool.request(1, 1)
    await tool.request(6, 11, s6f11_body(7))
    (host,) = [h for h in hosts if h.selected_conns()]
    await host.send_primary(2, 41, b"\x01\x00")
    await _switch(proxy, reg, 2, "green", SPECS, hosts)
    await tool.request(1, 1)
    path = logdir / "127.0.0.1.sml"
    await async_wait_until(lambda: len(_lines(path)) >= 8, 10, "8 lines in the message log")
    lines = _lines(path)
    who = rf"127\.0\.0\.1:{port} session=0"
    blue = r"backend=drimeap-blue-\d version=v1 host_sys=0x[0-9a-f]{8}"
    green = r"backend=drimeap-green-\d version=v2 host_sys=0x[0-9a-f]{8}"
    expected = [
        rf"tool->host {who} sys=0x00000002 {blue} S1F1 W\.",
        rf'host->tool {who} sys=0x00000002 {blue} S1F2 <L\[2\] <A "MDLN"> <A "v1">>\.',
        rf"tool->host {who} sys=0x00000003 {blue} S6F11 W <L\[3\] <U4 7> <U4 1000> <L\[0\]>>\.",
        rf"host->tool {who} sys=0x00000003 {blue} S6F12 <B 0x00>\.",
        rf"host->tool {who} sys=0x00000001 {blue} S2F41 W <L\[0\]>\.",
        rf"tool->host {who} sys=0x00000001 {blue} S2F42 <L\[2\] <B 0x00> <L\[0\]>>\.",
        rf"tool->host {who} sys=0x00000004 {green} S1F1 W\.",
        rf'host->tool {who} sys=0x00000004 {green} S1F2 <L\[2\] <A "MDLN"> <A "v2">>\.',
    ]
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z "
    for line, want in zip(lines, expected, strict=True):
        assert re.fullmatch(stamp + want, line), (line, want)
    await tool.close()


async def test_device_id_filter_logs_only_that_tool(tmp_path, stacks):
    logdir = tmp_path / "msglog"
    proxy, _, _ = await stacks(f'message_log_dir = "{logdir}"\nmessage_log_tools = "5"\n')
    tools = [RawTool(proxy.hsms, device_id=d) for d in (0, 5)]
    for t in tools:
        await t.connect()
        assert await t.select() == 0
    for k in range(3):
        for t in tools:
            await t.request(6, 11, s6f11_body(100 * t.device_id + k))
    path = logdir / "127.0.0.1.sml"
    await async_wait_until(lambda: len(_lines(path)) >= 6, 10, "6 lines in the message log")
    lines = _lines(path)
    assert len(lines) == 6 and all(" session=5 " in line for line in lines), lines
    for t in tools:
        await t.close()


async def test_log_off_by_default_creates_no_file(tmp_path, stacks):
    proxy, _, _ = await stacks()
    tool = RawTool(proxy.hsms)
    await tool.connect()
    assert await tool.select() == 0
    for k in range(5):
        await tool.request(6, 11, s6f11_body(k))
    await tool.close()
    proxy.terminate()
    written = [p for p in tmp_path.rglob("*") if p.suffix == ".sml" or ".sml." in p.name]
    assert not written
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == []
