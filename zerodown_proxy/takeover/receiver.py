"""The new process's side of a takeover (it runs when wire.ENV names a donor's channel).

`connect()` gets the listening sockets by name before anything else starts (the server serves on
them instead of binding); `ready(server)` waits until this process routes at least the generation
the donor had (bounded), says "ready", then adopts the tool connections as they come (tools.py).
A failure before "ready" is reported to the donor (`fail`), which then keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any

from . import wire
from .tools import AdoptedToolLink

if TYPE_CHECKING:
    from ..routing import Router
    from ..server import ProxyServer

log = logging.getLogger("zerodown.takeover")

CONNECT_TIMEOUT = 10.0
ROUTING_TIMEOUT = 10.0


def channel_path() -> str | None:
    """The donor's channel, taken out of the environment (children must not inherit it)."""
    return os.environ.pop(wire.ENV, None) or None


async def routed(router: Router, generation: int, timeout: float, reload: Any = None) -> bool:
    """Wait until `router` applied `generation` (asking the provider to read now, if it can)."""
    if router.snapshot.generation >= generation:
        return True
    if reload is not None:
        try:
            reload()
        except LookupError:
            pass
    deadline = time.monotonic() + timeout
    while router.current().generation < generation:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


class Receiver:
    def __init__(self, path: str) -> None:
        self.path = path
        self.ch: wire.Channel | None = None
        self.generation = 0
        self.adopted = 0
        self.task: asyncio.Task[None] | None = None

    async def connect(self) -> dict[str, socket.socket]:
        """The donor's listening sockets by name."""
        ch = self.ch = await asyncio.to_thread(wire.Channel.connect, self.path, CONNECT_TIMEOUT)
        msg, socks = await asyncio.to_thread(wire.receive_listeners, ch)
        self.generation = int(msg.get("generation") or 0)
        self.extra = msg
        return socks

    def close(self) -> None:
        """Stopping: unblock a read still waiting for the old process."""
        if self.ch is not None:
            try:
                self.ch.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def fail(self, reason: str) -> None:
        if self.ch is not None:
            try:
                self.ch.send({"t": "failed", "reason": reason})
            except wire.ChannelError:
                pass
            self.ch.close()
            self.ch = None

    async def caught_up(self, server: ProxyServer) -> None:
        """Before serving: routing at least as recent as the donor's (bounded)."""
        if not await routed(server.router, self.generation, ROUTING_TIMEOUT, server.watcher.reload):
            raise wire.ChannelError(
                f"routing generation {self.generation} not applied within {ROUTING_TIMEOUT:g}s"
            )

    async def ready(self, server: ProxyServer) -> None:
        """Say "ready" (serving); tool connections are adopted from a task."""
        assert self.ch is not None
        self.ch.send({"t": "ready", "pid": os.getpid()})
        self.task = asyncio.get_running_loop().create_task(self._adopt_all(server))

    async def _adopt_all(self, server: ProxyServer) -> None:
        ch = self.ch
        assert ch is not None
        ch.sock.settimeout(None)  # the donor may drain for T3 before the first tool
        loop = asyncio.get_running_loop()
        try:
            while True:
                msg, fds = await asyncio.to_thread(ch.recv)
                kind = msg.get("t")
                if kind == "done":
                    ch.send({"t": "bye"})
                    break
                if kind != "tool" or len(fds) != 1:
                    for fd in fds:
                        os.close(fd)
                    log.error("takeover: unexpected message %r; ignored", kind)
                    continue
                await self._adopt(server, loop, msg, fds[0])
        except wire.ChannelError as exc:
            log.error("takeover: channel to the old process lost: %s", exc)
        finally:
            ch.close()
            self.ch = None
        log.info("takeover complete: %d tool connections adopted", self.adopted,
                 extra={"fields": {"event": "takeover_adopted", "tools": self.adopted}})  # fmt: skip

    async def _adopt(
        self, server: ProxyServer, loop: asyncio.AbstractEventLoop, msg: dict[str, Any], fd: int
    ) -> None:
        sock = socket.socket(fileno=fd)
        state = msg.get("state") or {}
        hsms = server.hsms
        if hsms is None:
            log.error("tool %s handed over but HSMS is disabled here; closing it",
                      state.get("peer"))  # fmt: skip
            sock.close()
            return
        gen = int(state.get("generation") or 0)
        if not await routed(server.router, gen, hsms.cfg.t3, server.watcher.reload):
            log.warning("tool %s: generation %d not applied yet; continuing", state.get("peer"),
                        gen)  # fmt: skip
        blob = msg.get("blob") or b""
        sock.setblocking(False)
        await loop.connect_accepted_socket(lambda: AdoptedToolLink(hsms, state, blob), sock)
        self.adopted += 1
