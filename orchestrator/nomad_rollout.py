"""The two waits of `zerodown deploy --backend nomad` after the job is registered: `follow` the
Nomad deployment and the Consul checks until the Standby group is healthy on the new version,
then `smoke` test it through every proxy's Standby preview. Neither touches the Active group.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp

from zerodown_proxy.contract.consul import PROXY_SERVICE

from .backend import Progress, Refused
from .consul_view import ConsulView
from .hashicorp_api import NomadApi


async def follow(
    nomad: NomadApi,
    view: ConsulView,
    app: str,
    job_id: str,
    group: str,
    version: str,
    count: int,
    job_index: int,
    registered: bool,
    progress: Progress,
    timeout: float,
) -> None:
    """Until the deployment of our job version succeeded and Consul shows `count` passing
    instances of `group` on `version` (and none on another version) — or the timeout."""
    deadline = time.monotonic() + timeout
    index = 0
    last = ""
    dep_done = not registered  # nothing registered: only Consul's view matters
    while True:
        wait = min(1.0, max(0.0, deadline - time.monotonic()))
        dep, index = await nomad.deployment(job_id, index, wait)
        ours = dep is not None and int(dep.get("JobSpecModifyIndex") or 0) >= job_index
        if ours and int(dep["JobSpecModifyIndex"]) > job_index:
            # A newer registration: Nomad's auto-revert after our deployment failed, or
            # someone else. Ours tells which.
            mine = [d for d in await nomad.deployments(job_id)
                    if int(d.get("JobSpecModifyIndex") or 0) == job_index]  # fmt: skip
            if not mine or mine[0]["Status"] not in ("failed", "cancelled"):
                raise Refused(
                    f"a newer version of job {job_id} was registered while deploying "
                    f"(deployment {dep['ID'][:8]}); check 'zerodown status'"
                )
            dep = mine[0]
        state = (dep or {}).get("TaskGroups", {}).get(group, {}) if ours else {}
        if ours and dep["Status"] in ("failed", "cancelled"):
            raise Refused(
                f"Nomad deployment {dep['ID'][:8]} of {version} to group {group} "
                f"{dep['Status']}: {dep.get('StatusDescription')} "
                f"({state.get('HealthyAllocs', 0)}/{state.get('DesiredTotal', count)} "
                f"healthy, {state.get('UnhealthyAllocs', 0)} unhealthy); the Active group "
                "was not touched"
            )
        dep_done = dep_done or (ours and dep["Status"] == "successful")
        regs = [i for i in await view.registered(app) if i.group == group]
        fresh = [i for i in regs if i.version == version]
        passing = [i for i in fresh if i.checks == "passing"]
        line = (
            f"  deployment {dep['ID'][:8] if ours else '-'}: "
            f"{dep['Status'] if ours else 'pending'}, "
            f"{state.get('PlacedAllocs', 0)} placed, {state.get('HealthyAllocs', 0)} healthy "
            f"of {state.get('DesiredTotal', count)}; Consul: {len(passing)}/{count} "
            f"{group} instances on {version} passing"
            + (f", {len(regs) - len(fresh)} old still registered" if len(regs) > len(fresh) else "")
        )
        if line != last:
            progress(line)
            last = line
        if dep_done and len(passing) >= count and len(regs) == len(fresh):
            return
        if time.monotonic() > deadline:
            raise Refused(
                f"group {group} did not become healthy on {version} within {timeout:g}s "
                f"(last: {line.strip()}); the Active group was not touched"
            )


async def smoke(
    session: aiohttp.ClientSession,
    view: ConsulView,
    version: str,
    admin_token: str,
    timeout: float,
    progress: Progress,
) -> str:
    """Two answers in a row from `version` through each proxy's Standby preview."""
    proxies = [p for p in await view.proxies() if p.http]
    if not proxies:
        msg = f"smoke test skipped: no {PROXY_SERVICE} is registered in Consul"
        progress(msg)
        return msg
    if not admin_token:
        msg = ("smoke test skipped: no admin token for the Standby preview "
               "(--admin-token or ZERODOWN_ADMIN_TOKEN)")  # fmt: skip
        progress(msg)
        return msg
    headers = {"X-Zerodown-Preview": "standby", "X-Zerodown-Token": admin_token}
    for p in proxies:
        # The proxy follows Consul by itself; give it a moment to see the new instances.
        deadline = time.monotonic() + timeout
        good = 0
        last = ""
        while good < 2:
            try:
                async with session.get(
                    f"http://{p.http}/", headers=headers, timeout=aiohttp.ClientTimeout(total=5),
                ) as r:  # fmt: skip
                    await r.read()
                    got = r.headers.get("X-Backend-Version")
                    if r.status == 403:
                        raise Refused(f"smoke test: proxy {p.name} refused the admin token "
                                      "(403); check ZERODOWN_ADMIN_TOKEN")  # fmt: skip
                    ok = r.status == 200 and got == version
                    last = f"HTTP {r.status}, version {got}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                ok, last = False, f"{type(exc).__name__}: {exc}"
            good = good + 1 if ok else 0
            if good < 2 and time.monotonic() > deadline:
                raise Refused(
                    f"{version} is deployed and healthy, but the smoke test through proxy "
                    f"{p.name} ({p.http}) Standby preview failed: {last}; it is not Active, "
                    "nothing routes to it"
                )
            if not ok:
                await asyncio.sleep(0.05)
    msg = f"smoke test through {len(proxies)} proxy(ies) Standby preview: {version} answered"
    progress(msg)
    return msg
