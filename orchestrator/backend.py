"""What every release backend (local stack, Consul + Nomad) offers the CLI.

The CLI never knows which backend it talks to: it calls these methods, prints the result, and
turns `Refused` into one line on stderr and exit code 1. The status records (`zerodown status
--json`) are part of the contract both sides share: zerodown_proxy/contract/status.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from zerodown_proxy.contract.status import (
    STATUS_SCHEMA,
    AppStatus,
    GroupStatus,
    InstanceStatus,
    ProxyStatus,
    ToolSession,
)

__all__ = [
    "STATUS_SCHEMA",
    "AppStatus",
    "Backend",
    "DryRun",
    "GroupStatus",
    "InstanceStatus",
    "Progress",
    "ProxyStatus",
    "Refused",
    "SwitchOutcome",
    "ToolSession",
]

Progress = Callable[[str], None]


class Refused(Exception):
    """A command that will not (or could not) do what was asked; str() is the one-line reason."""


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


@dataclass(frozen=True, slots=True)
class DryRun:
    """What `deploy --dry-run` found: the plan to print, and why a deploy would refuse (None:
    it would go ahead)."""

    lines: list[str]
    refusal: str | None = None


class Backend(Protocol):
    name: str

    async def status(self, app: str) -> AppStatus: ...

    async def deploy(
        self, app: str, version: str, image: str | None, progress: Progress
    ) -> str: ...

    async def plan_deploy(self, app: str, version: str, image: str | None) -> DryRun: ...

    async def switch(self, app: str, to_group: str | None, progress: Progress) -> SwitchOutcome: ...

    async def rollback(
        self, app: str, progress: Progress, reason: str | None = None
    ) -> SwitchOutcome: ...

    async def history(self, app: str) -> list[dict[str, Any]]: ...
