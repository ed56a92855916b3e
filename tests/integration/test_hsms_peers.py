"""The HSMS peers we ship, against each other with no proxy: the secsgem equipment simulator
(orchestrator/hsms_sim.py) talking to `zerodown sample-app --hsms-port` (orchestrator/sample_hsms.py).

These pin down the contract the HSMS proxy tests rely on (HSMS_PEERS.md): SOFTREV tells the
version, every S6F11 DATAID is recorded by the host, host-initiated S2F41 reaches the tool and
comes back, device ids are checked, and the app Separates its sessions on SIGTERM.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
import pytest

from orchestrator.devstack.hsms_sim import DATAID_STRIDE, SimTool
from orchestrator.devstack.sample_hsms import start_hsms_host

from ..helpers import ROOT, SampleApp, wait_until

# HSMS frame: length, session id, byte 2, byte 3, PType, SType, system bytes (raw-socket tests)
HEADER = struct.Struct(">IHBBBBI")


@pytest.fixture
def tools() -> Iterator[Callable[..., SimTool]]:
    made: list[SimTool] = []

    def make(port: int, **kw: Any) -> SimTool:
        tool = SimTool("127.0.0.1", port, t3=kw.pop("t3", 5.0), **kw)
        made.append(tool)
        tool.start()
        return tool

    yield make
    for t in made:
        t.stop()


def http(method: str, port: int, path: str) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=15) as r:
            return r.status, orjson.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read())


def test_select_softrev_and_event_reports_are_recorded(sample_app, tools) -> None:
    app: SampleApp = sample_app("drimeap-blue-1", "v1", hsms=True)
    tool = tools(app.hsms_port, name="tool-1")
    tool.wait_selected(10)
    assert tool.softrev(5) == "v1"
    dataids = [DATAID_STRIDE + i for i in range(1, 31)]
    assert all(tool.send_event(d, ceid=1001) for d in dataids)
    st = tool.stats
    assert (st["sent"], st["replied"], st["timed_out"], st["rejected"]) == (30, 30, 0, 0)
    assert st["versions"] == {"v1": 1} and st["selects"] == 1 and len(tool.rtts) == 30
    status, body = http("GET", app.port, "/hsms/received")
    assert status == 200
    assert body == {"version": "v1", "instance": "drimeap-blue-1", "s6f11": dataids, "total": 30}


def test_host_serves_several_sessions_at_once(tools) -> None:
    host = start_hsms_host(0, "v2", instance_id="in-process")
    try:
        a, b = tools(host.port, name="tool-a"), tools(host.port, name="tool-b")
        a.wait_selected(10)
        b.wait_selected(10)
        assert a.send_event(1) and b.send_event(2) and a.send_event(3)
        assert [e["dataid"] for e in host.received()] == [1, 2, 3]
        assert b.softrev(5) == "v2" and host.sessions() == 2
    finally:
        host.stop()
    # stop() sent Separate.req: both tools saw their session end
    wait_until(lambda: a.stats["disconnects"] == 1 and b.stats["disconnects"] == 1, 10, "Separate")


def test_host_initiated_s2f41_is_answered_by_the_tool(sample_app, tools) -> None:
    app = sample_app("drimeap-blue-1", "v1", hsms=True)
    status, body = http("POST", app.port, "/hsms/command?rcmd=START&timeout=2")
    assert status == 409 and "no equipment session" in body["error"]
    tool = tools(app.hsms_port, reply_delay=0.3)
    tool.wait_selected(10)
    status, body = http("POST", app.port, "/hsms/command?rcmd=START&timeout=5")
    assert (status, body) == (200, {"hcack": 0, "version": "v1"})
    assert tool.stats["host_primaries_answered"] == 1
    # an answer later than the caller's timeout is a 504 with the reason, not a hang
    slow = tools(app.hsms_port, name="tool-slow", reply_delay=3.0)
    slow.wait_selected(10)
    status, body = http("POST", app.port, "/hsms/command?rcmd=START&timeout=0.3")
    assert status == 504 and "no reply to S2F41" in body["error"]
    status, body = http("POST", app.port, "/hsms/command?timeout=1")
    assert status == 400 and "rcmd" in body["error"]


def test_wrong_device_id_is_not_answered(sample_app, tools) -> None:
    app = sample_app("drimeap-blue-1", "v1", hsms=True)
    tool = tools(app.hsms_port, device_id=7, t3=0.5)
    tool.wait_selected(10)  # control messages use session id 0xFFFF: Select works
    assert tool.send_event(42) is False
    assert tool.stats["timed_out"] == 1 and tool.stats["replied"] == 0
    assert http("GET", app.port, "/hsms/received")[1]["s6f11"] == []


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", "hsms-sim", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def test_hsms_sim_cli_report_matches_what_the_host_received(sample_app) -> None:
    app = sample_app("drimeap-green-1", "v2", hsms=True)
    target = f"127.0.0.1:{app.hsms_port}"
    out = run_cli("--target", target, "--tools", "3", "--rate", "20", "--seconds", "1.5", "--json")
    assert out.returncode == 0, out.stderr
    report = orjson.loads(out.stdout)
    assert report["sent"] == report["replied"] > 0
    assert (report["timed_out"], report["rejected"], report["disconnects"]) == (0, 0, 0)
    assert set(report["versions"]) == {"v2"} and report["ok"] is True
    assert (
        report["rtt_ms"]["p50"] is not None and report["rtt_ms"]["p99"] >= report["rtt_ms"]["p50"]
    )
    received = http("GET", app.port, "/hsms/received")[1]["s6f11"]
    assert len(received) == len(set(received)) == report["sent"]
    for k in (1, 2, 3):  # each tool's DATAIDs arrive increasing with no gap
        mine = [d for d in received if d // DATAID_STRIDE == k]
        assert mine == list(range(k * DATAID_STRIDE + 1, k * DATAID_STRIDE + 1 + len(mine)))
        assert len(mine) == report["per_tool"][f"tool-{k}"]["sent"]

    text = run_cli("--target", target, "--rate", "50", "--seconds", "0.3")
    assert text.returncode == 0, text.stderr
    assert "result: OK" in text.stdout and "versions that answered S1F1: v2" in text.stdout


def test_hsms_sim_cli_errors(sample_app) -> None:
    bad = run_cli("--target", "nowhere")
    assert bad.returncode == 2 and "HOST:PORT" in bad.stderr
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    out = run_cli("--target", f"127.0.0.1:{free}", "--seconds", "1", "--connect-timeout", "0.5")
    assert out.returncode == 1 and "not SELECTED" in out.stderr


def test_sample_app_exits_cleanly_on_sigterm_with_a_tool_connected(sample_app, tools) -> None:
    app = sample_app("drimeap-blue-1", "v1", hsms=True)
    tool = tools(app.hsms_port)
    tool.wait_selected(10)
    assert tool.send_event(1)
    assert app.terminate(timeout=15) == 0, app.output()
    wait_until(lambda: tool.stats["disconnects"] == 1, 10, "the tool to see the Separate")
    assert not tool.selected


def test_select_right_after_connect_is_honoured_every_time() -> None:
    # Regression: secsgem read the socket before its HSMS state was CONNECTED, so a Select.req
    # sent at once was answered but the session stayed NOT SELECTED and rejected all data.
    hdr = HEADER

    def read_frame(s: socket.socket) -> tuple[int, ...]:
        data = b""
        while len(data) < 14:
            chunk = s.recv(14 - len(data))
            assert chunk, "host closed the connection"
            data += chunk
        fields = hdr.unpack(data)
        rest = fields[0] - 10
        while rest > 0:
            rest -= len(s.recv(rest))
        return fields

    def session(i: int) -> None:
        with socket.create_connection(("127.0.0.1", host.port), timeout=5) as s:
            s.sendall(hdr.pack(10, 0xFFFF, 0, 0, 0, 1, 1000 + i))  # Select.req, at once
            assert read_frame(s)[5:7] == (2, 1000 + i)  # Select.rsp
            s.sendall(hdr.pack(10, 0, 0x81, 1, 0, 0, 2000 + i))  # S1F1 W
            _, _, b2, b3, _, stype, system = read_frame(s)
            assert (b2, b3, stype, system) == (1, 2, 0, 2000 + i), "S1F1 not answered by S1F2"

    host = start_hsms_host(0, "v1", instance_id="race")
    try:  # sessions opened in parallel: the race shows when threads compete for the CPU
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(session, range(48)))
    finally:
        host.stop()


def test_secsgem_on_both_ends_through_the_proxy_across_switches(
    tmp_path, sample_app, start_proxy, tools
) -> None:
    # The peers as the proxy sees them in production: secsgem tools -> proxy -> secsgem hosts.
    import threading

    from ..helpers import instance, registry, write_registry

    blue = sample_app("drimeap-blue-1", "v1", hsms=True)
    green = sample_app("drimeap-green-1", "v2", hsms=True)
    apps = {"blue": blue, "green": green}
    reg = tmp_path / "registry.json"

    def publish(generation: int, active: str) -> None:
        insts = [
            instance(a.ready_file.stem, g, v, a.port, hsms=a.hsms_port)
            for g, v, a in (("blue", "v1", blue), ("green", "v2", green))
        ]
        write_registry(reg, registry(generation, active, insts, hsms_device_id=0))

    publish(1, "blue")
    proxy = start_proxy(reg, config="[hsms]\nenabled = true\nt3 = 10.0")
    sims = [tools(proxy.hsms, name=f"tool-{k}", reply_delay=0.2) for k in (1, 2)]
    for s in sims:
        s.wait_selected(10)
    stop = threading.Event()
    sent: dict[str, list[int]] = {s.name: [] for s in sims}

    def load(k: int, sim: SimTool) -> None:
        for seq in range(1, 2001):  # bounded; stopped by the event well before
            if stop.is_set():
                return
            dataid = k * DATAID_STRIDE + seq
            sent[sim.name].append(dataid)
            sim.send_event(dataid)

    threads = [threading.Thread(target=load, args=(k, s)) for k, s in enumerate(sims, 1)]
    for t in threads:
        t.start()
    try:
        active = "blue"
        for generation in range(2, 6):
            active = "green" if active == "blue" else "blue"
            publish(generation, active)
            proxy.wait_generation(generation)
            want = "v2" if active == "green" else "v1"
            # every primary sent after the switch is answered by the new version
            wait_until(lambda w=want: sims[0].softrev(5) == w, 5, f"S1F1 answered by {want}")
            assert sims[1].softrev(5) == want
            status, body = http("POST", apps[active].port, "/hsms/command?rcmd=GO&timeout=5")
            assert status == 200 and body["version"] == want, body
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    received = [d for a in apps.values() for d in http("GET", a.port, "/hsms/received")[1]["s6f11"]]
    assert len(received) == len(set(received)), "a DATAID was recorded twice"
    for s in sims:
        st = s.stats
        assert st["sent"] == st["replied"] == len(sent[s.name]) > 0, st
        assert (st["disconnects"], st["selects"], st["timed_out"], st["rejected"]) == (0, 1, 0, 0)
        assert set(sent[s.name]) <= set(received)
    assert sum(s.stats["host_primaries_answered"] for s in sims) == 4


def test_received_record_is_bounded_and_counts_everything(tools, monkeypatch) -> None:
    import orchestrator.devstack.sample_hsms as sample_hsms

    monkeypatch.setattr(sample_hsms, "RECEIVED_LIMIT", 4)
    host = start_hsms_host(0, "v1")
    try:
        tool = tools(host.port)
        tool.wait_selected(10)
        assert all(tool.send_event(d) for d in range(1, 6))
        assert host.received_dataids() == ([3, 4, 5], 5)  # the oldest half went at the 5th
        assert [e["dataid"] for e in host.received()] == [3, 4, 5]
    finally:
        host.stop()


def test_a_connection_that_never_selects_is_closed_after_t7() -> None:
    host = start_hsms_host(0, "v1", t7=0.3)
    try:
        with socket.create_connection(("127.0.0.1", host.port), timeout=10) as s:
            wait_until(lambda: host.sessions() == 1, 5, "the session to start")
            assert s.recv(100) == b""  # closed by the host, no Separate.req first
        wait_until(lambda: host.sessions() == 0, 5, "the session to be forgotten")
    finally:
        host.stop()


def test_connections_closed_at_once_never_stop_the_host_accepting() -> None:
    # Regression: secsgem spin-waited for its receiver thread to say it runs; a peer that closes
    # right after connecting (a TCP health check) let the thread start and end before the spin
    # looked, so the accept thread hung for good, the listen queue filled, and every later
    # check timed out (the Nomad double marked both groups critical under HSMS load).
    import threading
    import time

    hdr = HEADER
    stop = threading.Event()

    def load() -> None:  # a selected session sending S1F1 back to back, as a tool under load
        with socket.create_connection(("127.0.0.1", host.port), timeout=5) as s:
            s.sendall(hdr.pack(10, 0xFFFF, 0, 0, 0, 1, 1))  # Select.req
            n = 1
            while not stop.is_set() and n < 100_000:
                assert s.recv(14), "host closed the load session"
                n += 1
                s.sendall(hdr.pack(10, 0, 0x81, 1, 0, 0, n))  # S1F1 W

    host = start_hsms_host(0, "v1", instance_id="checks")
    loaders = [threading.Thread(target=load, daemon=True) for _ in range(2)]
    try:
        for t in loaders:
            t.start()
        deadline = time.monotonic() + 8  # the old code hung within ~3 s of this on 2 cores
        checks = 0
        while checks < 400 and time.monotonic() < deadline:
            socket.create_connection(("127.0.0.1", host.port), timeout=5).close()
            checks += 1
            time.sleep(0.01)
        # The listen queue (64) is long past full if the accept thread hung: a Select must work.
        with socket.create_connection(("127.0.0.1", host.port), timeout=5) as s:
            s.sendall(hdr.pack(10, 0xFFFF, 0, 0, 0, 1, 7))
            s.settimeout(5)
            assert hdr.unpack(s.recv(14))[5:7] == (2, 7), "no Select.rsp"
        assert checks >= 100
    finally:
        stop.set()
        for t in loaders:
            t.join(5)
        host.stop()
