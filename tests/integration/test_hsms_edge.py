"""HSMS at the edge: hostile and broken peers against a real proxy process (issue 9, HSMS parts).

Raw-socket tools and hosts in the test process, the proxy as a child process; memory is the
proxy's RSS (psutil), latency is what a well-behaved tool sees while another one misbehaves.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import orjson
import pytest

from zerodown_proxy.hsms import codec

from ..helpers import async_wait_until, instance, registry, write_registry
from ..hsmspeers import HostConn, RawHost, RawTool, metric, read_frame, rss, s6f11_body

MiB = 1024 * 1024

EDGE_CFG = """[hsms]
t3 = 3.0
t5 = 0.5
t6 = 2.0
t7 = 5.0
t8 = 1.0
linktest_interval = 0.5
warn_limit = 5
warn_interval = 0.5
"""


def _write(reg: Path, hosts: list[RawHost], generation: int = 1, active: str = "blue") -> None:
    groups = ["blue", "blue", "green", "green"]
    insts = [
        instance(f"drimeap-{g}-{k}", g, "v1" if g == "blue" else "v2", 1, hsms=h.port)
        for k, (g, h) in enumerate(zip(groups, hosts, strict=False), 1)
    ]
    write_registry(reg, registry(generation, active, insts, hsms_device_id=0))


@pytest.fixture
async def edge(tmp_path, start_proxy):
    """A proxy with two Active raw hosts; `edge(config)` starts it (once)."""
    hosts = [RawHost("v1"), RawHost("v1")]
    for h in hosts:
        await h.start()
    reg = tmp_path / "registry.json"
    _write(reg, hosts)

    def start(config: str = EDGE_CFG):
        return start_proxy(reg, config=config)

    yield start, hosts
    for h in hosts:
        await h.stop()


async def _tool(port: int, **kw) -> RawTool:
    t = RawTool(port, **kw)
    await t.connect()
    assert await t.select() == codec.SELECT_OK
    return t


async def _raw_selected(port: int) -> socket.socket:
    """A raw, non-blocking tool socket that has selected and then never reads again."""
    loop = asyncio.get_running_loop()
    s = socket.socket()
    s.setblocking(False)
    await loop.sock_connect(s, ("127.0.0.1", port))
    await loop.sock_sendall(s, codec.select_req(1))
    head = b""
    while len(head) < 14:
        head += await asyncio.wait_for(loop.sock_recv(s, 14 - len(head)), 5)
    assert codec.HEADER.unpack(head)[5] == codec.SELECT_RSP
    return s


async def _push(s: socket.socket, block: bytes, budget: int, seconds: float) -> int:
    """Send `block` repeatedly until `budget` bytes went out or `seconds` passed, whichever
    first; a peer that stops reading makes the sends wait (bounded by the deadline)."""
    loop = asyncio.get_running_loop()
    sent = 0
    deadline = time.monotonic() + seconds
    while sent < budget and time.monotonic() < deadline:
        try:
            await asyncio.wait_for(loop.sock_sendall(s, block), deadline - time.monotonic())
        except (TimeoutError, ConnectionError):
            break
        sent += len(block)
    return sent


# Another tool's S1F1 round trip while one floods for 6 s: starved, it would wait for the
# flood to end; served, it waits at most a scheduling hiccup (1.6 s seen at load average 10).
STARVED = 3.0


async def _latencies(tool: RawTool, stop: asyncio.Event, limit: int = 5000) -> list[float]:
    out = []
    while not stop.is_set() and len(out) < limit:
        t0 = time.monotonic()
        rsp = await tool.request(1, 1, timeout=15)
        assert rsp.function == 2
        out.append(time.monotonic() - t0)
        await asyncio.sleep(0.005)
    return out


# -- a tool that floods and never reads --------------------------------------------------------


async def test_a_tool_flooding_linktests_without_reading_is_paused_not_buffered(edge):
    start, hosts = edge
    proxy = start()
    good = await _tool(proxy.hsms)
    await good.request(1, 1)
    before = rss(proxy.ports["pid"])
    flooder = await _raw_selected(proxy.hsms)
    block = b"".join(codec.linktest_req(i) for i in range(1, 4682))  # 64 KiB of Linktest.req
    stop = asyncio.Event()
    probe = asyncio.create_task(_latencies(good, stop))
    peak = [0]

    async def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss(proxy.ports["pid"]) - before)
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch())
    try:
        sent = await _push(flooder, block, 200 * MiB, 6.0)
    finally:
        stop.set()
    lat = await probe
    await watcher
    grown = max(peak[0], rss(proxy.ports["pid"]) - before)
    # The proxy stopped reading the flooder as soon as its answers backed up: what it was sent
    # waits in the flooder's socket, not in the proxy's memory.
    assert grown < 24 * MiB, f"the proxy grew by {grown / MiB:.0f} MiB ({sent} bytes sent)"
    assert lat and max(lat) < STARVED, f"another tool waited {max(lat):.2f} s"
    # The well-behaved tool and the backends never noticed; the flooder is just not read.
    assert (await good.request(6, 11, s6f11_body(1))).function == 12
    assert not good.closed.is_set()
    flooder.close()
    await good.close()


class FloodHost(RawHost):
    """A backend that, once `flood` is set, stops reading and floods Linktest.req."""

    def __init__(self) -> None:
        super().__init__("flood")
        self.flood = asyncio.Event()
        self.sent = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.sessions += 1
        f = await read_frame(reader)
        if f is None or f.stype != codec.SELECT_REQ:
            writer.close()
            return
        writer.write(codec.select_rsp(f.system, 0))
        self.conns.append(HostConn(writer, selected=True))
        await self.flood.wait()
        writer.transport.pause_reading()
        block = b"".join(codec.linktest_req(i) for i in range(1, 4682))
        deadline = time.monotonic() + 8
        try:
            while time.monotonic() < deadline and not writer.is_closing():
                writer.write(block)
                await asyncio.wait_for(writer.drain(), deadline - time.monotonic())
                self.sent += len(block)
        except (TimeoutError, ConnectionError):
            pass
        writer.close()


async def test_a_backend_flooding_without_reading_is_paused_then_failed_over(tmp_path, start_proxy):
    flood, normal = FloodHost(), RawHost("v1")
    for h in (flood, normal):
        await h.start()
    reg = tmp_path / "registry.json"
    _write(reg, [flood, normal])
    proxy = start_proxy(reg, config=EDGE_CFG)
    try:
        tools = [await _tool(proxy.hsms) for _ in range(2)]

        def on(port: int) -> int:
            by_peer = {s["tool"]: s for s in proxy.status()["hsms"]["sessions"]}
            for k, t in enumerate(tools):
                sock = t.writer.get_extra_info("sockname")
                b = by_peer[f"{sock[0]}:{sock[1]}"]["backend"]
                if b and b["address"].endswith(f":{port}"):
                    return k
            raise AssertionError("no tool on that backend")

        await async_wait_until(lambda: len(flood.conns) == 1 and normal.selected_conns(), 5,
                               "one session on each backend")  # fmt: skip
        victim, other = tools[on(flood.port)], tools[on(normal.port)]
        before = rss(proxy.ports["pid"])
        stop = asyncio.Event()
        probe = asyncio.create_task(_latencies(other, stop))
        flood.flood.set()
        t0 = time.monotonic()
        peak = 0
        # The proxy stops reading the flooding backend, and its own Linktest.req (which that
        # backend never reads) goes unanswered: the session is cut (not closed gracefully: that
        # would wait for a peer that reads nothing) and the tool fails over.
        while metric(proxy, "zerodown_hsms_failovers_total") < 1:
            assert time.monotonic() - t0 < 15, "the flooding backend's session was never replaced"
            peak = max(peak, rss(proxy.ports["pid"]) - before)
            await asyncio.sleep(0.05)
        stop.set()
        lat = await probe
        assert peak < 24 * MiB, f"the proxy grew by {peak / MiB:.0f} MiB"
        assert lat and max(lat) < STARVED, f"another tool waited {max(lat):.2f} s"
        rsp = await victim.request(6, 11, s6f11_body(5))
        assert rsp.function == 12 and normal.received == [5]
        assert not victim.closed.is_set() and not other.closed.is_set()
        for t in tools:
            await t.close()
    finally:
        for h in (flood, normal):
            await h.stop()


# -- replies nobody asked for: Reject.req reason 3, both sides ---------------------------------


async def test_a_reply_with_unknown_system_bytes_is_rejected_reason_3_on_both_sides(edge):
    start, hosts = edge
    proxy = start()
    tool = await _tool(proxy.hsms)
    await tool.request(1, 1)
    # From a tool: an S1F2 that answers nothing the proxy sent.
    n = len(tool.rejects)
    tool.send_raw(codec.data_message(0, 1, 2, False, 4242))
    await async_wait_until(lambda: len(tool.rejects) > n, 5, "Reject.req to the tool")
    r = tool.rejects[-1]
    assert (r.system, r.byte2, r.byte3) == (4242, codec.DATA, codec.REJECT_TRANSACTION_NOT_OPEN)
    # From a backend: an S6F12 whose system bytes the proxy never used on that session.
    (host,) = [h for h in hosts if h.selected_conns()]
    host.selected_conns()[0].writer.write(codec.data_message(0, 6, 12, False, 0xABCDEF, b""))
    await async_wait_until(lambda: host.rejects, 5, "Reject.req to the backend")
    r = host.rejects[-1]
    assert (r.system, r.byte2, r.byte3) == (0xABCDEF, 0, codec.REJECT_TRANSACTION_NOT_OPEN)
    # A late reply (after the proxy answered the tool S6F0 at T3) is not open any more either.
    host.reply_delay = 3.6  # T3 is 3 s
    t0 = time.monotonic()
    rsp = await tool.request(6, 11, s6f11_body(1), timeout=6)
    assert rsp.function == 0 and time.monotonic() - t0 > 2.5
    await async_wait_until(lambda: len(host.rejects) == 2, 5, "Reject.req for the late reply")
    assert host.rejects[-1].byte3 == codec.REJECT_TRANSACTION_NOT_OPEN
    assert metric(proxy, "zerodown_hsms_rejected_total", 'reason="3"') == 3
    assert metric(proxy, "zerodown_hsms_orphan_replies_total") == 3
    # Nothing else changed: both sessions are up and the tool is served.
    host.reply_delay = 0
    assert (await tool.request(6, 11, s6f11_body(2))).function == 12
    assert not tool.closed.is_set() and host.selected_conns()
    await tool.close()


# -- per-frame warnings: counted always, logged within an allowance ----------------------------


def _log_lines(proxy, event: str) -> list[dict]:  # type: ignore[no-untyped-def]
    out = []
    for line in Path(proxy.log_path).read_text(errors="replace").splitlines():
        if event in line:
            out.append(orjson.loads(line))
    return out


async def test_a_flood_of_bad_frames_is_counted_not_logged_line_by_line(edge):
    start, _ = edge
    proxy = start()
    bad = await _tool(proxy.hsms)
    n = 20_000

    def shown() -> list[dict]:
        return _log_lines(proxy, "hsms_reject") + _log_lines(proxy, "hsms_orphan_reply")

    def told() -> int:
        return sum(s["suppressed"] for s in _log_lines(proxy, "hsms_warnings_suppressed"))

    bad.send_raw(b"".join(codec.control(8, 100 + i) for i in range(n)))  # unknown SType 8
    await async_wait_until(lambda: len(bad.rejects) == n, 20, "every frame answered")
    assert {r.byte3 for r in bad.rejects} == {codec.REJECT_STYPE_NOT_SUPPORTED}
    assert metric(proxy, "zerodown_hsms_rejected_total", 'side="tool"') == n
    # warn_limit = 5 per 0.5 s per tool: a handful of lines, then one summary per interval that
    # says how many were left out (every frame is accounted for, in the log or in a summary).
    await async_wait_until(lambda: len(shown()) + told() >= n, 10, "the summary lines")
    assert len(shown()) < 25, f"{len(shown())} warning lines for one tool"
    assert len(shown()) + told() == n
    # Orphan replies (now answered Reject.req reason 3) are limited the same way.
    bad.send_raw(b"".join(codec.data_message(0, 6, 12, False, 50_000 + i) for i in range(n)))
    await async_wait_until(lambda: len(bad.rejects) == 2 * n, 20, "every reply answered")
    await async_wait_until(lambda: len(shown()) + told() >= 2 * n, 10, "the summary lines")
    assert len(shown()) < 50 and len(shown()) + told() == 2 * n
    assert metric(proxy, "zerodown_hsms_log_lines_suppressed_total") == told()
    kinds = [s["kinds"] for s in _log_lines(proxy, "hsms_warnings_suppressed")]
    assert "reject_1" in kinds[0] and "orphan_reply" in kinds[-1]
    assert not bad.closed.is_set()
    await bad.close()


# -- the partial-frame budget --------------------------------------------------------------------

BIG = 16 * MiB  # max_message_bytes (default)
BUDGET_CFG = EDGE_CFG + f"max_partial_bytes = {2 * (BIG + 4)}\n"  # room for two whole messages


class Trickler:
    """A tool that sends most of a BIG message at once, then one byte every 0.4 s (under T8)."""

    def __init__(self, s: socket.socket, upfront: int) -> None:
        self.sock = s
        head = codec.HEADER.pack(BIG, 0, 0x87, 3, 0, 0, 7)  # S7F3 W, the length says BIG - 10
        self.upfront = head + b"\0" * (upfront - len(head))
        self.sent_upfront = False
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_sendall(self.sock, self.upfront)
            self.sent_upfront = True
            for _ in range(100):  # bounded: 40 s at most
                await asyncio.sleep(0.4)
                await loop.sock_sendall(self.sock, b"\0")
        except OSError:
            pass  # separated by the proxy

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        self.sock.close()


async def test_tools_trickling_big_messages_are_held_to_the_budget(edge):
    start, hosts = edge
    proxy = start(BUDGET_CFG)
    good = await _tool(proxy.hsms)
    before = rss(proxy.ports["pid"])
    tricklers = [Trickler(await _raw_selected(proxy.hsms), 15 * MiB) for _ in range(12)]
    try:
        # Two hold reservations (the budget's room), ten wait unread: 12 x 15 MiB would be
        # 180 MiB held (the old behaviour); now the waiting tools' bytes stay in their sockets.
        peak = [0]

        def settled() -> bool:
            grown = rss(proxy.ports["pid"]) - before
            peak[0] = max(peak[0], grown)
            assert grown < 72 * MiB, f"the proxy holds {grown / MiB:.0f} MiB of partial frames"
            b = proxy.status()["hsms"].get("partial_budget", {})
            return sum(t.sent_upfront for t in tricklers) == 2 and b.get("waiting") == 10

        await async_wait_until(settled, 20, "two tools holding the budget, ten waiting")
        assert proxy.status()["hsms"]["partial_budget"]["reserved"] == 2 * (BIG + 4)
        # Small messages arrive whole and need no reservation: the good tool is served.
        assert (await good.request(6, 11, s6f11_body(1))).function == 12
        # The holders trickle: T8 (1 s) after the others began waiting they are separated,
        # and the next two in line get the budget.
        closed = 'kind="budget"'
        await async_wait_until(
            lambda: metric(proxy, "zerodown_hsms_sessions_closed_total", closed) >= 2, 10,
            "the two holders to be separated",
        )  # fmt: skip
        await async_wait_until(lambda: sum(t.sent_upfront for t in tricklers) == 4, 10,
                               "the next two in line to be read")  # fmt: skip
        assert peak[0] < 72 * MiB and rss(proxy.ports["pid"]) - before < 72 * MiB
        assert (await good.request(6, 11, s6f11_body(2))).function == 12
        assert not good.closed.is_set()
    finally:
        for t in tricklers:
            await t.close()
    await good.close()


async def test_a_tool_waiting_for_the_budget_is_served_when_it_frees(edge):
    start, hosts = edge
    proxy = start(BUDGET_CFG)
    tricklers = [Trickler(await _raw_selected(proxy.hsms), 8 * MiB) for _ in range(2)]
    try:
        await async_wait_until(lambda: all(t.sent_upfront for t in tricklers), 10, "two holders")
        big = await _tool(proxy.hsms)
        body = bytes(range(256)) * ((BIG - 10) // 256) + b"\1" * ((BIG - 10) % 256)
        t0 = time.monotonic()
        rsp = await big.request(7, 3, body, timeout=20)
        # Paused until the trickling holders were cut (T8 after it began waiting), then read.
        assert (rsp.stream, rsp.function) == (7, 4) and time.monotonic() - t0 > 0.9
        assert (7, 3, BIG - 10) in [p for h in hosts for p in h.primaries]
        assert metric(proxy, "zerodown_hsms_sessions_closed_total", 'kind="budget"') == 2
        assert metric(proxy, "zerodown_hsms_partial_budget_waits_total") >= 1
        assert not big.closed.is_set()
        await big.close()
    finally:
        for t in tricklers:
            await t.close()


async def test_primaries_queued_for_a_backend_pause_the_tool_above_1_mib(tmp_path, start_proxy):
    host = RawHost("v1")
    await host.start()
    reg = tmp_path / "registry.json"
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # a port nobody listens on: every connect is refused
    dead_port = dead.getsockname()[1]
    write_registry(reg, registry(1, "blue", [instance("drimeap-blue-1", "blue", "v1", 1, hsms=dead_port)],
                                 hsms_device_id=0))  # fmt: skip
    proxy = start_proxy(reg, config=EDGE_CFG.replace("t3 = 3.0", "t3 = 20.0"))
    try:
        tool = await _tool(proxy.hsms)
        body = b"\x41\x00" + b"x" * (600 * 1024)
        calls = [asyncio.create_task(tool.request(7, 3, body, timeout=20)) for _ in range(3)]

        def paused() -> list[str]:
            (s,) = proxy.status()["hsms"]["sessions"]
            return s["paused"]

        # 1.2 MiB queued with no backend session: the tool is not read until they can go.
        await async_wait_until(lambda: "pipeline" in paused(), 10, "the tool to be paused")
        write_registry(reg, registry(2, "blue", [instance("drimeap-blue-1", "blue", "v1", 1,
                                                          hsms=host.port)], hsms_device_id=0))  # fmt: skip
        for rsp in await asyncio.gather(*calls):
            assert (rsp.stream, rsp.function) == (7, 4)
        assert [p for p in host.primaries if p[:2] == (7, 3)] == [(7, 3, len(body))] * 3
        assert paused() == [] and not tool.closed.is_set()
        await tool.close()
    finally:
        dead.close()
        await host.stop()
