"""The Consul discovery provider in real proxy processes, against the Consul double and real
sample-app backends: switches, outages, ACL and garbage answers, refused views, the old stack's
tags, a hung watch, self-registration, and multi-worker mode."""

from __future__ import annotations

import shutil
import ssl
import statistics
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from orchestrator.devstack.fakes.consul import FakeConsul

from ..helpers import ProxyProc, SampleApp, wait_until

KEY = "zerodown/drimeap/active"


@pytest.fixture(scope="module")
def backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, list[SampleApp]]]:
    """Two sample-app processes per group (blue v1, green v2), shared by the module."""
    wd = tmp_path_factory.mktemp("consul-backends")
    groups: dict[str, list[SampleApp]] = {"blue": [], "green": []}
    try:
        for group, version in (("blue", "v1"), ("green", "v2")):
            for n in (1, 2):
                groups[group].append(SampleApp(wd, f"{group}-{n}", version))
        yield groups
    finally:
        for apps in groups.values():
            for a in apps:
                a.terminate()


VERSION = {"blue": "v1", "green": "v2"}


def register_backends(
    consul: FakeConsul,
    backends: dict[str, list[SampleApp]],
    extra_tags: dict[str, str] | None = None,
) -> None:
    for group, apps in backends.items():
        for n, a in enumerate(apps, 1):
            tags = [f"zerodown-group={group}", f"zerodown-version={VERSION[group]}"]
            if extra_tags:
                tags.append(extra_tags[group])
            consul.register(f"drimeap-{group}-{n}", "drimeap", "127.0.0.1", a.port, tags=tags)


def config(
    consul: FakeConsul, workers: int = 1, stale_after: float | None = None, **consul_keys: Any
) -> str:
    keys = {"addr": consul.url, "wait": 1.0, "watchdog": 0.5, "backoff_min": 0.05,
            "backoff_max": 0.3, "check_ttl": 1.0, **consul_keys}  # fmt: skip
    lines = [
        "[proxy]",
        'http_listen = "127.0.0.1:0"',
        'admin_listen = "127.0.0.1:0"',
        'admin_token = "test-token"',
        "shutdown_grace = 2.0",
        f"workers = {workers}",
        "[hsms]",
        "enabled = false",
        "[discovery]",
        'provider = "consul"',
        *([f"stale_after = {stale_after}"] if stale_after is not None else []),
        "[consul]",
    ]
    for k, v in keys.items():
        lines.append(f"{k} = {orjson.dumps(v).decode()}")
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
        assert r.status == 200
        return r.headers["X-Backend-Version"]


def discovery(proxy: ProxyProc) -> dict[str, Any]:
    return proxy.status()["discovery"]


def metric(proxy: ProxyProc, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{proxy.admin}/metrics", timeout=5) as r:
        text = r.read().decode()
    total = 0.0  # `name` is a sample name with or without labels; without, label sets add up
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample == name or ("{" not in name and sample.startswith(name + "{")):
            total += float(value)
    return total


def test_switch_propagates_to_three_proxies(
    consul: FakeConsul, backends: dict[str, list[SampleApp]], proxies: Callable[..., ProxyProc]
) -> None:
    register_backends(consul, backends)
    gen = consul.kv_set(KEY, "blue")
    ps = [proxies(config(consul, wait=30.0), f"p{n}") for n in range(3)]
    for p in ps:
        st = p.wait_generation(gen)
        assert st["generation"] == gen and st["apps"]["drimeap"]["active"]["group"] == "blue"
        assert version_of(p) == "v1"
    delays = []
    active = "blue"
    for _ in range(10):
        active = "green" if active == "blue" else "blue"
        t0 = time.monotonic()
        gen = consul.kv_set(KEY, active)
        pending = set(range(3))
        deadline = t0 + 10
        while pending and time.monotonic() < deadline:
            pending = {i for i in pending if ps[i].status()["generation"] < gen}
            time.sleep(0.002)  # polling pace; keeps the double's thread responsive
        assert not pending, f"proxies {pending} did not apply generation {gen}"
        delays.append(time.monotonic() - t0)
        for p in ps:
            assert version_of(p) == VERSION[active]
            assert p.status()["generation"] == gen
    for p in ps:
        d = discovery(p)
        assert d["healthy"] and d["errors"] == 0
        assert d["apps"]["drimeap"]["generation_source"] == "kv"
        # The provider applied each change a few ms after Consul answered (not asserted: noisy CI).
        apply_count = metric(p, 'zerodown_consul_apply_seconds_count{kind="switch"}')
        apply_sum = metric(p, 'zerodown_consul_apply_seconds_sum{kind="switch"}')
        assert apply_count == 10
    print(
        f"\nswitch -> 3 proxies applied (incl. status polling): median "
        f"{statistics.median(delays) * 1000:.1f} ms, max {max(delays) * 1000:.1f} ms; "
        f"provider apply mean {apply_sum / apply_count * 1000:.2f} ms"
    )


def test_consul_down_keeps_routing_and_recovers(
    consul: FakeConsul, backends: dict[str, list[SampleApp]], proxies: Callable[..., ProxyProc]
) -> None:
    register_backends(consul, backends)
    gen = consul.kv_set(KEY, "blue")
    p = proxies(config(consul))
    p.wait_generation(gen)
    consul.set_down(True)
    d = wait_until(
        lambda: (d := discovery(p))["errors_by_kind"].get("unreachable") and d, 10, "errors"
    )
    assert not d["healthy"] and "unreachable" in d["last_error"]
    assert version_of(p) == "v1"  # routing continues on the last good snapshot
    down_gen = consul.kv_set(KEY, "green")  # written while the proxy cannot see it
    wait_until(lambda: discovery(p)["last_contact_age_s"] > 0.5, 10, "contact to age")
    assert p.status()["generation"] == gen and version_of(p) == "v1"
    assert metric(p, "zerodown_consul_last_contact_age_seconds") > 0.5
    assert metric(p, "zerodown_consul_healthy") == 0
    consul.set_down(False)
    st = p.wait_generation(down_gen, timeout=10)
    assert st["apps"]["drimeap"]["active"]["group"] == "green"
    assert version_of(p) == "v2"
    wait_until(lambda: discovery(p)["healthy"], 10, "healthy again")
    assert metric(p, "zerodown_consul_healthy") == 1


def health(proxy: ProxyProc) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{proxy.admin}/health", timeout=5) as r:
            return r.status, orjson.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read())


def test_health_says_discovery_is_stale_while_consul_is_down(
    consul: FakeConsul, backends: dict[str, list[SampleApp]], proxies: Callable[..., ProxyProc]
) -> None:
    register_backends(consul, backends)
    gen = consul.kv_set(KEY, "blue")
    # wait 1 s, watchdog 0.5 s: a healthy watch confirms at least every ~1.6 s
    p = proxies(config(consul, stale_after=2.0))
    p.wait_generation(gen)
    wait_until(lambda: health(p)[0] == 200, 10, "healthy")
    consul.set_down(True)
    code, body = wait_until(lambda: (h := health(p))[0] == 503 and h, 15, "stale")
    assert body["status"] == "stale" and body["generation"] == gen
    assert "discovery (consul) has not confirmed its view" in body["reason"]
    assert "unreachable" in body["reason"]
    assert version_of(p) == "v1"  # routing continues on the last good snapshot
    consul.set_down(False)
    code, body = wait_until(lambda: (h := health(p))[0] == 200 and h, 15, "fresh again")
    assert body["status"] == "ok"


def test_acl_denied_and_garbage_keep_routing(
    consul: FakeConsul, backends: dict[str, list[SampleApp]], proxies: Callable[..., ProxyProc]
) -> None:
    register_backends(consul, backends)
    consul.acl_token = "secret"
    gen = consul.kv_set(KEY, "blue")
    p = proxies(config(consul, token="secret"))
    p.wait_generation(gen)
    consul.acl_token = "rotated"  # the proxy's token is no longer valid
    d = wait_until(
        lambda: (d := discovery(p))["errors_by_kind"].get("acl_denied") and d, 10, "acl errors"
    )
    assert "403" in d["last_error"] and "token" in d["last_error"]
    assert version_of(p) == "v1"
    consul.acl_token = "secret"
    consul.garbage = True
    wait_until(lambda: discovery(p)["errors_by_kind"].get("garbage"), 10, "garbage errors")
    assert version_of(p) == "v1" and p.status()["generation"] == gen
    # Instant garbage answers do not make a hot loop: back-off and the rate limit bound the
    # request rate (a loop without them makes thousands of requests a second).
    n0, t0 = len(consul.requests), time.monotonic()
    wait_until(lambda: time.monotonic() - t0 >= 0.5, 5, "half a second of garbage")
    rate = (len(consul.requests) - n0) / (time.monotonic() - t0)
    assert rate < 200, f"{rate:.0f} requests/s while Consul answers garbage"
    print(f"\nrequests to Consul while it answers garbage: {rate:.0f}/s")
    gen2 = consul.kv_set(KEY, "green")
    consul.garbage = False
    p.wait_generation(gen2, timeout=10)
    assert version_of(p) == "v2"
    wait_until(lambda: discovery(p)["healthy"], 10, "healthy again")


def test_active_group_without_passing_instance_is_refused(
    consul: FakeConsul, backends: dict[str, list[SampleApp]], proxies: Callable[..., ProxyProc]
) -> None:
    register_backends(consul, backends)
    gen = consul.kv_set(KEY, "blue")
    p = proxies(config(consul))
    p.wait_generation(gen)
    consul.set_check("drimeap-green-1", "critical")
    consul.set_check("drimeap-green-2", "warning")
    bad = consul.kv_set(KEY, "green")
    d = wait_until(lambda: (d := discovery(p))["apps"]["drimeap"]["problem"] and d, 10, "refusal")
    assert d["apps"]["drimeap"]["problem"] == (
        "app drimeap: Active group green has 0/2 passing instances"
    )
    assert p.status()["generation"] == gen and version_of(p) == "v1"
    assert metric(p, "zerodown_consul_refused_total") >= 1
    # The refused view still updates health: the failing Standby instances are not listed.
    wait_until(lambda: p.status()["apps"]["drimeap"]["standby"]["instances"] == [], 10, "health")
    assert p.status()["generation"] == gen
    consul.set_check("drimeap-green-2", "passing")
    st = p.wait_generation(bad)
    assert [i["id"] for i in st["apps"]["drimeap"]["active"]["instances"]] == ["drimeap-green-2"]
    assert version_of(p) == "v2" and discovery(p)["apps"]["drimeap"]["problem"] is None
    # An empty group (every instance gone) is refused the same way.
    consul.deregister("drimeap-blue-1")
    consul.deregister("drimeap-blue-2")
    # Health and KV are separate watches: let the proxy see the deregistration first.
    wait_until(lambda: not p.status()["apps"]["drimeap"]["standby"]["instances"], 10, "blue gone")
    to_blue = consul.kv_set(KEY, "blue")
    wait_until(lambda: discovery(p)["apps"]["drimeap"]["problem"], 10, "refusal")
    assert "Active group blue has 0/0" in discovery(p)["apps"]["drimeap"]["problem"]
    assert p.status()["generation"] == bad < to_blue and version_of(p) == "v2"


def test_missing_key_falls_back_to_old_stack_tags(
    consul: FakeConsul, backends: dict[str, list[SampleApp]], proxies: Callable[..., ProxyProc]
) -> None:
    register_backends(consul, backends, extra_tags={"blue": "standby", "green": "active"})
    p = proxies(config(consul))
    st = wait_until(lambda: (s := p.status())["generation"] and s, 10, "routing from tags")
    assert st["apps"]["drimeap"]["active"]["group"] == "green" and version_of(p) == "v2"
    now = p.status()
    d = now["discovery"]["apps"]["drimeap"]
    assert d["generation_source"] == "tags" and d["generation"] == now["generation"]
    # Creating the key takes over, with a larger generation (its ModifyIndex).
    gen = consul.kv_set(KEY, "blue")
    assert gen > st["generation"]
    p.wait_generation(gen)
    assert version_of(p) == "v1" and discovery(p)["apps"]["drimeap"]["generation_source"] == "kv"
    # Deleting it again falls back to the tags without the generation going backwards.
    consul.kv_delete(KEY)
    st = wait_until(
        lambda: (s := p.status())["apps"]["drimeap"]["active"]["group"] == "green" and s, 10, "tags"
    )
    assert st["generation"] > gen


def test_hung_watch_is_cut_by_the_watchdog(
    consul: FakeConsul, backends: dict[str, list[SampleApp]], proxies: Callable[..., ProxyProc]
) -> None:
    register_backends(consul, backends)
    gen = consul.kv_set(KEY, "blue")
    p = proxies(config(consul, wait=0.5, watchdog=0.5))
    p.wait_generation(gen)
    consul.hang = True  # blocking queries stop answering, connections stay open
    new = consul.kv_set(KEY, "green")
    # The watchdog cuts the hung query; the resynchronising (non-blocking) read sees the switch.
    p.wait_generation(new, timeout=15)
    assert version_of(p) == "v2"
    assert discovery(p)["errors_by_kind"].get("timeout", 0) >= 1
    consul.hang = False
    wait_until(lambda: discovery(p)["healthy"], 10, "healthy again")


def test_registers_itself_and_deregisters_on_sigterm(
    consul: FakeConsul, backends: dict[str, list[SampleApp]], proxies: Callable[..., ProxyProc]
) -> None:
    register_backends(consul, backends)
    gen = consul.kv_set(KEY, "blue")
    p = proxies(config(consul))
    p.wait_generation(gen)
    entries = wait_until(lambda: consul.services("zerodown-proxy", passing=True), 10, "registered")
    assert len(entries) == 1
    svc = entries[0]["Service"]
    assert svc["Meta"]["admin"] == f"127.0.0.1:{p.admin}" and svc["Port"] == p.http
    # The TTL check is kept passing (TTL 1 s here) and carries the applied generation.
    first = entries[0]["Checks"][1]["ModifyIndex"]
    wait_until(lambda: discovery(p)["registration"]["heartbeats"] >= 4, 10, "heartbeats")
    later = consul.services("zerodown-proxy", passing=True)
    assert later and later[0]["Checks"][1]["Output"] == f"generation {gen}"
    assert later[0]["Checks"][1]["ModifyIndex"] >= first
    # What the CLI does: find the proxy by the service and read its generation.
    admin = later[0]["Service"]["Meta"]["admin"]
    with urllib.request.urlopen(f"http://{admin}/v1/status", timeout=5) as r:
        assert orjson.loads(r.read())["generation"] == gen
    assert p.terminate() == 0
    assert consul.services("zerodown-proxy") == []
    assert any(path.startswith("/v1/agent/service/deregister/") for _, path in consul.requests)


def test_reregisters_when_the_agent_forgot_it(
    consul: FakeConsul, backends: dict[str, list[SampleApp]], proxies: Callable[..., ProxyProc]
) -> None:
    register_backends(consul, backends)
    consul.kv_set(KEY, "blue")
    p = proxies(config(consul))
    entries = wait_until(lambda: consul.services("zerodown-proxy", passing=True), 10, "registered")
    consul.deregister(entries[0]["Service"]["ID"])  # e.g. an agent restarted without state
    wait_until(lambda: consul.services("zerodown-proxy", passing=True), 10, "registered again")
    assert discovery(p)["registration"]["registered"]


def test_multi_worker_proxy_registers_once_and_every_worker_follows(
    consul: FakeConsul, backends: dict[str, list[SampleApp]], proxies: Callable[..., ProxyProc]
) -> None:
    register_backends(consul, backends)
    gen = consul.kv_set(KEY, "blue")
    p = proxies(config(consul, workers=2), "multi")
    p.wait_generation(gen, timeout=20)
    entries = wait_until(lambda: consul.services("zerodown-proxy", passing=True), 10, "registered")
    assert len(entries) == 1
    assert entries[0]["Service"]["Meta"]["admin"] == f"127.0.0.1:{p.admin}"  # the supervisor
    new = consul.kv_set(KEY, "green")
    st = p.wait_generation(new, timeout=10)  # the supervisor reports the lowest worker generation
    assert [w["generation"] for w in st["workers"]] == [new, new]
    assert version_of(p) == "v2"
    assert p.terminate() == 0
    assert consul.services("zerodown-proxy") == []


def test_http_and_hsms_services_join_into_one_instance(
    consul: FakeConsul, backends: dict[str, list[SampleApp]], proxies: Callable[..., ProxyProc]
) -> None:
    register_backends(consul, backends)
    hsms_ports = {}
    for group, apps in backends.items():
        for n, _ in enumerate(apps, 1):
            sid = f"drimeap-{group}-{n}"
            hsms_ports[sid] = 20000 + 10 * n + (5 if group == "green" else 0)
            consul.register(f"{sid}-hsms", "drimeap-hsms", "127.0.0.1", hsms_ports[sid],
                            tags=[f"zerodown-group={group}", f"zerodown-version={VERSION[group]}"],
                            meta={"hsms_device_id": "0"})  # fmt: skip
    gen = consul.kv_set(KEY, "blue")
    p = proxies(config(consul))
    st = p.wait_generation(gen)
    route = st["apps"]["drimeap"]
    joined = {
        i["id"]: i["hsms_port"]
        for i in route["active"]["instances"] + route["standby"]["instances"]
    }
    assert joined == hsms_ports
    # The HSMS side of one instance fails: it keeps serving HTTP but gets no new HSMS sessions.
    consul.set_check("drimeap-blue-1-hsms", "critical")

    def blue1() -> dict[str, Any] | None:
        for i in p.status()["apps"]["drimeap"]["active"]["instances"]:
            if i["id"] == "drimeap-blue-1" and i["hsms_port"] is None:
                return i
        return None

    assert wait_until(blue1, 10, "blue-1 to lose its HSMS port")["healthy"]
    assert discovery(p)["apps"]["drimeap"]["unmatched_hsms"] == []


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (openssl CLI), used as its own CA."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "consul.pem", tmp_path / "consul-key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


def test_tls_with_the_ca_certificate(
    tls_files: tuple[Path, Path],
    backends: dict[str, list[SampleApp]],
    proxies: Callable[..., ProxyProc],
) -> None:
    cert, key = tls_files
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    consul = FakeConsul(ssl_context=ctx)
    consul.start()
    try:
        assert consul.url.startswith("https://127.0.0.1:")
        register_backends(consul, backends)
        gen = consul.kv_set(KEY, "blue")
        p = proxies(config(consul, cacert=str(cert)))
        p.wait_generation(gen)
        assert version_of(p) == "v1" and discovery(p)["healthy"]
        # Without the CA the certificate is not trusted: a clear "tls" error, no routing.
        untrusted = proxies(config(consul, register_self=False), "untrusted")
        d = wait_until(
            lambda: (d := discovery(untrusted))["errors_by_kind"].get("tls") and d, 10, "tls error"
        )
        assert "check cacert" in d["last_error"] and untrusted.status()["generation"] == 0
    finally:
        consul.stop()


async def test_switch_racing_a_health_change_is_never_applied_on_stale_health(
    consul: FakeConsul,
) -> None:
    """In-process provider: the target group goes critical right before each switch is written;
    the KV answer may overtake the health answer, the re-read on switch must catch it."""
    import asyncio

    from zerodown_proxy.config import ConsulSection
    from zerodown_proxy.discovery.consul import ConsulProvider
    from zerodown_proxy.metrics import Registry
    from zerodown_proxy.routing import Router
    from zerodown_proxy.watcher import Watcher

    from ..helpers import async_wait_until

    for group in ("blue", "green"):
        for n in (1, 2):
            consul.register(f"{group}-{n}", "drimeap", "127.0.0.1", 9000 + n + 10 * (group == "green"),
                            tags=[f"zerodown-group={group}"])  # fmt: skip
    gen = consul.kv_set(KEY, "blue")
    router = Router()
    applied: list[str] = []
    router.subscribe(lambda old, new: applied.append(new.apps["drimeap"].active_group))
    cfg = ConsulSection(addr=consul.url, register_self=False, wait=5.0)
    watcher = Watcher(router)
    provider = ConsulProvider(cfg, watcher, Registry(), "127.0.0.1:1", "test")
    watcher.start(provider)
    try:
        await async_wait_until(lambda: router.snapshot.generation >= gen, 10, "first snapshot")
        for _ in range(5):
            await asyncio.to_thread(consul.set_check, "green-1", "critical")
            await asyncio.to_thread(consul.set_check, "green-2", "critical")
            await asyncio.to_thread(consul.kv_set, KEY, "green")
            await async_wait_until(
                lambda: provider.status()["apps"]["drimeap"]["problem"], 10, "refusal"
            )
            assert "green" not in applied
            # heal and go back to blue for the next round
            await asyncio.to_thread(consul.kv_set, KEY, "blue")
            await asyncio.to_thread(consul.set_check, "green-1", "passing")
            await asyncio.to_thread(consul.set_check, "green-2", "passing")
            await async_wait_until(
                lambda: provider.status()["apps"]["drimeap"]["problem"] is None, 10, "healed"
            )
        assert "green" not in applied and router.snapshot.apps["drimeap"].active_group == "blue"
    finally:
        await watcher.stop()


def test_agent_restarted_empty_indexes_go_backwards(
    consul: FakeConsul, backends: dict[str, list[SampleApp]], proxies: Callable[..., ProxyProc]
) -> None:
    """A -dev agent restarted without data: every index goes backwards and the proxy's own
    registration is gone. Routing stays, the watches reset their index, the proxy registers
    again, and it follows the restored state."""
    register_backends(consul, backends)
    for n in range(40):  # an agent with some history: indexes well above a fresh one's
        consul.kv_set("elsewhere/counter", str(n))
    gen = consul.kv_set(KEY, "blue")
    p = proxies(config(consul))
    p.wait_generation(gen)
    wait_until(lambda: consul.services("zerodown-proxy", passing=True), 10, "registered")
    consul.set_down(True)
    consul.wipe()
    consul.set_down(False)
    d = wait_until(
        lambda: "no Active key" in ((d := discovery(p))["apps"]["drimeap"]["problem"] or "") and d,
        10,
        "the empty view to be refused",
    )
    assert p.status()["generation"] == gen and version_of(p) == "v1"
    assert sum(w["index_resets"] for w in d["watches"].values()) >= 1
    wait_until(lambda: consul.services("zerodown-proxy", passing=True), 10, "registered again")
    # The jobs re-register and an operator puts the key back: followed although the new
    # ModifyIndex is lower than the generation the proxy had applied.
    register_backends(consul, backends)
    new = consul.kv_set(KEY, "green")
    assert new < gen
    wait_until(lambda: p.status()["generation"] == new, 10, "the restored state")
    assert version_of(p) == "v2"


async def test_datacenter_and_token_are_sent(consul: FakeConsul) -> None:
    """In-process provider: every query carries dc= and the token; a wrong datacenter is a
    clear http_error and nothing is routed."""
    from zerodown_proxy.config import ConsulSection
    from zerodown_proxy.discovery.consul import ConsulProvider
    from zerodown_proxy.metrics import Registry
    from zerodown_proxy.routing import Router
    from zerodown_proxy.watcher import Watcher

    from ..helpers import async_wait_until

    consul.register("blue-1", "drimeap", "127.0.0.1", 9001, tags=["zerodown-group=blue"])
    gen = consul.kv_set(KEY, "blue")
    consul.acl_token = "secret"
    for dc, works in (("dc1", True), ("dc9", False)):
        router = Router()
        cfg = ConsulSection(addr=consul.url, token="secret", datacenter=dc, register_self=False)
        watcher = Watcher(router)
        provider = ConsulProvider(cfg, watcher, Registry(), "127.0.0.1:1", "test")
        watcher.start(provider)
        try:
            if works:
                await async_wait_until(lambda r=router: r.snapshot.generation == gen, 10, "routing")
                assert all(f"dc={dc}" in path for _, path in consul.requests)
            else:
                await async_wait_until(
                    lambda pr=provider: pr.status()["errors_by_kind"].get("http_error"),
                    10,
                    "errors",
                )
                assert "500 to /v1/" in provider.status()["last_error"]
                assert "No path to datacenter" in provider.status()["last_error"]
                assert router.snapshot.generation == 0
        finally:
            await watcher.stop()


def test_a_takeover_keeps_the_registration_the_new_process_made(
    consul: FakeConsul, backends: dict[str, list[SampleApp]], proxies: Callable[..., ProxyProc]
) -> None:
    import os
    import signal

    register_backends(consul, backends)
    gen = consul.kv_set(KEY, "blue")
    p = proxies(config(consul))
    p.wait_generation(gen)
    wait_until(lambda: consul.services("zerodown-proxy", passing=True), 10, "registered")
    os.kill(p.pid, signal.SIGUSR2)
    new = wait_until(lambda: (pid := p.status()["pid"]) != p.pid and pid, 60, "a new pid")
    try:
        assert p.proc.wait(60) == 0  # the old process stopped...
        # ... without deregistering the service id the new process registered too.
        assert not any(path.startswith("/v1/agent/service/deregister/")
                       for _, path in consul.requests)  # fmt: skip
        entries = wait_until(lambda: consul.services("zerodown-proxy", passing=True), 10, "kept")
        assert entries[0]["Service"]["Meta"]["admin"] == f"127.0.0.1:{p.admin}"
        assert version_of(p) == "v1"
    finally:
        os.kill(new, signal.SIGTERM)
    wait_until(lambda: consul.services("zerodown-proxy") == [], 30, "deregistered by the new one")
