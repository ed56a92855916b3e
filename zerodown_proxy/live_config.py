"""SIGHUP and admin `POST /v1/reload`: read the configuration file again and apply what can
change in a running process; name what needs a takeover (`zerodown proxy-reload`).

Applied live (new values are used from the next request, connection, probe or timer on):
- [http] timeouts, limits, balance, pool and retry settings, except the two the connection
  capacity is sized from at start (max_client_connections, fd_reserve);
- [hsms] timers (T3, T5, T6, T7, T8), linktest_interval, max_message_bytes, device_id (each
  for sessions opened from now on; T3/T8 and max_queued at once), warn_limit/warn_interval;
- [health_check] everything (probes are rebuilt), [outlier_detection] everything (ejection
  counters restart);
- [proxy] log_level, access_log, shutdown_grace, admin_token.
Everything else (listen addresses, workers, name, [discovery], [consul], [hsms] enabled and
max_partial_bytes, the two [http] keys above) is reported as `needs_takeover`, not applied.
"""

from __future__ import annotations

import logging
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from .config import Config, ConfigError, load_config

if TYPE_CHECKING:
    from .server import ProxyServer

log = logging.getLogger("zerodown.proxy")

LIVE_PROXY = frozenset({"log_level", "access_log", "shutdown_grace", "admin_token"})
TAKEOVER_HTTP = frozenset({"max_client_connections", "fd_reserve"})
TAKEOVER_HSMS = frozenset({"enabled", "max_partial_bytes"})
LIVE_SECTIONS = ("proxy", "http", "hsms", "health_check", "outlier_detection")


def changes(old: Config, new: Config) -> list[tuple[str, str]]:
    """(section, key) of every value that differs."""
    out = []
    for section in ("proxy", "http", "hsms", "health_check", "outlier_detection",
                    "discovery", "consul"):  # fmt: skip
        a, b = getattr(old, section), getattr(new, section)
        out += [(section, f.name) for f in fields(a) if getattr(a, f.name) != getattr(b, f.name)]
    return out


def needs_takeover(section: str, key: str) -> bool:
    if section not in LIVE_SECTIONS:
        return True
    if section == "proxy":
        return key not in LIVE_PROXY
    if section == "http":
        return key in TAKEOVER_HTTP
    if section == "hsms":
        return key in TAKEOVER_HSMS
    return False


class LiveConfig:
    def __init__(
        self,
        server: ProxyServer,
        path: str | None,
        overrides: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.server = server
        self.path = path
        self.overrides = overrides

    def reload(self) -> dict[str, Any]:
        """Re-read and apply; the answer says what was applied and what needs a takeover.
        A file that does not load is reported (`error`) and nothing changes."""
        if not self.path:
            return {"config": None, "error": "the proxy was started without --config"}
        try:
            new = load_config(self.path, self.overrides)
        except ConfigError as exc:
            return {"config": self.path, "error": str(exc)}
        srv = self.server
        diff = changes(srv.cfg, new)
        applied = [f"{s}.{k}" for s, k in diff if not needs_takeover(s, k)]
        pending = [f"{s}.{k}" for s, k in diff if needs_takeover(s, k)]
        self._apply(new, {s for s, k in diff if not needs_takeover(s, k)})
        return {"config": self.path, "applied": applied, "needs_takeover": pending}

    def reload_logged(self) -> None:
        result = self.reload()
        if "error" in result:
            log.error("SIGHUP: configuration not reloaded: %s", result["error"])
            return
        log.info(
            "SIGHUP: configuration reloaded: %d change(s) applied%s",
            len(result["applied"]),
            "; needs a takeover (zerodown proxy-reload): " + ", ".join(result["needs_takeover"])
            if result["needs_takeover"] else "",
            extra={"fields": {"event": "config_reloaded", **result}},
        )  # fmt: skip

    def _apply(self, new: Config, sections: set[str]) -> None:
        from dataclasses import replace

        srv = self.server
        old = srv.cfg
        keep = {s: getattr(old, s) for s in ("discovery", "consul")}
        proxy = replace(
            old.proxy, **{k: getattr(new.proxy, k) for k in LIVE_PROXY}
        )  # fmt: skip
        http = replace(new.http, **{k: getattr(old.http, k) for k in TAKEOVER_HTTP})
        hsms = replace(new.hsms, **{k: getattr(old.hsms, k) for k in TAKEOVER_HSMS})
        cfg = replace(new, proxy=proxy, http=http, hsms=hsms, **keep)
        srv.cfg = cfg
        if "proxy" in sections:
            logging.getLogger().setLevel(cfg.proxy.log_level.upper())
            if srv.admin is not None:
                srv.admin.token = cfg.proxy.admin_token
            if srv.http is not None:
                srv.http.admin_token = cfg.proxy.admin_token.encode()
                srv.http.acc.access_log = cfg.proxy.access_log
        if srv.http is not None and "http" in sections:
            srv.http.cfg = srv.http.pool.cfg = srv.http.balancer.cfg = cfg.http
        if srv.hsms is not None and "hsms" in sections:
            srv.hsms.cfg = cfg.hsms
            srv.hsms.choice.t5 = cfg.hsms.t5
            srv.hsms.choice.device_id = cfg.hsms.device_id
        if srv.checker is not None and "health_check" in sections:
            srv.checker.cfg = cfg.health_check
            srv.checker._on_snapshot(srv.router.snapshot, srv.router.snapshot)
        if srv.http is not None and srv.checker is not None and "outlier_detection" in sections:
            from .health.outlier import OutlierDetector

            b = srv.http.balancer
            b.outliers = OutlierDetector(cfg.outlier_detection)
            b._counts = b.outliers.counts
