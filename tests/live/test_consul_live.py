"""The Consul discovery provider against a REAL Consul agent (opt-in): set CONSUL_HTTP_ADDR and
NOMAD_ADDR (e.g. `consul agent -dev` and `nomad agent -dev` on this host). No Docker and no Nomad
job are needed: the test registers services in the agent itself, with TTL checks it drives,
pointing at local `zerodown sample-app` processes, under a unique app name (zdclive-<random>)
so it cannot touch a real drimeap. Everything it registers or writes is removed afterwards.

Scenarios the double also covers but a real agent cannot be made to do on demand (Consul down,
ACL denied on a dev agent without ACLs, garbage answers, a hung query) stay in
tests/integration/test_consul_discovery.py.
"""

from __future__ import annotations

import base64
import os
import statistics
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from ..helpers import ProxyProc, SampleApp, wait_until

pytestmark = [
    pytest.mark.live,
    pytest.mark.skipif(
        not (os.environ.get("CONSUL_HTTP_ADDR") and os.environ.get("NOMAD_ADDR")),
        reason="needs real agents: set CONSUL_HTTP_ADDR and NOMAD_ADDR",
    ),
]

VERSION = {"blue": "v1", "green": "v2"}


class LiveConsul:
    """A few direct calls to the agent, and a record of what to clean up."""

    def __init__(self) -> None:
        addr = os.environ.get("CONSUL_HTTP_ADDR", "127.0.0.1:8500")
        if "://" not in addr:
            ssl = os.environ.get("CONSUL_HTTP_SSL", "").lower() in ("1", "true")
            addr = ("https://" if ssl else "http://") + addr
        self.addr = addr.rstrip("/")
        self.token = os.environ.get("CONSUL_HTTP_TOKEN", "")
        self.cacert = os.environ.get("CONSUL_CACERT", "")
        self.app = f"zdclive-{uuid.uuid4().hex[:6]}"
        self.key = f"zerodown/{self.app}/active"
        self.service_ids: list[str] = []

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = body if isinstance(body, bytes) or body is None else orjson.dumps(body)
        req = urllib.request.Request(self.addr + path, data=data, method=method)
        if self.token:
            req.add_header("X-Consul-Token", self.token)
        ctx = None
        if self.cacert:
            import ssl

            ctx = ssl.create_default_context(cafile=self.cacert)
        try:
            with urllib.request.urlopen(req, timeout=30, context=ctx) as r:
                raw, status = r.read(), r.status
        except urllib.error.HTTPError as exc:
            raw, status = exc.read(), exc.code
        try:
            return status, orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            return status, raw.decode()

    def kv_get(self) -> tuple[str, int] | None:
        status, body = self.call("GET", f"/v1/kv/{self.key}")
        if status == 404:
            return None
        return base64.b64decode(body[0]["Value"] or b"").decode(), body[0]["ModifyIndex"]

    def switch(self, group: str) -> int:
        """CAS-write the Active key as the CLI does; returns the new ModifyIndex."""
        current = self.kv_get()
        status, ok = self.call("PUT", f"/v1/kv/{self.key}?cas={current[1] if current else 0}",
                               group.encode())  # fmt: skip
        assert status == 200 and ok is True, f"CAS write failed: {status} {ok}"
        now = self.kv_get()
        assert now is not None and now[0] == group
        return now[1]

    def register(self, sid: str, port: int, tags: list[str]) -> None:
        body = {"ID": sid, "Name": self.app, "Address": "127.0.0.1", "Port": port, "Tags": tags,
                "Check": {"CheckID": f"{sid}-ttl", "Name": "live test ttl", "TTL": "10m",
                          "Status": "passing"}}  # fmt: skip
        status, text = self.call("PUT", "/v1/agent/service/register", body)
        assert status == 200, f"register {sid}: {status} {text}"
        self.service_ids.append(sid)

    def set_check(self, sid: str, status: str) -> None:
        verb = {"passing": "pass", "warning": "warn", "critical": "fail"}[status]
        code, text = self.call("PUT", f"/v1/agent/check/{verb}/{sid}-ttl")
        assert code == 200, text

    def health(self, name: str, passing: bool = False) -> list[dict[str, Any]]:
        status, body = self.call(
            "GET", f"/v1/health/service/{name}" + ("?passing=1" if passing else "")
        )
        assert status == 200, body
        return body

    def cleanup(self) -> None:
        for sid in self.service_ids:
            self.call("PUT", f"/v1/agent/service/deregister/{sid}")
        self.call("DELETE", f"/v1/kv/zerodown/{self.app}?recurse=true")


@pytest.fixture
def live() -> Iterator[LiveConsul]:
    c = LiveConsul()
    status, leader = c.call("GET", "/v1/status/leader")
    if status != 200 or not leader:
        pytest.fail(f"Consul at {c.addr} has no leader ({status} {leader!r})")
    try:
        yield c
    finally:
        c.cleanup()


@pytest.fixture(scope="module")
def backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, list[SampleApp]]]:
    wd = tmp_path_factory.mktemp("consul-live-backends")
    groups: dict[str, list[SampleApp]] = {"blue": [], "green": []}
    try:
        for group, version in VERSION.items():
            for n in (1, 2):
                groups[group].append(SampleApp(wd, f"{group}-{n}", version))
        yield groups
    finally:
        for apps in groups.values():
            for a in apps:
                a.terminate()


def register_backends(
    live: LiveConsul, backends: dict[str, list[SampleApp]], roles: dict[str, str] | None = None
) -> None:
    for group, apps in backends.items():
        for n, a in enumerate(apps, 1):
            tags = [f"zerodown-group={group}", f"zerodown-version={VERSION[group]}"]
            if roles:
                tags.append(roles[group])
            live.register(f"{live.app}-{group}-{n}", a.port, tags)


def proxy_config(live: LiveConsul, **keys: Any) -> str:
    consul = {"addr": live.addr, "token": live.token, "cacert": live.cacert, "apps": [live.app],
              "wait": 5.0, "watchdog": 2.0, "check_ttl": 3.0, **keys}  # fmt: skip
    lines = ["[proxy]", 'http_listen = "127.0.0.1:0"', 'admin_listen = "127.0.0.1:0"',
             "shutdown_grace = 2.0", "[hsms]", "enabled = false", "[discovery]",
             'provider = "consul"', "[consul]"]  # fmt: skip
    lines += [f"{k} = {orjson.dumps(v).decode()}" for k, v in consul.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture
def proxies(tmp_path: Path) -> Iterator[Callable[..., ProxyProc]]:
    procs: list[ProxyProc] = []

    def start(cfg: str, name: str = "proxy") -> ProxyProc:
        p = ProxyProc(tmp_path, tmp_path / "unused.json", cfg, name)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.terminate()


def version_of(proxy: ProxyProc) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{proxy.http}/", timeout=5) as r:
        return r.headers["X-Backend-Version"]


def test_live_switch_propagates_to_three_proxies(
    live: LiveConsul, backends: dict[str, list[SampleApp]], proxies: Callable[..., ProxyProc]
) -> None:
    register_backends(live, backends)
    gen = live.switch("blue")
    ps = [proxies(proxy_config(live), f"p{n}") for n in range(3)]
    for p in ps:
        assert p.wait_generation(gen, timeout=15)["generation"] == gen
        assert version_of(p) == "v1"
    delays, active = [], "blue"
    for _ in range(10):
        active = "green" if active == "blue" else "blue"
        t0 = time.monotonic()
        gen = live.switch(active)
        for p in ps:
            p.wait_generation(gen, timeout=10)
        delays.append(time.monotonic() - t0)
        assert {version_of(p) for p in ps} == {VERSION[active]}
    for p in ps:
        d = p.status()["discovery"]
        assert d["healthy"] and d["apps"][live.app]["generation_source"] == "kv"
    print(f"\nlive: CAS write -> 3 proxies applied: median {statistics.median(delays) * 1000:.1f} ms,"
          f" max {max(delays) * 1000:.1f} ms")  # fmt: skip


def test_live_critical_active_group_is_refused(
    live: LiveConsul, backends: dict[str, list[SampleApp]], proxies: Callable[..., ProxyProc]
) -> None:
    register_backends(live, backends)
    gen = live.switch("blue")
    p = proxies(proxy_config(live))
    p.wait_generation(gen, timeout=15)
    live.set_check(f"{live.app}-green-1", "critical")
    live.set_check(f"{live.app}-green-2", "warning")
    bad = live.switch("green")
    problem = wait_until(
        lambda: p.status()["discovery"]["apps"][live.app]["problem"], 10, "the view to be refused"
    )
    assert "Active group green has 0/2 passing instances" in problem
    assert p.status()["generation"] == gen and version_of(p) == "v1"
    live.set_check(f"{live.app}-green-2", "passing")
    p.wait_generation(bad, timeout=10)
    assert version_of(p) == "v2"


def test_live_missing_key_falls_back_to_old_stack_tags(
    live: LiveConsul, backends: dict[str, list[SampleApp]], proxies: Callable[..., ProxyProc]
) -> None:
    register_backends(live, backends, roles={"blue": "standby", "green": "active"})
    assert live.kv_get() is None
    p = proxies(proxy_config(live))
    st = wait_until(lambda: (s := p.status())["generation"] and s, 15, "routing from tags")
    assert st["apps"][live.app]["active"]["group"] == "green" and version_of(p) == "v2"
    assert p.status()["discovery"]["apps"][live.app]["generation_source"] == "tags"
    gen = live.switch("blue")
    assert gen > st["generation"]
    p.wait_generation(gen, timeout=10)
    assert version_of(p) == "v1"


def test_live_registration_and_deregistration(
    live: LiveConsul, backends: dict[str, list[SampleApp]], proxies: Callable[..., ProxyProc]
) -> None:
    register_backends(live, backends)
    gen = live.switch("blue")
    p = proxies(proxy_config(live))
    p.wait_generation(gen, timeout=15)
    admin = f"127.0.0.1:{p.admin}"

    def ours(passing: bool) -> list[dict[str, Any]]:
        return [e for e in live.health("zerodown-proxy", passing)
                if e["Service"]["Meta"].get("admin") == admin]  # fmt: skip

    (entry,) = wait_until(lambda: ours(True), 15, "the proxy to register and pass its TTL check")
    assert entry["Service"]["Port"] == p.http
    ttl = [c for c in entry["Checks"] if c["CheckID"].endswith("-ttl")]
    assert ttl and ttl[0]["Status"] == "passing"
    assert p.terminate() == 0
    assert ours(False) == []
