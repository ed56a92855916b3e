"""Proxy configuration: a TOML file, then environment variables, then command-line flags.

Every section is a frozen dataclass with working defaults, so `zerodown proxy` with no file
runs the local stack's layout.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .hsms.msglog import config_problem as msglog_problem


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
    # What the proxy registers in Consul as its admin address (discovery/advertise.py):
    # host[:port]; empty: admin_listen, or a routable address when that is 0.0.0.0 or ::.
    advertise_admin: str = ""
    admin_token: str = ""
    # HTTP access log (http/access_log.py): false (off), true or "-" (stdout), or a file path
    # (appended, reopened on SIGUSR1); access_log_format "json" or "combined" (nginx's).
    access_log: bool | str = False
    access_log_format: str = "json"
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
    max_idle_per_instance: int = 128
    retry_body_bytes: int = 64 * 1024
    retry_budget_ratio: float = 0.2  # retries over 10 s: at most 20 % of requests ...
    retry_budget_min: int = 10  # ... plus this many
    max_client_connections: int = 10000  # also at most half of (open-files limit - fd_reserve)
    fd_reserve: int = 256  # file descriptors HTTP never takes (HSMS tools, admin, discovery)
    # Overload (http/overload.py): requests in flight on one instance at most (0: no limit;
    # Envoy's circuit-breaker default), and how long a request may wait for a free instance
    # before it is shed with 503 + Retry-After (HAProxy's `timeout queue`; 0: shed at once).
    max_requests_per_instance: int = 1024
    max_queue_time: float = 2.0


# -- [health_check] and [outlier_detection] (owner: health/; the balancer consults both) ----------

# Per-app overrides: ((app, ((key, value), ...)), ...), applied over the section by for_app().
AppOverrides = tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]


@dataclass(frozen=True, slots=True)
class HealthCheckSection:
    """The proxy's own active HTTP checks of every routed instance (Envoy/Traefik style)."""

    enabled: bool = True
    path: str = "/health"
    interval: float = 1.0  # between the starts of two probes of one instance
    timeout: float = 1.0  # a probe without a complete answer by then fails
    healthy_threshold: int = 2  # consecutive passes to bring a down instance back
    unhealthy_threshold: int = 2  # consecutive failures to mark an instance down
    host: str = ""  # Host header of probes; empty: the instance's address:port
    apps: AppOverrides = ()  # [health_check.apps.<app>] tables

    def for_app(self, app: str) -> HealthCheckSection:
        for name, changes in self.apps:
            if name == app:
                return replace(self, apps=(), **dict(changes))
        return self


@dataclass(frozen=True, slots=True)
class OutlierSection:
    """Passive ejection of instances that fail real requests (Envoy's outlier detection)."""

    enabled: bool = True
    consecutive_5xx: int = 5  # 5xx answers and resets/protocol errors in a row (0: off)
    consecutive_connect_failures: int = 3  # 0: off
    consecutive_timeouts: int = 2  # first-byte or read timeouts in a row (0: off)
    base_ejection_time: float = 10.0  # x the number of recent ejections of the instance ...
    max_ejection_time: float = 300.0  # ... capped here
    max_ejection_percent: int = 50  # of a group; never the whole group


@dataclass(frozen=True, slots=True)
class HsmsSection:
    enabled: bool = True
    t3: float = 45.0
    t5: float = 10.0
    t6: float = 5.0
    t7: float = 10.0
    t8: float = 5.0
    # Linktest.req to a backend after this much silence from it; with no Linktest.rsp within
    # T6 the session is declared dead and the tool fails over: a hung backend is found within
    # linktest_interval + t6 (8 s by default). 0 turns it off.
    linktest_interval: float = 3.0
    max_message_bytes: int = 16 * 1024 * 1024
    # Bytes all tools together may hold in incomplete messages (see hsms/budget.py).
    max_partial_bytes: int = 64 * 1024 * 1024
    # Per-frame warnings (bad SType, orphan reply, abort, ...) logged per tool and interval;
    # the rest are only counted, with one summary line per interval.
    warn_limit: int = 10
    warn_interval: float = 10.0
    # Session id for data messages sent to backends when the registry does not give the app's
    # hsms_device_id; unset: the tool's own session id is forwarded unchanged.
    device_id: int | None = None
    max_queued: int = 1000  # tool primaries held per tool while no backend session is selected
    # Host primaries and replies remembered per tool, to map the header a Stream 9 message
    # quotes back to the backend session that sent it (hsms/stream9.py).
    stream9_memory: int = 256
    # Per-tool message log in SML (hsms/msglog.py): off while message_log_dir is "". Tools:
    # comma-separated IP addresses or device ids, "" = every tool; max_bytes: per tool address,
    # all its rotated files together.
    message_log_dir: str = ""
    message_log_tools: str = ""
    message_log_max_bytes: int = 16 * 1024 * 1024
    message_log_files: int = 4


@dataclass(frozen=True, slots=True)
class DiscoverySection:
    provider: str = "file"  # file | consul
    file: str = ".zerodown/registry.json"
    poll_interval: float = 0.02
    # /health answers 503 "stale" when the provider has not confirmed its view (file read and
    # valid, every Consul watch answering) for this long; 0: never. With Consul it must exceed
    # a blocking query's longest quiet time (wait * 17/16 + watchdog).
    stale_after: float = 60.0


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
class VerifySection:
    """Defaults of `zerodown switch --verify` (read by the release commands, not the proxy;
    meaning: orchestrator/verify.py). Durations: "60s", "2m", "500ms"."""

    window: str = "0s"  # watch the new Active this long after a switch; 0s: off
    baseline: str = "5s"  # measure the old version this long before the flip
    min_requests: int = 50  # responses needed before HTTP is judged
    max_5xx_increase: float = 0.01  # 5xx rate allowed above the baseline's (0.01: 1 point)
    latency_factor: float = 2.0  # p99 allowed up to this times the baseline's ...
    latency_min_increase: str = "50ms"  # ... and at least this much above it
    min_hsms_primaries: int = 20  # HSMS primaries needed before HSMS is judged
    max_hsms_error_increase: float = 0.01  # SxF0/Reject rate allowed above the baseline's


@dataclass(frozen=True, slots=True)
class Config:
    proxy: ProxySection = field(default_factory=ProxySection)
    http: HttpSection = field(default_factory=HttpSection)
    hsms: HsmsSection = field(default_factory=HsmsSection)
    health_check: HealthCheckSection = field(default_factory=HealthCheckSection)
    outlier_detection: OutlierSection = field(default_factory=OutlierSection)
    discovery: DiscoverySection = field(default_factory=DiscoverySection)
    consul: ConsulSection = field(default_factory=ConsulSection)
    verify: VerifySection = field(default_factory=VerifySection)
    base_dir: Path = field(default_factory=Path.cwd)

    def registry_path(self) -> Path:
        p = Path(self.discovery.file)
        return p if p.is_absolute() else self.base_dir / p


_SECTIONS = {
    "proxy": ProxySection,
    "http": HttpSection,
    "hsms": HsmsSection,
    "health_check": HealthCheckSection,
    "outlier_detection": OutlierSection,
    "discovery": DiscoverySection,
    "consul": ConsulSection,
    "verify": VerifySection,
}


def _coerce(section: str, name: str, default: Any, value: Any) -> Any:
    expected = type(default) if default is not None else None
    if section == "proxy" and name == "access_log":
        return _access_log(value)
    if section == "health_check" and name == "apps":
        return _app_overrides(section, value)
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


def _access_log(value: Any) -> bool | str:
    """[proxy] access_log: a switch (true = stdout) or where to write ("-": stdout, a path)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("", "0", "false", "no", "off"):
            return False
        if word in ("1", "true", "yes", "on"):
            return True
        return value
    raise ConfigError(f'[proxy] access_log must be true, false, "-" or a file path, got {value!r}')


def access_log_target(cfg: Config) -> str | None:
    """Where the access log goes: "-" (stdout), a path (relative to the config file), or None."""
    value = cfg.proxy.access_log
    if value is True:
        return "-"
    if not value:
        return None
    if value in ("-", "stdout"):
        return "-"
    p = Path(value)
    return str(p if p.is_absolute() else cfg.base_dir / p)


_MOVED = {
    ("http", "eject_after_failures"): "[outlier_detection] consecutive_connect_failures "
    "(and consecutive_5xx, consecutive_timeouts)",
    ("http", "eject_seconds"): "[outlier_detection] base_ejection_time",
}


def _app_overrides(section: str, value: Any) -> AppOverrides:
    """[health_check.apps.<app>] tables -> per-app overrides, each value coerced like the
    section's own (so a typo fails at load time, naming the app)."""
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise ConfigError(f"[{section}.apps] must hold one table per app: [{section}.apps.<app>]")
    base = {f.name: f.default for f in fields(HealthCheckSection) if f.name != "apps"}
    out = []
    for app, changes in value.items():
        where = f"{section}.apps.{app}"
        coerced = []
        for k, v in changes.items():
            if k not in base:
                raise ConfigError(f"unknown setting [{where}] {k}")
            coerced.append((k, _coerce(where, k, base[k], v)))
        out.append((str(app), tuple(coerced)))
    return tuple(out)


def _apply(cfg: Config, section: str, values: dict[str, Any]) -> Config:
    cls = _SECTIONS[section]
    current = getattr(cfg, section)
    known = {f.name: getattr(current, f.name) for f in fields(cls)}
    changes = {}
    for k, v in values.items():
        if k not in known:
            if (section, k) in _MOVED:
                raise ConfigError(f"[{section}] {k} is now {_MOVED[section, k]}")
            raise ConfigError(f"unknown setting [{section}] {k}")
        changes[k] = _coerce(section, k, known[k], v)
    return replace(cfg, **{section: replace(current, **changes)})


ENV_MAP = {
    "ZERODOWN_ADMIN_TOKEN": ("proxy", "admin_token"),
    "ZERODOWN_HTTP_LISTEN": ("proxy", "http_listen"),
    "ZERODOWN_HSMS_LISTEN": ("proxy", "hsms_listen"),
    "ZERODOWN_ADMIN_LISTEN": ("proxy", "admin_listen"),
    "ZERODOWN_ADVERTISE_ADMIN": ("proxy", "advertise_admin"),
    "ZERODOWN_REGISTRY": ("discovery", "file"),
    "ZERODOWN_DISCOVERY": ("discovery", "provider"),
    "CONSUL_HTTP_ADDR": ("consul", "addr"),
    "CONSUL_HTTP_TOKEN": ("consul", "token"),
    "CONSUL_CACERT": ("consul", "cacert"),
    # Consul's own clients read no datacenter or prefix from the environment; ours do, so the
    # proxy and the release commands can be pointed at the same ones without a file.
    "ZERODOWN_CONSUL_DATACENTER": ("consul", "datacenter"),
    "ZERODOWN_CONSUL_KEY_PREFIX": ("consul", "key_prefix"),
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
    if cfg.proxy.access_log_format not in ("json", "combined"):
        raise ConfigError("[proxy] access_log_format must be json or combined")
    log_path = access_log_target(cfg)
    if log_path is not None and log_path != "-" and not Path(log_path).parent.is_dir():
        raise ConfigError(f"[proxy] access_log: directory {Path(log_path).parent} does not exist")
    if cfg.proxy.workers < 1:
        raise ConfigError("[proxy] workers must be at least 1")
    if cfg.http.balance not in ("round_robin", "least_conn"):
        raise ConfigError("[http] balance must be round_robin or least_conn")
    _check_http(cfg.http)
    if cfg.discovery.provider not in ("file", "consul"):
        raise ConfigError("[discovery] provider must be file or consul")
    for addr in (cfg.proxy.http_listen, cfg.proxy.hsms_listen, cfg.proxy.admin_listen):
        parse_addr(addr)
    if cfg.proxy.advertise_admin:
        from .discovery.advertise import split_host_port

        try:
            split_host_port(cfg.proxy.advertise_admin)
        except ValueError as exc:
            raise ConfigError(f"[proxy] advertise_admin: {exc}") from None
    if cfg.discovery.stale_after < 0:
        raise ConfigError("[discovery] stale_after must be 0 (off) or a number of seconds")
    if cfg.discovery.provider == "consul":
        check_consul(cfg.consul)
        quiet = cfg.consul.wait * 17 / 16 + cfg.consul.watchdog
        if 0 < cfg.discovery.stale_after <= quiet:
            raise ConfigError(
                f"[discovery] stale_after ({cfg.discovery.stale_after:g}s) must exceed a Consul "
                f"blocking query's quiet time, [consul] wait * 17/16 + watchdog ({quiet:g}s)"
            )
    _check_hsms(cfg.hsms)
    _check_health(cfg.health_check)
    for app, _ in cfg.health_check.apps:
        _check_health(cfg.health_check.for_app(app), f"health_check.apps.{app}")
    _check_outlier(cfg.outlier_detection)
    return cfg


def _check_health(h: HealthCheckSection, where: str = "health_check") -> None:
    for key in ("interval", "timeout"):
        if getattr(h, key) <= 0:
            raise ConfigError(f"[{where}] {key} must be a positive number of seconds")
    for key in ("healthy_threshold", "unhealthy_threshold"):
        if getattr(h, key) < 1:
            raise ConfigError(f"[{where}] {key} must be at least 1")
    # Both go into the probe's request head verbatim: no CR, LF or spaces may smuggle a header.
    if not h.path.startswith("/") or not h.path.isprintable() or " " in h.path:
        raise ConfigError(f"[{where}] path must be an absolute path like /health, got {h.path!r}")
    if not h.host.isprintable() or " " in h.host:
        raise ConfigError(f"[{where}] host must be a plain host[:port], got {h.host!r}")


def _check_outlier(o: OutlierSection) -> None:
    for key in ("consecutive_5xx", "consecutive_connect_failures", "consecutive_timeouts"):
        if getattr(o, key) < 0:
            raise ConfigError(f"[outlier_detection] {key} must be 0 (off) or more")
    if o.base_ejection_time <= 0:
        raise ConfigError("[outlier_detection] base_ejection_time must be a positive number")
    if o.max_ejection_time < o.base_ejection_time:
        raise ConfigError(
            "[outlier_detection] max_ejection_time must be at least base_ejection_time"
        )
    if not 0 <= o.max_ejection_percent <= 100:
        raise ConfigError("[outlier_detection] max_ejection_percent must be 0..100")


def _check_http(h: HttpSection) -> None:
    for key in ("connect_timeout", "first_byte_timeout", "read_timeout"):
        if getattr(h, key) <= 0:
            raise ConfigError(f"[http] {key} must be a positive number of seconds")
    if h.max_client_connections < 1:
        raise ConfigError("[http] max_client_connections must be at least 1")
    if h.fd_reserve < 0:
        raise ConfigError("[http] fd_reserve must be 0 or more")
    if h.max_requests_per_instance < 0:
        raise ConfigError("[http] max_requests_per_instance must be 0 (no limit) or more")
    if h.max_queue_time < 0:
        raise ConfigError("[http] max_queue_time must be 0 (shed at once) or more seconds")


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
    if not 1 <= h.stream9_memory <= 1_000_000:
        raise ConfigError("[hsms] stream9_memory must be 1..1000000 messages per tool")
    problem = msglog_problem(h.message_log_files, h.message_log_max_bytes, h.message_log_tools)
    if problem:
        raise ConfigError(f"[hsms] {problem}")
    if h.max_partial_bytes < h.max_message_bytes + 4:
        raise ConfigError(
            f"[hsms] max_partial_bytes ({h.max_partial_bytes}) must hold at least one whole "
            f"message: max_message_bytes + 4 = {h.max_message_bytes + 4}"
        )
    if h.warn_limit < 0 or h.warn_interval <= 0:
        raise ConfigError("[hsms] warn_limit must be 0 or more and warn_interval more than 0")
    if h.device_id is not None and not 0 <= h.device_id <= 0x7FFF:
        raise ConfigError(f"[hsms] device_id must be 0..32767 (E37 session id), got {h.device_id}")


_CONSUL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_consul(c: ConsulSection) -> None:
    """The [consul] section's rules (also used by the release commands, which read it too)."""
    if c.addr.split("://", 1)[0] not in ("http", "https") or "://" not in c.addr:
        raise ConfigError(
            f"[consul] addr must be http://host:port or https://host:port, got {c.addr!r}"
        )
    if c.datacenter and not _CONSUL_NAME.fullmatch(c.datacenter):
        raise ConfigError(f"[consul] datacenter {c.datacenter!r} is not a datacenter name")
    parts = c.key_prefix.strip("/").split("/")
    if not all(_CONSUL_NAME.fullmatch(p) for p in parts):
        raise ConfigError(
            f"[consul] key_prefix {c.key_prefix!r} must be one or more '/'-separated names "
            "(letters, digits, '_', '.', '-')"
        )
    if not c.apps:
        raise ConfigError("[consul] apps must name at least one app")
    for app in c.apps:
        if not _CONSUL_NAME.fullmatch(app):
            raise ConfigError(f"[consul] apps: {app!r} is not an app name")
    for name in ("wait", "watchdog", "backoff_min", "check_ttl", "connect_timeout"):
        if getattr(c, name) <= 0:
            raise ConfigError(f"[consul] {name} must be greater than 0")
    if c.backoff_max < c.backoff_min:
        raise ConfigError("[consul] backoff_max must be at least backoff_min")
    if c.min_request_interval < 0 or c.deregister_after < 0:
        raise ConfigError("[consul] min_request_interval and deregister_after cannot be negative")
