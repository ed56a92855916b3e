"""The Nomad backend against real agents (opt-in): set CONSUL_HTTP_ADDR and NOMAD_ADDR (e.g.
`consul agent -dev` and `nomad agent -dev` on this host; raw_exec enabled, which -dev does).

Runs deploy/nomad/drimeap-raw-exec.json under a unique app/job name (zdlive-<random>) so it
cannot touch a real drimeap, with the task started as `<this python> -m orchestrator
sample-app` (the Nomad client must run on this host), two `zerodown proxy` processes using the
Consul provider, and the CLI as a user runs it. Everything is purged afterwards.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from orchestrator.backend import Refused
from orchestrator.hashicorp_api import ConsulApi, NomadApi, env_settings
from orchestrator.release_nomad import NomadConsulBackend, Settings

from ..helpers import ProxyProc, wait_until

pytestmark = [
    pytest.mark.live,
    pytest.mark.skipif(
        not (os.environ.get("CONSUL_HTTP_ADDR") and os.environ.get("NOMAD_ADDR")),
        reason="needs real agents: set CONSUL_HTTP_ADDR and NOMAD_ADDR",
    ),
]

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "live-token"


class Agents:
    def __init__(self) -> None:
        s = env_settings()
        self.consul = s["consul_addr"]
        self.nomad = s["nomad_addr"]
        self.consul_token = s["consul_token"]
        self.nomad_token = s["nomad_token"]
        self.app = f"zdlive-{uuid.uuid4().hex[:6]}"

    def call(self, base: str, method: str, path: str, body: Any = None) -> Any:
        data = body if isinstance(body, bytes) or body is None else orjson.dumps(body)
        req = urllib.request.Request(base + path, data=data, method=method)
        if base == self.consul and self.consul_token:
            req.add_header("X-Consul-Token", self.consul_token)
        if base == self.nomad and self.nomad_token:
            req.add_header("X-Nomad-Token", self.nomad_token)
        with urllib.request.urlopen(req, timeout=30) as r:
            raw = r.read()
        try:
            return orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            return raw.decode()

    def kv(self, name: str) -> tuple[str, int] | None:
        try:
            (e,) = self.call(self.consul, "GET", f"/v1/kv/zerodown/{self.app}/{name}")
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise
        return base64.b64decode(e["Value"] or b"").decode(), e["ModifyIndex"]

    def history(self) -> list[dict[str, Any]]:
        try:
            es = self.call(self.consul, "GET", f"/v1/kv/zerodown/{self.app}/history/?recurse=true")
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return []
            raise
        return [orjson.loads(base64.b64decode(e["Value"])) for e in es]

    def allocs(self, group: str) -> set[str]:
        return {
            a["ID"]
            for a in self.call(self.nomad, "GET", f"/v1/job/{self.app}/allocations")
            if a["TaskGroup"] == group and a["ClientStatus"] == "running"
        }

    def wait_deployment(self, timeout: float = 180.0) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            d = self.call(self.nomad, "GET", f"/v1/job/{self.app}/deployment")
            return d if d and d["Status"] != "running" else None

        return wait_until(done, timeout, f"deployment of {self.app}")

    def job(self) -> dict[str, Any]:
        job = json.loads((ROOT / "deploy/nomad/drimeap-raw-exec.json").read_text())["Job"]
        job["ID"] = job["Name"] = self.app
        for tg in job["TaskGroups"]:
            tg["Update"]["MinHealthyTime"] = 1_000_000_000
            for svc in tg["Services"]:
                svc["Name"] = svc["Name"].replace("drimeap", self.app)
                for chk in svc["Checks"]:
                    chk["Interval"] = 1_000_000_000  # Nomad refuses < 1 s
            for task in tg["Tasks"]:
                task["Config"]["command"] = sys.executable
                task["Config"]["args"] = ["-m", "orchestrator", *task["Config"]["args"]]
                task["Env"]["PYTHONPATH"] = str(ROOT)
        return job


@pytest.fixture(scope="module")
def agents(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agents]:
    a = Agents()
    a.call(a.nomad, "POST", "/v1/jobs", {"Job": a.job()})
    try:
        dep = a.wait_deployment()
        assert dep["Status"] == "successful", dep
        a.call(a.consul, "PUT", f"/v1/kv/zerodown/{a.app}/active", b"blue")
        yield a
    finally:
        a.call(a.nomad, "DELETE", f"/v1/job/{a.app}?purge=true")
        a.call(a.consul, "DELETE", f"/v1/kv/zerodown/{a.app}?recurse=true")


@pytest.fixture(scope="module")
def live_proxies(agents: Agents, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list]:
    wd = tmp_path_factory.mktemp("live-proxies")
    cfg = "\n".join(
        [
            "[proxy]", 'http_listen = "127.0.0.1:0"', 'admin_listen = "127.0.0.1:0"',
            f'admin_token = "{TOKEN}"', "[hsms]", "enabled = false", "[discovery]",
            'provider = "consul"', "[consul]", f'addr = "{agents.consul}"',
            f'token = "{agents.consul_token}"', f'apps = ["{agents.app}"]', "check_ttl = 3.0",
            "",
        ]
    )  # fmt: skip
    procs = [ProxyProc(wd, wd / "unused.json", cfg, f"live{i}") for i in range(2)]
    try:
        yield procs
    finally:
        for p in procs:
            p.terminate()


def cli(agents: Agents, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ZERODOWN_STATE_DIR": str(tmp_path)}
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", args[0], "--backend", "nomad", "--app",
         agents.app, *args[1:]],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def backend(agents: Agents, tmp_path: Path) -> NomadConsulBackend:
    s = env_settings()
    return NomadConsulBackend(Settings(**s, admin_token=TOKEN, audit_log=tmp_path / "h.jsonl"))


def test_live_deploy_touches_only_standby_then_switch_and_rollback(
    agents: Agents, live_proxies: list[ProxyProc], tmp_path: Path
) -> None:
    blue = agents.allocs("blue")
    green = agents.allocs("green")
    r = cli(agents, tmp_path, "deploy", "v2", "--admin-token", TOKEN)
    assert r.returncode == 0, r.stderr
    assert "Active group blue untouched" in r.stdout
    assert "Standby preview: v2 answered" in r.stdout
    assert agents.allocs("blue") == blue  # same allocations, not restarted
    assert not agents.allocs("green") & green

    r = cli(agents, tmp_path, "status", "--json")
    st = orjson.loads(r.stdout)
    assert (st["active"]["group"], st["standby"]["version"]) == ("blue", "v2")
    assert st["in_sync"] and len(st["proxies"]) >= 2

    r = cli(agents, tmp_path, "switch")
    assert r.returncode == 0, r.stderr
    gen = agents.kv("active")
    assert gen is not None and gen[0] == "green"
    for p in live_proxies:
        assert p.status()["generation"] >= gen[1]

    r = cli(agents, tmp_path, "rollback")
    assert r.returncode == 0, r.stderr
    assert agents.kv("active")[0] == "blue"
    actions = [(e["action"], e["result"]) for e in agents.history()]
    assert actions[-3:] == [("deploy", "ok"), ("switch", "ok"), ("rollback", "ok")]


def test_live_switch_refused_when_a_standby_instance_is_in_maintenance(
    agents: Agents, live_proxies: list[ProxyProc], tmp_path: Path
) -> None:
    entries = agents.call(agents.consul, "GET", f"/v1/health/service/{agents.app}")
    sid = next(
        e["Service"]["ID"] for e in entries if "zerodown-group=green" in e["Service"]["Tags"]
    )
    before = agents.kv("active")
    agents.call(agents.consul, "PUT", f"/v1/agent/service/maintenance/{sid}?enable=true")
    try:
        r = cli(agents, tmp_path, "switch")
        assert r.returncode == 1
        assert "Standby group green has 1/2 passing instances" in r.stderr
        assert agents.kv("active") == before
    finally:
        agents.call(agents.consul, "PUT", f"/v1/agent/service/maintenance/{sid}?enable=false")


async def test_live_plan_touching_active_refused_and_enforce_index(
    agents: Agents, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_job = NomadApi.job

    async def job_then_someone_edits_blue(self: NomadApi, job_id: str) -> dict[str, Any]:
        job = await real_job(self, job_id)
        edited = json.loads(json.dumps(job))
        blue = next(tg for tg in edited["TaskGroups"] if tg["Name"] == "blue")
        blue["Services"][0]["Tags"].append(f"owner-{time.time_ns()}")
        agents.call(agents.nomad, "POST", "/v1/jobs", {"Job": edited})
        return job

    monkeypatch.setattr(NomadApi, "job", job_then_someone_edits_blue)
    with pytest.raises(Refused, match="plan would also change group blue"):
        await backend(agents, tmp_path).deploy(agents.app, "v3", None, lambda m: None)
    monkeypatch.setattr(NomadApi, "job", real_job)
    agents.wait_deployment()

    real_plan = NomadApi.plan

    async def plan_then_someone_registers(self: NomadApi, job: dict[str, Any]) -> dict:
        out = await real_plan(self, job)
        current = await real_job(self, job["ID"])
        current["Priority"] = 51 if current.get("Priority") != 51 else 52
        agents.call(agents.nomad, "POST", "/v1/jobs", {"Job": current})
        return out

    monkeypatch.setattr(NomadApi, "plan", plan_then_someone_registers)
    with pytest.raises(Refused, match="changed by someone else since it was read"):
        await backend(agents, tmp_path).deploy(agents.app, "v3", None, lambda m: None)


async def test_live_cas_conflict(
    agents: Agents, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_put = ConsulApi.kv_put
    key = f"zerodown/{agents.app}/active"

    async def racing(self: ConsulApi, k: str, value: Any, cas: int | None = None) -> bool:
        if k == key:
            await real_put(self, k, "green")  # someone else's switch lands first
        return await real_put(self, k, value, cas)

    monkeypatch.setattr(ConsulApi, "kv_put", racing)
    with pytest.raises(Refused, match="someone else switched"):
        await backend(agents, tmp_path).switch(agents.app, None, lambda m: None)
    monkeypatch.setattr(ConsulApi, "kv_put", real_put)
    agents.call(agents.consul, "PUT", f"/v1/kv/{key}", b"blue")
