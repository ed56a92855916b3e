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


class HeldProxy:
    """A fake proxy admin API whose /v1/status does not report a new generation (read from
    `generation()`) until the test lets it (`release()`), or MAX_HOLD s after it first saw it
    (under the switch's 10 s proxy timeout): a switch stays in its last wait, holding the
    release lock, as long as the test needs."""

    MAX_HOLD = 8.0

    def __init__(self, generation: Callable[[], int]) -> None:
        import http.server
        import threading

        seen: dict[int, float] = {}
        self.released = threading.Event()
        released, hold = self.released, self.MAX_HOLD

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                now = time.monotonic()
                gen = generation()
                seen.setdefault(gen, now)
                if released.is_set():
                    shown = gen
                else:
                    shown = max((g for g, t in seen.items() if now - t >= hold), default=0)
                body = orjson.dumps({"generation": shown})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port: int = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def release(self) -> None:
        self.released.set()

    def hold(self) -> None:
        self.released.clear()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
