"""Every proxy the dashboard knows of, with the Consul provider: the `zerodown-proxy` services
registered in Consul (contract/consul.py), each asked for the generation it has applied (its
admin /v1/status), as `zerodown status` asks them. With the file provider the page shows this
proxy (and a supervisor's workers) from /v1/status alone."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from ..contract.consul import PROXY_META_ADMIN, PROXY_SERVICE, parse_health
from ..contract.status import PROXY_GENERATION
from ..discovery.consul_client import ConsulClient, ConsulError

ASK_TIMEOUT = 1.0  # a proxy that does not answer within this is shown as unreachable


async def _generation(session: aiohttp.ClientSession, admin: str) -> tuple[int | None, str | None]:
    try:
        async with session.get(
            f"http://{admin}/v1/status", timeout=aiohttp.ClientTimeout(total=ASK_TIMEOUT)
        ) as r:
            body = await r.json()
        return int(body[PROXY_GENERATION]), None
    except (TimeoutError, aiohttp.ClientError, ValueError, KeyError, TypeError) as exc:
        return None, f"no status from {admin}: {type(exc).__name__} {exc}".strip()


async def consul_proxies(client: ConsulClient) -> dict[str, Any]:
    """{"proxies": [{name, admin, check, generation, error}]} or {"error": why}."""
    try:
        answer = await client.get(f"/v1/health/service/{PROXY_SERVICE}", timeout=3.0)
        entries = parse_health(answer.body)
    except (ConsulError, ValueError) as exc:
        return {"error": f"cannot list the proxies registered in Consul: {exc}"}
    found = sorted(((e, e.meta.get(PROXY_META_ADMIN)) for e in entries),
                   key=lambda x: x[0].service_id)  # fmt: skip
    async with aiohttp.ClientSession() as session:
        gens = await asyncio.gather(*(_generation(session, admin) for _, admin in found if admin))
    it = iter(gens)
    out = []
    for e, admin in found:
        gen, err = next(it) if admin else (None, "registered without an admin address")
        out.append({"name": e.service_id, "admin": admin, "check": e.status,
                    "generation": gen, "error": err})  # fmt: skip
    return {"proxies": out}
