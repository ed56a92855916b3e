"""Direct checks the CLI makes itself: an instance's /health, and a proxy's applied generation."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import aiohttp

from .backend import ProxyStatus, Refused, ToolSession


async def probe_http(
    session: aiohttp.ClientSession, address: str, port: int, timeout: float = 2.0
) -> str:
    """GET /health on an instance: "ok" or "error: <why>"."""
    url = f"http://{address}:{port}/health"
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            await r.read()
            return "ok" if r.status == 200 else f"error: /health answered {r.status}"
    except aiohttp.ClientConnectorError as exc:
        return f"error: {exc.os_error.strerror if exc.os_error else exc}".lower()
    except TimeoutError:
        return f"error: no answer within {timeout:g}s"
    except aiohttp.ClientError as exc:
        return f"error: {exc}"


async def proxy_generation(
    session: aiohttp.ClientSession, admin: str, timeout: float = 2.0
) -> tuple[int | None, str | None]:
    """The generation a proxy reports at admin /v1/status, or (None, error)."""
    gen, err, _ = await proxy_view(session, admin, timeout)
    return gen, err


async def proxy_view(
    session: aiohttp.ClientSession, admin: str, timeout: float = 2.0
) -> tuple[int | None, str | None, list[ToolSession]]:
    """(generation, error, HSMS tool sessions) from a proxy's admin /v1/status."""
    try:
        async with session.get(
            f"http://{admin}/v1/status", timeout=aiohttp.ClientTimeout(total=timeout)
        ) as r:
            if r.status != 200:
                return None, f"admin answered {r.status}", []
            body = await r.json()
            return int(body["generation"]), None, _tools(body)
    except (TimeoutError, aiohttp.ClientError, KeyError, ValueError) as exc:
        return None, f"unreachable: {exc or type(exc).__name__}", []


def _tools(body: dict) -> list[ToolSession]:  # type: ignore[type-arg]
    sessions = (body.get("hsms") or {}).get("sessions") or []
    out = []
    for s in sessions if isinstance(sessions, list) else []:
        if not isinstance(s, dict):
            continue
        b = s.get("backend") or {}
        out.append(ToolSession(str(s.get("tool")), s.get("app"), b.get("group"),
                               b.get("version"), bool(s.get("pilot"))))  # fmt: skip
    return out


async def proxy_switch_blocked(
    session: aiohttp.ClientSession, admin: str, timeout: float = 5.0
) -> str | None:
    """Why a multi-worker proxy holds a switch back (its supervisor's `switch.blocked`), if it
    says so."""
    try:
        async with session.get(
            f"http://{admin}/v1/status", timeout=aiohttp.ClientTimeout(total=timeout)
        ) as r:
            body = await r.json()
        blocked = (body.get("switch") or {}).get("blocked")
        return str(blocked) if blocked else None
    except (TimeoutError, aiohttp.ClientError, ValueError, AttributeError):
        return None


async def proxy_statuses(
    session: aiohttp.ClientSession, proxies: Sequence[tuple[str, str]], generation: int
) -> list[ProxyStatus]:
    results = await asyncio.gather(*(proxy_view(session, admin) for _, admin in proxies))
    return [
        ProxyStatus(
            name=n,
            admin=a,
            generation=g,
            in_sync=g is not None and g >= generation,
            error=e,
            tools=t,
        )  # fmt: skip
        for (n, a), (g, e, t) in zip(proxies, results, strict=True)
    ]


async def wait_proxies(
    session: aiohttp.ClientSession,
    proxies: Sequence[tuple[str, str]],
    generation: int,
    timeout: float = 10.0,
    interval: float = 0.005,
) -> float:
    """Poll every proxy until all report `generation` (or newer). Returns seconds waited.
    Raises Refused naming the proxies that did not follow."""
    start = time.perf_counter()
    pending = list(proxies)
    while True:
        results = await asyncio.gather(*(proxy_generation(session, a) for _, a in pending))
        pending = [
            p for p, (g, _) in zip(pending, results, strict=True) if g is None or g < generation
        ]
        if not pending:
            return time.perf_counter() - start
        if time.perf_counter() - start > timeout:
            names = ", ".join(f"{n} ({a})" for n, a in pending)
            why = await asyncio.gather(*(proxy_switch_blocked(session, a) for _, a in pending))
            reasons = "".join(f"; {n}: {w}" for (n, _), w in zip(pending, why, strict=True) if w)
            raise Refused(
                f"generation {generation} was written, but {len(pending)} proxy(ies) did not "
                f"apply it within {timeout:g}s: {names}{reasons}"
            )
        await asyncio.sleep(interval)
