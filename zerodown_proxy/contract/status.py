"""The status schema both sides speak.

- `zerodown status --json` (schema `zerodown.status/v1`, documented in the README): the records
  below, built by each release backend from the registry (file or Consul) and the proxies.
- A proxy's admin `/v1/status` carries, among its other fields, `generation`: the routing
  generation it has applied. Release commands wait until every proxy reports at least the
  generation they wrote (`PROXY_GENERATION`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

STATUS_SCHEMA = "zerodown.status/v1"
PROXY_GENERATION = "generation"  # key of a proxy's /v1/status: the applied generation


@dataclass(slots=True)
class InstanceStatus:
    id: str
    group: str
    version: str
    address: str
    http_port: int
    hsms_port: int | None
    registered: str  # health as the registry/Consul says: passing | warning | critical | unknown
    probe: str  # direct probe of GET /health: "ok" or "error: <reason>"


@dataclass(slots=True)
class ToolSession:
    """One HSMS tool session a proxy holds (its /v1/status `hsms.sessions`)."""

    tool: str  # address:port the tool connected from
    app: str | None  # the app whose listener it came in on
    group: str | None  # the backend group serving it now
    version: str | None
    pilot: bool  # on the Standby group as a pilot


@dataclass(slots=True)
class ProxyStatus:
    name: str
    admin: str
    generation: int | None
    in_sync: bool
    error: str | None = None
    tools: list[ToolSession] = field(default_factory=list)


@dataclass(slots=True)
class GroupStatus:
    group: str | None
    version: str | None
    instances: list[InstanceStatus] = field(default_factory=list)

    @property
    def healthy(self) -> int:
        return sum(1 for i in self.instances if i.registered == "passing" and i.probe == "ok")


@dataclass(slots=True)
class AppStatus:
    backend: str
    app: str
    generation: int
    active: GroupStatus
    standby: GroupStatus
    proxies: list[ProxyStatus]
    # The pilot list as stored ({"group", "tools"}; contract/pilots.py), None: no pilots.
    pilots: dict[str, Any] | None = None

    @property
    def in_sync(self) -> bool:
        return all(p.in_sync for p in self.proxies)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["schema"] = STATUS_SCHEMA
        d["in_sync"] = self.in_sync
        for g in ("active", "standby"):
            d[g]["healthy"] = getattr(self, g).healthy
        return d
