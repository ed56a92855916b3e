"""Test helpers: real proxy and sample-app processes on 127.0.0.1 with ephemeral ports."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from orchestrator.devstack.children import Child, ChildFailed, ProxyProc, SampleApp, wait_until

ROOT = Path(__file__).resolve().parent.parent

__all__ = ["Child", "ChildFailed", "ProxyProc", "SampleApp", "wait_until"]


async def async_wait_until(
    cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def write_registry(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(orjson.dumps(data))
    os.replace(tmp, path)


def instance(
    iid: str, group: str, version: str, port: int, healthy: bool = True, hsms: int | None = None
) -> dict[str, Any]:
    return {
        "id": iid,
        "group": group,
        "version": version,
        "address": "127.0.0.1",
        "http_port": port,
        "hsms_port": hsms,
        "healthy": healthy,
    }


def registry(generation: int, active: str, instances: list[dict[str, Any]], **app: Any) -> dict:
    return {
        "generation": generation,
        "apps": {"drimeap": {"active": active, "instances": instances, **app}},
        "proxies": [],
    }
