"""What the release commands read from Consul, in the contract's terms
(zerodown_proxy/contract/consul.py): the instances of an app (the same join, the same instance
ids as the proxy's), its Active group (the key, else the old stack's tags, the same rule as the
proxy's), and the proxies to wait for. Every call goes through `ConsulApi`, which names the
configured datacenter on each one.
"""

from __future__ import annotations

import asyncio
import getpass
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from zerodown_proxy.contract.consul import (
    PROXY_META_ADMIN,
    PROXY_META_HTTP,
    PROXY_SERVICE,
    Joined,
    Keys,
    active_from_tags,
    hsms_service,
    http_service,
    join_instances,
    nomad_instance_id,
    parse_health,
)
from zerodown_proxy.contract.model import Instance

from . import audit
from .backend import InstanceStatus, Progress, Refused
from .hashicorp_api import ApiError, ConsulApi


@dataclass(frozen=True, slots=True)
class Proxy:
    name: str
    admin: str
    http: str | None  # host:port of its HTTP listener, for the preview smoke test
    critical: bool = False  # its TTL check is critical: crashed or hung, not routing anything


class ConsulView:
    def __init__(self, consul: ConsulApi, keys: Keys) -> None:
        self.consul = consul
        self.keys = keys

    async def joined(self, app: str) -> Joined:
        """Every registered instance of `app`, HTTP and HSMS services joined."""
        http, hsms = await asyncio.gather(
            self.consul.health(http_service(app)), self.consul.health(hsms_service(app))
        )
        try:
            return join_instances(app, parse_health(http), parse_health(hsms))
        except ValueError as exc:  # ConsulDataError: not the documented shape
            raise ApiError(
                f"Consul at {self.consul.addr}: unexpected health answer: {exc}"
            ) from None

    async def registered(self, app: str) -> list[Instance]:
        return sorted((await self.joined(app)).instances, key=lambda i: (i.group, i.id))

    async def active(self, app: str, joined: Joined | None = None) -> tuple[str, int]:
        """(Active group, ModifyIndex of the key — 0 when it is absent)."""
        key = self.keys.active(app)
        got = await self.consul.kv_get(key)
        if got is not None:
            value = got[0].decode(errors="replace").strip()
            if not value:
                raise Refused(f"Consul key {key} is empty; set it to a group")
            return value, got[1]
        joined = joined if joined is not None else await self.joined(app)
        group, _ = active_from_tags(app, joined.instances, joined.entries)
        if group is not None:
            return group, 0
        known = ", ".join(sorted({i.group for i in joined.instances})) or "none registered"
        raise Refused(
            f"no Active group for {app}: Consul key {key} is absent and no instance is tagged "
            f"active (groups: {known}); set it, e.g. `consul kv put {key} blue`"
        )

    async def audit(
        self,
        backend: str,
        app: str,
        entry: dict[str, Any],
        local_log: Path | None,
        progress: Progress,
    ) -> None:
        """Append a release action (refused and failed ones too) to the audit trail: the local
        history.jsonl and `<key_prefix>/<app>/history/<ns>` in Consul."""
        record = audit.record(backend, app, entry)
        ns = record["time_ns"]
        data = orjson.dumps(record)
        if local_log is not None:
            audit.append_local(local_log, record, progress)
        try:
            await self.consul.kv_put(self.keys.history(app, ns), data)
        except Refused as exc:
            progress(f"warning: audit entry not written to Consul: {exc}")

    async def proxies(self) -> list[Proxy]:
        out = []
        for e in await self.consul.health(PROXY_SERVICE):
            svc = e["Service"]
            meta = svc.get("Meta") or {}
            admin = meta.get(PROXY_META_ADMIN)
            if not admin:
                continue
            addr = svc.get("Address") or e["Node"]["Address"]
            http = meta.get(PROXY_META_HTTP) or (
                f"{addr}:{svc['Port']}" if svc.get("Port") else None
            )
            critical = any(c.get("Status") == "critical" for c in e.get("Checks") or ())
            out.append(Proxy(svc["ID"], admin, http, critical))
        return sorted(out, key=lambda p: p.name)


def unregistered(
    allocs: list[dict[str, Any]], instances: list[Instance], group: str
) -> list[InstanceStatus]:
    """Allocations Nomad wants running in `group` that have no service in Consul (failed,
    pending, or restarting): shown as critical, so `status` counts them as not healthy. Their
    ids follow the contract's rule for Nomad instances (`<alloc[:8]>-<group>`)."""
    newest: dict[str, dict[str, Any]] = {}
    for a in allocs:
        if a.get("TaskGroup") != group or a.get("DesiredStatus") != "run":
            continue
        if a["Name"] not in newest or a["CreateIndex"] > newest[a["Name"]]["CreateIndex"]:
            newest[a["Name"]] = a
    known = {i.alloc for i in instances if i.alloc}
    return [
        InstanceStatus(
            id=nomad_instance_id(a["ID"], group),
            group=group,
            version="?",
            address="",
            http_port=0,
            hsms_port=None,
            registered="critical",
            probe=f"error: not registered in Consul (allocation {a.get('ClientStatus')})",
        )
        for a in sorted(newest.values(), key=lambda a: a["Name"])
        if a["ID"] not in known
    ]


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return os.environ.get("USER") or str(os.getuid())
