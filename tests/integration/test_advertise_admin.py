"""A proxy registers the admin address of [proxy] advertise_admin in Consul (alone and as a
multi-worker supervisor), not its bind address."""

from __future__ import annotations

from collections.abc import Callable

from orchestrator.devstack.fakes.consul import FakeConsul

from ..helpers import ProxyProc, wait_until
from .test_consul_discovery import config, proxies  # noqa: F401  (proxies: a fixture)


def registered_admin(consul: FakeConsul) -> str:
    entries = wait_until(lambda: consul.services("zerodown-proxy"), 15, "the proxy registered")
    assert len(entries) == 1, entries
    return entries[0]["Service"]["Meta"]["admin"]


def with_advertise(cfg: str, value: str) -> str:
    return cfg.replace("[proxy]\n", f'[proxy]\nadvertise_admin = "{value}"\n', 1)


def test_advertise_admin_is_what_the_proxy_registers(
    consul: FakeConsul,
    proxies: Callable[..., ProxyProc],  # noqa: F811
) -> None:
    p = proxies(with_advertise(config(consul), "proxy-b.fab.example"))
    assert registered_admin(consul) == f"proxy-b.fab.example:{p.admin}"


def test_a_supervisor_advertises_it_for_all_its_workers(
    consul: FakeConsul,
    proxies: Callable[..., ProxyProc],  # noqa: F811
) -> None:
    proxies(with_advertise(config(consul, workers=2), "10.1.2.3:9081"), "multi")
    assert registered_admin(consul) == "10.1.2.3:9081"
