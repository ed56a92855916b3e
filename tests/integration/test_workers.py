"""Multi-worker mode: SO_REUSEPORT workers, one routing follower each, supervisor admin."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import orjson
import pytest

from orchestrator.backend import Refused
from orchestrator.probes import wait_proxies
from zerodown_proxy.supervisor import merge_hsms, merge_metrics

from ..helpers import ROOT, Child, async_wait_until, instance, registry, wait_until, write_registry
from ..hsmspeers import RawHost, RawTool


async def test_two_workers_share_the_port_and_switch_together(
    tmp_path, backend_factory, start_proxy
):
    blue = await backend_factory("v1", "blue-0")
    green = await backend_factory("v2", "green-0")
    insts = [instance("blue-0", "blue", "v1", blue), instance("green-0", "green", "v2", green)]
    reg = tmp_path / "registry.json"
    write_registry(reg, registry(1, "blue", insts))
    proxy = start_proxy(reg, "workers = 2")
    st = proxy.status()
    assert len(st["workers"]) == 2 and st["generation"] == 1
    url = f"http://127.0.0.1:{proxy.http}/"
    async with aiohttp.ClientSession() as s:
        for _ in range(40):  # new connections each time: both workers get some
            async with s.get(url, headers={"Connection": "close"}) as r:
                assert r.headers["X-Backend-Version"] == "v1"
        write_registry(reg, registry(2, "green", insts))
        st = proxy.wait_generation(2)  # the lowest generation over both workers
        assert all(w["generation"] == 2 for w in st["workers"])
        for _ in range(20):
            async with s.get(url, headers={"Connection": "close"}) as r:
                assert r.headers["X-Backend-Version"] == "v2"
        async with s.get(f"http://127.0.0.1:{proxy.admin}/metrics") as r:
            text = await r.text()
    served = [
        line for line in text.splitlines() if line.startswith("zerodown_http_requests_total{")
    ]
    assert {line.split('"')[1] for line in served} == {"0", "1"}, served
    # Responses are counted per version served: the metric a release verdict compares.
    assert any('version="v1"' in line for line in served), served
    assert any('version="v2"' in line for line in served), served

    # A worker that dies is restarted and catches up with the registry.
    victim = st["workers"][0]["pid"]
    os.kill(victim, signal.SIGKILL)
    wait_until(
        lambda: (
            (w := proxy.status())["worker_restarts"] == 1
            and all(x["generation"] == 2 for x in w["workers"])
        ),
        20,
        "the killed worker to be replaced",
    )
    assert proxy.terminate() == 0


def test_merge_metrics_keeps_families_contiguous():
    a = '# HELP x_total X\n# TYPE x_total counter\nx_total{code="200"} 1\n# HELP g G\n# TYPE g gauge\ng 3\n'
    b = '# HELP x_total X\n# TYPE x_total counter\nx_total{code="200"} 2\n# HELP g G\n# TYPE g gauge\ng 4\n'
    lines = merge_metrics([a, b]).splitlines()
    assert lines == [
        "# HELP x_total X",
        "# TYPE x_total counter",
        'x_total{worker="0",code="200"} 1',
        'x_total{worker="1",code="200"} 2',
        "# HELP g G",
        "# TYPE g gauge",
        'g{worker="0"} 3',
        'g{worker="1"} 4',
    ]


# -- one instant across workers ---------------------------------------------------------------

SWITCHES = 12
CLIENTS = 8


async def _get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[int, str]:
    writer.write(b"GET / HTTP/1.1\r\nHost: drimeap\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
    await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers.get("x-backend-version", "-")


def _worker_connections(metrics: str) -> dict[str, float]:
    out = {}
    for line in metrics.splitlines():
        if line.startswith("zerodown_http_client_connections{"):
            out[line.split('"')[1]] = float(line.rsplit(" ", 1)[1])
    return out


def mixed_pairs(
    records: list[tuple[float, float, str, int]], start: float, end: float, old: str, new: str
) -> int:
    """Pairs that prove two versions served at once: a request that got `old` was sent after a
    response with `new` had been received. Only requests sent and answered within [start, end]."""
    window = [r for r in records if r[0] >= start and r[1] <= end]
    first_new = min((r[1] for r in window if r[2] == new), default=float("inf"))
    return sum(1 for r in window if r[2] == old and r[0] > first_new)


async def test_every_worker_switches_at_the_same_instant(tmp_path, backend_factory, start_proxy):
    """Keep-alive clients spread over 2 workers send requests back to back through 12 switches
    via the file registry (each worker polls it on its own). No request may get the old version
    after any client has received the new one. Demonstrate the failure without the gate:
    ZERODOWN_SWITCH_GATE=off pytest -k same_instant."""
    blue = await backend_factory("v1", "blue-0")
    green = await backend_factory("v2", "green-0")
    insts = [instance("blue-0", "blue", "v1", blue), instance("green-0", "green", "v2", green)]
    reg = tmp_path / "registry.json"
    write_registry(reg, registry(1, "blue", insts))
    proxy = start_proxy(reg, "workers = 2")
    admin = f"http://127.0.0.1:{proxy.admin}"
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    records: list[tuple[float, float, str, int]] = []  # (sent, received, version, status)
    done: list[int] = []
    stop = asyncio.Event()

    async def client(index: int) -> None:
        reader, writer = conns[index]
        clock = time.perf_counter
        for _ in range(20000):  # bounded; normally ended by `stop`
            if stop.is_set():
                break
            sent = clock()
            status, version = await _get(reader, writer)
            records.append((sent, clock(), version, status))
            done[index] += 1
        writer.close()

    async def settle(more: int = 2) -> float:
        # Every client has completed `more` requests more: with 2, all are past the last switch;
        # with 1 (before a switch), each has an old-version answer sent after the last boundary.
        marks = list(done)
        await async_wait_until(
            lambda: all(d >= m + more for d, m in zip(done, marks, strict=True)), 10, "clients"
        )
        return time.perf_counter()

    async with aiohttp.ClientSession() as s:
        for _ in range(40):  # SO_REUSEPORT spreads connections; make sure both workers have some
            conns.append(await asyncio.open_connection("127.0.0.1", proxy.http))
            done.append(0)
            if len(conns) < CLIENTS:
                continue
            async with s.get(f"{admin}/metrics") as r:
                per_worker = _worker_connections(await r.text())
            if len(per_worker) == 2 and min(per_worker.values()) >= 2:
                break
        assert len(per_worker) == 2 and min(per_worker.values()) >= 2, per_worker
        tasks = [asyncio.create_task(client(i)) for i in range(len(conns))]
        try:
            boundaries = [await settle()]
            for n in range(SWITCHES):
                gen = n + 2
                await settle(1)
                write_registry(reg, registry(gen, "green" if n % 2 == 0 else "blue", insts))

                async def applied(gen: int = gen) -> bool:
                    async with s.get(f"{admin}/v1/status") as r:
                        return (await r.json())["generation"] >= gen

                deadline = time.monotonic() + 10
                while not await applied():
                    assert time.monotonic() < deadline, f"generation {gen} not applied"
                    await asyncio.sleep(0.005)
                boundaries.append(await settle())
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
        async with s.get(f"{admin}/v1/status") as r:
            st = await r.json()

    assert {r[3] for r in records} == {200}
    assert all(w["generation"] == SWITCHES + 1 for w in st["workers"])
    mixed = []
    for n in range(SWITCHES):
        old, new = ("v1", "v2") if n % 2 == 0 else ("v2", "v1")
        start, end = boundaries[n], boundaries[n + 1]
        versions = {r[2] for r in records if r[0] >= start and r[1] <= end}
        assert versions == {old, new}, (n, versions)  # the window really spans the switch
        mixed.append(mixed_pairs(records, start, end, old, new))
    assert sum(mixed) == 0, f"old version served after the new one, per switch: {mixed}"
    assert proxy.terminate() == 0


def test_mixed_pairs_counts_old_answers_sent_after_a_new_one_arrived():
    records = [(0.0, 1.0, "v1", 200), (1.5, 2.0, "v2", 200), (2.5, 3.0, "v1", 200)]
    assert mixed_pairs(records, 0, 10, "v1", "v2") == 1
    assert mixed_pairs(records[:2], 0, 10, "v1", "v2") == 0
    assert mixed_pairs(records, 0, 2.9, "v1", "v2") == 0  # the late one is outside the window


def test_merge_hsms_lists_every_workers_sessions():
    a = {"port": 5000, "tool_sessions": 1, "handovers": 2, "failovers": 0,
         "sessions": [{"tool": "t1", "connected_at": 2.0}]}  # fmt: skip
    b = {"port": 5000, "tool_sessions": 1, "handovers": 1, "failovers": 1,
         "sessions": [{"tool": "t2", "connected_at": 1.0}]}  # fmt: skip
    merged = merge_hsms([a, None, b])
    assert merged is not None
    assert merged["tool_sessions"] == 2 and merged["handovers"] == 3 and merged["failovers"] == 1
    assert [(s["tool"], s["worker"]) for s in merged["sessions"]] == [("t2", 2), ("t1", 0)]
    assert merge_hsms([None, None]) is None


async def test_hsms_tools_on_every_worker_switch_at_the_same_instant(tmp_path, start_proxy):
    """The same instant for HSMS: tools spread over 2 workers send S1F1 back to back through 8
    switches; no tool primary is handled by the old version once any tool got the new one."""
    specs = [("blue-1", "blue", "v1"), ("green-1", "green", "v2")]
    hosts = [RawHost(v) for _, _, v in specs]
    for h in hosts:
        await h.start()

    def write(gen: int, active: str) -> None:
        insts = [
            instance(iid, grp, v, 1, hsms=h.port)
            for (iid, grp, v), h in zip(specs, hosts, strict=True)
        ]
        write_registry(reg, registry(gen, active, insts, hsms_device_id=0))

    reg = tmp_path / "registry.json"
    write(1, "blue")
    proxy = start_proxy(reg, "workers = 2\n[hsms]\nt3 = 5.0\nt5 = 0.5\nt6 = 2.0\nt7 = 2.0")
    admin = f"http://127.0.0.1:{proxy.admin}"
    tools: list[RawTool] = []
    records: list[tuple[float, float, str, int]] = []
    done: list[int] = []
    stop = asyncio.Event()

    async def run(k: int) -> None:
        tool, clock = tools[k], time.perf_counter
        for _ in range(20000):
            if stop.is_set():
                break
            sent = clock()
            rsp = await tool.request(1, 1, timeout=10)
            version = "v2" if b"v2" in rsp.body else "v1" if b"v1" in rsp.body else "-"
            records.append((sent, clock(), version, 200 if rsp.function == 2 else rsp.function))
            done[k] += 1

    async def settle(more: int = 2) -> float:
        marks = list(done)
        await async_wait_until(
            lambda: all(d >= m + more for d, m in zip(done, marks, strict=True)), 10, "tools"
        )
        return time.perf_counter()

    try:
        async with aiohttp.ClientSession() as s:
            workers: set[int] = set()
            for _ in range(30):  # until the tools are spread over both workers
                t = RawTool(proxy.hsms)
                await t.connect()
                assert await t.select() == 0
                tools.append(t)
                done.append(0)
                async with s.get(f"{admin}/v1/status") as r:
                    sessions = (await r.json())["hsms"]["sessions"]
                workers = {x["worker"] for x in sessions}
                if len(tools) >= 4 and len(workers) == 2:
                    break
            assert workers == {0, 1} and len(sessions) == len(tools)
            tasks = [asyncio.create_task(run(k)) for k in range(len(tools))]
            try:
                boundaries = [await settle()]
                for n in range(8):
                    gen = n + 2
                    await settle(1)
                    write(gen, "green" if n % 2 == 0 else "blue")
                    deadline = time.monotonic() + 10
                    while True:
                        async with s.get(f"{admin}/v1/status") as r:
                            if (await r.json())["generation"] >= gen:
                                break
                        assert time.monotonic() < deadline, f"generation {gen} not applied"
                        await asyncio.sleep(0.005)
                    boundaries.append(await settle())
            finally:
                stop.set()
                await asyncio.gather(*tasks, return_exceptions=True)
        assert {r[3] for r in records} == {200}
        mixed = []
        for n in range(8):
            old, new = ("v1", "v2") if n % 2 == 0 else ("v2", "v1")
            start, end = boundaries[n], boundaries[n + 1]
            assert {r[2] for r in records if r[0] >= start and r[1] <= end} == {old, new}
            mixed.append(mixed_pairs(records, start, end, old, new))
        assert sum(mixed) == 0, f"old version served after the new one, per switch: {mixed}"
    finally:
        for t in tools:
            await t.close()
        for h in hosts:
            await h.stop()


async def test_a_worker_that_does_not_prepare_holds_the_switch_and_is_named(
    tmp_path, backend_factory, start_proxy
):
    """A frozen worker (SIGSTOP: alive, not following the registry) holds a switch back in every
    worker; the supervisor names it, and the CLI's wait times out with that reason. Once it runs
    again the switch is committed everywhere."""
    blue = await backend_factory("v1", "blue-0")
    green = await backend_factory("v2", "green-0")
    insts = [instance("blue-0", "blue", "v1", blue), instance("green-0", "green", "v2", green)]
    reg = tmp_path / "registry.json"
    write_registry(reg, registry(1, "blue", insts))
    proxy = start_proxy(reg, "workers = 2")
    st = proxy.status()
    frozen = st["workers"][1]["pid"]
    os.kill(frozen, signal.SIGSTOP)
    try:
        write_registry(reg, registry(2, "green", insts))
        async with aiohttp.ClientSession() as s:
            with pytest.raises(Refused) as err:
                await wait_proxies(s, [("p", f"127.0.0.1:{proxy.admin}")], 2, timeout=3.0)
        assert f"worker 1 (pid {frozen}) did not prepare it" in str(err.value)
        st = proxy.status()  # worker 0 prepared the switch but still serves generation 1
        assert st["switch"]["waiting_for"] == [1] and "blocked" in st["switch"]
        assert st["workers"][0]["generation"] == 1
        assert st["workers"][0]["switch_pending"]["generation"] == 2
    finally:
        os.kill(frozen, signal.SIGCONT)
    st = proxy.wait_generation(2, timeout=10)
    assert [w["generation"] for w in st["workers"]] == [2, 2]
    assert "blocked" not in st["switch"] and st["switch"]["waiting_for"] == []
    assert proxy.terminate() == 0


# -- the supervisor's flags, signals and death ------------------------------------------------


def _config(tmp_path: Path, extra: str = "") -> Path:
    """A config without [discovery]: the flags under test must say which provider/registry."""
    cfg = tmp_path / "workers.toml"
    cfg.write_text(
        "\n".join(
            [
                "[proxy]",
                'http_listen = "127.0.0.1:0"',
                'admin_listen = "127.0.0.1:0"',
                'admin_token = "test-token"',
                "shutdown_grace = 2.0",
                "[hsms]",
                "enabled = false",
                extra,
                "",
            ]
        )
    )
    return cfg


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out.update(int(x) for x in (task / "children").read_text().split())
        except OSError:
            pass
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent has not reaped it yet


def _reap_strays(pids: set[int]) -> None:
    for pid in pids:  # only on failure: orphans of the code under test must not outlive it
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _version(port: int) -> tuple[int, str | None]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
            return r.status, r.headers.get("X-Backend-Version")
    except urllib.error.HTTPError as exc:
        return exc.code, None


def test_discovery_and_no_register_flags_reach_every_worker(tmp_path, consul, sample_app):
    """Regression: `zerodown proxy --workers 2 --discovery consul` served 503, the workers fell
    back to the file provider. Every flag the supervisor got is now forwarded."""
    blue = sample_app("blue-1", "v1")
    consul.register("drimeap-blue-1", "drimeap", "127.0.0.1", blue.port,
                    tags=["zerodown-group=blue", "zerodown-version=v1"])  # fmt: skip
    consul.kv_set("zerodown/drimeap/active", "blue")
    cfg = _config(tmp_path, f'[consul]\naddr = "{consul.url}"\nwait = 1.0\ncheck_ttl = 1.0')
    proc = Child(["--config", str(cfg), "--workers", "2", "--discovery", "consul"],
                 tmp_path, "sup", module="zerodown_proxy")  # fmt: skip
    try:
        st = wait_until(lambda: (s := _status(proc))["generation"] > 0 and s, 20, "routing")
        assert [w["generation"] > 0 for w in st["workers"]] == [True, True]
        for _ in range(20):  # new connections: both workers answer
            assert _version(proc.ports["http"]) == (200, "v1")
        # One registration for the whole proxy, with the supervisor's admin address.
        reg = wait_until(lambda: consul.services("zerodown-proxy"), 10, "the proxy registered")
        assert len(reg) == 1
        assert reg[0]["Service"]["Meta"]["admin"] == f"127.0.0.1:{proc.ports['admin']}"
    finally:
        assert proc.terminate() == 0
    wait_until(lambda: not consul.services("zerodown-proxy"), 10, "the proxy deregistered")

    proc = Child(["--config", str(cfg), "--workers", "2", "--discovery", "consul",
                  "--no-register"], tmp_path, "sup2", module="zerodown_proxy")  # fmt: skip
    try:
        wait_until(lambda: _status(proc)["generation"] > 0, 20, "routing")
        assert _version(proc.ports["http"]) == (200, "v1")
        assert consul.services("zerodown-proxy") == []  # --no-register reached every worker
    finally:
        assert proc.terminate() == 0


def test_registry_flag_reaches_every_worker(tmp_path, sample_app):
    app = sample_app("blue-1", "v1")
    reg = tmp_path / "elsewhere.json"
    write_registry(reg, registry(1, "blue", [instance("blue-1", "blue", "v1", app.port)]))
    cfg = _config(tmp_path, '[discovery]\nfile = "/nonexistent/registry.json"')
    proc = Child(["--config", str(cfg), "--workers", "2", "--registry", str(reg)],
                 tmp_path, "sup", module="zerodown_proxy")  # fmt: skip
    try:
        st = _status(proc)
        assert [w["generation"] for w in st["workers"]] == [1, 1]
        assert _version(proc.ports["http"]) == (200, "v1")
    finally:
        assert proc.terminate() == 0


def _status(proc: Child) -> dict:
    import urllib.request

    with urllib.request.urlopen(
        f"http://127.0.0.1:{proc.ports['admin']}/v1/status", timeout=10
    ) as r:
        return orjson.loads(r.read())


@pytest.mark.parametrize("why", ["registry missing", "consul down"])
def test_sigterm_while_starting_stops_the_workers(tmp_path, why):
    """Regression: SIGTERM before the first commit (the registry missing, Consul down) killed
    the supervisor and left both workers running, holding the ports."""
    if why == "registry missing":
        cfg = _config(tmp_path, f'[discovery]\nfile = "{tmp_path / "missing.json"}"')
    else:
        cfg = _config(tmp_path, '[discovery]\nprovider = "consul"\n[consul]\n'
                                'addr = "http://127.0.0.1:9"\nbackoff_max = 0.2')  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    sup = subprocess.Popen(
        [sys.executable, "-m", "zerodown_proxy", "--config", str(cfg), "--workers", "2"],
        env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    workers: set[int] = set()
    try:
        # Both workers started (and listening: they hold the ports) but nothing is committed.
        workers = wait_until(
            lambda: len(w := _children(sup.pid)) == 2 and w, 30, "two workers to be started"
        )
        wait_until(lambda: all(_listening(pid) for pid in workers), 30, "the workers to listen")
        assert sup.poll() is None
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(30) == 0
        wait_until(lambda: not any(_alive(p) for p in workers), 15, "the workers to exit")
    finally:
        if sup.poll() is None:
            sup.kill()
        _reap_strays(workers)


def _listening(pid: int) -> bool:
    """Does process `pid` hold a listening TCP socket?"""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").glob("*"):
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            parts = line.split()
            if parts[3] == "0A" and parts[9] in inodes:  # 0A: LISTEN
                return True
    return False


def test_workers_exit_when_the_supervisor_is_killed(tmp_path, sample_app):
    """Regression: SIGKILL of the supervisor always orphaned its workers. The kernel now
    SIGTERMs each worker when its supervisor dies (PR_SET_PDEATHSIG)."""
    app = sample_app("b", "v1")
    reg = tmp_path / "registry.json"
    write_registry(reg, registry(1, "blue", [instance("b", "blue", "v1", app.port)]))
    cfg = _config(tmp_path, f'[discovery]\nfile = "{reg}"')
    proc = Child(["--config", str(cfg), "--workers", "2"], tmp_path, "sup",
                 module="zerodown_proxy")  # fmt: skip
    workers = {w["pid"] for w in _status(proc)["workers"]}
    try:
        assert len(workers) == 2 and all(_alive(p) for p in workers)
        proc.kill()  # SIGKILL: no handler runs
        wait_until(lambda: not any(_alive(p) for p in workers), 20, "the workers to exit")
        # The ports are free again: a new proxy can bind them.
        with socket.socket() as s:
            s.bind(("127.0.0.1", proc.ports["http"]))
    finally:
        proc.terminate()
        _reap_strays(workers)


def test_worker_argv_forwards_every_override_flag():
    import argparse

    from zerodown_proxy.cli import OVERRIDES, add_arguments, overrides_from
    from zerodown_proxy.supervised import worker_argv

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--discovery", "consul", "--registry", "r.json", "--no-register",
                         "--workers", "3", "--name", "edge", "--http-listen", ":1"])  # fmt: skip
    argv = worker_argv(overrides_from(args))
    assert argv == ["--registry", "r.json", "--discovery", "consul", "--no-register"]
    # Every flag that overrides a key is either forwarded or set by the supervisor per worker.
    forwarded_or_set = {f for f, _, _ in OVERRIDES}
    assert {"--discovery", "--registry", "--no-register"} <= forwarded_or_set
    reparsed = p.parse_args(argv)
    assert overrides_from(reparsed)["discovery"] == {"file": "r.json", "provider": "consul"}
    assert overrides_from(reparsed)["consul"] == {"register_self": False}
