"""Release backend for the local stack: deploy restarts Standby processes, switch rewrites the
registry file's Active pointer (under a lock), and both wait on the proxy's admin API.

deploy, switch and rollback each hold the release lock (`<state dir>/release.lock`, see
release_lock.py) for their whole run, and each is recorded in `history.jsonl` however it ends
(audit.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

from . import audit, registry
from .backend import (
    AppStatus,
    DryRun,
    GroupStatus,
    InstanceStatus,
    Progress,
    Refused,
    SwitchOutcome,
)
from .deploy_plan import local_plan
from .local_stack import StackPaths, load_stack, save_stack, start_instance, stop_pid
from .probes import probe_http, proxy_statuses, wait_proxies
from .release_lock import FileReleaseLock
from .versions import check_version


class LocalBackend:
    name = "local"

    def __init__(self, state_dir: Path, proxy_timeout: float = 10.0) -> None:
        self.paths = StackPaths(state_dir)
        self.proxy_timeout = proxy_timeout

    # -- helpers ------------------------------------------------------------------------------

    def _app(self, reg: dict[str, Any], app: str) -> dict[str, Any]:
        try:
            return reg["apps"][app]
        except KeyError:
            known = ", ".join(reg.get("apps", {})) or "none"
            raise Refused(f"app {app} is not in the local registry (known: {known})") from None

    @staticmethod
    def _groups(a: dict[str, Any]) -> tuple[str, str | None]:
        active = a["active"]
        others = sorted({i["group"] for i in a["instances"]} - {active})
        return active, (others[0] if others else None)

    @staticmethod
    def _proxies(reg: dict[str, Any]) -> list[tuple[str, str]]:
        return [(p["name"], p["admin"]) for p in reg.get("proxies", [])]

    @asynccontextmanager
    async def _release(
        self, app: str, action: str, verb: str, progress: Progress
    ) -> AsyncIterator[dict[str, Any]]:
        """Hold the release lock for the whole action and audit how it ended."""
        if not self.paths.root.is_dir():  # no stack: nothing to lock or audit, create nothing
            raise Refused(f"no local stack in {self.paths.root}: start one with 'zerodown up'")
        history = self.paths.root / "history.jsonl"

        async def write(entry: dict[str, Any]) -> None:
            audit.append_local(history, audit.record(self.name, app, entry), progress)

        lock = FileReleaseLock(self.paths.root / "release.lock")
        async with audit.release_action(lock, write, action, verb, progress) as entry:
            yield entry

    async def history(self, app: str) -> list[dict[str, Any]]:
        """The audit trail (history.jsonl), oldest first."""
        return [e for e in audit.read_local(self.paths.root / "history.jsonl")
                if e.get("app") == app]  # fmt: skip

    async def _probe_all(
        self, session: aiohttp.ClientSession, instances: list[dict[str, Any]]
    ) -> list[str]:
        return list(
            await asyncio.gather(
                *(probe_http(session, i["address"], i["http_port"]) for i in instances)
            )
        )

    # -- Backend ------------------------------------------------------------------------------

    async def status(self, app: str) -> AppStatus:
        reg = registry.read(self.paths.registry)
        a = self._app(reg, app)
        active, standby = self._groups(a)
        async with aiohttp.ClientSession() as session:
            probes = await self._probe_all(session, a["instances"])
            proxies = await proxy_statuses(session, self._proxies(reg), reg["generation"])
        groups = {active: GroupStatus(active, None), standby: GroupStatus(standby, None)}
        for inst, probe in zip(a["instances"], probes, strict=True):
            g = groups.get(inst["group"])
            if g is None:
                continue
            g.instances.append(
                InstanceStatus(
                    id=inst["id"],
                    group=inst["group"],
                    version=inst["version"],
                    address=inst["address"],
                    http_port=inst["http_port"],
                    hsms_port=inst.get("hsms_port"),
                    registered="passing" if inst.get("healthy", True) else "critical",
                    probe=probe,
                )
            )
        for g in groups.values():
            versions = sorted({i.version for i in g.instances})
            g.version = ",".join(versions) if versions else None
        return AppStatus(
            backend=self.name,
            app=app,
            generation=reg["generation"],
            active=groups[active],
            standby=groups[standby] if standby else GroupStatus(None, None),
            proxies=proxies,
            pilots=a.get("pilots"),
        )

    async def deploy(self, app: str, version: str, image: str | None, progress: Progress) -> str:
        async with self._release(app, "deploy", "deploying", progress) as entry:
            entry["version"] = version
            return await self._deploy(app, version, image, progress, entry)

    async def plan_deploy(self, app: str, version: str, image: str | None) -> DryRun:
        """`deploy --dry-run`: the instances a deploy would restart; nothing is changed."""
        check_version(version)
        if image:
            raise Refused(
                "--image applies to the Nomad backend; the local stack runs the sample app"
            )
        load_stack(self.paths)
        a = self._app(registry.read(self.paths.registry), app)
        active, standby = self._groups(a)
        if standby is None:
            raise Refused(f"app {app} has no Standby group to deploy to")
        return DryRun(local_plan(app, a["instances"], active, standby, version))

    async def _deploy(
        self, app: str, version: str, image: str | None, progress: Progress, entry: dict[str, Any]
    ) -> str:
        check_version(version)
        if image:
            raise Refused(
                "--image applies to the Nomad backend; the local stack runs the sample app"
            )
        stack = load_stack(self.paths)
        reg = registry.read(self.paths.registry)
        a = self._app(reg, app)
        active, standby = self._groups(a)
        if standby is None:
            raise Refused(f"app {app} has no Standby group to deploy to")
        targets = [i for i in a["instances"] if i["group"] == standby]
        entry.update(group=standby, active=active,
                     from_version=",".join(sorted({i["version"] for i in targets})) or None)  # fmt: skip
        progress(f"deploying {version} to Standby group {standby} ({len(targets)} instances); "
                 f"Active group {active} is not touched")  # fmt: skip
        hsms = any(i.get("hsms_port") for i in targets)
        device_id = a.get("hsms_device_id") or 0
        for inst in targets:
            iid = inst["id"]

            def mark(reg: dict[str, Any], iid: str = iid, **fields: Any) -> None:
                for i in self._app(reg, app)["instances"]:
                    if i["id"] == iid:
                        i.update(fields)

            entry["changed"] = True  # from here on a refusal leaves the Standby group changed
            registry.update(self.paths.registry, lambda r, iid=iid: mark(r, iid, healthy=False))
            old = stack["instances"].get(iid)
            if old:
                await asyncio.to_thread(stop_pid, old["pid"])
            progress(f"  {iid}: stopped, starting {version}")
            info = await asyncio.to_thread(
                start_instance, self.paths, iid, version, hsms, device_id
            )
            stack["instances"][iid] = {"pid": info["pid"]}
            save_stack(self.paths, stack)
            async with aiohttp.ClientSession() as session:
                deadline = time.monotonic() + 20
                while (probe := await probe_http(session, "127.0.0.1", info["http_port"])) != "ok":
                    if time.monotonic() > deadline:
                        raise Refused(f"{iid} on {version} did not become healthy: {probe}")
                    await asyncio.sleep(0.05)
            registry.update(
                self.paths.registry,
                lambda r, iid=iid, info=info: mark(
                    r,
                    iid,
                    version=version,
                    http_port=info["http_port"],
                    hsms_port=info["hsms_port"],
                    healthy=True,
                ),
            )
            progress(f"  {iid}: healthy on {version} (http :{info['http_port']})")
        reg = registry.read(self.paths.registry)
        async with aiohttp.ClientSession() as session:
            await wait_proxies(session, self._proxies(reg), reg["generation"], self.proxy_timeout)
            await self._smoke(session, stack, version, progress)
        return f"{version} is on Standby group {standby}, healthy; Active group {active} untouched"

    async def _smoke(
        self,
        session: aiohttp.ClientSession,
        stack: dict[str, Any],
        version: str,
        progress: Progress,
    ) -> None:
        proxy = stack.get("proxy") or {}
        if not proxy.get("http"):
            raise Refused("the local proxy is not running; cannot smoke-test the Standby group")
        url = f"http://127.0.0.1:{proxy['http']}/"
        headers = {"X-Zerodown-Preview": "standby", "X-Zerodown-Token": stack["token"]}
        seen = set()
        for _ in range(4):
            try:
                async with session.get(url, headers=headers) as r:
                    await r.read()
                    if r.status != 200:
                        raise Refused(
                            f"smoke test through the proxy's Standby preview got {r.status}"
                        )
                    seen.add(r.headers.get("X-Backend-Version"))
            except aiohttp.ClientError as exc:
                raise Refused(f"smoke test through the proxy failed: {exc}") from None
        if seen != {version}:
            raise Refused(f"smoke test: Standby preview answered versions {sorted(map(str, seen))}, "
                          f"expected {version}")  # fmt: skip
        progress(f"smoke test through the proxy's Standby preview: 4/4 answered {version}")

    async def switch(self, app: str, to_group: str | None, progress: Progress) -> SwitchOutcome:
        async with self._release(app, "switch", "switching", progress) as entry:
            return await self._switch(app, to_group, progress, entry)

    async def rollback(
        self, app: str, progress: Progress, reason: str | None = None
    ) -> SwitchOutcome:
        """`reason`: why it was asked for, kept in the audit record (an automatic rollback's
        measured verdict)."""
        async with self._release(app, "rollback", "rolling back", progress) as entry:
            if reason:
                entry["reason"] = reason
            reg = registry.read(self.paths.registry)
            previous = self._app(reg, app).get("previous")
            if not previous:
                raise Refused(f"nothing to roll back to: no switch has been recorded for {app}")
            progress(f"rolling back {app} to {previous}")
            return await self._switch(app, previous, progress, entry)

    async def _switch(
        self, app: str, to_group: str | None, progress: Progress, entry: dict[str, Any]
    ) -> SwitchOutcome:
        reg = registry.read(self.paths.registry)
        a = self._app(reg, app)
        active, standby = self._groups(a)
        target = to_group or standby
        entry.update({"from": active, "to": target})
        groups = {i["group"] for i in a["instances"]}
        if target not in groups:
            raise Refused(f"app {app} has no group {target} (groups: {', '.join(sorted(groups))})")
        if target == active:
            raise Refused(f"group {target} is already Active for {app}; nothing to switch")
        targets = [i for i in a["instances"] if i["group"] == target]
        async with aiohttp.ClientSession() as session:
            probes = await self._probe_all(session, targets)
            bad = [
                f"{i['id']}: {p.removeprefix('error: ')}"
                if p != "ok"
                else f"{i['id']}: registered unhealthy"
                for i, p in zip(targets, probes, strict=True)
                if p != "ok" or not i.get("healthy", True)
            ]
            if bad or not targets:
                ok = len(targets) - len(bad)
                raise Refused(
                    f"Standby group {target} has {ok}/{len(targets)} passing instances "
                    f"({'; '.join(bad) or 'no instances'}); not switching."
                )
            from_version = ",".join(sorted({i["version"] for i in a["instances"]
                                              if i["group"] == active}))  # fmt: skip
            to_version = ",".join(sorted({i["version"] for i in targets}))
            entry.update(from_version=from_version, to_version=to_version)
            expected_gen = reg["generation"]

            def flip(r: dict[str, Any]) -> None:
                if r["generation"] != expected_gen:
                    raise Refused(
                        f"the registry changed while switching (generation {expected_gen} -> "
                        f"{r['generation']}): someone else is releasing; check 'zerodown status'"
                    )
                x = self._app(r, app)
                x["previous"] = x["active"]
                x["active"] = target
                # The pilots are on `target` already; everyone joins them (pilot.py).
                if x.pop("pilots", None):
                    entry["pilots_cleared"] = True

            new = registry.update(self.paths.registry, flip)
            written = time.perf_counter()
            entry.update(changed=True, generation=new["generation"])
            proxies = self._proxies(new)
            progress(f"generation {new['generation']} written; waiting for {len(proxies)} "
                     "proxy(ies) to apply it")  # fmt: skip
            try:
                await wait_proxies(session, proxies, new["generation"], self.proxy_timeout)
            finally:
                took = time.perf_counter() - written
        entry.update(propagation_ms=round(took * 1000, 2), proxies=len(proxies))
        progress(f"switched {app}: {active} ({from_version}) -> {target} ({to_version}), "
                 f"generation {new['generation']}")  # fmt: skip
        return SwitchOutcome(app, active, target, from_version, to_version, new["generation"],
                             took, len(proxies))  # fmt: skip
