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

from ..helpers import async_wait_until, instance, registry, wait_until, write_registry
from ..hsmspeers import RawHost, RawTool, metric, s6f11_body

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
    # A tool whose new session was still being selected at the next switch moves once for both.
    assert st["handovers"] >= 10 and all(s["state"] == "SELECTED" for s in st["sessions"])
    final = "v2" if active == "green" else "v1"
    await async_wait_until(
        lambda: all(
            s["backend"] and s["backend"]["version"] == final
            for s in proxy.status()["hsms"]["sessions"]
        ),
        5, "every tool on the final version",
    )  # fmt: skip
    # Drained old sessions are deselected and closed: only the Active group keeps sessions.
    old = [h for (_, grp, _), h in zip(SPECS, hosts, strict=True) if grp != active]
    await async_wait_until(
        lambda: all(not h.selected_conns() for h in old), 5, "old-group sessions to close"
    )
    assert sum(h.separates for h in hosts) >= 40
    for t in tools:
        await t.close()


async def test_host_transaction_open_at_switch_completes_on_the_old_version(stack):
    proxy, hosts, reg = stack
    tool = RawTool(proxy.hsms, reply_delay=1.0)
    await tool.connect()
    assert await tool.select() == 0
    await tool.request(1, 1)
    (old,) = [h for h in hosts if h.selected_conns()]
    host_call = asyncio.create_task(old.send_primary(2, 41, b"\x01\x00", timeout=5))
    await async_wait_until(lambda: tool.host_primaries, 5, "S2F41 to reach the tool")
    await _switch(proxy, reg, 2, "green", SPECS, hosts)
    # The tool's next primary is handled by the new version, while S2F41 is still open.
    reply = await tool.request(1, 1)
    assert b"v2" in reply.body
    # A NEW primary from the old version is refused with Reject.req reason 4, never forwarded.
    rej = await old.send_primary(2, 41, b"\x01\x00")
    assert (rej.stype, rej.byte3) == (codec.REJECT_REQ, codec.REJECT_ENTITY_NOT_SELECTED)
    assert len(tool.host_primaries) == 1
    # The open transaction completes on the version that opened it.
    rsp = await host_call
    assert (rsp.stream, rsp.function) == (2, 42)
    await async_wait_until(lambda: old.separates == 1, 5, "old session to be separated")
    assert old.deselects == 1 and not old.selected_conns()
    assert not tool.closed.is_set() and not tool.separated
    assert metric(proxy, "zerodown_hsms_old_version_primaries_rejected_total") == 1
    await tool.close()


async def test_failover_when_the_backend_dies(stack):
    proxy, hosts, reg = stack
    for h in hosts[:2]:
        h.reply_delay = 0.5
    tool = RawTool(proxy.hsms)
    await tool.connect()
    assert await tool.select() == 0
    assert (await tool.request(6, 11, s6f11_body(1))).function == 12
    (dead,) = [h for h in hosts if h.selected_conns()]
    inflight = asyncio.create_task(tool.request(6, 11, s6f11_body(2)))
    await asyncio.sleep(0.1)  # the primary is now open on the backend (it answers after 0.5 s)
    dead.kill()
    # The open transaction gets an explicit abort (S6F0) instead of a silent T3.
    rsp = await inflight
    assert (rsp.stream, rsp.function) == (6, 0)
    # The tool stays selected and its next primaries go to the other Active instance.
    for n in range(3, 6):
        assert (await tool.request(6, 11, s6f11_body(n))).function == 12
    (survivor,) = [h for h in hosts[:2] if h is not dead]
    assert survivor.received == [3, 4, 5]
    assert not tool.closed.is_set()
    assert metric(proxy, "zerodown_hsms_failovers_total") == 1
    await tool.close()


async def test_a_backend_that_stops_answering_linktests_is_replaced(stack):
    proxy, hosts, _ = stack
    tool = RawTool(proxy.hsms)
    await tool.connect()
    assert await tool.select() == 0
    await tool.request(1, 1)
    (hung,) = [h for h in hosts if h.selected_conns()]
    hung.answer_linktest = False
    seen = hung.linktests
    await async_wait_until(lambda: hung.linktests > seen, 5, "a linktest to the hung backend")
    # No Linktest.rsp within T6 (2 s): the proxy separates that session and fails over.
    await async_wait_until(lambda: not hung.selected_conns(), 5, "the hung session to end")
    assert (await tool.request(6, 11, s6f11_body(1))).function == 12
    assert hung.received == [] and not tool.closed.is_set()
    assert metric(proxy, "zerodown_hsms_failovers_total") == 1
    await tool.close()


async def test_primaries_wait_for_a_backend_then_get_an_explicit_answer(stack):
    proxy, hosts, reg = stack
    tool = RawTool(proxy.hsms)
    await tool.connect()
    assert await tool.select() == 0
    await tool.request(1, 1)
    for h in hosts[:2]:
        h.kill()  # the whole Active group is gone: nothing to fail over to yet

    def no_selected_backend() -> bool:
        (sess,) = proxy.status()["hsms"]["sessions"]
        return sess["backend"] is None or sess["backend"]["state"] != "selected"

    await asyncio.to_thread(wait_until, no_selected_backend, 5, "the proxy to notice")
    waiting = asyncio.create_task(tool.request(6, 11, s6f11_body(10), timeout=5))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    await _switch(proxy, reg, 2, "green", SPECS, hosts)
    rsp = await waiting  # queued, then delivered to the new Active group
    assert rsp.function == 12 and sum(h.received.count(10) for h in hosts[2:]) == 1
    for h in hosts[2:]:
        h.kill()
    await asyncio.to_thread(wait_until, no_selected_backend, 5, "the proxy to notice")
    t0 = time.monotonic()
    rsp = await tool.request(6, 11, s6f11_body(11), timeout=6)
    # Nobody to deliver to within T3 (3 s): S6F0, not silence.
    assert rsp.function == 0 and 2.5 < time.monotonic() - t0 < 5.5
    assert not tool.closed.is_set()
    await tool.close()


async def test_deselect_ends_the_backend_session_and_select_again_opens_one(stack):
    proxy, hosts, _ = stack
    tool = RawTool(proxy.hsms)
    await tool.connect()
    assert await tool.select() == 0
    assert (await tool.request(1, 1)).function == 2
    rsp = await tool.control(codec.deselect_req)
    assert (rsp.stype, rsp.byte3) == (codec.DESELECT_RSP, codec.DESELECT_OK)
    await async_wait_until(lambda: sum(h.separates for h in hosts) == 1, 5, "backend separated")
    # Not selected any more: data is refused with reason 4 until the tool selects again.
    tool.send_raw(codec.data_message(0, 1, 1, True, 500))
    await async_wait_until(lambda: tool.rejects, 5, "Reject.req")
    assert tool.rejects[0].byte3 == codec.REJECT_ENTITY_NOT_SELECTED
    assert await tool.select() == 0
    assert (await tool.request(1, 1)).function == 2
    assert sum(h.sessions for h in hosts) == 2
    await tool.close()


async def test_backend_device_id_is_mapped_both_ways(tmp_path, start_proxy):
    specs = SPECS[:1]
    hosts = await _hosts(specs, device_id=7)
    reg = tmp_path / "registry.json"
    _reg(reg, 1, "blue", specs, hosts, hsms_device_id=7)
    proxy = start_proxy(reg, config=HSMS_CFG)
    tool = RawTool(proxy.hsms, device_id=3)
    await tool.connect()
    assert await tool.select() == 0
    rsp = await tool.request(6, 11, s6f11_body(1))
    assert (rsp.session_id, rsp.function) == (3, 12)
    assert hosts[0].received == [1] and not hosts[0].ignored
    rsp = await hosts[0].send_primary(2, 41)
    assert rsp.function == 42 and tool.host_primaries[0].session_id == 3
    await tool.close()
    await hosts[0].stop()


async def test_sigterm_finishes_open_transactions_then_separates(tmp_path, start_proxy):
    specs = SPECS[:1]
    hosts = await _hosts(specs, reply_delay=0.5)
    reg = tmp_path / "registry.json"
    _reg(reg, 1, "blue", specs, hosts, hsms_device_id=0)
    proxy = start_proxy(reg, config=HSMS_CFG)
    tool = RawTool(proxy.hsms)
    await tool.connect()
    assert await tool.select() == 0
    open_tx = asyncio.create_task(tool.request(6, 11, s6f11_body(1)))
    await async_wait_until(lambda: hosts[0].selected_conns(), 5, "backend session")
    await asyncio.sleep(0.1)  # the S6F11 is now with the backend, answered after 0.5 s
    rc = await asyncio.to_thread(proxy.terminate)
    assert rc == 0
    assert (await open_tx).function == 12  # finished within the shutdown grace
    await asyncio.wait_for(tool.closed.wait(), 5)
    assert tool.separated and hosts[0].separates == 1
    await hosts[0].stop()


async def test_a_tool_that_does_not_read_pushes_back_on_its_backend(stack):
    proxy, hosts, _ = stack
    tool = RawTool(proxy.hsms)
    await tool.connect()
    assert await tool.select() == 0
    await tool.request(1, 1)
    (host,) = [h for h in hosts if h.selected_conns()]
    conn = host.selected_conns()[0]
    import psutil

    rss = psutil.Process(proxy.ports["pid"]).memory_info().rss
    tool.writer.transport.pause_reading()  # the tool stops reading
    body = b"\x00" * 60_000
    n = 400  # 24 MB
    for i in range(n):
        conn.writer.write(codec.data_message(0, 6, 1, False, 10_000 + i, body))
    # The proxy stops reading from the backend instead of buffering what the tool cannot take:
    # the data waits in socket buffers and on the backend's side, not in the proxy's memory.
    last = [-1]

    def steady() -> bool:  # the backend's unsent bytes stopped changing: nobody is reading
        size = conn.writer.transport.get_write_buffer_size()
        same, last[0] = size == last[0], size
        return same

    for _ in range(3):
        await async_wait_until(steady, 10, "the backend's send buffer to settle")
        await asyncio.sleep(0.1)
    assert conn.writer.transport.get_write_buffer_size() > 0, "the proxy read everything"
    grown = psutil.Process(proxy.ports["pid"]).memory_info().rss - rss
    assert grown < 12_000_000, f"the proxy buffered {grown} bytes for a tool that does not read"
    tool.writer.transport.resume_reading()
    await async_wait_until(lambda: len(tool.host_primaries) == n, 20, "every message delivered")
    assert [f.body == body for f in tool.host_primaries] == [True] * n
    assert (await tool.request(1, 1)).function == 2
    await tool.close()


async def test_bad_input_is_answered_and_other_sessions_are_unaffected(stack):
    proxy, hosts, _ = stack
    good = RawTool(proxy.hsms)
    await good.connect()
    assert await good.select() == 0

    async def fresh(select: bool = True) -> RawTool:
        t = RawTool(proxy.hsms)
        await t.connect()
        if select:
            assert await t.select() == 0
        return t

    async def reject_for(t: RawTool, raw: bytes) -> codec.Frame:
        n = len(t.rejects)
        t.send_raw(raw)
        await async_wait_until(lambda: len(t.rejects) > n, 5, "Reject.req")
        return t.rejects[-1]

    # Data message before Select: Reject.req reason 4 (entity not selected).
    t = await fresh(select=False)
    r = await reject_for(t, codec.data_message(0, 1, 1, True, 77))
    assert (r.system, r.byte2, r.byte3) == (77, 0, codec.REJECT_ENTITY_NOT_SELECTED)
    # Unknown SType: reason 1, byte 2 names the SType.
    r = await reject_for(t, codec.control(8, 78))
    assert (r.system, r.byte2, r.byte3) == (78, 8, codec.REJECT_STYPE_NOT_SUPPORTED)
    # PType other than SECS-II: reason 2, byte 2 names the PType.
    r = await reject_for(t, codec.HEADER.pack(10, 0, 0x81, 1, 3, 0, 79))
    assert (r.system, r.byte2, r.byte3) == (79, 3, codec.REJECT_PTYPE_NOT_SUPPORTED)
    # A response nobody asked for: reason 3 (transaction not open).
    r = await reject_for(t, codec.linktest_rsp(80))
    assert (r.system, r.byte3) == (80, codec.REJECT_TRANSACTION_NOT_OPEN)
    assert not t.closed.is_set()
    await t.close()

    # Framing errors cannot be recovered: Separate.req, then the connection is closed.
    for raw in (
        b"\x00\x00\x00\x04abcd",  # length shorter than the header
        codec.HEADER.pack(70000, 0, 0x86, 11, 0, 0, 1),  # over max_message_bytes (65536)
        codec.HEADER.pack(30, 0, 0x86, 11, 0, 0, 1) + b"x",  # incomplete: T8 (0.5 s)
        b"\xff" * 64,  # garbage
    ):
        t = await fresh()
        t.send_raw(raw)
        await asyncio.wait_for(t.closed.wait(), 5)
        assert t.separated, raw[:16]
    # Never selected: closed after T7 (1 s).
    t = await fresh(select=False)
    await asyncio.wait_for(t.closed.wait(), 5)
    assert t.separated
    # The well-behaved tool never noticed.
    rsp = await good.request(6, 11, s6f11_body(99))
    assert rsp.function == 12 and not good.closed.is_set()
    assert metric(proxy, "zerodown_hsms_rejected_total") >= 4
    assert metric(proxy, "zerodown_hsms_sessions_closed_total") >= 5
    await good.close()


# -- secsgem on both ends: `zerodown sample-app --hsms-port` behind the proxy, SimTool in front --


def _http(method: str, port: int, path: str) -> tuple[int, dict]:
    import orjson

    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=15) as r:
            return r.status, orjson.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read())


@pytest.fixture
def secsgem_stack(tmp_path, start_proxy, sample_app):
    from concurrent.futures import ThreadPoolExecutor

    specs = [("drimeap-blue-1", "blue", "v1"), ("drimeap-blue-2", "blue", "v1"),
             ("drimeap-green-1", "green", "v2")]  # fmt: skip
    with ThreadPoolExecutor(len(specs)) as ex:
        apps = list(ex.map(lambda s: sample_app(s[0], s[2], hsms=True), specs))
    reg = tmp_path / "registry.json"

    def write(generation: int, active: str) -> None:
        insts = [
            instance(iid, group, version, app.port, hsms=app.hsms_port)
            for (iid, group, version), app in zip(specs, apps, strict=True)
        ]
        write_registry(reg, registry(generation, active, insts, hsms_device_id=0))

    write(1, "blue")
    proxy = start_proxy(reg, config=HSMS_CFG.replace("t3 = 3.0", "t3 = 8.0"))
    made = []

    def tool(**kw):
        from orchestrator.devstack.hsms_sim import SimTool

        t = SimTool("127.0.0.1", proxy.hsms, t3=5.0, **kw)
        made.append(t)
        t.start()
        t.wait_selected(10)
        return t

    yield proxy, apps, write, tool
    for t in made:
        t.stop()


def _received(apps) -> dict[str, list[int]]:
    return {a.ports["pid"] and str(a.port): _http("GET", a.port, "/hsms/received")[1]["s6f11"]
            for a in apps}  # fmt: skip


def test_secsgem_both_ends_select_transactions_and_host_command(secsgem_stack):
    proxy, apps, _, tool = secsgem_stack
    t = tool(name="tool-1")
    assert t.softrev(5) == "v1"
    assert all(t.send_event(1000 + i) for i in range(20))
    got = [d for ds in _received(apps).values() for d in ds]
    assert sorted(got) == [1000 + i for i in range(20)]
    # Host-initiated S2F41 from the backend serving this tool, through the proxy, answered S2F42.
    serving = [a for a in apps[:2] if any(
        s["backend"]["instance"] == a.ready_file.stem for s in proxy.status()["hsms"]["sessions"]
    )]  # fmt: skip
    code, body = _http("POST", serving[0].port, "/hsms/command?rcmd=START&timeout=5")
    assert code == 200 and body == {"hcack": 0, "version": "v1"}
    st = t.stats
    assert st["host_primaries_answered"] == 1 and st["disconnects"] == 0
    assert st["replied"] == 20 and st["timed_out"] == 0 and st["rejected"] == 0


def test_secsgem_ten_switches_under_load(secsgem_stack):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    proxy, apps, write, tool = secsgem_stack
    tools = [tool(name=f"tool-{k}") for k in range(1, 4)]
    slow = tool(name="tool-slow", reply_delay=1.0)
    stop = threading.Event()
    sent: dict[int, bool] = {}

    def run(k, t) -> None:
        deadline = time.monotonic() + 40
        n = 0
        while not stop.is_set() and time.monotonic() < deadline and n < 20000:
            n += 1
            d = k * 1_000_000 + n
            sent[d] = t.send_event(d)

    ex = ThreadPoolExecutor(len(tools) + 1)
    futs = [ex.submit(run, k, t) for k, t in enumerate(tools, 1)]
    try:
        # A host-initiated transaction open at the first switch completes on the old version.
        # The slow tool connected last, so its backend session is normally the newest on its
        # host, the one the sample host's /hsms/command talks to; if the host saw the selects in
        # another order the command lands on a fast tool and returns at once: try again.
        wait_until(
            lambda: all(s["backend"] and s["backend"]["state"] == "selected"
                        for s in proxy.status()["hsms"]["sessions"]),
            10, "every backend session to be selected",
        )  # fmt: skip
        inst = _newest(proxy)["backend"]["instance"]
        serving = next(a for a in apps if a.ready_file.stem == inst)
        for _ in range(5):
            cmd = ex.submit(_http, "POST", serving.port, "/hsms/command?rcmd=HOLD&timeout=6")
            wait_until(lambda c=cmd: c.done() or _newest(proxy)["in_flight"] == 1, 10, "S2F41")
            if not cmd.done():
                break
        else:
            raise AssertionError("S2F41 never reached the slow tool")
        active = "blue"
        for g in range(2, 12):
            active = "green" if active == "blue" else "blue"
            write(g, active)
            proxy.wait_generation(g)
            want = "v2" if active == "green" else "v1"
            # The first primary after the switch is answered by the new version.
            assert tools[0].softrev(5) == want
            before = sum(1 for ok in sent.values() if ok)
            wait_until(lambda b=before: sum(1 for ok in list(sent.values()) if ok) >= b + 15, 10,
                       f"traffic after switch {g}")  # fmt: skip
        assert cmd.result(10) == (200, {"hcack": 0, "version": "v1"})
    finally:
        stop.set()
        for f in futs:
            f.result(60)
        ex.shutdown()
    assert sent and all(sent.values()), [d for d, ok in sent.items() if not ok][:10]
    got = [d for ds in _received(apps).values() for d in ds]
    assert len(got) == len(set(got)), "duplicated DATAIDs"
    assert set(got) == set(sent)
    for t in [*tools, slow]:
        st = t.stats
        assert st["disconnects"] == 0 and st["selects"] == 1, (t.name, st)
        assert st["timed_out"] == 0 and st["rejected"] == 0 and st["aborted"] == 0, (t.name, st)
    assert proxy.status()["hsms"]["handovers"] >= 10
    final = "v2" if active == "green" else "v1"
    wait_until(
        lambda: all(
            s["backend"] and s["backend"]["version"] == final
            for s in proxy.status()["hsms"]["sessions"]
        ),
        5, "every tool on the final version",
    )  # fmt: skip


def _newest(proxy) -> dict:
    return max(proxy.status()["hsms"]["sessions"], key=lambda s: s["connected_at"])


def test_secsgem_failover_on_a_killed_instance(secsgem_stack):
    proxy, apps, _, tool = secsgem_stack
    t = tool(name="tool-1")
    assert all(t.send_event(1 + i) for i in range(5))
    (sess,) = proxy.status()["hsms"]["sessions"]
    dead = next(a for a in apps if a.ready_file.stem == sess["backend"]["instance"])
    dead.kill()
    wait_until(
        lambda: (b := proxy.status()["hsms"]["sessions"][0]["backend"]) is not None
        and b["instance"] != dead.ready_file.stem and b["state"] == "selected",
        10, "failover to the other Active instance",
    )  # fmt: skip
    assert all(t.send_event(100 + i) for i in range(5))
    assert t.softrev(5) == "v1"
    st = t.stats
    assert st["disconnects"] == 0 and st["selects"] == 1
    assert metric(proxy, "zerodown_hsms_failovers_total") == 1
