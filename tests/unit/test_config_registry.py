from __future__ import annotations

import asyncio
import re
from pathlib import Path

import orjson
import pytest

from zerodown_proxy.config import ConfigError, load_config, parse_addr
from zerodown_proxy.discovery.file import FileProvider, RegistryError, parse_registry
from zerodown_proxy.metrics import Registry
from zerodown_proxy.routing import Router

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
    provider = FileProvider(path, router, poll_interval=0.01)
    provider.start()
    try:
        assert router.snapshot.generation == 4
        path.write_bytes(b'{"generation": 5, "apps": {"drimeap": {"active": "bl')  # torn write
        await asyncio.sleep(0.05)
        assert router.snapshot.generation == 4
        assert provider.errors >= 1 and "rejected" in provider.last_error
        good = orjson.loads(orjson.dumps(GOOD))
        good["generation"] = 6
        good["apps"]["drimeap"]["active"] = "green"
        path.write_bytes(orjson.dumps(good))
        for _ in range(100):
            if router.snapshot.generation == 6:
                break
            await asyncio.sleep(0.01)
        assert router.snapshot.apps["drimeap"].active_group == "green"
        assert provider.last_error is None
        path.unlink()
        await asyncio.sleep(0.05)
        assert router.snapshot.generation == 6 and "does not exist" in provider.last_error
    finally:
        await provider.stop()


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
