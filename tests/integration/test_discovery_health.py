"""Issue 9 section 4, first bullet, through a real proxy process and a file registry: a provider
never stops routing silently. A registry that breaks a rule is refused (last_error, metric),
the proxy keeps the last good routing and keeps following the file, and /health says when
discovery is stale and why."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from ..helpers import ProxyProc, instance, registry, wait_until, write_registry

TOKEN = "test-token"


def config(registry_path: Path, stale_after: float) -> str:
    return "\n".join(
        [
            "[proxy]",
            'http_listen = "127.0.0.1:0"',
            'admin_listen = "127.0.0.1:0"',
            f'admin_token = "{TOKEN}"',
            "shutdown_grace = 2.0",
            "[hsms]",
            "enabled = false",
            "[discovery]",
            f'file = "{registry_path}"',
            "poll_interval = 0.01",
            f"stale_after = {stale_after}",
            "",
        ]
    )


def get(proxy: ProxyProc, path: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{proxy.admin}{path}", timeout=5) as r:
            body = r.read()
            return r.status, orjson.loads(body) if path != "/metrics" else body.decode()
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read())


def version_of(proxy: ProxyProc) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{proxy.http}/", timeout=5) as r:
        return r.headers["X-Backend-Version"]


@pytest.fixture
def world(tmp_path: Path, sample_app: Callable[..., Any]) -> tuple[Path, list[dict[str, Any]]]:
    insts = []
    for group, version in (("blue", "v1"), ("green", "v2")):
        app = sample_app(f"drimeap-{group}-1", version)
        insts.append(instance(f"drimeap-{group}-1", group, version, app.port))
    reg = tmp_path / "registry.json"
    write_registry(reg, registry(1, "blue", insts))
    return reg, insts


def bad_apps(insts: list[dict[str, Any]], target: str) -> list[tuple[dict[str, Any], str]]:
    """(app fields, expected reason): each switches to `target` and breaks one rule."""
    broken = [{**i, "healthy": "false"} if i["group"] == target else dict(i) for i in insts]
    return [
        ({"active": target, "instances": insts, "hosts": 5}, "'hosts' must be a list"),
        ({"active": target, "instances": insts, "path_prefix": 5}, "path_prefix must be a path"),
        # "false" (a string) used to count as healthy: a switch to a dead group
        ({"active": target, "instances": broken}, "'healthy' must be true or false"),
        # used to be accepted, then closed every tool's connection (struct.error)
        ({"active": target, "instances": insts, "hsms_device_id": 99999},
         "hsms_device_id must be an integer"),
    ]  # fmt: skip


def test_a_broken_registry_is_refused_and_a_later_switch_still_applies(
    world: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    reg, insts = world
    proxy = ProxyProc(tmp_path, reg, config(reg, 0), "proxy")
    versions = {"blue": "v1", "green": "v2"}
    try:
        proxy.wait_generation(1, timeout=10)
        active, generation = "blue", 1
        for n in range(4):
            target = "green" if active == "blue" else "blue"
            app, message = bad_apps(insts, target)[n]
            write_registry(reg, {"generation": generation + 1, "apps": {"drimeap": app}})
            st = wait_until(lambda m=message: m in ((s := proxy.status())["last_error"] or "")
                            and s, 10, "the refusal to be reported")  # fmt: skip
            assert st["generation"] == generation
            assert st["apps"]["drimeap"]["active"]["group"] == active
            assert message in st["discovery"]["last_error"]
            assert version_of(proxy) == versions[active]  # the last good routing serves on
            _, metrics = get(proxy, "/metrics")
            assert f'zerodown_discovery_errors_total{{kind="invalid"}} {n + 1}' in metrics
            # ... and the provider is still following the file: a valid switch applies.
            generation += 2
            write_registry(reg, registry(generation, target, insts))
            st = proxy.wait_generation(generation, timeout=10)
            assert st["apps"]["drimeap"]["active"]["group"] == target and not st["last_error"]
            assert version_of(proxy) == versions[target]
            assert get(proxy, "/health")[0] == 200
            active = target
    finally:
        proxy.terminate()


def test_health_reports_stale_discovery_with_the_reason(
    world: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    reg, insts = world
    proxy = ProxyProc(tmp_path, reg, config(reg, 1.0), "stale")
    try:
        proxy.wait_generation(1, timeout=10)
        code, body = get(proxy, "/health")
        assert code == 200 and body["status"] == "ok" and body["discovery_age_s"] < 1.0
        reg.write_bytes(b'{"generation": 2, "apps": {"drimeap": {"active": "gr')  # torn
        code, body = wait_until(lambda: (r := get(proxy, "/health"))[0] == 503 and r, 10, "stale")
        assert body["status"] == "stale" and body["generation"] == 1
        assert "has not confirmed its view" in body["reason"] and "stale_after 1s" in body["reason"]
        assert "not valid JSON" in body["reason"]  # says why: the file's own error
        assert version_of(proxy) == "v1"  # stale is not down: the last good routing serves on
        _, metrics = get(proxy, "/metrics")
        assert "zerodown_discovery_stale 1" in metrics
        write_registry(reg, registry(3, "green", insts))
        proxy.wait_generation(3, timeout=10)
        code, body = wait_until(lambda: (r := get(proxy, "/health"))[0] == 200 and r, 10, "ok")
        assert body["status"] == "ok" and "last_error" not in body
        reg.unlink()  # a registry that vanishes is stale too, after stale_after
        code, body = wait_until(lambda: (r := get(proxy, "/health"))[0] == 503 and r, 10, "gone")
        assert "does not exist" in body["reason"]
    finally:
        proxy.terminate()
