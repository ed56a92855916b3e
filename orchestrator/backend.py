"""What every release backend (local stack, Consul + Nomad) offers the CLI.

The CLI never knows which backend it talks to: it calls these methods, prints the result, and
turns `Refused` into one line on stderr and exit code 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

Progress = Callable[[str], None]

STATUS_SCHEMA = "zerodown.status/v1"


class Refused(Exception):
    """A command that will not (or could not) do what was asked; str() is the one-line reason."""


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
class ProxyStatus:
    name: str
    admin: str
    generation: int | None
    in_sync: bool
    error: str | None = None


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


@dataclass(slots=True)
class SwitchOutcome:
    app: str
    from_group: str
    to_group: str
    from_version: str | None
    to_version: str | None
    generation: int
    propagation_s: float  # from the registry write until every proxy reported the generation
    proxies: int


class Backend(Protocol):
    name: str

    async def status(self, app: str) -> AppStatus: ...

    async def deploy(
        self, app: str, version: str, image: str | None, progress: Progress
    ) -> str: ...

    async def switch(self, app: str, to_group: str | None, progress: Progress) -> SwitchOutcome: ...

    async def rollback(self, app: str, progress: Progress) -> SwitchOutcome: ...

    async def history(self, app: str) -> list[dict[str, Any]]: ...
