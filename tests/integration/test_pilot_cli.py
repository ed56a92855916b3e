"""`zerodown pilot` end to end, both backends: the CLI as a child process, a real proxy process,
raw HSMS hosts and tools (four tools from 127.0.0.2..5 under load), HTTP sample backends for the
switch's probes. Local stack: the registry file; Consul: the Consul double (FakeConsul)."""

from __future__ import annotations

import asyncio
import fcntl
import http.client
import os
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import pytest

from orchestrator import hashicorp_api
from orchestrator.backend import Refused
from orchestrator.pilot import run as pilot_run
from orchestrator.release_nomad import NomadConsulBackend, Settings

from ..fake_agents import NomadStack
from ..helpers import ROOT, ProxyProc, instance, write_registry
from ..hsmsload import SOURCES, Load, connect_tools, start_hosts
from ..hsmspeers import metric

HSMS_CFG = """[hsms]
t3 = 5.0
t5 = 0.5
t6 = 3.0
t7 = 2.0
t8 = 1.0
linktest_interval = 1.0
"""


async def cli(state: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """`python -m orchestrator ...` without blocking the event loop (the load keeps running)."""
    full_env = {**(env or os.environ), "PYTHONPATH": str(ROOT)}
    full_env.pop("ZERODOWN_BACKEND", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "orchestrator", *args, "--state-dir", str(state),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=full_env,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode or 0, out.decode(), err.decode()


def pilot_handover_ms(proxy: ProxyProc) -> float:
    """Mean time from the pilot change being applied to the tool's Standby session selected."""
    total = metric(proxy, 'zerodown_hsms_handover_seconds_sum{kind="pilot"}')
    n = metric(proxy, 'zerodown_hsms_handover_seconds_count{kind="pilot"}')
    return total / n * 1000 if n else float("nan")


async def pilot_then_switch(
    proxy: ProxyProc, state: Path, backend: list[str], env: dict[str, str] | None = None
) -> dict[str, Any]:
    """The scenario of issue 13: one of four tools piloted under load, then a switch, then a
    rollback. Returns what the checks and the report need."""
    tools = await connect_tools(proxy.hsms_port_for_test, SOURCES)  # type: ignore[attr-defined]
    load = Load(tools)
    try:
        t0 = time.monotonic()
        for k in range(4):
            await load.wait_answers(k, t0, 10, f"tool {k} before the pilot")
        rc, out, err = await cli(state, "pilot", "add", "127.0.0.3", *backend, env=env)
        assert rc == 0, err
        piloted = time.monotonic()
        for k in range(4):
            await load.wait_answers(k, piloted, 20, f"tool {k} with the pilot")
        during = [load.since(k, piloted) for k in range(4)]
        rc, listed, err = await cli(state, "pilot", "list", "--json", *backend, env=env)
        assert rc == 0, err
        rc, status, err = await cli(state, "status", *backend, env=env)
        assert rc == 0, err

        rc, switched_out, err = await cli(state, "switch", *backend, env=env)
        assert rc == 0, err
        switched = time.monotonic()
        for k in range(4):
            await load.wait_answers(k, switched, 20, f"tool {k} after the switch")
        after_switch = [load.since(k, switched) for k in range(4)]
        rc, after_list, err = await cli(state, "pilot", "list", "--json", *backend, env=env)
        assert rc == 0, err

        rc, _, err = await cli(state, "rollback", *backend, env=env)
        assert rc == 0, err
        rolled = time.monotonic()
        for k in range(4):
            await load.wait_answers(k, rolled, 20, f"tool {k} after the rollback")
        after_rollback = [load.since(k, rolled) for k in range(4)]
    finally:
        await load.finish()
    disconnected = [t for t in tools if t.closed.is_set() or t.separated]
    for t in tools:
        await t.close()
    return {
        "add": out, "during": during, "listed": orjson.loads(listed), "status": status,
        "after_switch": after_switch, "after_list": orjson.loads(after_list),
        "after_rollback": after_rollback, "disconnected": disconnected,
    }  # fmt: skip


def check_scenario(r: dict[str, Any], proxy: ProxyProc) -> None:
    assert "applied generation" in r["add"]
    assert r["during"] == [{"v1"}, {"v2"}, {"v1"}, {"v1"}]
    assert r["listed"]["tools"] == ["127.0.0.3"] and r["listed"]["in_force"] is True
    assert r["listed"]["group"] == "green"
    # status shows the pilot, and which tool is on which group of the app.
    assert "pilots on green: 127.0.0.3" in r["status"]
    assert "127.0.0.3:" in r["status"] and "pilot" in r["status"].split("127.0.0.3:")[1]
    assert r["after_switch"] == [{"v2"}] * 4
    assert r["after_list"]["tools"] == []  # the switch cleared the pilots
    assert r["after_rollback"] == [{"v1"}] * 4
    assert not r["disconnected"], "a tool was disconnected"
    assert metric(proxy, "zerodown_hsms_pilot_moves_total") == 1
    print(f"pilot move: {pilot_handover_ms(proxy):.1f} ms from applied to selected on Standby")


# -- local stack --------------------------------------------------------------------------------


@pytest.fixture
async def local(tmp_path, start_proxy, backend_factory):
    hosts = await start_hosts(["v1", "v2"])
    http = [
        await backend_factory("v1", "drimeap-blue"),
        await backend_factory("v2", "drimeap-green"),
    ]
    state = tmp_path / "state"
    state.mkdir()
    reg = state / "registry.json"
    insts = [
        instance("drimeap-blue", "blue", "v1", http[0], hsms=hosts[0].port),
        instance("drimeap-green", "green", "v2", http[1], hsms=hosts[1].port),
    ]
    data = {"generation": 1, "apps": {"drimeap": {"active": "blue", "instances": insts,
            "hsms_device_id": 0}}, "proxies": []}  # fmt: skip
    write_registry(reg, data)
    proxy = start_proxy(reg, config=HSMS_CFG)
    data["proxies"] = [{"name": "proxy", "admin": f"127.0.0.1:{proxy.admin}"}]
    data["generation"] = 2
    write_registry(reg, data)
    await asyncio.to_thread(proxy.wait_generation, 2)
    proxy.hsms_port_for_test = proxy.hsms  # type: ignore[attr-defined]
    yield proxy, state, reg
    for h in hosts:
        await h.stop()


async def test_local_pilot_one_of_four_tools_then_switch_and_rollback(local):
    proxy, state, reg = local
    r = await pilot_then_switch(proxy, state, [])
    check_scenario(r, proxy)
    assert "pilots" not in orjson.loads(reg.read_bytes())["apps"]["drimeap"]
    rc, out, _ = await cli(state, "history")
    (line,) = [x for x in out.splitlines() if "pilot-add" in x]
    assert rc == 0 and "127.0.0.3 -> green" in line and "pilots: 127.0.0.3" in line, out


async def test_local_pilot_refusals_say_why_and_change_nothing(local):
    proxy, state, reg = local
    before = reg.read_bytes()
    rc, _, err = await cli(state, "pilot", "add", "not-a-tool")
    assert rc == 1 and "is not a tool: give an IP address" in err and err.count("\n") == 1
    rc, _, err = await cli(state, "pilot", "add", "40000")
    assert rc == 1 and "a device id is 0-32767" in err
    rc, _, err = await cli(state, "pilot", "remove", "127.0.0.9")
    assert rc == 1 and "127.0.0.9 is not a pilot of drimeap (pilots: none)" in err
    rc, _, err = await cli(state, "pilot", "add", "127.0.0.2", "--app", "nosuch")
    assert rc == 1 and "app nosuch is not in the local registry" in err
    # A release in progress holds the lock: a pilot change is refused at once.
    with open(state / "release.lock", "a+") as fd:
        fcntl.flock(fd, fcntl.LOCK_EX)
        rc, _, err = await cli(state, "pilot", "add", "127.0.0.2")
        fcntl.flock(fd, fcntl.LOCK_UN)
    assert rc == 1 and "another release command is running" in err
    assert reg.read_bytes() == before
    rc, out, _ = await cli(state, "history", "--json")
    results = [orjson.loads(line)["result"] for line in out.splitlines()]
    assert results == ["refused"] * 4  # the one for app nosuch is in its own history
    # A header rule is an HTTP pilot: the request carrying it goes to Standby.
    rc, _, err = await cli(state, "pilot", "add", "header:X-Tool-Id=ETCH01")
    assert rc == 0, err

    def version(headers: dict[str, str]) -> str:
        req = urllib.request.Request(f"http://127.0.0.1:{proxy.http}/", headers=headers)
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.headers["X-Backend-Version"]

    assert await asyncio.to_thread(version, {"X-Tool-Id": "ETCH01"}) == "v2"
    assert await asyncio.to_thread(version, {"X-Tool-Id": "ETCH02"}) == "v1"
    assert await asyncio.to_thread(version, {}) == "v1"
    # A client address is an HTTP pilot too (the same pilot that names an HSMS tool).
    rc, _, err = await cli(state, "pilot", "add", "127.0.0.4")
    assert rc == 0, err

    def version_from(source: str) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.http, timeout=5,
                                          source_address=(source, 0))  # fmt: skip
        try:
            conn.request("GET", "/")
            return conn.getresponse().headers["X-Backend-Version"]
        finally:
            conn.close()

    assert await asyncio.to_thread(version_from, "127.0.0.4") == "v2"
    assert await asyncio.to_thread(version_from, "127.0.0.5") == "v1"
    assert metric(proxy, 'zerodown_pilots{app="drimeap"}') == 2
    rc, out, _ = await cli(state, "pilot", "list")
    assert "2 pilot(s) on green (in force)" in out and "header:x-tool-id=ETCH01" in out


# -- Consul ---------------------------------------------------------------------------------------


@pytest.fixture
async def on_nomad(nomad_stack: NomadStack, tmp_path: Path):
    """drimeap on the Nomad double (sample apps, secsgem HSMS), v2 deployed to green by the CLI,
    one proxy following Consul."""
    stack = nomad_stack
    cfg = "\n".join([
        "[proxy]", 'http_listen = "127.0.0.1:0"', 'hsms_listen = "127.0.0.1:0"',
        'admin_listen = "127.0.0.1:0"', 'admin_token = "test-token"', "shutdown_grace = 2.0",
        HSMS_CFG, "[discovery]", 'provider = "consul"',
        "[consul]", f'addr = "{stack.consul.url}"', "wait = 5.0", "check_ttl = 2.0",
        "backoff_min = 0.05", "backoff_max = 0.3", "",
    ])  # fmt: skip
    proxy = ProxyProc(tmp_path, tmp_path / "unused.json", cfg, "proxy")
    try:
        env = stack.env()
        state = tmp_path / "state"
        rc, _, err = await cli(state, "deploy", "v2", "--backend", "nomad", "--admin-token",
                               "test-token", env=env)  # fmt: skip
        assert rc == 0, err
        proxy.hsms_port_for_test = proxy.hsms  # type: ignore[attr-defined]
        yield stack, proxy, state, env
    finally:
        proxy.terminate()


async def test_nomad_pilot_one_of_four_tools_then_switch_and_rollback(on_nomad):
    stack, proxy, state, env = on_nomad
    try:
        r = await pilot_then_switch(proxy, state, ["--backend", "nomad"], env)
    finally:  # shown when the test fails: a group going critical explains most failures
        for t, sid, status, output in stack.nomad.check_log:
            print(f"check {t:.3f} {sid} {status} {output}")
    check_scenario(r, proxy)
    got = stack.consul.kv_get("zerodown/drimeap/pilots")
    assert got is not None and orjson.loads(got[0]) == {"group": None, "tools": []}
    rc, out, _ = await cli(state, "history", "--backend", "nomad", env=env)
    (line,) = [x for x in out.splitlines() if "pilot-add" in x]
    assert rc == 0 and "127.0.0.3 -> green" in line and "pilots: 127.0.0.3" in line, out


async def test_consul_pilot_change_racing_another_is_refused_not_retried(
    consul, tmp_path, monkeypatch
):
    """Another operator writes the pilots key between this command's read and its CAS write:
    Consul answers false to `?cas=`, the command says so and changes nothing."""
    for group in ("blue", "green"):
        tags = [f"zerodown-group={group}", f"zerodown-version={group}-v"]
        consul.register(f"drimeap-{group}", "drimeap", "127.0.0.1", 9, tags=tags)
    consul.kv_set("zerodown/drimeap/active", "blue")
    key = "zerodown/drimeap/pilots"
    theirs = orjson.dumps({"group": "green", "tools": ["10.9.9.9"]})
    real_put = hashicorp_api.ConsulApi.kv_put

    async def racing_put(self, k, value, cas=None):  # type: ignore[no-untyped-def]
        if k == key:
            consul.kv_set(key, theirs)  # the other operator got there first
        return await real_put(self, k, value, cas)

    monkeypatch.setattr(hashicorp_api.ConsulApi, "kv_put", racing_put)
    backend = NomadConsulBackend(
        Settings(nomad_addr="", consul_addr=consul.url, audit_log=tmp_path / "history.jsonl")
    )
    with pytest.raises(Refused, match=r"someone else changed the pilots of drimeap .* meanwhile"):
        await pilot_run(backend, "add", "drimeap", "127.0.0.3", lambda m: None)
    assert orjson.loads(consul.kv_get(key)[0]) == orjson.loads(theirs)  # theirs stands
    (rec,) = [orjson.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert (rec["action"], rec["result"]) == ("pilot-add", "refused")
