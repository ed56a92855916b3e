"""Release backend for production: backends scheduled by Nomad, registered in Consul, the Active
group chosen by the Consul KV key `zerodown/<app>/active` (DESIGN.md, "Data model in Consul").

- deploy: read the job as JSON, change only the Standby task group (jobspec.with_version), ask
  Nomad's plan whether any other group would be touched (refuse if so), register with
  EnforceIndex, follow the deployment and the Consul checks, smoke-test through a proxy's
  Standby preview.
- switch: the Standby group must be complete and healthy (Consul checks and a direct /health),
  then one CAS write of the KV key; the new ModifyIndex is the routing generation every proxy
  must report at its admin /v1/status.
- rollback: switch back to the group recorded in `zerodown/<app>/previous`, if it still runs
  the version it ran then and is healthy.
Every deploy and switch (refused ones too) is appended to `zerodown/<app>/history/<ns>` in
Consul and to the local history.jsonl.
deploy, switch and rollback hold the release lock, a Consul session lock on
`zerodown/<app>/lock`, for their whole run (release_lock.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from . import audit, jobspec
from .backend import (
    AppStatus,
    GroupStatus,
    InstanceStatus,
    Progress,
    Refused,
    SwitchOutcome,
)
from .hashicorp_api import ApiError, ConsulApi, NomadApi, env_settings
from .probes import probe_http, proxy_statuses, wait_proxies
from .release_lock import ConsulReleaseLock, LockBusy, held
from .versions import check_version

_ALLOC_IN_ID = re.compile(
    r"_nomad-task-([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})"
)
PROXY_SERVICE = "zerodown-proxy"


@dataclass(frozen=True, slots=True)
class Settings:
    nomad_addr: str
    consul_addr: str
    nomad_token: str = ""
    nomad_cacert: str = ""
    consul_token: str = ""
    consul_cacert: str = ""
    job: str | None = None
    admin_token: str = ""
    audit_log: Path | None = None
    key_prefix: str = "zerodown"
    deploy_timeout: float = 300.0
    proxy_timeout: float = 10.0
    smoke_timeout: float = 10.0
    lock_ttl: float = ConsulReleaseLock.TTL  # the release lock's Consul session TTL


@dataclass(frozen=True, slots=True)
class Instance:
    """One allocation as Consul sees it: its HTTP service and (if any) its HSMS service."""

    id: str
    group: str
    version: str
    address: str
    http_port: int
    hsms_port: int | None
    registered: str  # worst check status over both services
    alloc: str | None = None  # Nomad allocation id, when Nomad registered it


@dataclass(frozen=True, slots=True)
class Proxy:
    name: str
    admin: str
    http: str | None  # host:port of its HTTP listener, for the preview smoke test
    critical: bool = False  # its TTL check is critical: crashed or hung, not routing anything


def _tag(tags: list[str], prefix: str) -> str | None:
    for t in tags:
        if t.startswith(prefix):
            return t[len(prefix) :]
    return None


def _worst(statuses: list[str]) -> str:
    for s in ("critical", "warning", "passing"):
        if s in statuses:
            return s
    return "unknown"


def _checks_status(entry: dict[str, Any]) -> str:
    return _worst([c.get("Status", "unknown") for c in entry.get("Checks") or []])


def _join_keys(svc: dict[str, Any]) -> list[str]:
    """How the HTTP and HSMS services of one instance are recognised — the same order as the
    proxy's Consul provider: Meta zerodown-instance, the Nomad allocation id, then the id."""
    keys = []
    if (svc.get("Meta") or {}).get("zerodown-instance"):
        keys.append("meta:" + svc["Meta"]["zerodown-instance"])
    m = _ALLOC_IN_ID.search(svc["ID"])
    if m:
        keys.append("alloc:" + m.group(1))
    return keys


def _instances(http: list[dict], hsms: list[dict]) -> list[Instance]:
    """Pair each `<app>` registration with the `<app>-hsms` one of the same instance."""
    by_key: dict[str, dict] = {}
    for e in hsms:
        for k in [*_join_keys(e["Service"]), "id:" + e["Service"]["ID"]]:
            by_key.setdefault(k, e)
    out = []
    for e in http:
        svc = e["Service"]
        tags = svc.get("Tags") or []
        group = _tag(tags, jobspec.GROUP_TAG)
        if group is None:
            continue
        keys = [*_join_keys(svc), "id:" + svc["ID"] + "-hsms"]
        twin = next((by_key[k] for k in keys if k in by_key), None)
        statuses = [_checks_status(e)] + ([_checks_status(twin)] if twin else [])
        m = _ALLOC_IN_ID.search(svc["ID"])
        out.append(
            Instance(
                id=m.group(1)[:8] + f"-{group}" if m else svc["ID"],
                group=group,
                version=_tag(tags, jobspec.VERSION_TAG) or "?",
                address=svc.get("Address") or e["Node"]["Address"],
                http_port=int(svc["Port"]),
                hsms_port=int(twin["Service"]["Port"]) if twin else None,
                registered=_worst(statuses),
                alloc=m.group(1) if m else None,
            )
        )
    return sorted(out, key=lambda i: (i.group, i.id))


def _unregistered(
    allocs: list[dict[str, Any]], instances: list[Instance], group: str
) -> list[InstanceStatus]:
    """Allocations Nomad wants running in `group` that have no service in Consul (failed,
    pending, or restarting): shown as critical, so `status` counts them as not healthy."""
    newest: dict[str, dict[str, Any]] = {}
    for a in allocs:
        if a.get("TaskGroup") != group or a.get("DesiredStatus") != "run":
            continue
        if a["Name"] not in newest or a["CreateIndex"] > newest[a["Name"]]["CreateIndex"]:
            newest[a["Name"]] = a
    known = {i.alloc for i in instances if i.alloc}
    return [
        InstanceStatus(
            id=f"{a['ID'][:8]}-{group}",
            group=group,
            version="?",
            address="",
            http_port=0,
            hsms_port=None,
            registered="critical",
            probe=f"error: not registered in Consul (allocation {a.get('ClientStatus')})",
        )
        for a in sorted(newest.values(), key=lambda a: a["Name"])
        if a["ID"] not in known
    ]


class NomadConsulBackend:
    name = "nomad"

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self._held: ConsulReleaseLock | None = None

    @classmethod
    def from_env(cls, args: argparse.Namespace) -> NomadConsulBackend:
        env = env_settings()
        state_dir = getattr(args, "state_dir", None) or os.environ.get("ZERODOWN_STATE_DIR")
        timeout = os.environ.get("ZERODOWN_DEPLOY_TIMEOUT", "300")
        try:
            deploy_timeout = float(timeout)
        except ValueError:
            raise Refused(f"ZERODOWN_DEPLOY_TIMEOUT must be seconds, got {timeout!r}") from None
        return cls(
            Settings(
                **env,
                job=getattr(args, "job", None),
                admin_token=getattr(args, "admin_token", None)
                or os.environ.get("ZERODOWN_ADMIN_TOKEN", ""),
                audit_log=Path(state_dir or ".zerodown").resolve() / "history.jsonl",
                deploy_timeout=deploy_timeout,
            )
        )

    # -- plumbing -----------------------------------------------------------------------------

    @asynccontextmanager
    async def _clients(self) -> AsyncIterator[tuple[aiohttp.ClientSession, NomadApi, ConsulApi]]:
        async with aiohttp.ClientSession() as session:
            nomad = NomadApi(session, self.s.nomad_addr, self.s.nomad_token, self.s.nomad_cacert)
            consul = ConsulApi(
                session, self.s.consul_addr, self.s.consul_token, self.s.consul_cacert
            )
            yield session, nomad, consul

    def _key(self, app: str, name: str) -> str:
        return f"{self.s.key_prefix}/{app}/{name}"

    def _job_id(self, app: str) -> str:
        return self.s.job or app

    async def _audit(
        self, consul: ConsulApi, app: str, entry: dict[str, Any], progress: Progress
    ) -> None:
        record = audit.record(self.name, app, entry)
        ns = record["time_ns"]
        data = orjson.dumps(record)
        if self.s.audit_log is not None:
            audit.append_local(self.s.audit_log, record, progress)
        try:
            await consul.kv_put(self._key(app, f"history/{ns}"), data)
        except Refused as exc:
            progress(f"warning: audit entry not written to Consul: {exc}")

    @asynccontextmanager
    async def _locked(
        self, consul: ConsulApi, app: str, entry: dict[str, Any], verb: str, progress: Progress
    ) -> AsyncIterator[None]:
        """The release lock for the whole action; a refusal to take it is audited."""

        async def busy(exc: Refused) -> None:
            holder = exc.holder if isinstance(exc, LockBusy) else None
            await self._audit(consul, app, {**entry, "result": "refused", "reason": str(exc),
                              "holder": holder.to_dict() if holder else None}, progress)  # fmt: skip

        lock = ConsulReleaseLock(consul, self._key(app, "lock"), self.s.lock_ttl)
        async with held(lock, entry["action"], verb, progress, busy):
            self._held = lock
            try:
                yield
            finally:
                self._held = None

    async def _confirm(self, verb: str) -> None:
        """Right before a write: still holding the release lock?"""
        if self._held is not None:
            await self._held.confirm(verb)

    async def _active(
        self, consul: ConsulApi, app: str, instances: list[Instance]
    ) -> tuple[str, int]:
        """(Active group, ModifyIndex of the key — 0 when it is absent)."""
        got = await consul.kv_get(self._key(app, "active"))
        if got is not None:
            value = got[0].decode(errors="replace").strip()
            if not value:
                raise Refused(f"Consul key {self._key(app, 'active')} is empty; set it to a group")
            return value, got[1]
        # Old stack compatibility: instances tagged `active` are Active.
        http = await consul.health(app, tag="active")
        groups = {_tag(e["Service"].get("Tags") or [], jobspec.GROUP_TAG) for e in http}
        groups.discard(None)
        if len(groups) == 1:
            return str(groups.pop()), 0
        known = ", ".join(sorted({i.group for i in instances})) or "none registered"
        raise Refused(
            f"no Active group for {app}: Consul key {self._key(app, 'active')} is absent and no "
            f"instance is tagged active (groups: {known}); set it, e.g. `consul kv put "
            f"{self._key(app, 'active')} blue`"
        )

    async def _registered(self, consul: ConsulApi, app: str) -> list[Instance]:
        http, hsms = await asyncio.gather(consul.health(app), consul.health(f"{app}-hsms"))
        return _instances(http, hsms)

    async def _proxies(self, consul: ConsulApi) -> list[Proxy]:
        out = []
        for e in await consul.health(PROXY_SERVICE):
            svc = e["Service"]
            meta = svc.get("Meta") or {}
            admin = meta.get("admin")
            if not admin:
                continue
            addr = svc.get("Address") or e["Node"]["Address"]
            http = meta.get("http") or (f"{addr}:{svc['Port']}" if svc.get("Port") else None)
            critical = any(c.get("Status") == "critical" for c in e.get("Checks") or ())
            out.append(Proxy(svc["ID"], admin, http, critical))
        return sorted(out, key=lambda p: p.name)

    @staticmethod
    def _other(groups: list[str], active: str, job_id: str) -> str:
        others = [g for g in groups if g != active]
        if active not in groups:
            raise Refused(
                f"the Active group {active} is not a task group of job {job_id} "
                f"(groups: {', '.join(groups)})"
            )
        if len(others) != 1:
            raise Refused(
                f"job {job_id} must have exactly two task groups for blue/green, "
                f"has {', '.join(groups)}"
            )
        return others[0]

    async def history(self, app: str) -> list[dict[str, Any]]:
        """The audit trail every operator's commands left in Consul, oldest first."""
        async with self._clients() as (_session, _nomad, consul):
            entries = await consul.kv_list(self._key(app, "history/"))
        return audit.from_kv(entries)

    # -- status -------------------------------------------------------------------------------

    async def status(self, app: str) -> AppStatus:
        job_id = self._job_id(app)
        async with self._clients() as (session, nomad, consul):
            job, instances, allocs = await asyncio.gather(
                nomad.job(job_id), self._registered(consul, app), nomad.allocations(job_id)
            )
            active, generation = await self._active(consul, app, instances)
            groups = jobspec.group_names(job)
            standby = self._other(groups, active, job_id)
            probes = await asyncio.gather(
                *(probe_http(session, i.address, i.http_port) for i in instances)
            )
            proxies = await self._proxies(consul)
            pstat = await proxy_statuses(session, [(p.name, p.admin) for p in proxies], generation)
        out = {}
        for g in (active, standby):
            members = [
                InstanceStatus(
                    i.id, i.group, i.version, i.address, i.http_port, i.hsms_port, i.registered, p
                )
                for i, p in zip(instances, probes, strict=True)
                if i.group == g
            ]
            versions = sorted({m.version for m in members})
            version = (
                ",".join(versions)
                if versions
                else jobspec.group_version(jobspec.task_group(job, g))
            )
            members += _unregistered(allocs, instances, g)
            out[g] = GroupStatus(g, version, members)
        return AppStatus(self.name, app, generation, out[active], out[standby], pstat)

    # -- deploy -------------------------------------------------------------------------------

    async def deploy(self, app: str, version: str, image: str | None, progress: Progress) -> str:
        job_id = self._job_id(app)
        async with self._clients() as (session, nomad, consul):
            entry: dict[str, Any] = {"action": "deploy", "version": version, "image": image}
            async with self._locked(consul, app, entry, "deploying", progress):
                try:
                    check_version(version)
                    msg = await self._deploy(session, nomad, consul, app, job_id, version, image,
                                             progress, entry)  # fmt: skip
                except Refused as exc:
                    entry.setdefault("result", "failed" if entry.get("registered") else "refused")
                    await self._audit(consul, app, {**entry, "reason": str(exc)}, progress)
                    raise
                await self._audit(consul, app, {**entry, "result": "ok"}, progress)
                return msg

    async def _deploy(
        self,
        session: aiohttp.ClientSession,
        nomad: NomadApi,
        consul: ConsulApi,
        app: str,
        job_id: str,
        version: str,
        image: str | None,
        progress: Progress,
        entry: dict[str, Any],
    ) -> str:
        job = await nomad.job(job_id)
        read_index = int(job["JobModifyIndex"])
        instances = await self._registered(consul, app)
        active, active_index = await self._active(consul, app, instances)
        standby = self._other(jobspec.group_names(job), active, job_id)
        entry.update({"group": standby, "active": active})
        old_version = jobspec.group_version(jobspec.task_group(job, standby))
        entry["from_version"] = old_version
        new_job = jobspec.with_version(job, standby, version, image)
        progress(f"deploying {version} to Standby group {standby} of job {job_id} (now "
                 f"{old_version}); Active group {active} must stay untouched")  # fmt: skip

        plan = await nomad.plan(new_job)
        plan_index = int(plan.get("JobModifyIndex") or read_index)
        moved = (
            f"; the job changed in Nomad since it was read (modify index {read_index} -> "
            f"{plan_index})"
            if plan_index != read_index
            else ""
        )
        verdict = jobspec.judge_plan(plan, standby)
        if not verdict.ok:
            raise Refused(
                f"Nomad's plan would also change {'; '.join(verdict.others_touched)} "
                f"(Active is {active}){moved}; refusing to deploy, nothing was registered"
            )
        if moved:
            raise Refused(f"job {job_id} changed while deploying{moved}; nothing was "
                          "registered; re-run deploy")  # fmt: skip
        failed = jobspec.failed_placements(plan, standby)
        if failed:
            raise Refused(f"Nomad cannot place group {standby}: {failed}; nothing was registered")
        progress(f"plan: group {standby}: {verdict.target_changes}; every other group unchanged")

        count = int(jobspec.task_group(job, standby).get("Count") or 0)
        if verdict.target_changes == "no change" or not any(
            tgd["Name"] == standby and tgd.get("Type") != "None"
            for tgd in (plan.get("Diff") or {}).get("TaskGroups") or []
        ):
            progress(f"group {standby} already runs {version} in job {job_id}; checking health")
            new_index = read_index
        else:
            # A switch between our read and the register would make us replace the group that
            # just became Active: look again, as late as possible.
            again, again_index = await self._active(consul, app, instances)
            if (again, again_index) != (active, active_index):
                raise Refused(
                    f"{app} was switched while deploying (Active {active} -> {again}); "
                    "nothing was registered; re-run deploy to target the new Standby"
                )
            await self._confirm("deploying")
            try:
                reg = await nomad.register(new_job, read_index)
            except ApiError as exc:
                if exc.status == 500 and "modify index" in exc.body:
                    raise Refused(
                        f"job {job_id} was changed by someone else since it was read (Nomad: "
                        f"{exc.body.splitlines()[0]}); nothing was registered; re-run deploy"
                    ) from None
                raise
            new_index = int(reg["JobModifyIndex"])
            entry["registered"] = True
            progress(f"registered job {job_id} (modify index {read_index} -> {new_index}, "
                     f"evaluation {str(reg.get('EvalID', ''))[:8]})")  # fmt: skip
        await self._follow(nomad, consul, app, job_id, standby, version, count, new_index,
                           new_index != read_index, progress)  # fmt: skip
        smoke = await self._smoke(session, consul, version, progress)
        return (f"{version} is on Standby group {standby} ({count}/{count} healthy); Active group "
                f"{active} untouched; {smoke}")  # fmt: skip

    async def _follow(
        self,
        nomad: NomadApi,
        consul: ConsulApi,
        app: str,
        job_id: str,
        group: str,
        version: str,
        count: int,
        job_index: int,
        registered: bool,
        progress: Progress,
    ) -> None:
        """Until the deployment of our job version succeeded and Consul shows `count` passing
        instances of `group` on `version` (and none on another version) — or the timeout."""
        deadline = time.monotonic() + self.s.deploy_timeout
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
            regs = [i for i in await self._registered(consul, app) if i.group == group]
            fresh = [i for i in regs if i.version == version]
            passing = [i for i in fresh if i.registered == "passing"]
            line = (
                f"  deployment {dep['ID'][:8] if ours else '-'}: "
                f"{dep['Status'] if ours else 'pending'}, "
                f"{state.get('PlacedAllocs', 0)} placed, {state.get('HealthyAllocs', 0)} healthy "
                f"of {state.get('DesiredTotal', count)}; Consul: {len(passing)}/{count} "
                f"{group} instances on {version} passing"
                + (
                    f", {len(regs) - len(fresh)} old still registered"
                    if len(regs) > len(fresh)
                    else ""
                )
            )
            if line != last:
                progress(line)
                last = line
            if dep_done and len(passing) >= count and len(regs) == len(fresh):
                return
            if time.monotonic() > deadline:
                raise Refused(
                    f"group {group} did not become healthy on {version} within "
                    f"{self.s.deploy_timeout:g}s (last: {line.strip()}); the Active group was "
                    "not touched"
                )

    async def _smoke(
        self, session: aiohttp.ClientSession, consul: ConsulApi, version: str, progress: Progress
    ) -> str:
        proxies = [p for p in await self._proxies(consul) if p.http]
        if not proxies:
            msg = f"smoke test skipped: no {PROXY_SERVICE} is registered in Consul"
            progress(msg)
            return msg
        if not self.s.admin_token:
            msg = ("smoke test skipped: no admin token for the Standby preview "
                   "(--admin-token or ZERODOWN_ADMIN_TOKEN)")  # fmt: skip
            progress(msg)
            return msg
        headers = {"X-Zerodown-Preview": "standby", "X-Zerodown-Token": self.s.admin_token}
        for p in proxies:
            # The proxy follows Consul by itself; give it a moment to see the new instances.
            deadline = time.monotonic() + self.s.smoke_timeout
            good = 0
            last = ""
            while good < 2:
                try:
                    async with session.get(
                        f"http://{p.http}/", headers=headers,
                        timeout=aiohttp.ClientTimeout(total=5),
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

    # -- switch / rollback ----------------------------------------------------------------------

    async def switch(self, app: str, to_group: str | None, progress: Progress) -> SwitchOutcome:
        async with self._clients() as (session, nomad, consul):
            entry: dict[str, Any] = {"action": "switch"}
            async with self._locked(consul, app, entry, "switching", progress):
                return await self._switch_audited(session, nomad, consul, app, to_group,
                                                  progress, entry)  # fmt: skip

    async def _switch_audited(
        self,
        session: aiohttp.ClientSession,
        nomad: NomadApi,
        consul: ConsulApi,
        app: str,
        to_group: str | None,
        progress: Progress,
        entry: dict[str, Any],
    ) -> SwitchOutcome:
        try:
            out = await self._switch(session, nomad, consul, app, to_group, progress, entry)
        except Refused as exc:
            result = "failed" if entry.get("generation") else "refused"
            await self._audit(consul, app, {**entry, "result": result, "reason": str(exc)},
                              progress)  # fmt: skip
            raise
        await self._audit(consul, app, {**entry, "result": "ok"}, progress)
        return out

    async def _switch(
        self,
        session: aiohttp.ClientSession,
        nomad: NomadApi,
        consul: ConsulApi,
        app: str,
        to_group: str | None,
        progress: Progress,
        entry: dict[str, Any],
    ) -> SwitchOutcome:
        job_id = self._job_id(app)
        instances = await self._registered(consul, app)
        active, read_index = await self._active(consul, app, instances)
        entry["from"] = active
        groups = sorted({i.group for i in instances} | {active})
        expected: int | None = None
        counts: dict[str, int] = {}
        try:  # Nomad is only asked how many instances to expect; a switch must not need it
            if self.s.nomad_addr:
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
        probes = await asyncio.gather(
            *(probe_http(session, i.address, i.http_port) for i in members)
        )
        bad = [
            f"{i.id}: {p.removeprefix('error: ')}"
            if p != "ok"
            else f"{i.id}: Consul {i.registered}"
            for i, p in zip(members, probes, strict=True)
            if p != "ok" or i.registered != "passing"
        ]
        want = expected if expected is not None else len(members)
        ok = len(members) - len(bad)
        if bad or not members or len(members) < want:
            missing = (
                [f"{want - len(members)} of {want} not registered"] if len(members) < want else []
            )
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
        key = self._key(app, "active")
        await self._confirm("switching")
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
            await consul.kv_put(self._key(app, "previous"), orjson.dumps(previous))
        except Refused as exc:
            progress(f"warning: could not record the previous group for rollback: {exc}")
        proxies = await self._proxies(consul)
        for p in proxies:
            if p.critical:  # a dead proxy serves nobody; waiting for it would only time out
                progress(f"warning: proxy {p.name} ({p.admin}) is critical in Consul (not "
                         "heartbeating: crashed or hung); not waiting for it")  # fmt: skip
        proxies = [p for p in proxies if not p.critical]
        if not proxies:
            progress(
                f"warning: no live {PROXY_SERVICE} is registered in Consul; nobody to wait for"
            )
        await wait_proxies(session, [(p.name, p.admin) for p in proxies], generation,
                           self.s.proxy_timeout)  # fmt: skip
        took = time.perf_counter() - written
        entry.update({"propagation_ms": round(took * 1000, 2), "proxies": len(proxies)})
        return SwitchOutcome(app, active, target, from_version, to_version, generation, took,
                             len(proxies))  # fmt: skip

    async def rollback(self, app: str, progress: Progress) -> SwitchOutcome:
        async with self._clients() as (session, nomad, consul):
            entry: dict[str, Any] = {"action": "rollback"}
            async with self._locked(consul, app, entry, "rolling back", progress):
                try:
                    got = await consul.kv_get(self._key(app, "previous"))
                    if got is None:
                        raise Refused(f"nothing to roll back to: no switch of {app} is recorded "
                                      f"({self._key(app, 'previous')} is absent)")  # fmt: skip
                    try:
                        prev = orjson.loads(got[0])
                        group, version = str(prev["group"]), prev.get("version")
                    except (orjson.JSONDecodeError, KeyError, TypeError):
                        raise Refused(f"{self._key(app, 'previous')} is not valid JSON; "
                                      "use `zerodown switch --to GROUP`") from None  # fmt: skip
                    now = {
                        i.version for i in await self._registered(consul, app) if i.group == group
                    }
                    if version and now and now != {version}:
                        raise Refused(
                            f"group {group} now runs {', '.join(sorted(now))}, not {version} as "
                            f"when it was Active; use `zerodown switch --to {group}` if that is meant"
                        )
                except Refused as exc:
                    await self._audit(consul, app, {**entry, "result": "refused", "reason": str(exc)},
                                      progress)  # fmt: skip
                    raise
                progress(f"rolling back {app} to {group} ({version})")
                return await self._switch_audited(
                    session, nomad, consul, app, group, progress, entry
                )
