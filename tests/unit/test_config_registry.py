from __future__ import annotations

import re
from pathlib import Path

import orjson
import pytest

from zerodown_proxy.config import ConfigError, load_config, parse_addr
from zerodown_proxy.discovery.file import FileProvider, RegistryError, parse_registry
from zerodown_proxy.metrics import Registry
from zerodown_proxy.routing import Router
from zerodown_proxy.watcher import Watcher

from ..helpers import async_wait_until

GOOD = {
    "generation": 4,
    "apps": {
        "drimeap": {
            "active": "blue",
            "instances": [
                {
                    "id": "b1",
                    "group": "blue",
                    "version": "v1",
                    "http_port": 9001,
                    "hsms_port": 9101,
                },
                {"id": "g1", "group": "green", "version": "v2", "http_port": 9002},
            ],
        }
    },
}


def test_config_file_env_and_overrides(tmp_path: Path):
    f = tmp_path / "p.toml"
    f.write_text('[proxy]\nhttp_listen = "127.0.0.1:9999"\n[http]\nread_timeout = 5\n'
                 '[consul]\napps = ["a", "b"]\n')  # fmt: skip
    cfg = load_config(
        f,
        {"http": {"connect_timeout": 0.5}},
        env={"CONSUL_HTTP_ADDR": "10.0.0.1:8500", "ZERODOWN_ADMIN_TOKEN": "t"},
    )
    assert cfg.proxy.http_listen == "127.0.0.1:9999"
    assert cfg.http.read_timeout == 5.0 and cfg.http.connect_timeout == 0.5
    assert cfg.consul.addr == "http://10.0.0.1:8500" and cfg.consul.apps == ("a", "b")
    assert cfg.proxy.admin_token == "t"


@pytest.mark.parametrize(
    "text, message",
    [
        ("[proxy]\nbogus = 1\n", "unknown setting [proxy] bogus"),
        ("[nope]\n", "unknown config section"),
        ("[http]\nread_timeout = 'x'\n", "must be a number"),
        ("[http]\nbalance = 'random'\n", "balance must be"),
        ("[http]\nmax_queue_time = -1\n", "max_queue_time must be 0 (shed at once) or more"),
        ("[http]\nmax_requests_per_instance = -2\n", "max_requests_per_instance must be 0"),
        ("[proxy]\nhttp_listen = 'host:port'\n", "not an address"),
        ("this is not toml", "not valid TOML"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, text: str, message: str):
    f = tmp_path / "p.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(f, env={})


def test_parse_addr():
    assert parse_addr(":8080") == ("0.0.0.0", 8080)
    assert parse_addr("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_addr("[::1]:5000") == ("::1", 5000)


def test_parse_registry_good():
    assert parse_registry(orjson.dumps(mutated(lambda d: d["apps"][APP].update(previous="green"))))
    st = parse_registry(orjson.dumps(GOOD))
    assert st.generation == 4
    (app,) = st.apps
    assert app.active_group == "blue" and len(app.instances) == 2
    assert app.instances[0].hsms_port == 9101 and app.instances[1].hsms_port is None


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.pop("generation"), "missing 'generation'"),
        (lambda d: d["apps"]["drimeap"]["instances"][0].pop("group"), "missing 'group'"),
        (lambda d: d["apps"]["drimeap"]["instances"][0].update(http_port="x"), "wrong type"),
        (lambda d: d["apps"]["drimeap"]["instances"][0].update(http_port=70000), "out of range"),
        (lambda d: d["apps"]["drimeap"]["instances"][1].update(id="b1"), "duplicate instance"),
        (lambda d: d["apps"]["drimeap"].update(active=3), "'active' must be"),
    ],
)
def test_parse_registry_rejects_bad_files(mutate, message):
    data = orjson.loads(orjson.dumps(GOOD))
    mutate(data)
    with pytest.raises(RegistryError, match=message):
        parse_registry(orjson.dumps(data))


def test_parse_registry_rejects_half_written_json():
    raw = orjson.dumps(GOOD)
    with pytest.raises(RegistryError, match="not valid JSON"):
        parse_registry(raw[: len(raw) // 2])


async def test_file_provider_keeps_last_good_snapshot(tmp_path: Path):
    path = tmp_path / "registry.json"
    path.write_bytes(orjson.dumps(GOOD))
    router = Router()
    watcher = Watcher(router)
    provider = FileProvider(path, watcher, poll_interval=0.01)
    watcher.start(provider)
    try:
        assert router.snapshot.generation == 4
        path.write_bytes(b'{"generation": 5, "apps": {"drimeap": {"active": "bl')  # torn write
        await async_wait_until(lambda: provider.errors >= 1, 10, "the torn write to be seen")
        assert router.snapshot.generation == 4
        assert "rejected" in provider.last_error and "rejected" in watcher.last_error
        good = orjson.loads(orjson.dumps(GOOD))
        good["generation"] = 6
        good["apps"]["drimeap"]["active"] = "green"
        path.write_bytes(orjson.dumps(good))
        await async_wait_until(lambda: router.snapshot.generation == 6, 10, "generation 6")
        assert router.snapshot.apps["drimeap"].active_group == "green"
        assert provider.last_error is None and watcher.last_error is None
        path.unlink()
        await async_wait_until(lambda: provider.last_error, 10, "the missing file to be seen")
        assert router.snapshot.generation == 6 and "does not exist" in provider.last_error
    finally:
        await watcher.stop()


def mutated(change) -> dict:
    data = orjson.loads(orjson.dumps(GOOD))
    change(data)
    return data


APP = "drimeap"
BAD_FIELDS = [
    (lambda d: d["apps"][APP].update(hosts=5), "'hosts' must be a list"),
    (lambda d: d["apps"][APP].update(hosts=[5]), "host 5 must be"),
    (lambda d: d["apps"][APP].update(path_prefix=5), "path_prefix must be a path"),
    (lambda d: d["apps"][APP].update(path_prefix="api"), "path_prefix must be a path"),
    (lambda d: d["apps"][APP]["instances"][0].update(healthy="false"), "'healthy' must be true"),
    (lambda d: d["apps"][APP]["instances"][0].update(healthy=0), "'healthy' must be true"),
    (lambda d: d["apps"][APP].update(hsms_device_id=99999), "hsms_device_id must be an integer"),
    (lambda d: d["apps"][APP].update(hsms_device_id=-1), "0-32767"),
    (lambda d: d["apps"][APP].update(hsms_device_id="7"), "hsms_device_id must be an integer"),
    (lambda d: d["apps"][APP].update(hsms_device_id=True), "hsms_device_id must be an integer"),
    (lambda d: d["apps"][APP]["instances"][0].update(hsms_port="9101"), "must be a port number"),
    (lambda d: d["apps"][APP]["instances"][0].update(hsms_port=True), "must be a port number"),
    (lambda d: d["apps"][APP]["instances"][0].update(hsms_port=0), "out of range"),
    (lambda d: d["apps"][APP]["instances"][0].update(address=5), "'address' 5 must be"),
    (lambda d: d["apps"][APP]["instances"][0].update(address=""), "'address' '' must be"),
    (lambda d: d["apps"][APP]["instances"][0].update(group="bl ue"), "not a valid name"),
    (lambda d: d["apps"][APP]["instances"][0].update(version="v1\n"), "'version'"),
    (lambda d: d["apps"][APP]["instances"][0].update(id=""), "'id'"),
    (lambda d: d["apps"][APP]["instances"][0].update(helathy=False), "unknown key 'helathy'"),
    (lambda d: d["apps"][APP].update(activ="blue"), "unknown key 'activ'"),
    (lambda d: d["apps"][APP].update(active="blue/../x"), "not a valid name"),
    (lambda d: d["apps"][APP].update(previous=7), "'previous' 7 is not a valid name"),
    (lambda d: d.update(generation=-1), "generation must be a non-negative"),
    (lambda d: d.update(generation=True), "wrong type"),
    (lambda d: d["apps"].update({"a b": d["apps"][APP]}), "app 'a b' is not a valid name"),
    (lambda d: d["apps"].update({APP: []}), "not an object"),
    (lambda d: d["apps"][APP].update(instances=[5]), "not an object"),
    (lambda d: d.update(proxies=[{"name": "x"}]), "missing 'admin'"),
    (lambda d: d.update(proxies={}), "'proxies' must be a list"),
]


@pytest.mark.parametrize("mutate, message", BAD_FIELDS)
def test_every_field_is_type_checked(mutate, message):
    with pytest.raises(RegistryError, match=re.escape(message)):
        parse_registry(orjson.dumps(mutated(mutate)))


def test_any_bytes_give_a_registry_error_or_a_state():
    """Fuzz-ish: whatever the file holds, parsing raises RegistryError or succeeds."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    scalars = st.none() | st.booleans() | st.integers(-(2**65), 2**65) | st.text(max_size=8)
    values = st.recursive(scalars, lambda c: st.lists(c, max_size=3)
                          | st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=8)  # fmt: skip
    keys = st.sampled_from(sorted({"id", "group", "version", "address", "http_port",
                                   "hsms_port", "healthy", "hosts", "path_prefix",
                                   "hsms_device_id", "active", "instances"}))  # fmt: skip

    @settings(max_examples=300, deadline=None)
    @given(key=keys, value=values, where=st.booleans())
    def one(key, value, where):
        data = orjson.loads(orjson.dumps(GOOD))
        target = data["apps"][APP]["instances"][0] if where else data["apps"][APP]
        target[key] = value
        try:
            raw = orjson.dumps(data)
        except TypeError:  # orjson refuses some integers: not a file anyone can write
            return
        try:
            parse_registry(raw)
        except RegistryError:
            pass

    one()


async def test_a_broken_registry_then_a_valid_switch_is_still_applied(tmp_path: Path):
    """Issue 9 section 4: `"hosts": 5` killed the file watcher for good (an uncaught
    TypeError); later valid switches were never applied while last_error stayed null."""
    path = tmp_path / "registry.json"
    path.write_bytes(orjson.dumps(GOOD))
    router = Router()
    metrics = Registry()
    watcher = Watcher(router, metrics)
    provider = FileProvider(path, watcher, poll_interval=0.01)
    watcher.start(provider)
    try:
        assert router.snapshot.generation == 4
        for n, mutate in enumerate(m for m, _ in BAD_FIELDS[:10]):
            bad = mutated(mutate)
            bad["generation"] = 100 + n
            before = provider.errors
            path.write_bytes(orjson.dumps(bad))
            await async_wait_until(lambda b=before: provider.errors > b, 10, "the rejection")
            assert router.snapshot.generation == 4 and watcher.last_error
        assert watcher._errors.get(("invalid",)) >= 10
        assert 'zerodown_discovery_errors_total{kind="invalid"}' in metrics.render()
        good = mutated(lambda d: d["apps"][APP].update(active="green"))
        good["generation"] = 200
        path.write_bytes(orjson.dumps(good))
        await async_wait_until(lambda: router.snapshot.generation == 200, 10, "the switch")
        assert router.snapshot.apps[APP].active_group == "green"
        assert watcher.last_error is None and provider.last_error is None
    finally:
        await watcher.stop()


async def test_a_provider_that_raises_is_restarted_and_routing_stays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """ANY exception in a provider is caught, logged, reported; the watcher goes on."""
    import zerodown_proxy.discovery.file as file_module
    import zerodown_proxy.watcher as watcher_module

    monkeypatch.setattr(watcher_module, "RESTART_MIN", 0.01)
    path = tmp_path / "registry.json"
    path.write_bytes(orjson.dumps(GOOD))
    router = Router()
    watcher = Watcher(router, stale_after=0.5)
    provider = FileProvider(path, watcher, poll_interval=0.01)
    watcher.start(provider)
    real = file_module.parse_registry
    try:
        monkeypatch.setattr(file_module, "parse_registry", lambda *a, **k: [][1])
        path.write_bytes(orjson.dumps(mutated(lambda d: d.update(generation=5))))
        await async_wait_until(lambda: watcher._errors.get(("crash",)) >= 1, 10, "the crash")
        assert "IndexError" in watcher.last_error and router.snapshot.generation == 4
        # The file provider's view is not confirmed while it cannot read it: stale, with why.
        stale = await async_wait_until(watcher.stale, 10, "staleness")
        assert "has not confirmed its view" in stale and "generation 4" in stale
        monkeypatch.setattr(file_module, "parse_registry", real)
        good = mutated(lambda d: d.update(generation=6))
        path.write_bytes(orjson.dumps(good))
        await async_wait_until(lambda: router.snapshot.generation == 6, 10, "recovery")
        await async_wait_until(lambda: watcher.stale() is None, 10, "fresh again")
    finally:
        await watcher.stop()


def test_discovery_staleness_config(tmp_path: Path):
    assert load_config(None, env={}).discovery.stale_after == 60.0
    f = tmp_path / "p.toml"
    f.write_text("[discovery]\nstale_after = -1\n")
    with pytest.raises(ConfigError, match="stale_after must be 0"):
        load_config(f, env={})
    f.write_text('[discovery]\nprovider = "consul"\nstale_after = 20\n[consul]\nwait = 30\n')
    with pytest.raises(ConfigError, match="must exceed a Consul blocking query's quiet time"):
        load_config(f, env={})
    f.write_text('[discovery]\nprovider = "consul"\nstale_after = 0\n[consul]\nwait = 30\n')
    assert load_config(f, env={}).discovery.stale_after == 0


def test_metrics_render():
    reg = Registry()
    c = reg.counter("x_total", "help", ("code",))
    h = reg.histogram("lat_seconds", "latency", ("app",))
    reg.gauge("g", "gauge", fn=lambda: 7)
    c.inc(("200",))
    c.inc(("200",))
    h.observe(0.003, ("a",))
    h.observe(20, ("a",))
    text = reg.render()
    assert 'x_total{code="200"} 2' in text
    assert 'lat_seconds_bucket{app="a",le="0.005"} 1' in text
    assert 'lat_seconds_bucket{app="a",le="+Inf"} 2' in text
    assert 'lat_seconds_count{app="a"} 2' in text
    assert "g 7" in text


def test_access_log_accepts_a_switch_stdout_or_a_path(tmp_path):
    from zerodown_proxy.config import access_log_target

    def target(value):
        cfg = load_config(None, {"proxy": {"access_log": value}}, env={})
        return access_log_target(cfg)

    assert target(False) is None and target("off") is None
    assert target(True) == "-" and target("-") == "-" and target("stdout") == "-"
    assert target(str(tmp_path / "access.log")) == str(tmp_path / "access.log")
    with pytest.raises(ConfigError, match=r"\[proxy\] access_log: directory .* does not exist"):
        target(str(tmp_path / "missing" / "access.log"))
    with pytest.raises(ConfigError, match=r"\[proxy\] access_log must be"):
        target(3)
    with pytest.raises(ConfigError, match="access_log_format must be json or combined"):
        load_config(None, {"proxy": {"access_log_format": "apache"}}, env={})
