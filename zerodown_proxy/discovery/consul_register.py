"""The proxy's own registration in Consul: service `zerodown-proxy` with its admin address in
Meta (the CLI finds every proxy this way and reads its /v1/status), a TTL check kept passing
while the process lives, and deregistration on a clean shutdown. A proxy that dies without
deregistering goes critical after the TTL and is reaped by Consul after
`deregister_after` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from ..contract.consul import PROXY_META_ADMIN, PROXY_SERVICE
from .consul_client import ConsulClient, ConsulError, quote_path

log = logging.getLogger("zerodown.discovery.consul")

SERVICE_NAME = PROXY_SERVICE


def service_id_for(admin_addr: str, host: str | None = None) -> str:
    """A stable id per proxy on a host: a restarted proxy (or multi-worker worker 0) replaces
    its previous registration instead of adding a second one."""
    raw = f"{SERVICE_NAME}-{host or socket.gethostname()}-{admin_addr}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", raw).strip("-")


def go_duration(seconds: float) -> str:
    return f"{max(int(seconds * 1000), 1)}ms"


class SelfRegistration:
    def __init__(
        self,
        client: ConsulClient,
        admin_addr: str,
        proxy_name: str,
        ttl: float,
        deregister_after: float,
        routing_note: Callable[[], tuple[bool, str]],
    ) -> None:
        self.client = client
        self.admin_addr = admin_addr
        self.proxy_name = proxy_name
        self.ttl = ttl
        self.deregister_after = deregister_after
        self.routing_note = routing_note  # -> (has routing, note for the check output)
        self.service_id = service_id_for(admin_addr)
        self.check_id = f"{self.service_id}-ttl"
        # Set when a takeover's new process took this registration over (same service id):
        # the old process must not deregister it on its way out.
        self.handed_over = False
        self.ports: dict[str, int] = {}
        self.registered = False
        self.heartbeats = 0
        self.last_heartbeat = 0.0
        self.last_error: str | None = None
        self._ports_known = asyncio.Event()

    def set_ports(self, ports: dict[str, int]) -> None:
        self.ports = dict(ports)
        self._ports_known.set()

    def body(self) -> dict[str, Any]:
        meta = {PROXY_META_ADMIN: self.admin_addr, "name": self.proxy_name, "pid": str(os.getpid())}
        if self.ports.get("hsms"):
            meta["hsms_port"] = str(self.ports["hsms"])
        return {
            "ID": self.service_id,
            "Name": SERVICE_NAME,
            "Port": int(self.ports.get("http", 0)),
            "Tags": [],
            "Meta": meta,
            "Check": {
                "CheckID": self.check_id,
                "Name": "zerodown proxy ttl",
                "TTL": go_duration(self.ttl),
                "DeregisterCriticalServiceAfter": go_duration(self.deregister_after),
            },
        }

    async def register(self) -> None:
        await self.client.put("/v1/agent/service/register", self.body())
        self.registered = True
        log.info("registered in Consul as %s (admin %s)", self.service_id, self.admin_addr)

    async def heartbeat(self) -> None:
        ok, note = self.routing_note()
        verb = "pass" if ok else "warn"
        path = f"/v1/agent/check/{verb}/{quote_path(self.check_id)}"
        try:
            await self.client.put(path + "?note=" + quote(note, safe=""))
        except ConsulError as exc:
            # Consul versions word an unknown TTL check as 404 "Unknown check ID" or as 500
            # "CheckID ... does not have associated TTL".
            forgotten = exc.kind == "not_found" or "associated TTL" in str(exc)
            if not forgotten:
                raise
            # The agent forgot us (restarted, or reaped us after a long outage): register again.
            self.registered = False
            await self.register()
            await self.client.put(path)
        self.heartbeats += 1
        self.last_heartbeat = time.time()

    async def run(self) -> None:
        try:
            await asyncio.wait_for(self._ports_known.wait(), 10)
        except TimeoutError:
            pass  # register without ports rather than not at all
        period = max(self.ttl / 3, 0.05)
        while True:
            try:
                if not self.registered:
                    await self.register()
                await self.heartbeat()
                if self.last_error:
                    log.info("Consul registration %s is healthy again", self.service_id)
                self.last_error = None
                await asyncio.sleep(period)
            except ConsulError as exc:
                if str(exc) != self.last_error:
                    log.error("Consul registration %s: %s", self.service_id, exc)
                self.last_error = str(exc)
                await asyncio.sleep(min(period, 1.0))

    async def deregister(self) -> None:
        if not self.registered or self.handed_over:
            return
        try:
            await self.client.put(
                f"/v1/agent/service/deregister/{quote_path(self.service_id)}", timeout=3.0
            )
            self.registered = False
            log.info("deregistered %s from Consul", self.service_id)
        except ConsulError as exc:
            log.error(
                "could not deregister %s from Consul (%s); it expires after its TTL",
                self.service_id,
                exc,
            )

    def status(self) -> dict[str, Any]:
        return {
            "service": SERVICE_NAME,
            "service_id": self.service_id,
            "check_id": self.check_id,
            "admin": self.admin_addr,
            "registered": self.registered,
            "heartbeats": self.heartbeats,
            "last_heartbeat_age_s": round(time.time() - self.last_heartbeat, 3)
            if self.last_heartbeat
            else None,
            "last_error": self.last_error,
        }
