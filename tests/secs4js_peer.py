"""secs4js (a TypeScript HSMS implementation, npm) as equipment or host in tests: a Node process
running tests/peers/secs4js/peer.mjs, driven by one JSON object per line (see that file).

`make node-peers` (a dependency of `make test`) installs it with `npm ci` from the committed
package-lock.json."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

PEER_DIR = Path(__file__).resolve().parent / "peers" / "secs4js"


class PeerError(RuntimeError):
    """The peer answered a command with an error (a T3 timeout, a closed socket, ...)."""


def _require() -> str:
    node = shutil.which("node")
    if node is None or not (PEER_DIR / "node_modules" / "secs4js").is_dir():
        pytest.fail("secs4js peer not installed: run `make node-peers` (needs node and npm)")
    return node


class Secs4js:
    def __init__(self, proc: asyncio.subprocess.Process, role: str) -> None:
        self.proc = proc
        self.role = role
        self.events: list[dict[str, Any]] = []
        self.port = 0
        self._calls: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next = 0
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, role: str, *args: str, timeout: float = 20.0) -> Secs4js:
        node = _require()
        proc = await asyncio.create_subprocess_exec(
            node, str(PEER_DIR / "peer.mjs"), role, *args,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=PEER_DIR,
        )  # fmt: skip
        peer = cls(proc, role)
        ready = await peer.wait_event("ready", timeout)
        peer.port = int(ready["port"])
        return peer

    @classmethod
    async def host(cls, version: str, device_id: int = 0) -> Secs4js:
        return await cls.start("host", "--version", version, "--device-id", str(device_id))

    @classmethod
    async def equipment(cls, port: int, device_id: int = 0, t3: float = 10.0) -> Secs4js:
        peer = await cls.start(
            "equipment", "--port", str(port), "--device-id", str(device_id), "--t3", str(t3)
        )
        await peer.wait_event("selected", 20)
        return peer

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                break
            msg = json.loads(line)
            if "id" in msg:
                fut = self._calls.pop(msg["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
            else:
                self.events.append(msg)
                self._changed.set()
        for fut in self._calls.values():
            if not fut.done():
                fut.set_exception(PeerError(f"secs4js {self.role} exited"))

    def seen(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == name]

    async def wait_event(self, name: str, timeout: float = 10.0, count: int = 1) -> dict[str, Any]:
        async def until() -> dict[str, Any]:
            while len(self.seen(name)) < count:
                if self._reader.done():
                    raise PeerError(f"secs4js {self.role} exited before {name!r}: {self.events}")
                self._changed.clear()
                await self._changed.wait()
            return self.seen(name)[count - 1]

        return await asyncio.wait_for(until(), timeout)

    async def call(self, op: str, timeout: float = 15.0, **kw: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self._next += 1
        k = self._next
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._calls[k] = fut
        self.proc.stdin.write(json.dumps({"id": k, "op": op, **kw}).encode() + b"\n")
        await self.proc.stdin.drain()
        rsp = await asyncio.wait_for(fut, timeout)
        if not rsp["ok"]:
            raise PeerError(rsp["error"])
        return rsp

    async def send(
        self, s: int, f: int, sml: str = "", w: bool = True, timeout: float = 15.0
    ) -> dict[str, Any]:
        """A primary; the reply as {s, f, sys, session, sml} (empty for no W-bit)."""
        return await self.call("send", timeout, s=s, f=f, w=w, sml=sml)

    async def received(self) -> list[int]:
        return list((await self.call("received"))["received"])

    async def stop(self) -> None:
        if self.proc.returncode is None:
            try:
                await self.call("close", timeout=5)
            except (PeerError, TimeoutError, ConnectionError):
                pass
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        await asyncio.wait([self._reader], timeout=2)
