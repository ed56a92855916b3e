"""`zerodown proxy`: wires the router, a discovery provider, the HTTP and HSMS data planes and
the admin API into one process, and shuts it down gracefully on SIGTERM."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from . import pilot_gauges
from .admin import AdminApi
from .config import Config, access_log_target, parse_addr
from .dashboard.release import ReleaseDesk
from .dashboard.routes import Dashboard
from .dashboard.series import Sampler
from .discovery.advertise import advertised_admin, consul_addr
from .discovery.file import FileProvider
from .health.active import ActiveHealthChecker
from .http.access_log import AccessLogError, open_access_log
from .http.proxy import HttpProxy
from .metrics import Registry, register_process_info, register_routing_info
from .routing import Router
from .switch_gate import WorkerGate
from .takeover.listeners import Listeners
from .watcher import Watcher

log = logging.getLogger("zerodown.proxy")


class ProxyServer:
    def __init__(
        self,
        cfg: Config,
        reuse_port: bool = False,
        supervisor_admin: str | None = None,
        config_path: str | None = None,
        inherited: dict[str, socket.socket] | None = None,
    ) -> None:
        self.cfg = cfg
        self.config_path = config_path  # what the dashboard's release actions pass the CLI
        # Every listening socket by name: bound here, or inherited from a takeover (takeover/).
        self.listeners = Listeners(inherited)
        self.reuse_port = reuse_port
        # A multi-worker supervisor's admin address (it speaks for the whole proxy: this is
        # what the worker registers in Consul); None when running alone.
        self.supervisor_admin = supervisor_admin
        # Multi-worker mode: the supervisor's switch gate makes every worker switch at once.
        self.gate = WorkerGate.from_env() if reuse_port else None
        self.router = Router()
        self.metrics = Registry()
        register_process_info(self.metrics)
        # The one path from the discovery provider to the router (see watcher.py).
        self.watcher = Watcher(self.router, self.metrics, self.gate, cfg.discovery.stale_after)
        pilot_gauges.register(self.router, self.metrics)
        self.name = cfg.proxy.name or f"{socket.gethostname()}-{os.getpid()}"
        self.access_log = open_access_log(access_log_target(cfg), cfg.proxy.access_log_format)
        self.router.subscribe(self._log_switch)  # a line per switch in the access log
        self.http: HttpProxy | None = None
        self.hsms: Any = None
        self.checker: ActiveHealthChecker | None = None
        self.admin: AdminApi | None = None
        self.provider: Any = None
        self.sampler: Sampler | None = None  # per-second traffic samples for the dashboard
        self.stopped = asyncio.Event()
        # Awaited once routing is started, before the data planes listen (a takeover's new
        # process waits there until it routes what the old one did).
        self.before_serving: Callable[[], Awaitable[None]] | None = None
        self.metrics.gauge(
            "zerodown_gc_frozen_objects",
            "Objects moved out of the cyclic GC's reach after start-up (gc.freeze)",
            fn=gc.get_freeze_count,
        )

    async def start(self) -> dict[str, int]:
        cfg = self.cfg
        admin_host, admin_port = parse_addr(cfg.proxy.admin_listen, "127.0.0.1")
        dashboard = Dashboard(
            lambda: self.admin.token if self.admin else "",
            ReleaseDesk(cfg, self.config_path),
            self._samples,
            self._proxies,
        )
        self.admin = AdminApi(
            self.router, self.metrics, cfg.proxy.admin_token, self.name, parts={},
            watcher=self.watcher, dashboard=dashboard,
        )  # fmt: skip
        sock = self.listeners.get("admin", admin_host, admin_port)
        await self.admin.start(admin_host, admin_port, sock=sock)
        # What the CLI on another host uses to reach this proxy (discovery/advertise.py).
        admin_addr = self.supervisor_admin or advertised_admin(
            cfg.proxy.advertise_admin, admin_host, self.admin.port, consul_addr(cfg)
        )

        if cfg.discovery.provider == "consul":
            from .discovery.consul import ConsulProvider

            self.provider = ConsulProvider(
                cfg.consul, self.watcher, self.metrics, admin_addr=admin_addr, proxy_name=self.name
            )
        else:
            self.provider = FileProvider(
                cfg.registry_path(), self.watcher, cfg.discovery.poll_interval
            )
            self.admin.reload = self.watcher.reload
        self.watcher.start(self.provider)

        if self.before_serving is not None:
            await self.before_serving()
        http_host, http_port = parse_addr(cfg.proxy.http_listen)
        self.http = HttpProxy(
            self.router, cfg.http, self.metrics, cfg.proxy.admin_token, self.access_log
        )
        # The proxy's own view of instance health (health/): active checks and outlier
        # ejection, consulted by the balancer; the HSMS proxy may read checker.is_down.
        self.checker = ActiveHealthChecker(self.router, cfg.health_check, self.metrics)
        self.http.balancer.attach(self.router, cfg.outlier_detection, self.checker)
        self.checker.start()
        register_routing_info(self.metrics, self.router, self.checker)
        self.admin.checks = self.checker.verdict
        sock = self.listeners.get("http", http_host, http_port, self.reuse_port)
        await self.http.start(http_host, http_port, sock=sock)
        self.sampler = Sampler(self.http.acc.m_requests, self.http.acc.m_latency)
        self.sampler.start()
        ports = {"http": self.http.port, "admin": self.admin.port, "pid": os.getpid()}
        self.admin.parts["http"] = self.http.status
        self.admin.parts["discovery"] = self.watcher.status
        self.admin.parts["health_check"] = self.checker.status

        if cfg.hsms.enabled:
            from .hsms.proxy import HsmsProxy

            hsms_host, hsms_port = parse_addr(cfg.proxy.hsms_listen)
            # New backend sessions skip instances the proxy's own HTTP checks mark down.
            # Each app's own HSMS listener is kept in self.listeners too ("hsms:<app>").
            self.hsms = HsmsProxy(
                self.router, cfg.hsms, self.metrics, instance_down=self.checker.is_down,
                sockets=self.listeners,
            )  # fmt: skip
            sock = self.listeners.get("hsms", hsms_host, hsms_port, self.reuse_port)
            await self.hsms.start(hsms_host, hsms_port, self.reuse_port, sock=sock)
            ports["hsms"] = self.hsms.port
            self.admin.parts["hsms"] = self.hsms.status
        # Inherited from a takeover but served by nothing now (an app no longer routed, HSMS
        # disabled): closed, so a client is refused instead of waiting in a dead backlog.
        for name in self.listeners.drop_inherited(""):
            log.info("listener %s inherited but not served here: closed", name)
        if hasattr(self.provider, "set_listen_ports"):
            self.provider.set_listen_ports(ports)
        log.info("listening", extra={"fields": {"ports": ports, "name": self.name}})
        settle_gc()
        return ports

    def reopen_logs(self) -> None:
        """SIGUSR1 (logrotate): reopen the access log file."""
        if self.access_log is not None:
            self.access_log.reopen()

    def set_access_log(self, cfg: Config) -> None:
        """[proxy] access_log or access_log_format changed (SIGHUP): the new log is opened
        first and swapped in; one that cannot be opened leaves the old one writing."""
        try:
            new = open_access_log(access_log_target(cfg), cfg.proxy.access_log_format)
        except AccessLogError as exc:
            log.error("%s; keeping the access log as it was", exc)
            return
        old, self.access_log = self.access_log, new
        if self.http is not None:
            self.http.set_access_log(new)
        if old is not None:
            old.close()

    def _log_switch(self, old: Any, new: Any) -> None:
        if self.access_log is not None:
            self.access_log.on_snapshot(old, new)

    async def _samples(self, since: int) -> dict[str, Any]:
        if self.sampler is None:
            return {"buckets": [], "samples": []}
        return self.sampler.raw(since)

    async def _proxies(self) -> dict[str, Any] | None:
        if self.cfg.discovery.provider != "consul" or self.provider is None:
            return None  # the file provider: this proxy (the page reads /v1/status)
        from .dashboard.proxies import consul_proxies

        return await consul_proxies(self.provider.client)

    async def stop(self) -> None:
        grace = self.cfg.proxy.shutdown_grace
        log.info("shutting down", extra={"fields": {"grace_s": grace}})
        waits = []
        if self.http is not None:
            waits.append(self.http.close(grace))
        if self.hsms is not None:
            waits.append(self.hsms.close(grace))
        await asyncio.gather(*waits)
        if self.checker is not None:
            await self.checker.close()
        if self.sampler is not None:
            await self.sampler.close()
        await self.watcher.stop()
        if self.admin is not None:
            await self.admin.close()
        if self.gate is not None:
            self.gate.close()
        if self.access_log is not None:
            self.access_log.close()
        self.listeners.close()
        self.stopped.set()


# Thresholds after start-up. The data path frees its per-request objects by reference counting
# (the only cycles are one per closed connection: a client and its last exchange), so a young
# collection every 700 allocations (the default) finds almost nothing and only costs time per
# request; collecting every 50,000 keeps that garbage small, and the older generations are
# scanned less often too.
GC_THRESHOLDS = (50_000, 20, 100)


def settle_gc() -> None:
    """After start-up: collect once, then move every object alive now (modules, config, the
    routing snapshot, listeners) into the permanent generation, so no later collection walks
    them again (gc.freeze, as Instagram does for its forked workers), and collect less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def serve(
    cfg: Config,
    ready_file: str | None = None,
    reuse_port: bool = False,
    supervisor_admin: str | None = None,
    config_path: str | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> int:
    """Run one proxy process until SIGTERM/SIGINT or a takeover (takeover/lifecycle.py)."""
    from .takeover import lifecycle

    return await lifecycle.serve(
        cfg, ready_file, reuse_port, supervisor_admin, config_path, overrides
    )


def run(
    cfg: Config,
    ready_file: str | None = None,
    reuse_port: bool = False,
    config_path: str | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    supervisor_admin: str | None = None,
    supervisor_pid: int | None = None,
) -> int:
    if supervisor_pid is not None:  # a worker: it must not outlive its supervisor
        from .supervised import die_with_supervisor

        if not die_with_supervisor(supervisor_pid):
            log.error("supervisor (pid %d) is gone; not starting", supervisor_pid)
            return 1
    elif cfg.proxy.workers > 1:
        from .supervisor import run_supervisor

        return run_supervisor(cfg, config_path, ready_file, overrides)
    import uvloop

    return uvloop.run(serve(cfg, ready_file, reuse_port, supervisor_admin, config_path, overrides))
