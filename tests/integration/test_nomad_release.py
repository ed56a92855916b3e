"""`zerodown status/deploy/switch/rollback --backend nomad` as a user runs them, against the
Nomad double (running the drimeap raw_exec job as real sample-app processes) and the Consul
double, with real `zerodown proxy` processes using the Consul discovery provider."""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from orchestrator import jobspec
from orchestrator.backend import Refused
from orchestrator.devstack.fakes.consul import FakeConsul
from orchestrator.hashicorp_api import ConsulApi, NomadApi
from orchestrator.release_nomad import NomadConsulBackend, Settings

from ..fake_agents import NomadStack
from ..helpers import HeldProxy, ProxyProc, wait_until

KEY = "zerodown/drimeap/active"
TOKEN = "test-token"


def run_cli(
    stack: NomadStack, tmp_path: Path, *args: str, **env: str
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", args[0], "--backend", "nomad", *args[1:]],
        env=stack.env(ZERODOWN_STATE_DIR=str(tmp_path / "state"), **env),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )


def proxy_config(consul: FakeConsul) -> str:
    return "\n".join(
        [
            "[proxy]",
            'http_listen = "127.0.0.1:0"',
            'admin_listen = "127.0.0.1:0"',
            f'admin_token = "{TOKEN}"',
            "shutdown_grace = 2.0",
            "[hsms]",
            "enabled = false",
            "[discovery]",
            'provider = "consul"',
            "[consul]",
            f'addr = "{consul.url}"',
            "wait = 5.0",
            "check_ttl = 2.0",
            "backoff_min = 0.05",
            "backoff_max = 0.3",
            "",
        ]
    )


@pytest.fixture
def proxies(tmp_path: Path) -> Iterator[Callable[[NomadStack, int], list[ProxyProc]]]:
    procs: list[ProxyProc] = []

    def start(stack: NomadStack, n: int) -> list[ProxyProc]:
        for i in range(n):
            procs.append(
                ProxyProc(tmp_path, tmp_path / "unused.json", proxy_config(stack.consul), f"px{i}")
            )
        wait_until(
            lambda: len(stack.consul.services("zerodown-proxy", passing=True)) == n,
            15,
            f"{n} proxies registered in Consul",
        )
        return procs

    yield start
    for p in procs:
        p.terminate()


def version_via(proxy: ProxyProc, preview: bool = False) -> str:
    headers = {"X-Zerodown-Preview": "standby", "X-Zerodown-Token": TOKEN} if preview else {}
    req = urllib.request.Request(f"http://127.0.0.1:{proxy.http}/", headers=headers)
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.headers["X-Backend-Version"]


def green_versions(stack: NomadStack) -> set[str]:
    return {
        t[len("zerodown-version=") :]
        for e in stack.consul.services("drimeap")
        for t in e["Service"]["Tags"]
        if t.startswith("zerodown-version=") and "zerodown-group=green" in e["Service"]["Tags"]
    }


def history(stack: NomadStack) -> list[dict[str, Any]]:
    url = f"{stack.consul.url}/v1/kv/zerodown/drimeap/history/?recurse=true"
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            entries = orjson.loads(r.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return []
        raise
    import base64

    return [orjson.loads(base64.b64decode(e["Value"])) for e in entries]


def one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("zerodown: ")]
    assert len(lines) == 1, stderr
    return lines[0]


def test_release_cycle_deploy_switch_rollback_with_three_proxies(
    nomad_stack: NomadStack, proxies: Callable, tmp_path: Path
) -> None:
    stack = nomad_stack
    pxs = proxies(stack, 3)
    generation = stack.consul.kv_get(KEY)[1]
    for p in pxs:
        p.wait_generation(generation)
        assert version_via(p) == "v1"
    blue_pids = stack.pids("blue")
    green_pids = stack.pids("green")
    assert len(blue_pids) == 2 and len(green_pids) == 2

    r = run_cli(stack, tmp_path, "deploy", "v2", "--admin-token", TOKEN)
    assert r.returncode == 0, r.stderr
    assert "v2 is on Standby group green (2/2 healthy); Active group blue untouched" in r.stdout
    assert "plan: group green: create/destroy update 2; every other group unchanged" in r.stderr
    assert "smoke test through 3 proxy(ies) Standby preview: v2 answered" in r.stdout
    assert stack.pids("blue") == blue_pids  # the Active group's processes were not touched
    assert not stack.pids("green") & green_pids  # the Standby group's were replaced
    allocs = stack.nomad.allocations("drimeap")
    assert {a["job_version"] for a in allocs if a["group"] == "green"} == {1}
    assert green_versions(stack) == {"v2"}
    for p in pxs:
        assert version_via(p) == "v1"  # still Active: blue
        assert version_via(p, preview=True) == "v2"

    r = run_cli(stack, tmp_path, "status", "--json")
    assert r.returncode == 0, r.stderr
    st = orjson.loads(r.stdout)
    assert st["schema"] == "zerodown.status/v1" and st["backend"] == "nomad"
    assert (st["active"]["group"], st["active"]["version"]) == ("blue", "v1")
    assert (st["standby"]["group"], st["standby"]["version"]) == ("green", "v2")
    assert st["active"]["healthy"] == 2 and st["standby"]["healthy"] == 2
    assert {i["hsms_port"] is not None for i in st["standby"]["instances"]} == {True}
    assert st["generation"] == generation and st["in_sync"] is True
    assert len(st["proxies"]) == 3

    r = run_cli(stack, tmp_path, "switch")
    assert r.returncode == 0, r.stderr
    assert "switched drimeap to green (v2); 3 proxy(ies) applied generation" in r.stdout
    new_gen = stack.consul.kv_get(KEY)[1]
    assert stack.consul.kv_get(KEY)[0] == "green" and new_gen > generation
    for p in pxs:
        assert p.status()["generation"] >= new_gen
        assert version_via(p) == "v2"

    r = run_cli(stack, tmp_path, "rollback")
    assert r.returncode == 0, r.stderr
    assert "rolled back drimeap to blue (v1)" in r.stdout
    assert stack.consul.kv_get(KEY)[0] == "blue"
    for p in pxs:
        assert version_via(p) == "v1"
    assert stack.pids("blue") == blue_pids

    entries = history(stack)
    assert [(e["action"], e["result"]) for e in entries] == [
        ("deploy", "ok"),
        ("switch", "ok"),
        ("rollback", "ok"),
    ]
    assert (entries[1]["from"], entries[1]["to"]) == ("blue", "green")
    assert (entries[1]["from_version"], entries[1]["to_version"]) == ("v1", "v2")
    assert entries[1]["proxies"] == 3 and entries[1]["generation"] == new_gen
    assert all(e["user"] and e["time"] for e in entries)
    local = [
        orjson.loads(x) for x in (tmp_path / "state" / "history.jsonl").read_bytes().splitlines()
    ]
    assert [e["time_ns"] for e in local] == [e["time_ns"] for e in entries]
    r = run_cli(stack, tmp_path, "history", "--json")  # `zerodown history` reads Consul's trail
    assert r.returncode == 0, r.stderr
    assert [orjson.loads(x)["time_ns"] for x in r.stdout.splitlines()] == [
        e["time_ns"] for e in entries
    ]

    # green was Active on v2; once it is redeployed, "rollback" would not restore v2: refused.
    r = run_cli(stack, tmp_path, "deploy", "v3", "--admin-token", TOKEN)
    assert r.returncode == 0, r.stderr
    r = run_cli(stack, tmp_path, "rollback")
    assert r.returncode == 1
    assert "group green now runs v3, not v2 as when it was Active" in one_line(r.stderr)
    assert stack.consul.kv_get(KEY)[0] == "blue"
    assert [(e["action"], e["result"]) for e in history(stack)][-2:] == [
        ("deploy", "ok"),
        ("rollback", "refused"),
    ]


def test_plan_that_would_touch_the_active_group_is_refused(
    nomad_stack: NomadStack, tmp_path: Path
) -> None:
    stack = nomad_stack
    blue_pids = stack.pids("blue")

    def someone_edits_blue(job: dict[str, Any]) -> None:
        # An in-place change (tags only) by someone else: blue's Diff becomes "Edited".
        blue = next(tg for tg in job["TaskGroups"] if tg["Name"] == "blue")
        blue["Services"][0]["Tags"].append("owner=night-shift")

    stack.nomad.concurrent_edit("GET", "/v1/job/drimeap", "drimeap", someone_edits_blue)
    r = run_cli(stack, tmp_path, "deploy", "v2")
    assert r.returncode == 1, r.stdout
    line = one_line(r.stderr)
    assert "Nomad's plan would also change group blue: Diff Edited" in line, line
    assert "nothing was registered" in line
    job = stack.nomad.job("drimeap")
    assert job["Version"] == 1  # the other person's edit only; ours was not registered
    green = next(tg for tg in job["TaskGroups"] if tg["Name"] == "green")
    assert green["Meta"]["version"] == "v1" and green_versions(stack) == {"v1"}
    assert stack.pids("blue") == blue_pids
    (entry,) = history(stack)
    assert (entry["action"], entry["result"]) == ("deploy", "refused")
    assert "would also change group blue" in entry["reason"]


async def test_deploy_of_a_version_that_crashes_fails_and_nomad_reverts_standby(
    nomad_stack: NomadStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = nomad_stack
    blue_pids = stack.pids("blue")
    real_with_version = jobspec.with_version

    def crashing_release(job: dict[str, Any], group: str, version: str, image: Any) -> dict:
        # A release whose instances die on start-up: this build's sample app rejects its own
        # command line (argparse exits 2) before it listens.
        new = real_with_version(job, group, version, image)
        for tg in new["TaskGroups"]:
            if tg["Name"] == group:
                tg["Tasks"][0]["Config"]["args"].append("--no-such-option")
        return new

    monkeypatch.setattr(jobspec, "with_version", crashing_release)
    backend = NomadConsulBackend(
        Settings(
            nomad_addr=stack.nomad.url,
            consul_addr=stack.consul.url,
            audit_log=tmp_path / "history.jsonl",
        )  # fmt: skip
    )
    with pytest.raises(Refused) as exc:
        await backend.deploy("drimeap", "v9-crash", None, lambda m: None)
    monkeypatch.setattr(jobspec, "with_version", real_with_version)
    line = str(exc.value)
    assert "Nomad deployment" in line and "of v9-crash to group green failed" in line, line
    assert "Failed due to unhealthy allocations - rolling back to job version 0" in line
    assert "the Active group was not touched" in line
    assert stack.pids("blue") == blue_pids
    dep = stack.nomad.wait_deployment("drimeap", 90)  # Nomad's auto-revert of green
    assert dep["Status"] == "successful" and dep["JobVersion"] == 2
    assert green_versions(stack) == {"v1"} and len(stack.pids("green")) == 2
    assert stack.pids("blue") == blue_pids
    (entry,) = history(stack)
    assert (entry["action"], entry["result"], entry["version"]) == ("deploy", "failed", "v9-crash")

    r = run_cli(stack, tmp_path, "deploy", "v2", "--image", "drimeap:v2")
    assert r.returncode == 1
    assert "--image applies to docker tasks; group green uses the raw_exec driver" in one_line(
        r.stderr
    )


def test_concurrent_register_fails_cleanly_on_enforce_index(
    nomad_stack: NomadStack, tmp_path: Path
) -> None:
    stack = nomad_stack
    blue_pids, green_pids = stack.pids("blue"), stack.pids("green")
    stack.nomad.concurrent_edit(
        "POST", "/v1/jobs", "drimeap", lambda job: job.update(Priority=60), when="before"
    )
    r = run_cli(stack, tmp_path, "deploy", "v2")
    assert r.returncode == 1, r.stdout
    line = one_line(r.stderr)
    assert "job drimeap was changed by someone else since it was read" in line, line
    assert "job exists with conflicting job modify index" in line
    assert "nothing was registered" in line
    job = stack.nomad.job("drimeap")
    assert job["Priority"] == 60 and job["Version"] == 1
    assert green_versions(stack) == {"v1"}
    assert stack.pids("blue") == blue_pids and stack.pids("green") == green_pids


def test_switch_refused_when_standby_unhealthy_then_rollback_needs_history(
    nomad_stack: NomadStack, tmp_path: Path
) -> None:
    stack = nomad_stack
    before = stack.consul.kv_get(KEY)
    victim = sorted(stack.pids("green"))[0]
    os.kill(victim, signal.SIGKILL)  # a Standby instance crashes
    wait_until(lambda: len(stack.consul.services("drimeap", tags=["zerodown-group=green"])) == 1,
               10, "the dead instance to be deregistered")  # fmt: skip
    r = run_cli(stack, tmp_path, "switch")
    assert r.returncode == 1
    line = one_line(r.stderr)
    assert "Standby group green has 1/2 passing instances (1 of 2 not registered)" in line, line
    assert "not switching" in line
    assert stack.consul.kv_get(KEY) == before

    r = run_cli(stack, tmp_path, "status", "--json")
    standby = orjson.loads(r.stdout)["standby"]
    assert (standby["healthy"], len(standby["instances"])) == (1, 2)  # the dead one is listed
    (dead,) = [i for i in standby["instances"] if i["registered"] != "passing"]
    assert dead["probe"] == "error: not registered in Consul (allocation failed)"

    r = run_cli(stack, tmp_path, "switch", "--to", "purple")
    assert r.returncode == 1 and "has no group purple" in one_line(r.stderr)
    r = run_cli(stack, tmp_path, "rollback")
    assert r.returncode == 1
    assert "nothing to roll back to: no switch of drimeap is recorded" in one_line(r.stderr)
    results = [(e["action"], e["result"]) for e in history(stack)]
    assert results == [("switch", "refused"), ("switch", "refused"), ("rollback", "refused")]

    stack.consul.set_down(True)
    try:
        r = run_cli(stack, tmp_path, "switch")
        assert r.returncode == 1
        assert f"Consul at {stack.consul.url} is unreachable (connection refused)" in one_line(
            r.stderr
        )
    finally:
        stack.consul.set_down(False)
    assert stack.consul.kv_get(KEY) == before


async def test_cas_conflict_is_reported_not_retried(
    nomad_stack: NomadStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = nomad_stack
    puts: list[tuple[str, int | None]] = []
    real_put = ConsulApi.kv_put

    async def racing_put(self: ConsulApi, key: str, value: Any, cas: int | None = None) -> bool:
        if key == KEY:
            puts.append((key, cas))
            stack.consul.kv_set(KEY, "green")  # another operator switched a moment earlier
        return await real_put(self, key, value, cas)

    monkeypatch.setattr(ConsulApi, "kv_put", racing_put)
    backend = NomadConsulBackend(
        Settings(
            nomad_addr=stack.nomad.url,
            consul_addr=stack.consul.url,
            audit_log=tmp_path / "history.jsonl",
        )  # fmt: skip
    )
    with pytest.raises(Refused, match="someone else switched drimeap") as exc:
        await backend.switch("drimeap", None, lambda m: None)
    assert "not retrying" in str(exc.value)
    assert len(puts) == 1  # not retried
    assert stack.consul.kv_get(KEY)[0] == "green"  # theirs stands
    (entry,) = history(stack)
    assert (entry["action"], entry["result"], entry["to"]) == ("switch", "refused", "green")


def test_status_without_agents_is_one_clear_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_", "NOMAD_"))}
    env.update(NOMAD_ADDR="http://127.0.0.1:9", CONSUL_HTTP_ADDR="127.0.0.1:9")
    r = subprocess.run(
        [sys.executable, "-m", "orchestrator", "status", "--backend", "nomad"],
        env={**env, "PYTHONPATH": str(Path(__file__).parents[2])},
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 1
    line = one_line(r.stderr)
    assert "at http://127.0.0.1:9 is unreachable (connection refused)" in line, line


async def test_switch_during_deploy_stops_the_deploy_before_register(
    nomad_stack: NomadStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = nomad_stack
    real_plan = NomadApi.plan

    async def plan_then_someone_switches(self: NomadApi, job: dict[str, Any]) -> dict[str, Any]:
        out = await real_plan(self, job)
        stack.consul.kv_set(KEY, "green")  # green is Active now: deploying to it would hurt
        return out

    monkeypatch.setattr(NomadApi, "plan", plan_then_someone_switches)
    backend = NomadConsulBackend(
        Settings(
            nomad_addr=stack.nomad.url,
            consul_addr=stack.consul.url,
            audit_log=tmp_path / "history.jsonl",
        )  # fmt: skip
    )
    green_pids = stack.pids("green")
    with pytest.raises(Refused, match=r"was switched while deploying \(Active blue -> green\)"):
        await backend.deploy("drimeap", "v2", None, lambda m: None)
    assert stack.nomad.job("drimeap")["Version"] == 0
    assert stack.pids("green") == green_pids


async def test_acl_tokens_and_garbage_answers_give_one_line_reasons(
    nomad_stack: NomadStack, tmp_path: Path
) -> None:
    stack = nomad_stack

    def backend(**kw: str) -> NomadConsulBackend:
        return NomadConsulBackend(
            Settings(
                nomad_addr=stack.nomad.url,
                consul_addr=stack.consul.url,
                audit_log=tmp_path / "history.jsonl",
                **kw,
            )  # fmt: skip
        )

    stack.consul.acl_token = "consul-secret"
    stack.nomad.acl_token = "nomad-secret"
    with pytest.raises(Refused, match=r"answered 403 .*\(check (CONSUL_HTTP|NOMAD)_TOKEN\)$"):
        await backend().status("drimeap")
    st = await backend(consul_token="consul-secret", nomad_token="nomad-secret").status("drimeap")
    assert (st.active.group, st.active.healthy, st.standby.healthy) == ("blue", 2, 2)
    stack.consul.garbage = True
    with pytest.raises(Refused, match=r"^Consul at .* answered GET /v1/health/service/drimeap(-hsms)? with "
                                      "something that is not JSON"):  # fmt: skip
        await backend(consul_token="consul-secret", nomad_token="nomad-secret").status("drimeap")


async def test_switch_does_not_wait_for_a_proxy_whose_check_is_critical(
    nomad_stack: NomadStack, tmp_path: Path
) -> None:
    stack = nomad_stack
    # A proxy that crashed: still registered, its TTL check critical, its admin port dead.
    stack.consul.register(
        "zerodown-proxy-crashed",
        "zerodown-proxy",
        "127.0.0.1",
        1,
        meta={"admin": "127.0.0.1:1"},
        check_status="critical",
    )
    said: list[str] = []
    backend = NomadConsulBackend(
        Settings(
            nomad_addr=stack.nomad.url,
            consul_addr=stack.consul.url,
            audit_log=tmp_path / "history.jsonl",
            proxy_timeout=3.0,
        )  # fmt: skip
    )
    out = await backend.switch("drimeap", None, said.append)
    assert out.to_group == "green" and out.proxies == 0
    assert any("zerodown-proxy-crashed" in m and "not waiting" in m for m in said), said


@pytest.fixture
def fab_east(tmp_path: Path) -> Iterator[tuple[NomadStack, FakeConsul]]:
    """drimeap on FakeNomad registered in the Consul of datacenter `fab-east`, the Active key
    under a non-default prefix `fab/zerodown`; and `hq`, another datacenter's agent WAN-joined
    to fab-east (what an operator's workstation talks to)."""
    from orchestrator.devstack.fakes.nomad import FakeNomad

    from ..fake_agents import ROOT, raw_exec_job

    fab = FakeConsul(datacenter="fab-east")
    hq = FakeConsul(datacenter="hq")
    fab.start()
    hq.start()
    hq.federate(fab)
    nomad = FakeNomad(fab, workdir=tmp_path / "nomad", check_interval=0.2, kill_timeout_cap=2.0,
                      base_env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT)})  # fmt: skip
    try:
        nomad.start()
        nomad.register_job(raw_exec_job())
        assert nomad.wait_deployment("drimeap", 60)["Status"] == "successful"
        fab.kv_set(f"{PREFIX}/drimeap/active", "blue")
        yield NomadStack(fab, nomad), hq
    finally:
        nomad.stop()
        hq.stop()
        fab.stop()


PREFIX = "fab/zerodown"


def test_prefix_and_datacenter_are_the_proxies_own_end_to_end(
    fab_east: tuple[NomadStack, FakeConsul], tmp_path: Path
) -> None:
    """Issue 10: the release side hard-coded `zerodown/` and sent no datacenter, so a proxy
    configured with another prefix or datacenter never saw `zerodown switch --backend nomad`.
    Now both read [consul] key_prefix/datacenter (or ZERODOWN_CONSUL_*), and every Consul call
    of the release names the datacenter."""
    stack, hq = fab_east
    fab = stack.consul
    cfg = proxy_config(fab) + f'datacenter = "fab-east"\nkey_prefix = "{PREFIX}"\n'
    proxy = ProxyProc(tmp_path, tmp_path / "unused.json", cfg, "fab-proxy")
    try:
        wait_until(lambda: fab.services("zerodown-proxy", passing=True), 15, "registered")
        proxy.wait_generation(fab.kv_get(f"{PREFIX}/drimeap/active")[1], timeout=15)
        assert proxy.status()["discovery"]["key_prefix"] == PREFIX

        # 1. The environment only (no file): the operator's agent is hq's.
        env = {"CONSUL_HTTP_ADDR": hq.url, "ZERODOWN_CONSUL_DATACENTER": "fab-east",
               "ZERODOWN_CONSUL_KEY_PREFIX": PREFIX}  # fmt: skip
        hq.requests.clear()
        r = run_cli(stack, tmp_path, "switch", **env)
        assert r.returncode == 0, r.stderr
        assert "switched drimeap to green (v1); 1 proxy(ies) applied generation" in r.stdout
        value, generation = fab.kv_get(f"{PREFIX}/drimeap/active")
        assert value == "green"
        st = proxy.status()
        assert st["generation"] >= generation
        assert st["apps"]["drimeap"]["active"]["group"] == "green"
        assert hq.kv_get("zerodown/drimeap/active") is None and hq.kv_get(PREFIX) is None
        assert fab.kv_get(f"{PREFIX}/drimeap/previous") is not None
        calls = [path for _, path in hq.requests if not path.startswith("/v1/agent/")]
        assert calls and all("dc=fab-east" in path for path in calls), calls

        # 2. The proxies' own config file, the agent address from the environment.
        r = run_cli(stack, tmp_path, "rollback", "--config", str(tmp_path / "fab-proxy.toml"),
                    CONSUL_HTTP_ADDR=hq.url)  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert "rolled back drimeap to blue (v1)" in r.stdout
        assert fab.kv_get(f"{PREFIX}/drimeap/active")[0] == "blue"
        assert proxy.status()["apps"]["drimeap"]["active"]["group"] == "blue"
        r = run_cli(stack, tmp_path, "status", "--json", **env)
        st = orjson.loads(r.stdout)
        assert st["active"]["group"] == "blue" and st["in_sync"] and len(st["proxies"]) == 1
        url = f"{fab.url}/v1/kv/{PREFIX}/drimeap/history/?recurse=true"
        with urllib.request.urlopen(url, timeout=5) as resp:
            assert len(orjson.loads(resp.read())) == 2  # the audit trail under the prefix too
    finally:
        proxy.terminate()


# -- the release lock (a Consul session lock) ---------------------------------------------------

LOCK = "zerodown/drimeap/lock"
BUSY = re.compile(
    r"^zerodown: another release command is running \((switch|deploy|rollback), pid (\d+) on "
    r"host (\S+), since \d\d:\d\d:\d\d\); not (switching|deploying|rolling back)\.$"
)


def held_proxy(consul: FakeConsul) -> HeldProxy:
    """A registered zerodown-proxy that reports the Active key's ModifyIndex only when the test
    lets it (see tests/helpers.HeldProxy)."""
    proxy = HeldProxy(lambda: consul.kv_get(KEY)[1])
    consul.register("zerodown-proxy-held", "zerodown-proxy", "127.0.0.1", proxy.port,
                    meta={"admin": f"127.0.0.1:{proxy.port}"}, check_status="passing")  # fmt: skip
    return proxy


def popen_cli(stack: NomadStack, tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator", args[0], "--backend", "nomad", *args[1:]],
        env=stack.env(ZERODOWN_STATE_DIR=str(tmp_path / "state")),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_two_switches_started_together_one_runs_the_other_refuses_nomad(
    nomad_stack: NomadStack, tmp_path: Path
) -> None:
    stack = nomad_stack
    held = held_proxy(stack.consul)
    try:
        active = "blue"
        for n in range(3):
            held.released.clear()
            procs = [popen_cli(stack, tmp_path, "switch"), popen_cli(stack, tmp_path, "switch")]
            # The refused one ends at once; the other waits for the held proxy, lock held.
            wait_until(
                lambda ps=procs: any(p.poll() is not None for p in ps), 60, "a switch to end"
            )
            held.released.set()
            outs = [p.communicate(timeout=120) for p in procs]
            assert sorted(p.returncode for p in procs) == [0, 1], (n, outs)
            (winner,) = [p for p in procs if p.returncode == 0]
            (err,) = [e for p, (_, e) in zip(procs, outs, strict=True) if p.returncode == 1]
            m = BUSY.match(one_line(err))
            assert m, err
            assert (m.group(1), int(m.group(2)), m.group(4)) == ("switch", winner.pid, "switching")
            active = "green" if active == "blue" else "blue"
            assert stack.consul.kv_get(KEY)[0] == active
            entry = orjson.loads(base64.b64decode(kv_entry(stack, LOCK)["Value"]))
            assert "Session" not in kv_entry(stack, LOCK)  # released at the end
            assert entry["pid"] == winner.pid
        assert stack.consul.sessions.by_id == {}  # every session destroyed
    finally:
        held.close()
    results = sorted((e["action"], e["result"]) for e in history(stack))
    assert results == [("switch", "ok")] * 3 + [("switch", "refused")] * 3
    refused = [e for e in history(stack) if e["result"] == "refused"]
    assert all(e["holder"]["action"] == "switch" and "another release" in e["reason"]
               for e in refused)  # fmt: skip


def kv_entry(stack: NomadStack, key: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{stack.consul.url}/v1/kv/{key}", timeout=5) as r:
        return orjson.loads(r.read())[0]


def hold_lock(stack: NomadStack, holder: dict[str, Any], ttl: str = "10s") -> str:
    """Someone else's session holding the release lock, as another zerodown would leave it."""

    def put(path: str, body: bytes) -> Any:
        req = urllib.request.Request(stack.consul.url + path, data=body, method="PUT")
        with urllib.request.urlopen(req, timeout=5) as r:
            return orjson.loads(r.read())

    sid = put("/v1/session/create", orjson.dumps({"TTL": ttl, "LockDelay": "0s"}))["ID"]
    assert put(f"/v1/kv/{LOCK}?acquire={sid}", orjson.dumps(holder)) is True
    return sid


def _renew_until(stack: NomadStack, sid: str, stop: threading.Event) -> None:
    """Renew session `sid` every 0.1 s until `stop` is set (PUT /v1/session/renew/<id>)."""
    while not stop.wait(0.1):
        req = urllib.request.Request(
            f"{stack.consul.url}/v1/session/renew/{sid}", data=b"", method="PUT"
        )
        with urllib.request.urlopen(req, timeout=5) as r:
            r.read()


def _holder(**kw: Any) -> dict[str, Any]:
    from orchestrator.release_lock import Holder

    return {**Holder.me("deploy").to_dict(), **kw}


def test_a_lock_held_elsewhere_refuses_until_its_session_ttl_frees_it(
    nomad_stack: NomadStack, tmp_path: Path
) -> None:
    stack = nomad_stack
    stack.consul.sessions.ttl_min = 0.2  # Consul's session_ttl_min, lowered for the test
    # A deploy running on another machine: this host cannot tell whether it is alive.
    sid = hold_lock(stack, _holder(host="fab-ops-1", pid=4242, boot_id="another-machine"), ttl="1s")
    before = stack.consul.kv_get(KEY)
    # Alive while the first switch runs: renewed as its holder would (a CLI's start-up on a
    # loaded machine can take longer than the 2 x TTL an unrenewed session lives).
    alive = threading.Event()
    renewer = threading.Thread(target=_renew_until, args=(stack, sid, alive), daemon=True)
    renewer.start()
    try:
        r = run_cli(stack, tmp_path, "switch")
    finally:
        alive.set()
        renewer.join(5)
    assert r.returncode == 1
    line = one_line(r.stderr)
    assert BUSY.match(line) and "(deploy, pid 4242 on host fab-ops-1, since " in line, line
    assert stack.consul.kv_get(KEY) == before
    # It stops renewing (crashed): Consul invalidates the session after 2 x TTL.
    wait_until(lambda: "Session" not in kv_entry(stack, LOCK), 10, "the session to expire")
    r = run_cli(stack, tmp_path, "switch")
    assert r.returncode == 0, r.stderr
    assert stack.consul.kv_get(KEY)[0] == "green"


def test_a_lock_whose_holder_died_on_this_host_is_taken_over_at_once(
    nomad_stack: NomadStack, tmp_path: Path
) -> None:
    stack = nomad_stack
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    sid = hold_lock(stack, _holder(pid=dead.pid), ttl="3600s")  # would block for two hours
    r = run_cli(stack, tmp_path, "switch")
    assert r.returncode == 0, r.stderr
    assert f"held by a command that is no longer running (deploy, pid {dead.pid} on host" in (
        r.stderr
    )
    assert sid not in stack.consul.sessions.by_id
    assert stack.consul.kv_get(KEY)[0] == "green"

    # A holder that is alive here (this test process) is never taken over.
    hold_lock(stack, _holder(), ttl="3600s")
    r = run_cli(stack, tmp_path, "switch")
    assert r.returncode == 1 and f"(deploy, pid {os.getpid()} on host" in one_line(r.stderr)


async def test_a_switch_that_lost_its_lock_does_not_write(
    nomad_stack: NomadStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Frozen past its session's TTL (here: the session destroyed under it), a switch finds
    out right before its write and refuses; the Active key is not touched."""
    from orchestrator import nomad_switch  # the switch's own checks (release_nomad calls it)

    stack = nomad_stack
    real_probe = nomad_switch.probe_http

    async def probe_then_lose_the_session(*args: Any, **kw: Any) -> str:
        with stack.consul._lock:
            for sid in list(stack.consul.sessions.by_id):
                stack.consul.sessions.invalidate(sid)
        return await real_probe(*args, **kw)

    monkeypatch.setattr(nomad_switch, "probe_http", probe_then_lose_the_session)
    backend = NomadConsulBackend(
        Settings(
            nomad_addr=stack.nomad.url,
            consul_addr=stack.consul.url,
            audit_log=tmp_path / "history.jsonl",
        )  # fmt: skip
    )
    before = stack.consul.kv_get(KEY)
    with pytest.raises(Refused, match=r"^lost the release lock zerodown/drimeap/lock \("):
        await backend.switch("drimeap", None, lambda m: None)
    assert stack.consul.kv_get(KEY) == before
    (entry,) = history(stack)
    assert (entry["action"], entry["result"]) == ("switch", "refused")


def test_invalid_version_is_refused_before_nomad_is_touched(
    nomad_stack: NomadStack, tmp_path: Path
) -> None:
    stack = nomad_stack
    job = stack.nomad.job("drimeap")
    for version in ("", "--help", "v2\nx", "a/b"):
        r = run_cli(stack, tmp_path, "deploy", "--", version)
        assert r.returncode == 1, r.stderr
        assert one_line(r.stderr).startswith(f"zerodown: version {version!r} is not valid (")
    assert stack.nomad.job("drimeap")["JobModifyIndex"] == job["JobModifyIndex"]
    assert not any(m == "POST" for m, _ in stack.nomad.requests)
    assert [(e["action"], e["result"]) for e in history(stack)] == [("deploy", "refused")] * 4
