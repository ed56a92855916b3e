from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from orchestrator.devstack.sample_app import make_app

from .fake_agents import consul, nomad_stack  # noqa: F401  (fixtures: FakeConsul, + FakeNomad)
from .helpers import ProxyProc, SampleApp


@pytest.fixture
def start_proxy(tmp_path: Path) -> Iterator[Callable[..., ProxyProc]]:
    """Start proxy processes on ephemeral ports; each is stopped (SIGTERM) at teardown."""
    procs: list[ProxyProc] = []

    def start(
        registry_path: Path | None = None, config: str = "", name: str = "proxy"
    ) -> ProxyProc:
        p = ProxyProc(tmp_path, registry_path or tmp_path / "registry.json", config, name)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.terminate()


@pytest.fixture
async def backend_factory() -> AsyncIterator[Callable[..., Any]]:
    """In-process sample-app HTTP backends on 127.0.0.1:0 (aiohttp), cleaned up after."""
    runners: list[web.AppRunner] = []

    async def start(version: str, iid: str, app: web.Application | None = None) -> int:
        runner = web.AppRunner(app or make_app(version, iid), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        return site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    yield start
    await asyncio.gather(*(r.cleanup() for r in runners))


@pytest.fixture
def sample_app(tmp_path: Path) -> Iterator[Callable[..., SampleApp]]:
    """Start `zerodown sample-app` processes; all are stopped at teardown."""
    procs: list[SampleApp] = []

    def start(iid: str, version: str, hsms: bool = False) -> SampleApp:
        p = SampleApp(tmp_path, iid, version, hsms)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.terminate()
