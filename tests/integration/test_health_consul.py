"""Consul mode: Consul's checks decide what is registered and passing; the proxy's own checks
are added on top (an instance Consul calls passing that does not answer is still avoided)."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

from orchestrator.devstack.fakes.consul import FakeConsul

from ..helpers import ProxyProc, SampleApp, wait_until
from .test_consul_discovery import KEY, config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_consul_passing_but_not_answering_is_avoided(consul: FakeConsul, tmp_path: Path) -> None:
    live = SampleApp(tmp_path, "blue-1", "v1")
    dead = _free_port()
    tags = ["zerodown-group=blue", "zerodown-version=v1"]
    consul.register("drimeap-blue-1", "drimeap", "127.0.0.1", live.port, tags=tags)
    consul.register("drimeap-blue-2", "drimeap", "127.0.0.1", dead, tags=tags)
    gen = consul.kv_set(KEY, "blue")
    cfg = config(consul) + "[health_check]\ninterval = 0.2\ntimeout = 0.5\n"
    proxy = ProxyProc(tmp_path, tmp_path / "unused.json", cfg)
    try:
        proxy.wait_generation(gen, 15)

        def dead_instance() -> dict:
            insts = proxy.status()["apps"]["drimeap"]["active"]["instances"]
            return next(i for i in insts if i["http_port"] == dead)

        wait_until(lambda: (dead_instance()["check"] or {}).get("status") == "down", 15,
                   "the proxy's own check to mark the dead instance down")  # fmt: skip
        st = dead_instance()
        assert st["healthy"] is True  # Consul's view, kept beside the proxy's own
        assert "connect failed" in st["check"]["last"]
        for _ in range(10):
            with urllib.request.urlopen(f"http://127.0.0.1:{proxy.http}/", timeout=5) as r:
                assert r.headers["X-Backend-Instance"] == "blue-1"
        # Consul marks it critical: it leaves the routing, and the proxy stops probing it.
        consul.set_check("drimeap-blue-2", "critical")
        wait_until(lambda: len(proxy.status()["apps"]["drimeap"]["active"]["instances"]) == 1,
                   15, "Consul's verdict to remove it")  # fmt: skip
        assert proxy.status()["health_check"]["instances"] == 1
    finally:
        proxy.terminate()
        live.terminate()
