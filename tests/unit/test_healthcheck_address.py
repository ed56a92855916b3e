"""Which admin address `zerodown healthcheck` asks: --admin, else the proxy's own config view."""

from __future__ import annotations

import pytest

from orchestrator.healthcheck import admin_address
from zerodown_proxy.config import ConfigError


def test_flag_wins_and_wildcard_binds_are_asked_on_loopback(monkeypatch):
    monkeypatch.delenv("ZERODOWN_ADMIN_LISTEN", raising=False)
    assert admin_address("10.1.2.3:9000", None) == ("10.1.2.3", 9000)
    assert admin_address("0.0.0.0:8081", None) == ("127.0.0.1", 8081)
    assert admin_address("[::]:8081", None) == ("::1", 8081)
    assert admin_address(":8082", None) == ("127.0.0.1", 8082)
    assert admin_address(None, None) == ("127.0.0.1", 8081)  # the proxy's default


def test_config_file_then_environment_as_the_proxy_reads_them(tmp_path, monkeypatch):
    monkeypatch.delenv("ZERODOWN_ADMIN_LISTEN", raising=False)
    cfg = tmp_path / "proxy.toml"
    cfg.write_text('[proxy]\nadmin_listen = "0.0.0.0:18081"\n')
    assert admin_address(None, str(cfg)) == ("127.0.0.1", 18081)
    monkeypatch.setenv("ZERODOWN_ADMIN_LISTEN", "127.0.0.2:28081")
    assert admin_address(None, str(cfg)) == ("127.0.0.2", 28081)
    assert admin_address("127.0.0.3:1", str(cfg)) == ("127.0.0.3", 1)


def test_unusable_addresses_are_config_errors():
    with pytest.raises(ConfigError, match="port 0"):
        admin_address("127.0.0.1:0", None)
    with pytest.raises(ConfigError, match="not an address"):
        admin_address("127.0.0.1:http", None)
