"""File registry provider: one JSON state file (format: contract/registry_file.py), replaced by
atomic rename, watched by the proxy.

A change is noticed by polling stat() every `poll_interval` (20 ms by default: a switch is
visible well within 100 ms, at a cost of 50 stat calls a second). Each new version of the file
is parsed (every field type-checked) and emitted, whole, to the watcher; a file that does not
parse or validate is reported with one log line and the last good snapshot stays. The provider
never touches routing itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any, Protocol

from ..contract.model import RegistryState
from ..contract.registry_file import RegistryError, parse_registry

__all__ = ["FileProvider", "RegistryError", "parse_registry"]

log = logging.getLogger("zerodown.discovery.file")


class Sink(Protocol):
    """Where a provider emits (the watcher)."""

    def submit(self, state: RegistryState) -> Any: ...

    def failed(self, kind: str, message: str) -> None: ...


class FileProvider:
    """Watches the registry file and emits each new, valid version."""

    name = "file"

    def __init__(self, path: Path, sink: Sink, poll_interval: float = 0.02) -> None:
        self.path = path
        self.sink = sink
        self.poll_interval = poll_interval
        self.last_contact: float = 0.0  # the last time the file was read (or seen unchanged) fine
        self.errors: int = 0
        self.last_error: str | None = None
        self._stamp: tuple[int, int, int] | None = None  # of the version last looked at
        self._good: tuple[int, int, int] | None = None  # of the last version that was valid

    def load_once(self) -> bool:
        """Read the file if it changed. Returns True when a new version was applied."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._fail("missing", f"registry file {self.path} does not exist")
            return False
        except OSError as exc:
            self._fail("unreadable", f"registry file {self.path} cannot be read: {exc}")
            return False
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            if stamp == self._good:  # unchanged and known good: the view is still current
                self.last_contact = time.time()
            return False
        self._stamp = stamp
        try:
            raw = self.path.read_bytes()
            state = parse_registry(raw, source=f"file:{self.path}")
        except (OSError, RegistryError) as exc:
            self._fail(
                "invalid",
                f"registry file {self.path} rejected, keeping the last good routing: {exc}",
            )
            return False
        verdict = self.sink.submit(state)
        if verdict.error is not None:
            self._fail("invalid", f"registry file {self.path}: {verdict.error}", report=False)
            return False
        # Read and valid: the view is current, even if an app's switch was refused (the watcher
        # reports that; the file itself is fine).
        self._good = stamp
        self.last_contact = time.time()
        self.last_error = None
        return bool(verdict.applied)

    def _fail(self, kind: str, message: str, report: bool = True) -> None:
        if message != self.last_error:
            log.error(message)
        self.errors += 1
        self.last_error = message
        if report:
            self.sink.failed(kind, message)

    # -- Provider -------------------------------------------------------------------------------

    def prime(self) -> None:
        self.load_once()

    def reload(self) -> bool:
        return self.load_once()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            self.load_once()

    def confirmed_at(self) -> float:
        return self.last_contact

    async def close(self) -> None:
        return None

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
