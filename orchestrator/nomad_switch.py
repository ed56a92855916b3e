"""The switch of a Nomad + Consul release: check the target group, CAS the Active key, wait.

The target (the other group, or the one asked for) must be complete (as many registered
instances as its Nomad Count, or as registered when Nomad cannot be asked), every instance
passing in Consul and answering /health directly, all on one version. Then one CAS write of
`<key_prefix>/<app>/active` at the index it was read at; its new ModifyIndex is the routing
generation every live proxy must report before the switch counts as done. The group switched
away from is recorded in `<key_prefix>/<app>/previous` for rollback. Lock and audit stay with
the caller (release_nomad.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson

from zerodown_proxy.contract.consul import PROXY_SERVICE, Keys

from . import jobspec
from .backend import Progress, Refused, SwitchOutcome
from .consul_view import ConsulView
from .hashicorp_api import ApiError, ConsulApi, NomadApi
from .nomad_settings import Settings
from .probes import probe_http, wait_proxies


async def switch_active(
    session: aiohttp.ClientSession,
    nomad: NomadApi,
    consul: ConsulApi,
    view: ConsulView,
    s: Settings,
    keys: Keys,
    job_id: str,
    app: str,
    to_group: str | None,
    progress: Progress,
    entry: dict[str, Any],
    confirm: Callable[[str], Awaitable[None]],
) -> SwitchOutcome:
    """Switch `app` to `to_group` (None: the other group); `entry` gathers the audit fields.
    `confirm(verb)` runs right before the write (still holding the release lock?)."""
    instances = await view.registered(app)
    active, read_index = await view.active(app)
    entry["from"] = active
    groups = sorted({i.group for i in instances} | {active})
    expected: int | None = None
    counts: dict[str, int] = {}
    try:  # Nomad is only asked how many instances to expect; a switch must not need it
        if s.nomad_addr:
            job = await nomad.job(job_id)
            groups = jobspec.group_names(job)
            counts = {g: int(jobspec.task_group(job, g).get("Count") or 0) for g in groups}
    except ApiError as exc:
        progress(f"warning: {exc}; judging the target group from Consul alone")
    target = to_group or next((g for g in groups if g != active), None)
    entry["to"] = target
    if target is None or target not in groups:
        raise Refused(f"app {app} has no group {target} (groups: {', '.join(groups)})")
    if target == active:
        raise Refused(f"group {target} is already Active for {app}; nothing to switch")
    expected = counts.get(target)
    members = [i for i in instances if i.group == target]
    probes = await asyncio.gather(*(probe_http(session, i.address, i.http_port) for i in members))
    bad = [
        f"{i.id}: {p.removeprefix('error: ')}" if p != "ok" else f"{i.id}: Consul {i.checks}"
        for i, p in zip(members, probes, strict=True)
        if p != "ok" or i.checks != "passing"
    ]
    want = expected if expected is not None else len(members)
    ok = len(members) - len(bad)
    if bad or not members or len(members) < want:
        missing = [f"{want - len(members)} of {want} not registered"] if len(members) < want else []
        raise Refused(
            f"Standby group {target} has {ok}/{want} passing instances "
            f"({'; '.join(missing + bad) or 'no instances'}); not switching."
        )
    versions = sorted({i.version for i in members})
    if len(versions) > 1:
        raise Refused(f"group {target} runs mixed versions {', '.join(versions)} (a deploy "
                      "in progress?); not switching.")  # fmt: skip
    from_version = ",".join(sorted({i.version for i in instances if i.group == active})) or None
    to_version = versions[0]
    entry.update({"from_version": from_version, "to_version": to_version})
    key = keys.active(app)
    await confirm("switching")
    if not await consul.kv_put(key, target, cas=read_index):
        raise Refused(
            f"someone else switched {app} (Consul key {key} changed since it was read at "
            f"index {read_index}); not retrying — check 'zerodown status'"
        )
    written = time.perf_counter()
    got = await consul.kv_get(key)
    if got is None or got[0].decode(errors="replace").strip() != target:
        raise Refused(f"Consul key {key} changed again right after the switch; "
                      "check 'zerodown status'")  # fmt: skip
    generation = got[1]
    entry["generation"] = generation
    progress(f"switched {app}: {active} ({from_version}) -> {target} ({to_version}), "
             f"generation {generation}")  # fmt: skip
    previous = {"group": active, "version": from_version, "generation": generation}
    try:
        await consul.kv_put(keys.previous(app), orjson.dumps(previous))
    except Refused as exc:
        progress(f"warning: could not record the previous group for rollback: {exc}")
    from .pilot import consul_clear  # the pilots are on `target` already; everyone joins them

    if await consul_clear(consul, keys.pilots(app), progress):
        entry["pilots_cleared"] = True
    proxies = await view.proxies()
    for p in proxies:
        if p.critical:  # a dead proxy serves nobody; waiting for it would only time out
            progress(f"warning: proxy {p.name} ({p.admin}) is critical in Consul (not "
                     "heartbeating: crashed or hung); not waiting for it")  # fmt: skip
    proxies = [p for p in proxies if not p.critical]
    if not proxies:
        progress(f"warning: no live {PROXY_SERVICE} is registered in Consul; nobody to wait for")
    progress(f"waiting for {len(proxies)} proxy(ies) to apply generation {generation}")
    await wait_proxies(session, [(p.name, p.admin) for p in proxies], generation,
                       s.proxy_timeout)  # fmt: skip
    took = time.perf_counter() - written
    entry.update({"propagation_ms": round(took * 1000, 2), "proxies": len(proxies)})
    return SwitchOutcome(app, active, target, from_version, to_version, generation, took,
                         len(proxies))  # fmt: skip
