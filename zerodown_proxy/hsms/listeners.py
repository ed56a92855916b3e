"""Each EAP app's own HSMS listener.

An app with `hsms_listen` (registry file key, or Consul Meta on `<app>-hsms`) gets a listener
of its own; the tools it accepts belong to that app for the life of their connection and are
switched (and piloted) with that app only. Apps without one share the proxy's
`[proxy] hsms_listen` (the single-app case: the first such app with HSMS ports).

Listeners follow the routing snapshot: a new app (or a new address) is bound after the swap that
brings it, one that disappears stops accepting (its connected tools stay; with no routing they
wait as any tool without a backend does). A bind failure is logged and reported in /v1/status
(`hsms.listeners.<app>.error`), and retried on the next snapshot that still names it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import ConfigError, parse_addr
from .tool_link import ToolLink

if TYPE_CHECKING:
    from ..routing import Snapshot
    from .proxy import HsmsProxy

log = logging.getLogger("zerodown.hsms")


@dataclass(slots=True)
class AppListener:
    app: str
    listen: str
    server: asyncio.AbstractServer | None = None
    port: int = 0
    error: str | None = None


class AppListeners:
    def __init__(self, proxy: HsmsProxy) -> None:
        self.proxy = proxy
        self.reuse_port = False
        self.by_app: dict[str, AppListener] = {}
        self._task: asyncio.Task[None] | None = None
        self._again = False

    def on_snapshot(self, old: Snapshot, new: Snapshot) -> None:
        failed = any(lst.error for lst in self.by_app.values())
        if self.proxy.closing or (old.hsms_listeners() == new.hsms_listeners() and not failed):
            return
        if self._task is not None and not self._task.done():
            self._again = True  # one reconcile at a time; the latest snapshot wins
            return
        self._task = self.proxy.loop.create_task(self._run())

    async def _run(self) -> None:
        while True:
            self._again = False
            await self.reconcile(self.proxy.router.current())
            if not self._again:
                return

    async def reconcile(self, snap: Snapshot) -> None:
        """Bind what `snap` names and is not bound; close what it no longer names."""
        wanted = snap.hsms_listeners()
        for app, lst in list(self.by_app.items()):
            if wanted.get(app) != lst.listen:
                self._close(lst)
                del self.by_app[app]
        for app, listen in wanted.items():
            lst = self.by_app.get(app)
            if lst is not None and lst.server is not None:
                continue
            lst = self.by_app[app] = AppListener(app, listen)
            await self._bind(lst)

    async def _bind(self, lst: AppListener) -> None:
        proxy = self.proxy
        try:
            host, port = parse_addr(lst.listen)
            lst.server = await proxy.loop.create_server(
                lambda: ToolLink(proxy, lst.app),
                host,
                port,
                backlog=1024,
                reuse_address=True,
                reuse_port=self.reuse_port or None,
            )
        except (OSError, ConfigError) as exc:
            lst.error = f"cannot listen on {lst.listen}: {getattr(exc, 'strerror', None) or exc}"
            log.error("app %s: HSMS %s", lst.app, lst.error,
                      extra={"fields": {"event": "hsms_listen_failed", "app": lst.app,
                                        "listen": lst.listen, "error": lst.error}})  # fmt: skip
            return
        if proxy.closing:  # shutdown began while it was being bound
            self._close(lst)
            return
        lst.port = lst.server.sockets[0].getsockname()[1]
        lst.error = None
        log.info("app %s: HSMS listening on %s (port %d)", lst.app, lst.listen, lst.port,
                 extra={"fields": {"event": "hsms_listening", "app": lst.app,
                                   "listen": lst.listen, "port": lst.port}})  # fmt: skip

    @staticmethod
    def _close(lst: AppListener) -> None:
        if lst.server is not None:
            lst.server.close()
            lst.server = None
            log.info("app %s: HSMS listener %s closed", lst.app, lst.listen)

    def close(self) -> None:
        for lst in self.by_app.values():
            self._close(lst)

    def status(self) -> dict[str, Any]:
        return {
            app: {"listen": lst.listen, "port": lst.port, "error": lst.error}
            for app, lst in sorted(self.by_app.items())
        }
