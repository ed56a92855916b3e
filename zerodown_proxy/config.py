"""Proxy configuration: a TOML file, then environment variables, then command-line flags.

Every section is a frozen dataclass with working defaults, so `zerodown proxy` with no file
runs the local stack's layout.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key."""


def parse_addr(value: str, default_host: str = "0.0.0.0") -> tuple[str, int]:
    """'host:port', ':port' or 'port' -> (host, port)."""
    value = value.strip()
    if value.startswith("["):  # [::1]:8080
        host, _, port = value[1:].partition("]:")
    elif ":" in value:
        host, _, port = value.rpartition(":")
    else:
        host, port = "", value
    try:
        p = int(port)
    except ValueError:
        raise ConfigError(f"not an address (host:port): {value!r}") from None
    if not 0 <= p <= 65535:
        raise ConfigError(f"port out of range in {value!r}")
    return (host or default_host, p)


@dataclass(frozen=True, slots=True)
class ProxySection:
    http_listen: str = "0.0.0.0:8080"
    hsms_listen: str = "0.0.0.0:5000"
    admin_listen: str = "127.0.0.1:8081"
    admin_token: str = ""
    access_log: bool = False
    log_level: str = "info"
    shutdown_grace: float = 20.0
    name: str = ""
    workers: int = 1


@dataclass(frozen=True, slots=True)
class HttpSection:
    connect_timeout: float = 2.0
    # Request fully sent -> response head (Envoy's route timeout default); an idempotent request
    # that hits it is retried once elsewhere within the retry budget, else 504.
    first_byte_timeout: float = 15.0
    read_timeout: float = 60.0  # silence between bytes of a streaming response body
    client_idle_timeout: float = 75.0
    client_header_timeout: float = 10.0
    upstream_idle_timeout: float = 30.0
    max_header_bytes: int = 32 * 1024
    max_body_bytes: int = 4 * 1024**3
    balance: str = "round_robin"  # or least_conn
    eject_after_failures: int = 3
    eject_seconds: float = 10.0
    max_idle_per_instance: int = 128
    retry_body_bytes: int = 64 * 1024
    retry_budget_ratio: float = 0.2  # retries over 10 s: at most 20 % of requests ...
    retry_budget_min: int = 10  # ... plus this many
    max_client_connections: int = 10000  # also at most half of (open-files limit - fd_reserve)
    fd_reserve: int = 256  # file descriptors HTTP never takes (HSMS tools, admin, discovery)


@dataclass(frozen=True, slots=True)
class HsmsSection:
    enabled: bool = True
    t3: float = 45.0
    t5: float = 10.0
    t6: float = 5.0
    t7: float = 10.0
    t8: float = 5.0
    linktest_interval: float = 30.0
    max_message_bytes: int = 16 * 1024 * 1024
    # Session id for data messages sent to backends when the registry does not give the app's
    # hsms_device_id; unset: the tool's own session id is forwarded unchanged.
    device_id: int | None = None
    max_queued: int = 1000  # tool primaries held per tool while no backend session is selected


@dataclass(frozen=True, slots=True)
class DiscoverySection:
    provider: str = "file"  # file | consul
    file: str = ".zerodown/registry.json"
    poll_interval: float = 0.02


@dataclass(frozen=True, slots=True)
class ConsulSection:
    addr: str = "http://127.0.0.1:8500"
    token: str = ""
    cacert: str = ""
    datacenter: str = ""
    apps: tuple[str, ...] = ("drimeap",)
    wait: float = 30.0  # blocking query wait (Consul adds up to wait/16 jitter)
    watchdog: float = 5.0  # client timeout = wait * 17/16 + watchdog: a hung watch is cut
    min_request_interval: float = 0.05  # per watch: no hot loop, even if Consul answers at once
    backoff_min: float = 0.1  # first retry delay after an error, doubled up to backoff_max
    backoff_max: float = 10.0
    connect_timeout: float = 2.0
    # Re-read the app's health once when the Active group changes, before applying it (one
    # round trip to the agent): a health change made just before the switch cannot be missed.
    recheck_on_switch: bool = True
    register_self: bool = True
    check_ttl: float = 15.0  # TTL of the zerodown-proxy check (heartbeat every ttl/3)
    deregister_after: float = 60.0  # Consul reaps a proxy critical this long (crashed)
    key_prefix: str = "zerodown"


@dataclass(frozen=True, slots=True)
class Config:
    proxy: ProxySection = field(default_factory=ProxySection)
    http: HttpSection = field(default_factory=HttpSection)
    hsms: HsmsSection = field(default_factory=HsmsSection)
    discovery: DiscoverySection = field(default_factory=DiscoverySection)
    consul: ConsulSection = field(default_factory=ConsulSection)
    base_dir: Path = field(default_factory=Path.cwd)

    def registry_path(self) -> Path:
        p = Path(self.discovery.file)
        return p if p.is_absolute() else self.base_dir / p


_SECTIONS = {
    "proxy": ProxySection,
    "http": HttpSection,
    "hsms": HsmsSection,
    "discovery": DiscoverySection,
    "consul": ConsulSection,
}


def _coerce(section: str, name: str, default: Any, value: Any) -> Any:
    expected = type(default) if default is not None else None
    if name == "apps":
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"[{section}] {name} must be a list of app names")
        return tuple(value)
    if expected is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
        if isinstance(value, bool):
            return value
        raise ConfigError(f"[{section}] {name} must be true or false, got {value!r}")
    if expected in (int, float) or (expected is None and name == "device_id"):
        try:
            return (expected or int)(value)
        except (TypeError, ValueError):
            raise ConfigError(f"[{section}] {name} must be a number, got {value!r}") from None
    if expected is str:
        if not isinstance(value, str):
            raise ConfigError(f"[{section}] {name} must be a string, got {value!r}")
        return value
    return value


def _apply(cfg: Config, section: str, values: dict[str, Any]) -> Config:
    cls = _SECTIONS[section]
    current = getattr(cfg, section)
    known = {f.name: getattr(current, f.name) for f in fields(cls)}
    changes = {}
    for k, v in values.items():
        if k not in known:
            raise ConfigError(f"unknown setting [{section}] {k}")
        changes[k] = _coerce(section, k, known[k], v)
    return replace(cfg, **{section: replace(current, **changes)})


ENV_MAP = {
    "ZERODOWN_ADMIN_TOKEN": ("proxy", "admin_token"),
    "ZERODOWN_HTTP_LISTEN": ("proxy", "http_listen"),
    "ZERODOWN_HSMS_LISTEN": ("proxy", "hsms_listen"),
    "ZERODOWN_ADMIN_LISTEN": ("proxy", "admin_listen"),
    "ZERODOWN_REGISTRY": ("discovery", "file"),
    "ZERODOWN_DISCOVERY": ("discovery", "provider"),
    "CONSUL_HTTP_ADDR": ("consul", "addr"),
    "CONSUL_HTTP_TOKEN": ("consul", "token"),
    "CONSUL_CACERT": ("consul", "cacert"),
}


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    env: dict[str, str] | None = None,
) -> Config:
    """File < environment < overrides (flags). Raises ConfigError with the offending key."""
    cfg = Config()
    if path:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {p}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None
        cfg = replace(cfg, base_dir=p.resolve().parent)
        for section, values in data.items():
            if section not in _SECTIONS or not isinstance(values, dict):
                raise ConfigError(f"unknown config section [{section}] in {p}")
            cfg = _apply(cfg, section, values)
    env = os.environ if env is None else env
    for var, (section, key) in ENV_MAP.items():
        if env.get(var):
            value: str = env[var]
            if var == "CONSUL_HTTP_ADDR" and "://" not in value:
                ssl = env.get("CONSUL_HTTP_SSL", "").lower() in ("1", "true")
                value = ("https://" if ssl else "http://") + value
            cfg = _apply(cfg, section, {key: value})
    for section, values in (overrides or {}).items():
        cfg = _apply(cfg, section, {k: v for k, v in values.items() if v is not None})
    if cfg.proxy.workers < 1:
        raise ConfigError("[proxy] workers must be at least 1")
    if cfg.http.balance not in ("round_robin", "least_conn"):
        raise ConfigError("[http] balance must be round_robin or least_conn")
    _check_http(cfg.http)
    if cfg.discovery.provider not in ("file", "consul"):
        raise ConfigError("[discovery] provider must be file or consul")
    for addr in (cfg.proxy.http_listen, cfg.proxy.hsms_listen, cfg.proxy.admin_listen):
        parse_addr(addr)
    if cfg.discovery.provider == "consul":
        _check_consul(cfg.consul)
    _check_hsms(cfg.hsms)
    return cfg


def _check_http(h: HttpSection) -> None:
    for key in ("connect_timeout", "first_byte_timeout", "read_timeout"):
        if getattr(h, key) <= 0:
            raise ConfigError(f"[http] {key} must be a positive number of seconds")
    if h.max_client_connections < 1:
        raise ConfigError("[http] max_client_connections must be at least 1")
    if h.fd_reserve < 0:
        raise ConfigError("[http] fd_reserve must be 0 or more")


def _check_hsms(h: HsmsSection) -> None:
    for key in ("t3", "t5", "t6", "t7", "t8"):
        if getattr(h, key) <= 0:
            raise ConfigError(f"[hsms] {key} must be a positive number of seconds")
    if h.linktest_interval < 0:
        raise ConfigError("[hsms] linktest_interval must be 0 (off) or a number of seconds")
    if h.max_message_bytes < 10:
        raise ConfigError("[hsms] max_message_bytes must be at least 10 (the HSMS header)")
    if h.max_queued < 0:
        raise ConfigError("[hsms] max_queued must be 0 or more")
    if h.device_id is not None and not 0 <= h.device_id <= 0x7FFF:
        raise ConfigError(f"[hsms] device_id must be 0..32767 (E37 session id), got {h.device_id}")


def _check_consul(c: ConsulSection) -> None:
    if c.addr.split("://", 1)[0] not in ("http", "https") or "://" not in c.addr:
        raise ConfigError(
            f"[consul] addr must be http://host:port or https://host:port, got {c.addr!r}"
        )
    if not c.apps:
        raise ConfigError("[consul] apps must name at least one app")
    for name in ("wait", "watchdog", "backoff_min", "check_ttl", "connect_timeout"):
        if getattr(c, name) <= 0:
            raise ConfigError(f"[consul] {name} must be greater than 0")
    if c.backoff_max < c.backoff_min:
        raise ConfigError("[consul] backoff_max must be at least backoff_min")
    if c.min_request_interval < 0 or c.deregister_after < 0:
        raise ConfigError("[consul] min_request_interval and deregister_after cannot be negative")
