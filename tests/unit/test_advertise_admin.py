"""The admin address a proxy advertises in Consul (discovery/advertise.py) and its config key."""

from __future__ import annotations

import pytest

from zerodown_proxy.config import ConfigError, load_config
from zerodown_proxy.discovery.advertise import advertised_admin, route_source, split_host_port


def test_an_explicit_address_wins_and_takes_the_bound_port_when_it_has_none():
    assert advertised_admin("proxy-b.fab:9081", "127.0.0.1", 8081) == "proxy-b.fab:9081"
    assert advertised_admin("10.20.0.5", "0.0.0.0", 8081) == "10.20.0.5:8081"
    assert advertised_admin("[fd00::5]:9", "::", 8081) == "[fd00::5]:9"
    assert advertised_admin("fd00::5", "::", 8081) == "[fd00::5]:8081"


def test_a_specific_bind_address_is_advertised_as_it_is():
    assert advertised_admin("", "10.20.0.5", 8081) == "10.20.0.5:8081"
    assert advertised_admin("", "127.0.0.1", 8081, "http://127.0.0.1:8500") == "127.0.0.1:8081"


def test_a_wildcard_bind_is_never_advertised():
    got = advertised_admin("", "0.0.0.0", 8081, "http://127.0.0.1:8500")
    host, port = split_host_port(got)
    assert port == 8081 and host not in ("0.0.0.0", "::", "")


def test_the_route_toward_consul_names_the_local_address():
    assert route_source("127.0.0.1", 8500) == "127.0.0.1"
    assert route_source("no-such-host.invalid") is None


@pytest.mark.parametrize("bad", ["a b", "host:0", "host:http", "[fd00::1", "user@host", ":8081"])
def test_a_malformed_advertise_admin_is_refused_naming_the_key(bad):
    with pytest.raises(ConfigError, match=r"\[proxy\] advertise_admin"):
        load_config(None, {"proxy": {"advertise_admin": bad}}, env={})


def test_the_environment_sets_it():
    cfg = load_config(None, env={"ZERODOWN_ADVERTISE_ADMIN": "10.0.0.9"})
    assert cfg.proxy.advertise_admin == "10.0.0.9"
