"""Proxy takeover (issue 12 §1): `zerodown proxy` replaced by a new process, nothing dropped.

A real proxy process with HTTP and HSMS; HTTP backends (aiohttp) and HSMS hosts (RawHost) and
tools (RawTool) in the test process. Takeovers by SIGUSR2 and by `zerodown proxy-reload`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from zerodown_proxy.takeover import wire

from ..helpers import ROOT, instance, registry, wait_until, write_registry
from ..hsmspeers import RawHost, RawTool, s6f11_body
from ..rawhttp import read_response

CFG = """
[hsms]
t3 = 10.0
t5 = 0.5
t6 = 5.0
t7 = 5.0
t8 = 5.0
linktest_interval = 1.0
max_queued = 100
"""
N_HTTP = 16
N_TOOLS = 20
REQUEST_TIMEOUT = 30.0  # a held primary waits for the drain and the new backend session


def _gone(pid: int) -> bool:
    """Exited (a zombie counts: it serves nothing)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


class Load:
    """16 keep-alive HTTP clients and 20 HSMS tools sending S6F11, counting every failure."""

    def __init__(self, http_port: int, tools: list[RawTool]) -> None:
        self.http_port = http_port
        self.tools = tools
        self.stop = asyncio.Event()
        self.http_ok = 0
        self.http_failures: list[str] = []
        self.reconnects = 0
        self.versions: list[tuple[float, str]] = []
        self.sent: dict[int, float] = {}  # dataid -> when its S6F11 was written
        self.answered: list[int] = []
        self.hsms_failures: list[str] = []
        self.tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self.tasks += [asyncio.create_task(self._http()) for _ in range(N_HTTP)]
        self.tasks += [asyncio.create_task(self._tool(i, t)) for i, t in enumerate(self.tools)]

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.wait_for(asyncio.gather(*self.tasks), REQUEST_TIMEOUT + 10)

    async def _http(self) -> None:
        reader = writer = None
        while not self.stop.is_set():
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", self.http_port)
                    self.reconnects += 1
                writer.write(b"GET /info HTTP/1.1\r\nHost: x\r\n\r\n")
                r = await read_response(reader, timeout=REQUEST_TIMEOUT)
                if r.status != 200:
                    self.http_failures.append(f"status {r.status}: {r.body[:100]!r}")
                else:
                    self.http_ok += 1
                    self.versions.append((time.monotonic(), r.header("X-Backend-Version") or ""))
                if (r.header("Connection") or "").lower() == "close":
                    writer.close()
                    reader = writer = None
            except (OSError, ConnectionError, TimeoutError) as exc:
                self.http_failures.append(f"{type(exc).__name__}: {exc}")
                if writer is not None:
                    writer.close()
                reader = writer = None
            await asyncio.sleep(0.005)
        if writer is not None:
            writer.close()

    async def _tool(self, index: int, tool: RawTool) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            dataid = index * 1_000_000 + n
            self.sent[dataid] = time.monotonic()
            try:
                rsp = await tool.request(6, 11, s6f11_body(dataid), timeout=REQUEST_TIMEOUT)
                if (rsp.stream, rsp.function) != (6, 12):
                    self.hsms_failures.append(f"tool {index}: S{rsp.stream}F{rsp.function}")
                else:
                    self.answered.append(dataid)
            except TimeoutError:
                self.hsms_failures.append(f"tool {index}: no reply to dataid {dataid}")
            await asyncio.sleep(0.01)


def _reg(path: Path, generation: int, active: str, http_ports, hosts) -> None:
    groups = [("blue", "v1"), ("blue", "v1"), ("green", "v2"), ("green", "v2")]
    insts = [
        instance(f"drimeap-{g}-{i}", g, v, port, hsms=h.port)
        for i, ((g, v), port, h) in enumerate(zip(groups, http_ports, hosts, strict=True))
    ]
    write_registry(path, registry(generation, active, insts, hsms_device_id=0))


def _reload_cli(admin: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", "proxy-reload", "--admin", f"127.0.0.1:{admin}",
         "--token", "test-token", "--timeout", "60"],
        capture_output=True, text=True, timeout=90, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


async def _taken_over(proxy, old_pid: int, timeout: float = 60.0) -> int:
    """Wait until the admin API answers from a new pid and the old process has exited."""
    st = await asyncio.to_thread(
        wait_until, lambda: (s := proxy.status())["pid"] != old_pid and s, timeout, "a new pid"
    )
    await asyncio.to_thread(wait_until, lambda: _gone(old_pid), timeout, f"pid {old_pid} to exit")
    return st["pid"]


# The target with one proxy process; with a supervisor and two workers (three processes
# to start per takeover, slow on a loaded machine) two takeovers: one by the CLI, one in a switch.
PLANS = {
    1: ["signal", "cli", "signal", "switch+signal", "cli"],
    2: ["cli", "switch+signal"],
}


@pytest.mark.parametrize("workers", [1, 2], ids=["single", "two-workers"])
async def test_takeovers_and_one_during_a_switch_drop_nothing(
    tmp_path, backend_factory, start_proxy, workers
):
    plan = PLANS[workers]
    versions = ["v1", "v1", "v2", "v2"]
    http_ports = [await backend_factory(v, f"i{n}") for n, v in enumerate(versions)]
    hosts = [RawHost(v) for v in versions]
    for h in hosts:
        await h.start()
    reg = tmp_path / "registry.json"
    _reg(reg, 1, "blue", http_ports, hosts)
    proxy = start_proxy(reg, config=f"workers = {workers}\n{CFG}")
    pids = [proxy.pid]
    worker_pids = {w["pid"] for w in proxy.status().get("workers", [])}
    tools = [RawTool(proxy.hsms) for _ in range(N_TOOLS)]
    try:
        for t in tools:
            await t.connect()
            assert await t.select() == 0
        selects_before = sum(h.sessions for h in hosts)
        load = Load(proxy.http, tools)
        load.start()
        await asyncio.sleep(1.0)
        switched_at = 0.0
        for how in plan:
            if how == "switch+signal":  # a takeover in the middle of a switch
                _reg(reg, 2, "green", http_ports, hosts)
                os.kill(pids[-1], signal.SIGUSR2)
            elif how == "cli":
                out = await asyncio.to_thread(_reload_cli, proxy.admin)
                assert out.returncode == 0, out.stderr
                assert "proxy replaced: pid" in out.stdout
            else:
                os.kill(pids[-1], signal.SIGUSR2)
            pids.append(await _taken_over(proxy, pids[-1]))
            if workers > 1:  # every worker was replaced too, and the old ones are gone
                st = proxy.status()
                new_workers = {w["pid"] for w in st["workers"]}
                assert len(new_workers) == workers and not new_workers & worker_pids
                old = set(worker_pids)
                await asyncio.to_thread(
                    wait_until,
                    lambda old=old: all(_gone(p) for p in old),
                    60,
                    "old workers to exit",
                )
                worker_pids |= new_workers
            if how == "switch+signal":
                switched_at = time.monotonic()  # the old process, and its old routing, are gone
            await asyncio.sleep(0.5)  # load on the new process before the next one
        st = proxy.status()
        assert st["generation"] == 2
        if workers > 1:  # the switch went through the new supervisor's gate
            assert st["switch"]["gated"] and st["switch"]["commits"] >= 1
        await asyncio.sleep(0.5)
        await load.finish()
        disconnected = [i for i, t in enumerate(tools) if t.closed.is_set() or t.separated]
    finally:
        for t in tools:
            await t.close()
        if not _gone(pids[-1]):
            os.kill(pids[-1], signal.SIGTERM)
            await asyncio.to_thread(wait_until, lambda: _gone(pids[-1]), 30, "proxy to stop")
        for h in hosts:
            await h.stop()
    log = proxy.output(20000)
    assert len(set(pids)) == len(plan) + 1, pids
    assert load.http_failures == [], (load.http_failures[:5], log)
    assert load.hsms_failures == [], (load.hsms_failures[:5], log)
    assert load.http_ok > 100 and len(load.answered) > 100
    # 0 tool disconnects: the same TCP connections, never closed, never separated.
    assert disconnected == []
    # 0 lost or duplicated: every answered S6F11 reached exactly one backend exactly once.
    received = [d for h in hosts for d in h.received]
    assert len(received) == len(set(received)), "a message was delivered twice"
    assert set(load.answered) <= set(received)
    # The proxy opened its own backend sessions after each takeover (the tools did not select).
    assert sum(h.sessions for h in hosts) >= selects_before + len(plan) * N_TOOLS
    # After the switch (and the takeover during it), only the new version answers.
    late = [v for at, v in load.versions if at > switched_at]
    assert late and set(late) == {"v2"}, set(late)
    green = set(hosts[2].received) | set(hosts[3].received)
    late_ids = [d for d, at in load.sent.items() if at > switched_at and d in set(load.answered)]
    assert late_ids and set(late_ids) <= green


@pytest.mark.parametrize("workers", [1, 2], ids=["single", "two-workers"])
async def test_failing_takeover_leaves_the_old_process_serving(
    tmp_path, backend_factory, start_proxy, workers
):
    port = await backend_factory("v1", "i0")
    host = RawHost("v1")
    await host.start()
    reg = tmp_path / "registry.json"
    write_registry(reg, registry(1, "blue", [instance("b1", "blue", "v1", port, hsms=host.port)],
                                 hsms_device_id=0))  # fmt: skip
    proxy = start_proxy(reg, config=f"workers = {workers}\n{CFG}")
    worker_pids = {w["pid"] for w in proxy.status().get("workers", [])}
    tool = RawTool(proxy.hsms)
    try:
        await tool.connect()
        assert await tool.select() == 0
        assert (await tool.request(6, 11, s6f11_body(1))).function == 12
        # The new process (same command line) reads a broken configuration and exits at start.
        cfg = tmp_path / "proxy.toml"
        good = cfg.read_text()
        cfg.write_text(good + "\n[http\n")
        out = await asyncio.to_thread(_reload_cli, proxy.admin)
        cfg.write_text(good)
        assert out.returncode == 1
        assert "not replaced" in out.stderr and "exited with code" in out.stderr, out.stderr
        assert proxy.status()["pid"] == proxy.pid
        assert (await tool.request(6, 11, s6f11_body(2))).function == 12
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.http)
        writer.write(b"GET /info HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_response(reader)).status == 200
        writer.close()
        assert "takeover failed" in proxy.output()
        assert not tool.separated and not tool.closed.is_set()
        assert {w["pid"] for w in proxy.status().get("workers", [])} == worker_pids
    finally:
        await tool.close()
        await host.stop()


async def test_sighup_and_reload_apply_live_settings_and_name_what_needs_a_takeover(
    tmp_path, backend_factory, start_proxy
):
    import urllib.request

    import orjson

    port = await backend_factory("v1", "i0")
    reg = tmp_path / "registry.json"
    write_registry(reg, registry(1, "blue", [instance("b1", "blue", "v1", port)]))
    proxy = start_proxy(reg)
    cfg = tmp_path / "proxy.toml"
    text = cfg.read_text()
    assert proxy.status()["http"]
    # SIGHUP: a live setting (the admin token) and one that needs a takeover (the HTTP address).
    cfg.write_text(
        text.replace('admin_token = "test-token"', 'admin_token = "new-token"').replace(
            'http_listen = "127.0.0.1:0"', 'http_listen = "127.0.0.1:1"'
        )
    )
    os.kill(proxy.pid, signal.SIGHUP)
    wait_until(lambda: "configuration reloaded" in proxy.output(), 10, "the SIGHUP log line")
    assert "needs a takeover (zerodown proxy-reload): proxy.http_listen" in proxy.output()

    def post(token: str) -> tuple[int, dict]:
        req = urllib.request.Request(
            f"http://127.0.0.1:{proxy.admin}/v1/reload", method="POST", data=b"",
            headers={"Authorization": f"Bearer {token}"},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, orjson.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, {}

    assert post("test-token")[0] == 401  # the new token is live
    cfg.write_text(text.replace("[hsms]", "[http]\nclient_idle_timeout = 1.5\n[hsms]"))
    status, body = post("new-token")
    assert status == 200, body
    assert body["config"]["applied"] == ["proxy.admin_token", "http.client_idle_timeout"]
    assert body["config"]["needs_takeover"] == []
    assert "applied" in body and body["generation"] == 1  # the registry, re-read as before
    # The idle timeout is live: an idle keep-alive client is closed after 1.5 s, not 75 s.
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.http)
    writer.write(b"GET /info HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await read_response(reader)).status == 200
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
    # A file that does not load changes nothing and says why.
    cfg.write_text(text + "\n[http\n")
    status, body = post("test-token")
    assert status == 200 and "not valid TOML" in body["config"]["error"]
    assert post("test-token")[0] == 200  # the token from the file that loaded last
    assert proxy.status()["pid"] == proxy.pid


async def test_systemd_is_told_the_new_main_pid(tmp_path, backend_factory, start_proxy,
                                                monkeypatch):  # fmt: skip
    import socket

    port = await backend_factory("v1", "i0")
    reg = tmp_path / "registry.json"
    write_registry(reg, registry(1, "blue", [instance("b1", "blue", "v1", port)]))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(60)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    proxy = start_proxy(reg)
    new = 0
    try:
        first = notify.recv(4096).decode().split("\n")
        assert first == [f"MAINPID={proxy.pid}", "READY=1"]
        os.kill(proxy.pid, signal.SIGUSR2)
        second = (await asyncio.to_thread(notify.recv, 4096)).decode().split("\n")
        new = await _taken_over(proxy, proxy.pid)
        assert second == [f"MAINPID={new}", "READY=1"]
    finally:
        notify.close()
        if new and not _gone(new):
            os.kill(new, signal.SIGTERM)
            await asyncio.to_thread(wait_until, lambda: _gone(new), 30, "proxy to stop")


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out |= {int(c) for c in text}
    return out


def _execed(pid: int) -> bool:
    """The takeover's new process has exec'd: its environment has the channel variable."""
    try:
        return wire.ENV.encode() + b"=" in Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False


async def test_a_new_process_not_ready_in_time_is_killed_and_the_old_one_serves(
    tmp_path, backend_factory, start_proxy, monkeypatch
):
    port = await backend_factory("v1", "i0")
    reg = tmp_path / "registry.json"
    write_registry(reg, registry(1, "blue", [instance("b1", "blue", "v1", port)]))
    monkeypatch.setenv("ZERODOWN_TAKEOVER_READY_TIMEOUT", "6")
    proxy = start_proxy(reg)
    os.kill(proxy.pid, signal.SIGUSR2)
    # Stopped only once it runs the new program: a child stopped between fork and exec would
    # also stop its parent, which waits for the exec (libuv's spawn), not the test's point.
    (child,) = await asyncio.to_thread(
        wait_until, lambda: {c for c in _children(proxy.pid) if _execed(c)}, 10, "the new process"
    )
    os.kill(child, signal.SIGSTOP)  # it hangs: never ready
    await asyncio.to_thread(
        wait_until, lambda: "was not ready within 6s" in proxy.output(), 30, "the failure"
    )
    await asyncio.to_thread(wait_until, lambda: not _children(proxy.pid), 10, "the child reaped")
    assert proxy.status()["pid"] == proxy.pid
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.http)
    writer.write(b"GET /info HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await read_response(reader)).status == 200
    writer.close()
