"""Release backend for production: backends scheduled by Nomad, registered in Consul, the Active
group chosen by the Consul KV key `<key_prefix>/<app>/active` (DESIGN.md, "Data model in Consul";
names, keys and the instance join: zerodown_proxy/contract/consul.py, shared with the proxy).

The Consul settings are the proxies' own: the [consul] section of a proxy config file
(`--config proxy.toml`) with the same environment overrides (CONSUL_HTTP_ADDR,
CONSUL_HTTP_TOKEN, CONSUL_CACERT, ZERODOWN_CONSUL_DATACENTER, ZERODOWN_CONSUL_KEY_PREFIX), so a
switch writes the key the proxies watch, in their datacenter (`dc=` on every Consul call).

- deploy: read the job as JSON, change only the Standby task group (jobspec.with_version), ask
  Nomad's plan whether any other group would be touched (refuse if so), register with
  EnforceIndex, follow the deployment and the Consul checks, smoke-test through a proxy's
  Standby preview.
- switch: the Standby group must be complete and healthy (Consul checks and a direct /health),
  then one CAS write of the KV key; the new ModifyIndex is the routing generation every proxy
  must report at its admin /v1/status (nomad_switch.py).
- rollback: switch back to the group recorded in `<key_prefix>/<app>/previous`, if it still
  runs the version it ran then and is healthy.
Every deploy and switch (refused ones too) is appended to `<key_prefix>/<app>/history/<ns>` in
Consul and to the local history.jsonl.
deploy, switch and rollback hold the release lock, a Consul session lock on
`<key_prefix>/<app>/lock`, for their whole run (release_lock.py).
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import orjson

from zerodown_proxy.contract.consul import Keys
from zerodown_proxy.contract.model import Instance

from . import audit, jobspec
from .backend import (
    AppStatus,
    DryRun,
    GroupStatus,
    InstanceStatus,
    Progress,
    Refused,
    SwitchOutcome,
)
from .consul_view import ConsulView, Proxy, unregistered
from .deploy_plan import nomad_summary, render_nomad_plan
from .hashicorp_api import ApiError, ConsulApi, NomadApi
from .nomad_rollout import follow, smoke
from .nomad_settings import Settings, settings_from
from .nomad_switch import switch_active
from .probes import probe_http, proxy_statuses
from .release_lock import ConsulReleaseLock, LockBusy, held
from .versions import check_version


class NomadConsulBackend:
    name = "nomad"

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.keys = Keys(settings.key_prefix)
        self._held: ConsulReleaseLock | None = None

    @classmethod
    def from_env(cls, args: argparse.Namespace) -> NomadConsulBackend:
        return cls(settings_from(args))

    # -- plumbing -----------------------------------------------------------------------------

    @asynccontextmanager
    async def _clients(self) -> AsyncIterator[tuple[aiohttp.ClientSession, NomadApi, ConsulApi]]:
        async with aiohttp.ClientSession() as session:
            nomad = NomadApi(session, self.s.nomad_addr, self.s.nomad_token, self.s.nomad_cacert)
            consul = ConsulApi(
                session, self.s.consul_addr, self.s.consul_token, self.s.consul_cacert,
                datacenter=self.s.datacenter,
            )  # fmt: skip
            yield session, nomad, consul

    def _view(self, consul: ConsulApi) -> ConsulView:
        return ConsulView(consul, self.keys)

    def _job_id(self, app: str) -> str:
        return self.s.job or app

    async def _audit(
        self, consul: ConsulApi, app: str, entry: dict[str, Any], progress: Progress
    ) -> None:
        await self._view(consul).audit(self.name, app, entry, self.s.audit_log, progress)

    @asynccontextmanager
    async def _locked(
        self, consul: ConsulApi, app: str, entry: dict[str, Any], verb: str, progress: Progress
    ) -> AsyncIterator[None]:
        """The release lock for the whole action; a refusal to take it is audited."""

        async def busy(exc: Refused) -> None:
            holder = exc.holder if isinstance(exc, LockBusy) else None
            await self._audit(consul, app, {**entry, "result": "refused", "reason": str(exc),
                              "holder": holder.to_dict() if holder else None}, progress)  # fmt: skip

        lock = ConsulReleaseLock(consul, self.keys.lock(app), self.s.lock_ttl)
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

    async def history(self, app: str) -> list[dict[str, Any]]:
        """The audit trail every operator's commands left in Consul, oldest first."""
        async with self._clients() as (_session, _nomad, consul):
            entries = await consul.kv_list(self.keys.history_prefix(app))
        return audit.from_kv(entries)

    async def _active(
        self, consul: ConsulApi, app: str, instances: list[Instance]
    ) -> tuple[str, int]:
        """(Active group, ModifyIndex of the key — 0 when it is absent)."""
        return await self._view(consul).active(app)

    async def _registered(self, consul: ConsulApi, app: str) -> list[Instance]:
        return await self._view(consul).registered(app)

    async def _proxies(self, consul: ConsulApi) -> list[Proxy]:
        return await self._view(consul).proxies()

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
            stored = await consul.kv_get(self.keys.pilots(app))
        out = {}
        for g in (active, standby):
            members = [
                InstanceStatus(
                    i.id, i.group, i.version, i.address, i.http_port, i.hsms_port, i.checks, p
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
            members += unregistered(allocs, instances, g)
            out[g] = GroupStatus(g, version, members)
        try:
            pilots = orjson.loads(stored[0]) if stored and stored[0] else None
        except orjson.JSONDecodeError:
            pilots = None  # shown as none; the proxies report it as invalid
        if not isinstance(pilots, dict) or not pilots.get("tools"):
            pilots = None
        return AppStatus(self.name, app, generation, out[active], out[standby], pstat, pilots)

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

    async def plan_deploy(self, app: str, version: str, image: str | None) -> DryRun:
        """`deploy --dry-run`: Nomad's plan for the job a deploy would register; nothing is
        registered and no lock is taken."""
        check_version(version)
        job_id = self._job_id(app)
        async with self._clients() as (_session, nomad, consul):
            job = await nomad.job(job_id)
            active, _ = await self._active(consul, app, [])
            standby = self._other(jobspec.group_names(job), active, job_id)
            plan = await nomad.plan(jobspec.with_version(job, standby, version, image))
        lines, refusal = nomad_summary(plan, job_id, active, standby, version)
        return DryRun([*render_nomad_plan(plan), "", *lines], refusal)

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
        await follow(nomad, self._view(consul), app, job_id, standby, version, count, new_index,
                     new_index != read_index, progress, self.s.deploy_timeout)  # fmt: skip
        said = await smoke(session, self._view(consul), version, self.s.admin_token,
                           self.s.smoke_timeout, progress)  # fmt: skip
        return (f"{version} is on Standby group {standby} ({count}/{count} healthy); Active group "
                f"{active} untouched; {said}")  # fmt: skip

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
        return await switch_active(
            session, nomad, consul, self._view(consul), self.s, self.keys, self._job_id(app),
            app, to_group, progress, entry, self._confirm,
        )  # fmt: skip

    async def rollback(
        self, app: str, progress: Progress, reason: str | None = None
    ) -> SwitchOutcome:
        """`reason`: why it was asked for, kept in the audit record (an automatic rollback's
        measured verdict)."""
        async with self._clients() as (session, nomad, consul):
            entry: dict[str, Any] = {"action": "rollback"}
            if reason:
                entry["reason"] = reason
            async with self._locked(consul, app, entry, "rolling back", progress):
                try:
                    got = await consul.kv_get(self.keys.previous(app))
                    if got is None:
                        raise Refused(f"nothing to roll back to: no switch of {app} is recorded "
                                      f"({self.keys.previous(app)} is absent)")  # fmt: skip
                    try:
                        prev = orjson.loads(got[0])
                        group, version = str(prev["group"]), prev.get("version")
                    except (orjson.JSONDecodeError, KeyError, TypeError):
                        raise Refused(f"{self.keys.previous(app)} is not valid JSON; "
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
