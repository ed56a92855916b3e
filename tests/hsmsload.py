"""HSMS load for pilot and multi-app tests: raw tools from their own loopback addresses
(127.0.0.2, ...: a pilot names a tool by IP), each sending S1F1 back to back and recording which
version answered."""

from __future__ import annotations

import asyncio
import time

from .helpers import async_wait_until
from .hsmspeers import RawHost, RawTool

SOURCES = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]


def version_of(body: bytes) -> str:
    """The version (SOFTREV) in an S1F2 body L[2] <A MDLN> <A SOFTREV> (RawHost, sample app)."""
    at = 4 + body[3]  # list header (2 bytes), then MDLN's item header (2) and its text
    return body[at + 2 : at + 2 + body[at + 1]].decode()


class Load:
    """Each tool sends S1F1 back to back; every answer is recorded with the time it was sent."""

    def __init__(self, tools: list[RawTool]) -> None:
        self.tools = tools
        self.answers: list[list[tuple[float, str]]] = [[] for _ in tools]
        self.failures: list[str] = []
        self.stop = asyncio.Event()
        self.tasks = [asyncio.create_task(self._run(k, t)) for k, t in enumerate(tools)]

    async def _run(self, k: int, tool: RawTool) -> None:
        # Bounded even if the test logic breaks; generous: a scenario of several CLI commands
        # takes minutes on a loaded 2-core machine, and the load must last all of it.
        deadline = time.monotonic() + 600
        n = 0
        while not self.stop.is_set() and time.monotonic() < deadline and n < 200_000:
            n += 1
            sent = time.monotonic()
            try:
                rsp = await tool.request(1, 1, timeout=8)
            except TimeoutError:
                self.failures.append(f"tool {k}: S1F1 #{n} timed out")
                continue
            if (rsp.stype, rsp.stream, rsp.function) != (0, 1, 2):
                self.failures.append(f"tool {k}: S1F1 #{n} answered {rsp.describe()}")
                continue
            self.answers[k].append((sent, version_of(rsp.body)))

    def since(self, k: int, t: float) -> set[str]:
        return {v for sent, v in self.answers[k] if sent > t}

    async def wait_answers(self, k: int, t: float, n: int, what: str) -> None:
        await async_wait_until(
            lambda: sum(1 for sent, _ in self.answers[k] if sent > t) >= n, 60, what
        )

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks)
        assert not self.failures, self.failures[:5]


async def start_hosts(versions: list[str]) -> list[RawHost]:
    hosts = []
    for v in versions:
        h = RawHost(v)
        await h.start()
        hosts.append(h)
    return hosts


async def connect_tools(port: int, sources: list[str]) -> list[RawTool]:
    tools = []
    for src in sources:
        t = RawTool(port)
        await t.connect(src)
        assert await t.select() == 0
        tools.append(t)
    return tools
