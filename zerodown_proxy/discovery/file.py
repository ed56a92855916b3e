"""File registry provider: one JSON state file, replaced by atomic rename, watched by the proxy.

The file looks like this (written by `orchestrator.registry`)::

    {"generation": 7,
     "apps": {"drimeap": {"active": "blue", "hosts": [], "path_prefix": "/",
                          "hsms_device_id": 0,
                          "instances": [{"id": "drimeap-blue-1", "group": "blue",
                                         "version": "v1", "address": "127.0.0.1",
                                         "http_port": 9001, "hsms_port": 9101,
                                         "healthy": true}]}},
     "proxies": [{"name": "local", "admin": "127.0.0.1:8081"}]}

A change is noticed by polling stat() every `poll_interval` (20 ms by default: a switch is
visible well within 100 ms, at a cost of 50 stat calls a second). A file that does not parse or
validate is rejected with one log line and the last good snapshot stays.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

import orjson

from ..routing import AppState, Instance, RegistryState, Router

log = logging.getLogger("zerodown.discovery.file")


class RegistryError(ValueError):
    """The registry file cannot be used; the message says what is wrong with it."""


def _req(obj: dict[str, Any], key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise RegistryError(f"{where}: missing {key!r}")
    value = obj[key]
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise RegistryError(f"{where}: {key!r} has the wrong type ({type(value).__name__})")
    return value


def parse_registry(raw: bytes, source: str = "file") -> RegistryState:
    """Validate and convert the registry JSON. Raises RegistryError."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RegistryError(f"not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RegistryError("top level is not an object")
    generation = _req(data, "generation", int, "registry")
    apps_obj = _req(data, "apps", dict, "registry")
    apps: list[AppState] = []
    for name, a in apps_obj.items():
        where = f"app {name}"
        if not isinstance(a, dict):
            raise RegistryError(f"{where}: not an object")
        active = a.get("active")
        if active is not None and not isinstance(active, str):
            raise RegistryError(f"{where}: 'active' must be a group name")
        instances = []
        seen: set[str] = set()
        for n, i in enumerate(_req(a, "instances", list, where)):
            iw = f"{where} instance #{n}"
            if not isinstance(i, dict):
                raise RegistryError(f"{iw}: not an object")
            iid = _req(i, "id", str, iw)
            if iid in seen:
                raise RegistryError(f"{where}: duplicate instance id {iid}")
            seen.add(iid)
            port = _req(i, "http_port", int, iw)
            hsms = i.get("hsms_port")
            if hsms is not None and (not isinstance(hsms, int) or isinstance(hsms, bool)):
                raise RegistryError(f"{iw}: 'hsms_port' must be an integer")
            if not 0 < port < 65536:
                raise RegistryError(f"{iw}: http_port out of range")
            instances.append(
                Instance(
                    id=iid,
                    app=name,
                    group=_req(i, "group", str, iw),
                    version=_req(i, "version", str, iw),
                    address=i.get("address", "127.0.0.1"),
                    http_port=port,
                    hsms_port=hsms,
                    healthy=bool(i.get("healthy", True)),
                )
            )
        device = a.get("hsms_device_id")
        apps.append(
            AppState(
                name=name,
                active_group=active,
                instances=tuple(instances),
                hosts=tuple(a.get("hosts", ())),
                path_prefix=a.get("path_prefix", "/"),
                hsms_device_id=device if isinstance(device, int) else None,
            )
        )
    return RegistryState(generation=generation, apps=tuple(apps), source=source)


class FileProvider:
    """Watches the registry file and offers each new, valid version to the router."""

    def __init__(self, path: Path, router: Router, poll_interval: float = 0.02) -> None:
        self.path = path
        self.router = router
        self.poll_interval = poll_interval
        self.last_contact: float = 0.0
        self.errors: int = 0
        self.last_error: str | None = None
        self._stamp: tuple[int, int, int] | None = None
        self._task: asyncio.Task[None] | None = None

    def load_once(self) -> bool:
        """Read the file if it changed. Returns True when a new snapshot was applied."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._fail(f"registry file {self.path} does not exist")
            return False
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            self.last_contact = time.time()
            return False
        self._stamp = stamp
        try:
            raw = self.path.read_bytes()
            state = parse_registry(raw, source=f"file:{self.path}")
        except (OSError, RegistryError) as exc:
            self._fail(f"registry file {self.path} rejected, keeping the last good routing: {exc}")
            return False
        self.last_contact = time.time()
        if not self.router.offer(state):
            self._fail(f"registry file {self.path}: {self.router.last_error}")
            return False
        self.last_error = None
        return True

    def _fail(self, message: str) -> None:
        if message != self.last_error:
            log.error(message)
        self.errors += 1
        self.last_error = message

    async def run(self) -> None:
        while True:
            self.load_once()
            await asyncio.sleep(self.poll_interval)

    def start(self) -> None:
        self.load_once()
        self._task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def status(self) -> dict[str, Any]:
        return {
            "provider": "file",
            "path": str(self.path),
            "last_contact_age_s": round(time.time() - self.last_contact, 3)
            if self.last_contact
            else None,
            "errors": self.errors,
            "last_error": self.last_error,
        }
