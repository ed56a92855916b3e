"""A small Nomad HTTP API test double that really runs jobs (raw_exec driver) on 127.0.0.1.

Answers like the real agent (Nomad 1.1) field for field, after the recordings in
/work/shared/api-samples/nomad-exchanges.json: GET /v1/job/<id>, POST /v1/job/<id>/plan (Diff with
per-group Type None/Edited and Annotations.DesiredTGUpdates — including InPlaceUpdate for
untouched groups), POST /v1/jobs and /v1/job/<id> (EnforceIndex: a stale JobModifyIndex gets
HTTP 500 with the recorded plain-text reason), GET /v1/job/<id>/deployment(s), /allocations,
/versions, /v1/deployment/<id>, /v1/allocation/<id>, /v1/status/leader. GETs honour blocking
queries (`index`, `wait`).

It executes what it accepts, like a one-node cluster: a group whose tasks, networks or meta
changed has its allocations replaced (MaxParallel at a time): the old task processes get their
kill signal, then new processes start with NOMAD_PORT_<label>/NOMAD_IP_<label>/NOMAD_META_<key>/...
in the environment and ${VAR} interpolated in command and args, on free 127.0.0.1 ports. Their
services are registered in a FakeConsul (tags as in the job, Meta external-source=nomad, check
critical until the HTTP/TCP check answers — the double runs the checks, as the Consul agent
would). An allocation is healthy when its checks pass for MinHealthyTime; the deployment
succeeds when every group has its DesiredTotal healthy, and fails when a task exits or the
HealthyDeadline passes (then AutoRevert registers the last stable version). Groups that did not
change keep their processes (in-place update: only the job version of the allocation moves).

Jobs are validated as the real agent does where a job of ours can go wrong (check intervals and
timeouts of at least 1 s: nomad_validate.py); dynamic ports come from Nomad's own range,
20000..32000, outside the kernel's ephemeral ports.

Test-only knobs: `check_interval` (how often checks run, instead of the job's 2 s) and
`kill_timeout_cap`.
"""

from __future__ import annotations

import asyncio
import copy
import os
import random
import re
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import aiohttp
import orjson
from aiohttp import web

from . import nomad_diff, nomad_validate

NS = 1_000_000_000
_VAR = re.compile(r"\$\{([^}]+)\}")


def _now_ns() -> int:
    return time.time_ns()


def _rfc3339(ns: int) -> str:
    secs, frac = divmod(ns, NS)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{frac:09d}Z"


# Nomad's client hands out dynamic ports from min_dynamic_port..max_dynamic_port (20000..32000
# by default), *outside* the kernel's ephemeral range (32768..60999 on Linux). That matters: the
# task binds its port seconds after it was chosen (Python start-up, longer on a loaded machine),
# and a port taken from the ephemeral range meanwhile went to some client connection or bind(0)
# elsewhere, so the task failed to start and the allocation turned unhealthy.
MIN_DYNAMIC_PORT, MAX_DYNAMIC_PORT = 20000, 32000
_handed_out: dict[int, None] = {}  # ports this process gave out, oldest first (any FakeNomad)
_rng = random.SystemRandom()


def _free_port() -> int:
    for _ in range(200):
        port = _rng.randint(MIN_DYNAMIC_PORT, MAX_DYNAMIC_PORT)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use right now
        _handed_out[port] = None
        while len(_handed_out) > 4000:  # long runs: forget the oldest, they are long gone
            del _handed_out[next(iter(_handed_out))]
        return port
    raise RuntimeError(f"no free port in {MIN_DYNAMIC_PORT}..{MAX_DYNAMIC_PORT}")


def _event(kind: str, message: str = "", display: str = "", **extra: Any) -> dict[str, Any]:
    ev = {
        "Details": {}, "DiskLimit": 0, "DisplayMessage": display or message or kind,
        "DownloadError": "", "DriverError": "", "DriverMessage": "", "ExitCode": 0,
        "FailedSibling": "", "FailsTask": False, "GenericSource": "", "KillError": "",
        "KillReason": "", "KillTimeout": 0, "Message": message, "RestartReason": "",
        "SetupError": "", "Signal": 0, "StartDelay": 0, "TaskSignal": "",
        "TaskSignalReason": "", "Time": _now_ns(), "Type": kind, "ValidationError": "",
        "VaultError": "",
    }  # fmt: skip
    ev.update(extra)
    return ev


# -- job canonicalisation (what the server fills in on register) ------------------------------

_JOB_DEFAULTS: dict[str, Any] = {
    "Affinities": None, "AllAtOnce": False, "Constraints": None, "ConsulNamespace": "",
    "ConsulToken": "", "Datacenters": ["dc1"], "Dispatched": False, "Meta": None,
    "Multiregion": None, "Namespace": "default", "NomadTokenID": "", "ParameterizedJob": None,
    "ParentID": "", "Payload": None, "Periodic": None, "Priority": 50, "Region": "global",
    "Spreads": None, "Stop": False, "Type": "service", "VaultNamespace": "", "VaultToken": "",
}  # fmt: skip
_JOB_UPDATE = {"AutoPromote": False, "AutoRevert": False, "Canary": 0, "HealthCheck": "",
               "HealthyDeadline": 0, "MaxParallel": 1, "MinHealthyTime": 0,
               "ProgressDeadline": 0, "Stagger": 30 * NS}  # fmt: skip
_GROUP_UPDATE = {"AutoPromote": False, "AutoRevert": False, "Canary": 0, "HealthCheck": "checks",
                 "HealthyDeadline": 300 * NS, "MaxParallel": 1, "MinHealthyTime": 10 * NS,
                 "ProgressDeadline": 600 * NS, "Stagger": 30 * NS}  # fmt: skip
_RESTART = {"Attempts": 2, "Delay": 15 * NS, "Interval": 1800 * NS, "Mode": "fail"}
_GROUP_DEFAULTS: dict[str, Any] = {
    "Affinities": None, "Constraints": None, "Consul": {"Namespace": ""}, "Count": 1,
    "EphemeralDisk": {"Migrate": False, "SizeMB": 300, "Sticky": False}, "Meta": None,
    "Migrate": {"HealthCheck": "checks", "HealthyDeadline": 300 * NS, "MaxParallel": 1,
                "MinHealthyTime": 10 * NS},
    "Networks": None,
    "ReschedulePolicy": {"Attempts": 0, "Delay": 30 * NS, "DelayFunction": "exponential",
                         "Interval": 0, "MaxDelay": 3600 * NS, "Unlimited": True},
    "RestartPolicy": _RESTART, "Scaling": None, "Services": None, "ShutdownDelay": None,
    "Spreads": None, "StopAfterClientDisconnect": None, "Volumes": None,
}  # fmt: skip
_TASK_DEFAULTS: dict[str, Any] = {
    "Affinities": None, "Artifacts": None, "CSIPluginConfig": None, "Config": None,
    "Constraints": None, "DispatchPayload": None, "Env": None, "KillSignal": "",
    "KillTimeout": 5 * NS, "Kind": "", "Leader": False, "Lifecycle": None,
    "LogConfig": {"MaxFileSizeMB": 10, "MaxFiles": 10}, "Meta": None,
    "Resources": {"CPU": 100, "Cores": 0, "Devices": None, "DiskMB": 0, "IOPS": 0,
                  "MemoryMB": 300, "MemoryMaxMB": 0, "Networks": None},
    "RestartPolicy": _RESTART, "ScalingPolicies": None, "Services": None, "ShutdownDelay": 0,
    "Templates": None, "User": "", "Vault": None, "VolumeMounts": None,
}  # fmt: skip
_SERVICE_DEFAULTS: dict[str, Any] = {
    "AddressMode": "auto", "CanaryMeta": None, "CanaryTags": None, "Checks": None,
    "Connect": None, "EnableTagOverride": False, "Meta": None, "Namespace": "default",
    "OnUpdate": "require_healthy", "PortLabel": "", "Tags": None, "TaskName": "",
}  # fmt: skip
_CHECK_DEFAULTS: dict[str, Any] = {
    "AddressMode": "", "Args": None, "Body": "", "CheckRestart": None, "Command": "",
    "Expose": False, "FailuresBeforeCritical": 0, "GRPCService": "", "GRPCUseTLS": False,
    "Header": None, "InitialStatus": "", "Interval": 10 * NS, "Method": "", "Name": "",
    "OnUpdate": "require_healthy", "Path": "", "PortLabel": "", "Protocol": "",
    "SuccessBeforePassing": 0, "TLSSkipVerify": False, "TaskName": "", "Timeout": 2 * NS,
    "Type": "",
}  # fmt: skip


def _fill(d: dict[str, Any], defaults: dict[str, Any]) -> None:
    for k, v in defaults.items():
        if k not in d:
            d[k] = copy.deepcopy(v)


def canonicalize(job: dict[str, Any]) -> dict[str, Any]:
    """Fill server-side defaults the way `nomad job run` + GET /v1/job show them."""
    job = copy.deepcopy(job)
    _fill(job, _JOB_DEFAULTS)
    job.setdefault("Name", job["ID"])
    job["Update"] = {**_JOB_UPDATE, **(job.get("Update") or {})}
    for tg in job.get("TaskGroups") or []:
        _fill(tg, _GROUP_DEFAULTS)
        upd = {**_GROUP_UPDATE, **(tg.get("Update") or {})}
        tg["Update"] = upd
        for net in tg.get("Networks") or []:
            _fill(net, {"CIDR": "", "DNS": None, "Device": "", "DynamicPorts": None, "IP": "",
                        "MBits": 0, "Mode": "", "ReservedPorts": None})  # fmt: skip
            for p in net.get("DynamicPorts") or []:
                _fill(p, {"HostNetwork": "default", "To": 0, "Value": 0})
                p["HostNetwork"] = p["HostNetwork"] or "default"
        for svc in tg.get("Services") or []:
            _fill(svc, _SERVICE_DEFAULTS)
            for chk in svc.get("Checks") or []:
                _fill(chk, _CHECK_DEFAULTS)
        for task in tg.get("Tasks") or []:
            _fill(task, _TASK_DEFAULTS)
            task["RestartPolicy"] = copy.deepcopy(tg["RestartPolicy"])
            _fill(task["Resources"], _TASK_DEFAULTS["Resources"])
    return job


# -- runtime state ----------------------------------------------------------------------------


@dataclass(slots=True)
class _Task:
    name: str
    proc: asyncio.subprocess.Process | None = None
    state: str = "pending"  # pending | running | dead
    failed: bool = False
    started_at: int | None = None
    finished_at: int | None = None
    events: list[dict[str, Any]] = field(default_factory=list)


@dataclass(slots=True)
class _Alloc:
    id: str
    job_id: str
    group: str
    index: int
    job_version: int
    eval_id: str
    deployment_id: str | None
    ports: dict[str, int]
    create_index: int
    modify_index: int
    create_time: int = field(default_factory=_now_ns)
    modify_time: int = field(default_factory=_now_ns)
    client_status: str = "pending"  # pending | running | complete | failed
    client_description: str = ""
    desired_status: str = "run"
    healthy: bool | None = None
    health_ts: int = 0
    health_index: int = 0
    tasks: dict[str, _Task] = field(default_factory=dict)
    # service id -> (service json, check json or None, consul status)
    services: dict[str, list[Any]] = field(default_factory=dict)
    passing_since: float | None = None
    placed_at: float = field(default_factory=time.monotonic)
    watcher: asyncio.Task[None] | None = None


@dataclass(slots=True)
class _Deployment:
    id: str
    job_id: str
    job_version: int
    job_modify_index: int
    job_create_index: int
    create_index: int
    modify_index: int
    groups: dict[str, dict[str, Any]]
    status: str = "running"
    description: str = "Deployment is running"


class FakeNomad:
    def __init__(
        self,
        consul: Any | None = None,
        *,
        workdir: Path | None = None,
        base_env: dict[str, str] | None = None,
        check_interval: float = 0.1,
        kill_timeout_cap: float = 5.0,
        node: str = "vm",
        datacenter: str = "dc1",
    ) -> None:
        self.consul = consul
        self.workdir = Path(workdir or f"/tmp/fake-nomad-{os.getpid()}-{id(self)}")
        self.base_env = dict(base_env if base_env is not None else {"PATH": os.environ["PATH"]})
        self.check_interval = check_interval
        self.kill_timeout_cap = kill_timeout_cap
        self.node = node
        self.node_id = str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{node}.fake-nomad"))
        self.datacenter = datacenter
        self.acl_token: str | None = None
        self.requests: list[tuple[str, str]] = []
        self.check_log: list[tuple[float, str, str, str]] = []  # (t, service id, status, output)
        self.url = ""
        self.port = 0
        self._index = 1
        self._jobs: dict[str, dict[str, Any]] = {}
        self._versions: dict[str, list[dict[str, Any]]] = {}
        self._allocs: dict[str, _Alloc] = {}
        self._deployments: dict[str, _Deployment] = {}
        self._rollouts: dict[str, asyncio.Task[None]] = {}
        self._hooks: list[tuple[str, str, str, Any]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._changed: asyncio.Event | None = None
        self._session: aiohttp.ClientSession | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> str:
        self.workdir.mkdir(parents=True, exist_ok=True)
        started = threading.Event()
        errors: list[BaseException] = []

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._startup())
            except BaseException as exc:  # surfaced to start()'s caller
                errors.append(exc)
                started.set()
                return
            started.set()
            loop.run_forever()
            loop.run_until_complete(self._shutdown())
            loop.close()

        self._thread = threading.Thread(target=main, name="fake-nomad", daemon=True)
        self._thread.start()
        started.wait(10)
        if errors:
            raise errors[0]
        return self.url

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop = None

    async def _startup(self) -> None:
        self._changed = asyncio.Event()
        # Consul's HTTP checks do not keep connections alive; neither do ours (a pooled idle
        # connection would also hold up the app's graceful shutdown).
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        app = web.Application(client_max_size=64 * 1024**2)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{self.port}"

    async def _shutdown(self) -> None:
        for t in self._rollouts.values():
            t.cancel()
        await asyncio.gather(
            *(self._stop_alloc(a, "fake nomad shutting down") for a in self._allocs.values()),
            return_exceptions=True,
        )
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def _call(self, coro: Any, timeout: float = 30.0) -> Any:
        if self._loop is None:
            raise RuntimeError("FakeNomad is not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # -- test-facing API (thread-safe) --------------------------------------------------------

    def register_job(self, job: dict[str, Any]) -> dict[str, Any]:
        """Register like POST /v1/jobs without EnforceIndex; returns the API answer. A job
        Nomad would refuse raises ValueError with Nomad's text."""
        invalid = nomad_validate.validate_job(job)
        if invalid is not None:
            raise ValueError(invalid)
        return self._call(self._register(job, None))

    def edit_job(self, job_id: str, edit: Any) -> dict[str, Any]:
        """Someone else's change: edit(copy of the job) then register it."""
        return self._call(self._edit(job_id, edit))

    async def _edit(self, job_id: str, edit: Any) -> dict[str, Any] | str:
        job = copy.deepcopy(self._jobs[job_id])
        edit(job)
        return await self._register(job, None)

    def concurrent_edit(
        self, method: str, path: str, job_id: str, edit: Any, when: str = "after"
    ) -> None:
        """Fault injection: someone else edits and registers the job right before/after the
        next `method path` request is answered (the client sees the old state)."""
        self.on_request(method, path, lambda n: n._edit(job_id, edit), when)

    def job(self, job_id: str) -> dict[str, Any] | None:
        async def get() -> dict[str, Any] | None:
            j = self._jobs.get(job_id)
            return copy.deepcopy(j) if j else None

        return self._call(get())

    def allocations(self, job_id: str, group: str | None = None, running: bool = True) -> list:
        """Simplified view: id, name, group, job_version, client_status, healthy, pids, ports."""

        async def get() -> list[dict[str, Any]]:
            out = []
            for a in sorted(
                self._allocs.values(), key=lambda a: (a.group, a.index, a.create_index)
            ):
                if a.job_id != job_id or (group and a.group != group):
                    continue
                if running and a.desired_status != "run":
                    continue
                pids = {n: t.proc.pid for n, t in a.tasks.items() if t.proc is not None}
                out.append({"id": a.id, "name": f"{a.job_id}.{a.group}[{a.index}]",
                            "group": a.group, "job_version": a.job_version,
                            "client_status": a.client_status, "healthy": a.healthy,
                            "pids": pids, "ports": dict(a.ports)})  # fmt: skip
            return out

        return self._call(get())

    def deployment(self, job_id: str) -> dict[str, Any] | None:
        async def get() -> dict[str, Any] | None:
            d = self._latest_deployment(job_id)
            return self._deployment_json(d) if d else None

        return self._call(get())

    def wait_deployment(self, job_id: str, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until the latest deployment of the job is no longer running; returns it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            d = self.deployment(job_id)
            if d and d["Status"] != "running":
                return d
            time.sleep(0.02)
        raise AssertionError(f"deployment of {job_id} still running after {timeout}s")

    def on_request(self, method: str, path: str, fn: Any, when: str = "after") -> None:
        """Fault injection: call fn(self) once (in the double's loop; it may return a coroutine),
        before or after the next `method path` is handled."""
        self._hooks.append((method.upper(), path, when, fn))

    # -- state ------------------------------------------------------------------------------

    def _bump(self) -> int:
        self._index += 1
        assert self._changed is not None
        self._changed.set()
        self._changed = asyncio.Event()
        return self._index

    def _running_allocs(self, job_id: str, group: str | None = None) -> list[_Alloc]:
        return [
            a
            for a in self._allocs.values()
            if a.job_id == job_id
            and a.desired_status == "run"
            and a.client_status in ("pending", "running")
            and (group is None or a.group == group)
        ]

    def _latest_deployment(self, job_id: str) -> _Deployment | None:
        ds = [d for d in self._deployments.values() if d.job_id == job_id]
        return max(ds, key=lambda d: d.create_index) if ds else None

    def _plan(self, job: dict[str, Any]) -> tuple[dict, dict, dict]:
        old = self._jobs.get(job["ID"])
        running: dict[str, int] = {}
        for a in self._running_allocs(job["ID"]):
            running[a.group] = running.get(a.group, 0) + 1
        return nomad_diff.plan(old, job, running)

    async def _register(self, job: dict[str, Any], enforce: int | None) -> dict[str, Any] | str:
        job_id = job.get("ID") or ""
        old = self._jobs.get(job_id)
        if enforce is not None:
            if enforce == 0 and old is not None:
                return f"Enforcing job modify index 0: job already exists"  # noqa: F541
            if enforce > 0 and old is None:
                return f"Enforcing job modify index {enforce}: job does not exist"
            if old is not None and old["JobModifyIndex"] != enforce:
                return (
                    f"Enforcing job modify index {enforce}: job exists with conflicting job "
                    f"modify index: {old['JobModifyIndex']}"
                )
        job = canonicalize(job)
        diff, _updates, kinds = self._plan(job)
        eval_id = str(uuid.uuid4())
        if old is not None and diff["Type"] == "None":
            idx = self._bump()  # Nomad re-evaluates but keeps the job version
            return {"EvalCreateIndex": idx, "EvalID": eval_id, "Index": idx,
                    "JobModifyIndex": old["JobModifyIndex"], "KnownLeader": False,
                    "LastContact": 0, "Warnings": ""}  # fmt: skip
        idx = self._bump()
        job["Version"] = old["Version"] + 1 if old else 0
        job["CreateIndex"] = old["CreateIndex"] if old else idx
        job["JobModifyIndex"] = idx
        job["ModifyIndex"] = idx
        job["SubmitTime"] = _now_ns()
        job["Stable"] = False
        job["Status"] = "running" if old else "pending"
        job["StatusDescription"] = ""
        self._jobs[job_id] = job
        self._versions.setdefault(job_id, []).append(copy.deepcopy(job))
        prev = self._rollouts.pop(job_id, None)
        if prev is not None and prev is not asyncio.current_task():
            prev.cancel()
        dep_prev = self._latest_deployment(job_id)
        if dep_prev is not None and dep_prev.status == "running":
            dep_prev.status = "cancelled"
            dep_prev.description = "Cancelled due to newer version of job"
            dep_prev.modify_index = self._bump()
        dep = self._new_deployment(job)
        self._rollouts[job_id] = asyncio.ensure_future(self._rollout(job, kinds, dep, eval_id))
        return {"EvalCreateIndex": idx, "EvalID": eval_id, "Index": idx,
                "JobModifyIndex": idx, "KnownLeader": False, "LastContact": 0,
                "Warnings": ""}  # fmt: skip

    def _new_deployment(self, job: dict[str, Any]) -> _Deployment:
        idx = self._bump()
        groups = {}
        for tg in job["TaskGroups"]:
            u = tg["Update"]
            groups[tg["Name"]] = {
                "AutoPromote": u["AutoPromote"], "AutoRevert": u["AutoRevert"],
                "DesiredCanaries": 0, "DesiredTotal": tg["Count"], "HealthyAllocs": 0,
                "PlacedAllocs": 0, "PlacedCanaries": None,
                "ProgressDeadline": u["ProgressDeadline"], "Promoted": False,
                "RequireProgressBy": _rfc3339(_now_ns() + u["ProgressDeadline"]),
                "UnhealthyAllocs": 0,
            }  # fmt: skip
        d = _Deployment(
            id=str(uuid.uuid4()),
            job_id=job["ID"],
            job_version=job["Version"],
            job_modify_index=job["JobModifyIndex"],
            job_create_index=job["CreateIndex"],
            create_index=idx,
            modify_index=idx,
            groups=groups,
        )
        self._deployments[d.id] = d
        return d

    # -- execution ----------------------------------------------------------------------------

    async def _rollout(
        self, job: dict[str, Any], kinds: dict[str, str], dep: _Deployment, eval_id: str
    ) -> None:
        job_id = job["ID"]
        groups = {tg["Name"]: tg for tg in job["TaskGroups"]}
        for name, kind in kinds.items():
            if kind == "destroy":
                for a in self._running_allocs(job_id, name):
                    await self._stop_alloc(a, "alloc not needed as task group was removed")
        results = await asyncio.gather(
            *(
                self._rollout_group(job, groups[n], kinds[n], dep, eval_id)
                for n in groups
                if kinds.get(n) != "destroy"
            ),
            return_exceptions=True,
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            f = failures[0]
            # A bug in the double must show up as a failed deployment, not a silent hang.
            why = str(f) if isinstance(f, _DeploymentFailed) else f"fake nomad error: {f!r}"
            await self._fail_deployment(job, dep, why)
            return
        dep.status = "successful"
        dep.description = "Deployment completed successfully"
        dep.modify_index = self._bump()
        job["Stable"] = True
        for v in self._versions[job_id]:
            if v["Version"] == job["Version"]:
                v["Stable"] = True

    async def _fail_deployment(self, job: dict[str, Any], dep: _Deployment, why: str) -> None:
        dep.status = "failed"
        dep.description = why
        revert = any(g["AutoRevert"] for g in dep.groups.values())
        stable = [
            v for v in self._versions[job["ID"]] if v["Stable"] and v["Version"] < job["Version"]
        ]
        if revert and stable:
            target = stable[-1]
            dep.description = f"{why} - rolling back to job version {target['Version']}"
            dep.modify_index = self._bump()
            await self._register(copy.deepcopy(target), None)
        else:
            dep.modify_index = self._bump()

    async def _rollout_group(
        self, job: dict[str, Any], tg: dict[str, Any], kind: str, dep: _Deployment, eval_id: str
    ) -> None:
        name = tg["Name"]
        state = dep.groups[name]
        for a in self._allocs.values():  # failed allocations get replaced, not restarted
            if a.job_id == job["ID"] and a.group == name and a.client_status == "failed":
                a.desired_status = "stop"
        current = sorted(self._running_allocs(job["ID"], name), key=lambda a: a.index)
        want = tg["Count"]
        for a in current[want:]:
            await self._stop_alloc(a, "alloc not needed due to job update")
        current = current[:want]
        if kind in ("inplace", "ignore"):
            for a in current:
                a.job_version = job["Version"]
                a.deployment_id = dep.id
                a.modify_index = self._bump()
                self._reregister_services(a, tg)
            state["PlacedAllocs"] = len(current)
            todo: list[tuple[int, _Alloc | None]] = []
            await self._wait_group_healthy(current, tg, dep)
        else:
            todo = [(a.index, a) for a in current]
        used = {a.index for a in current}
        todo += [(i, None) for i in range(want) if i not in used]
        batch = max(1, int(tg["Update"]["MaxParallel"] or len(todo) or 1))
        for start in range(0, len(todo), batch):
            chunk = todo[start : start + batch]
            await asyncio.gather(
                *(self._stop_alloc(old, "alloc is being updated due to job update")
                  for _, old in chunk if old is not None)
            )  # fmt: skip
            placed = []
            for index, _ in chunk:
                placed.append(await self._place(job, tg, index, dep, eval_id))
                state["PlacedAllocs"] += 1
                dep.modify_index = self._bump()
            await self._wait_group_healthy(placed, tg, dep)

    async def _wait_group_healthy(self, allocs: list[_Alloc], tg: dict, dep: _Deployment) -> None:
        state = dep.groups[tg["Name"]]
        deadline = time.monotonic() + tg["Update"]["ProgressDeadline"] / NS
        counted: set[str] = set()
        while True:
            for a in allocs:
                if a.healthy is not None and a.id not in counted:
                    counted.add(a.id)
                    state["HealthyAllocs" if a.healthy else "UnhealthyAllocs"] += 1
                    dep.modify_index = self._bump()
            bad = [a for a in allocs if a.healthy is False]
            if bad:
                raise _DeploymentFailed("Failed due to unhealthy allocations")
            if all(a.healthy for a in allocs):
                return
            if time.monotonic() > deadline:
                raise _DeploymentFailed("Failed due to progress deadline")
            await asyncio.sleep(self.check_interval / 2)

    def _task_env(self, job: dict, tg: dict, task: dict, a: _Alloc) -> dict[str, str]:
        adir = self.workdir / "allocs" / a.id
        env = dict(self.base_env)
        meta = {**(job.get("Meta") or {}), **(tg.get("Meta") or {}), **(task.get("Meta") or {})}
        env.update(
            {
                "NOMAD_ALLOC_ID": a.id,
                "NOMAD_ALLOC_NAME": f"{job['ID']}.{tg['Name']}[{a.index}]",
                "NOMAD_ALLOC_INDEX": str(a.index),
                "NOMAD_ALLOC_DIR": str(adir / "alloc"),
                "NOMAD_TASK_DIR": str(adir / task["Name"] / "local"),
                "NOMAD_SECRETS_DIR": str(adir / task["Name"] / "secrets"),
                "NOMAD_GROUP_NAME": tg["Name"],
                "NOMAD_TASK_NAME": task["Name"],
                "NOMAD_JOB_ID": job["ID"],
                "NOMAD_JOB_NAME": job["Name"],
                "NOMAD_NAMESPACE": job["Namespace"],
                "NOMAD_REGION": job["Region"],
                "NOMAD_DC": self.datacenter,
                "NOMAD_CPU_LIMIT": str(task["Resources"]["CPU"]),
                "NOMAD_MEMORY_LIMIT": str(task["Resources"]["MemoryMB"]),
            }
        )
        for label, port in a.ports.items():
            env[f"NOMAD_PORT_{label}"] = str(port)
            env[f"NOMAD_HOST_PORT_{label}"] = str(port)
            env[f"NOMAD_IP_{label}"] = "127.0.0.1"
            env[f"NOMAD_HOST_IP_{label}"] = "127.0.0.1"
            env[f"NOMAD_ADDR_{label}"] = f"127.0.0.1:{port}"
        for k, v in meta.items():
            env[f"NOMAD_META_{k}"] = str(v)
            env[f"NOMAD_META_{k.upper()}"] = str(v)
        for k, v in (task.get("Env") or {}).items():
            env[k] = _interpolate(str(v), env)
        return env

    async def _place(
        self, job: dict[str, Any], tg: dict[str, Any], index: int, dep: _Deployment, eval_id: str
    ) -> _Alloc:
        idx = self._bump()
        ports = {}
        for net in tg.get("Networks") or []:
            for p in net.get("DynamicPorts") or []:
                ports[p["Label"]] = _free_port()
            for p in net.get("ReservedPorts") or []:
                ports[p["Label"]] = p["Value"]
        a = _Alloc(
            id=str(uuid.uuid4()),
            job_id=job["ID"],
            group=tg["Name"],
            index=index,
            job_version=job["Version"],
            eval_id=eval_id,
            deployment_id=dep.id,
            ports=ports,
            create_index=idx,
            modify_index=idx,
        )
        self._allocs[a.id] = a
        for task in tg["Tasks"]:
            t = a.tasks[task["Name"]] = _Task(task["Name"])
            t.events.append(_event("Received", display="Task received by client"))
            t.events.append(_event("Task Setup", "Building Task Directory",
                                   Details={"message": "Building Task Directory"}))  # fmt: skip
            await self._start_task(job, tg, task, a, t)
        a.client_status = "failed" if any(t.failed for t in a.tasks.values()) else "running"
        a.client_description = (
            "Failed tasks" if a.client_status == "failed" else "Tasks are running"
        )
        if a.client_status == "running":
            self._register_services(a, tg)
        a.modify_index = self._bump()
        a.watcher = asyncio.ensure_future(self._watch(a, job, tg))
        return a

    async def _start_task(self, job: dict, tg: dict, task: dict, a: _Alloc, t: _Task) -> None:
        if task.get("Driver") != "raw_exec":
            t.state, t.failed = "dead", True
            t.events.append(_event("Driver Failure", FailsTask=True,
                                   DriverError=f"driver {task.get('Driver')!r} is not available "
                                               "on this client (the double runs raw_exec only)"))  # fmt: skip
            return
        env = self._task_env(job, tg, task, a)
        cfg = task.get("Config") or {}
        argv = [_interpolate(str(cfg.get("command", "")), env)]
        argv += [_interpolate(str(x), env) for x in cfg.get("args") or []]
        tdir = self.workdir / "allocs" / a.id / task["Name"]
        (tdir / "local").mkdir(parents=True, exist_ok=True)
        (self.workdir / "allocs" / a.id / "alloc" / "logs").mkdir(parents=True, exist_ok=True)
        logs = self.workdir / "allocs" / a.id / "alloc" / "logs"
        out = open(logs / f"{task['Name']}.stdout.0", "ab")
        err = open(logs / f"{task['Name']}.stderr.0", "ab")
        try:
            t.proc = await asyncio.create_subprocess_exec(
                *argv, env=env, cwd=tdir, stdout=out, stderr=err, start_new_session=True
            )
        except OSError as exc:
            t.state, t.failed = "dead", True
            t.events.append(_event("Driver Failure", FailsTask=True, DriverError=str(exc)))
            return
        finally:
            out.close()
            err.close()
        t.state = "running"
        t.started_at = _now_ns()
        t.events.append(_event("Started", display="Task started by client"))

    def _service_id(self, a: _Alloc, svc: dict[str, Any]) -> str:
        return f"_nomad-task-{a.id}-group-{a.group}-{svc['Name']}-{svc['PortLabel']}"

    def _register_services(
        self, a: _Alloc, tg: dict[str, Any], known: dict[str, str] | None = None
    ) -> None:
        for svc in tg.get("Services") or []:
            sid = self._service_id(a, svc)
            check = (svc.get("Checks") or [None])[0]
            status = (known or {}).get(sid) or ("critical" if check else "passing")
            a.services[sid] = [svc, check, status]
            if self.consul is not None:
                self.consul.register(
                    sid, svc["Name"], "127.0.0.1", a.ports.get(svc["PortLabel"], 0),
                    tags=list(svc.get("Tags") or []),
                    meta={"external-source": "nomad", **(svc.get("Meta") or {})},
                    check_status=status if check else None, node=self.node,
                )  # fmt: skip

    def _reregister_services(self, a: _Alloc, tg: dict[str, Any]) -> None:
        """In-place update: Nomad syncs only changed service definitions (tags...) to Consul,
        keeping the known check status (an unchanged service is not touched at all)."""
        wanted = {self._service_id(a, s): s for s in tg.get("Services") or []}
        current = {sid: e[0] for sid, e in a.services.items()}
        if wanted == current:
            return
        known = {sid: e[2] for sid, e in a.services.items()}
        if self.consul is not None:
            for sid in set(current) - set(wanted):
                self.consul.deregister(sid)
        a.services.clear()
        self._register_services(a, tg, known)

    def _deregister_services(self, a: _Alloc, keep: bool = False) -> None:
        if self.consul is not None:
            for sid in a.services:
                self.consul.deregister(sid)
        if not keep:
            a.services.clear()

    async def _run_check(
        self, a: _Alloc, svc: dict[str, Any], check: dict[str, Any]
    ) -> tuple[str, str]:
        """(status, output) the way Consul words them."""
        port = a.ports.get(check.get("PortLabel") or svc["PortLabel"], 0)
        timeout = max(0.2, check.get("Timeout", 2 * NS) / NS)
        if check["Type"] == "tcp":
            target = f"127.0.0.1:{port}"
            try:
                _, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
                w.close()
                return "passing", f"TCP connect {target}: Success"
            except (OSError, TimeoutError) as exc:
                return "critical", f"dial tcp {target}: {str(exc) or 'i/o timeout'}"
        if check["Type"] == "http":
            url = f"http://127.0.0.1:{port}{check.get('Path') or '/'}"
            try:
                assert self._session is not None
                async with self._session.get(
                    url, timeout=aiohttp.ClientTimeout(total=timeout)
                ) as r:
                    body = (await r.read())[:200].decode(errors="replace")
                    out = f"HTTP GET {url}: {r.status} {r.reason} Output: {body}"
                    # Consul: 2xx passing, 429 warning, anything else critical
                    if 200 <= r.status < 300:
                        return "passing", out
                    return ("warning" if r.status == 429 else "critical"), out
            except (aiohttp.ClientError, TimeoutError) as exc:
                return "critical", f"Get {url}: {type(exc).__name__} {exc}"
        return "passing", ""  # other check types are not run by the double

    async def _watch(self, a: _Alloc, job: dict[str, Any], tg: dict[str, Any]) -> None:
        upd = tg["Update"]
        min_healthy = upd["MinHealthyTime"] / NS
        healthy_deadline = a.placed_at + (upd["HealthyDeadline"] / NS or 300)
        by_checks = upd["HealthCheck"] != "task_states"
        while a.desired_status == "run":
            dead = [
                t
                for t in a.tasks.values()
                if t.failed or (t.proc and t.proc.returncode is not None)
            ]
            if dead:
                for t in dead:
                    if t.state != "dead":
                        code = t.proc.returncode if t.proc else -1
                        t.state, t.failed, t.finished_at = "dead", True, _now_ns()
                        t.events.append(_event("Terminated", f"Exit Code: {code}", ExitCode=code))
                        t.events.append(_event("Not Restarting", "Error was unrecoverable",
                                               FailsTask=True))  # fmt: skip
                a.client_status, a.client_description = "failed", "Failed tasks"
                self._deregister_services(a)
                if a.healthy is None:
                    a.healthy, a.health_ts = False, _now_ns()
                a.modify_index = self._bump()
                return
            all_pass = True
            for sid, entry in list(a.services.items()):
                svc, check, status = entry
                if check is None:
                    continue
                new, output = await self._run_check(a, svc, check)
                if a.desired_status != "run":
                    return
                if new != status:
                    entry[2] = new
                    self.check_log.append((time.monotonic(), sid, new, output))
                    if self.consul is not None:
                        self.consul.set_check(sid, new, output)
                all_pass = all_pass and new == "passing"
            ok = all_pass if by_checks else True
            now = time.monotonic()
            if ok:
                a.passing_since = a.passing_since or now
            else:
                a.passing_since = None
            if a.healthy is None:
                if a.passing_since is not None and now - a.passing_since >= min_healthy:
                    a.healthy, a.health_ts = True, _now_ns()
                    a.health_index = a.modify_index = self._bump()
                elif now > healthy_deadline:
                    a.healthy, a.health_ts = False, _now_ns()
                    a.health_index = a.modify_index = self._bump()
            await asyncio.sleep(self.check_interval)

    async def _stop_alloc(self, a: _Alloc, why: str) -> None:
        if a.desired_status == "stop" and a.client_status in ("complete", "failed"):
            return
        a.desired_status = "stop"
        a.modify_index = self._bump()
        if a.watcher is not None:
            a.watcher.cancel()
        # Nomad deregisters the services first, so the proxies stop routing before the kill.
        self._deregister_services(a)
        job = self._jobs.get(a.job_id) or {}
        tasks = {t["Name"]: t for tg in job.get("TaskGroups") or [] for t in tg["Tasks"]
                 if tg["Name"] == a.group}  # fmt: skip
        for name, t in a.tasks.items():
            if t.proc is None or t.proc.returncode is not None:
                continue
            spec = tasks.get(name) or {}
            sig = getattr(signal, spec.get("KillSignal") or "SIGTERM", signal.SIGTERM)
            grace = min(self.kill_timeout_cap, (spec.get("KillTimeout") or 5 * NS) / NS)
            t.events.append(_event("Killing", "Sent interrupt", display=f"Sent interrupt. "
                                   f"Waiting {grace:g}s before force killing"))  # fmt: skip
            try:
                t.proc.send_signal(sig)
                await asyncio.wait_for(t.proc.wait(), grace)
            except TimeoutError:
                t.proc.kill()
                await t.proc.wait()
            except ProcessLookupError:
                pass
            t.state, t.finished_at = "dead", _now_ns()
            t.events.append(_event("Killed", "Task successfully killed"))
        if a.client_status != "failed":
            a.client_status, a.client_description = "complete", "All tasks have completed"
        a.modify_index = self._bump()

    # -- HTTP -------------------------------------------------------------------------------

    def _headers(self, index: int | None = None, leader: bool = True) -> dict[str, str]:
        h = {"X-Nomad-Index": str(index if index is not None else self._index)}
        if leader:
            h["X-Nomad-Knownleader"] = "true"
            h["X-Nomad-Lastcontact"] = "0"
        return h

    def _json(self, body: Any, index: int | None = None, leader: bool = True) -> web.Response:
        return web.Response(body=orjson.dumps(body), content_type="application/json",
                            headers=self._headers(index, leader))  # fmt: skip

    @staticmethod
    def _text(status: int, text: str) -> web.Response:
        return web.Response(status=status, text=text, content_type="text/plain",
                            charset="utf-8")  # fmt: skip

    async def _block(self, request: web.Request) -> None:
        """Blocking query: wait while the index is not above ?index=, at most ?wait=."""
        try:
            index = int(request.query.get("index", "0"))
        except ValueError:
            return
        if index <= 0 or self._index > index:
            return
        wait = _duration(request.query.get("wait", "5m"))
        deadline = time.monotonic() + min(wait, 600.0)
        while self._index <= index:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            assert self._changed is not None
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                return

    async def _run_hooks(self, method: str, path: str, when: str) -> None:
        for hook in list(self._hooks):
            m, p, w, fn = hook
            if m == method and p == path and w == when:
                self._hooks.remove(hook)
                result = fn(self)
                if asyncio.iscoroutine(result):
                    await result

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path = unquote(request.path)
        self.requests.append((request.method, request.path_qs))
        if self.acl_token is not None:
            token = request.headers.get("X-Nomad-Token") or request.query.get("token")
            if token != self.acl_token:
                return self._text(403, "Permission denied")
        await self._run_hooks(request.method, path, "before")
        resp = await self._route(request, path)
        await self._run_hooks(request.method, path, "after")
        return resp

    async def _route(self, request: web.Request, path: str) -> web.StreamResponse:
        m = request.method
        parts = path.strip("/").split("/")
        if parts[:1] != ["v1"]:
            return self._text(404, "Invalid URL")
        rest = parts[1:]
        if rest == ["status", "leader"] and m == "GET":
            return self._json("127.0.0.1:4647")
        if rest == ["jobs"] and m in ("POST", "PUT"):
            return await self._http_register(request, None)
        if rest == ["jobs"] and m == "GET":
            await self._block(request)
            return self._json([self._job_stub(j) for j in self._jobs.values()])
        if len(rest) >= 2 and rest[0] == "job":
            job_id, sub = rest[1], rest[2:]
            if not sub and m in ("POST", "PUT"):
                return await self._http_register(request, job_id)
            if sub == ["plan"] and m in ("POST", "PUT"):
                return await self._http_plan(request, job_id)
            if not sub and m == "DELETE":
                return await self._http_deregister(request, job_id)
            if m != "GET":
                return self._text(405, "Invalid method")
            await self._block(request)
            job = self._jobs.get(job_id)
            if job is None:
                return self._text(404, "job not found")
            if not sub:
                return self._json(job, job["ModifyIndex"])
            if sub == ["versions"]:
                versions = sorted(self._versions[job_id], key=lambda v: -v["Version"])
                return self._json({"Diffs": None, "Index": self._index, "KnownLeader": True,
                                   "LastContact": 0, "Versions": versions})  # fmt: skip
            if sub == ["allocations"]:
                allocs = [self._alloc_json(a) for a in self._allocs.values() if a.job_id == job_id]
                return self._json(allocs)
            if sub == ["deployment"]:
                d = self._latest_deployment(job_id)
                return self._json(self._deployment_json(d) if d else None)
            if sub == ["deployments"]:
                ds = sorted((d for d in self._deployments.values() if d.job_id == job_id),
                            key=lambda d: -d.create_index)  # fmt: skip
                return self._json([self._deployment_json(d) for d in ds])
            return self._text(404, "Invalid URL")
        if len(rest) == 2 and rest[0] == "deployment" and m == "GET":
            await self._block(request)
            d = self._deployments.get(rest[1])
            return (
                self._json(self._deployment_json(d))
                if d
                else self._text(404, "deployment not found")
            )
        if len(rest) == 2 and rest[0] == "allocation" and m == "GET":
            await self._block(request)
            a = self._allocs.get(rest[1])
            return (
                self._json(self._alloc_json(a, full=True))
                if a
                else self._text(404, "alloc not found")
            )
        return self._text(404, "Invalid URL")

    async def _read_job_body(self, request: web.Request) -> tuple[dict[str, Any] | None, str]:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            return None, f"Failed to decode request body: {exc}"
        if not isinstance(body, dict) or not isinstance(body.get("Job"), dict):
            return None, "Job must be specified"
        job = body["Job"]
        if not job.get("ID"):
            return None, "Job ID hasn't been provided"
        if not job.get("TaskGroups"):
            return None, "1 error occurred:\n\t* Missing job task groups\n\n"
        return body, ""

    async def _http_register(self, request: web.Request, path_id: str | None) -> web.Response:
        body, err = await self._read_job_body(request)
        if body is None:
            return self._text(400, err)
        invalid = nomad_validate.validate_job(body["Job"])
        if invalid is not None:  # Nomad answers a job that fails validation with a 500
            return self._text(500, invalid)
        if path_id is not None and body["Job"]["ID"] != path_id:
            return self._text(400, "Job ID does not match name")
        enforce = int(body.get("JobModifyIndex") or 0) if body.get("EnforceIndex") else None
        result = await self._register(body["Job"], enforce)
        if isinstance(result, str):
            return self._text(500, result)
        return self._json(result, result["Index"], leader=False)

    async def _http_deregister(self, request: web.Request, job_id: str) -> web.Response:
        """DELETE /v1/job/<id>[?purge=true]: stop every allocation; purge forgets the job."""
        job = self._jobs.get(job_id)
        if job is None:
            return self._text(404, "job not found")
        task = self._rollouts.pop(job_id, None)
        if task is not None:
            task.cancel()
        await asyncio.gather(*(self._stop_alloc(a, "alloc not needed since job was stopped")
                               for a in self._running_allocs(job_id)))  # fmt: skip
        idx = self._bump()
        if request.query.get("purge") in ("true", "1"):
            del self._jobs[job_id]
            self._versions.pop(job_id, None)
        else:
            job["Stop"] = True
            job["Status"] = "dead"
        return self._json({"EvalCreateIndex": idx, "EvalID": str(uuid.uuid4()), "Index": idx,
                           "JobModifyIndex": idx, "VolumesDeregistered": None},
                          idx, leader=False)  # fmt: skip

    async def _http_plan(self, request: web.Request, job_id: str) -> web.Response:
        body, err = await self._read_job_body(request)
        if body is None:
            return self._text(400, err)
        invalid = nomad_validate.validate_job(body["Job"])
        if invalid is not None:  # Nomad answers a job that fails validation with a 500
            return self._text(500, invalid)
        if body["Job"]["ID"] != job_id:
            return self._text(400, "Job ID does not match")
        job = canonicalize(body["Job"])
        diff, updates, _kinds = self._plan(job)
        failed = {}
        for tg in job["TaskGroups"]:
            drivers = {t.get("Driver") for t in tg["Tasks"]} - {"raw_exec"}
            if drivers and updates.get(tg["Name"], {}).get("Place", 0) + updates.get(
                tg["Name"], {}
            ).get("DestructiveUpdate", 0):
                failed[tg["Name"]] = {
                    "AllocationTime": 0, "ClassExhausted": None, "ClassFiltered": None,
                    "CoalescedFailures": 0, "ConstraintFiltered": {"missing drivers": 1},
                    "DimensionExhausted": None, "NodesAvailable": {self.datacenter: 1},
                    "NodesEvaluated": 1, "NodesExhausted": 0, "NodesFiltered": 1,
                    "QuotaExhausted": None, "ResourcesExhausted": None, "ScoreMetaData": None,
                    "Scores": None,
                }  # fmt: skip
        old = self._jobs.get(job_id)
        jmi = old["JobModifyIndex"] if old else 0
        return self._json(
            {"Annotations": {"DesiredTGUpdates": updates, "PreemptedAllocs": None},
             "CreatedEvals": None, "Diff": diff if body.get("Diff") else None,
             "FailedTGAllocs": failed or None, "Index": jmi, "JobModifyIndex": jmi,
             "NextPeriodicLaunch": None, "Warnings": ""},
            jmi, leader=False,
        )  # fmt: skip

    # -- rendering ----------------------------------------------------------------------------

    def _job_stub(self, job: dict[str, Any]) -> dict[str, Any]:
        return {k: job.get(k) for k in ("ID", "Name", "Type", "Priority", "Status",
                                         "StatusDescription", "Stop", "Version",
                                         "JobModifyIndex", "ModifyIndex", "CreateIndex",
                                         "SubmitTime", "Namespace")}  # fmt: skip

    def _deployment_json(self, d: _Deployment) -> dict[str, Any]:
        return {
            "CreateIndex": d.create_index,
            "ID": d.id,
            "IsMultiregion": False,
            "JobCreateIndex": d.job_create_index,
            "JobID": d.job_id,
            "JobModifyIndex": d.job_modify_index,
            "JobSpecModifyIndex": d.job_modify_index,
            "JobVersion": d.job_version,
            "ModifyIndex": d.modify_index,
            "Namespace": "default",
            "Status": d.status,
            "StatusDescription": d.description,
            "TaskGroups": copy.deepcopy(d.groups),
        }

    def _alloc_json(self, a: _Alloc, full: bool = False) -> dict[str, Any]:
        states = {}
        for name, t in a.tasks.items():
            states[name] = {
                "Events": list(t.events),
                "Failed": t.failed,
                "FinishedAt": _rfc3339(t.finished_at) if t.finished_at else None,
                "LastRestart": None,
                "Restarts": 0,
                "StartedAt": _rfc3339(t.started_at) if t.started_at else None,
                "State": t.state,
                "TaskHandle": None,
            }
        dstatus = None
        if a.healthy is not None:
            dstatus = {"Canary": False, "Healthy": a.healthy, "ModifyIndex": a.health_index,
                       "Timestamp": _rfc3339(a.health_ts)}  # fmt: skip
        out = {
            "ClientDescription": a.client_description,
            "ClientStatus": a.client_status,
            "CreateIndex": a.create_index,
            "CreateTime": a.create_time,
            "DeploymentStatus": dstatus,
            "DesiredDescription": "",
            "DesiredStatus": a.desired_status,
            "DesiredTransition": {"ForceReschedule": None, "Migrate": None, "Reschedule": None},
            "EvalID": a.eval_id,
            "FollowupEvalID": "",
            "ID": a.id,
            "JobID": a.job_id,
            "JobType": "service",
            "JobVersion": a.job_version,
            "ModifyIndex": a.modify_index,
            "ModifyTime": a.modify_time,
            "Name": f"{a.job_id}.{a.group}[{a.index}]",
            "Namespace": "default",
            "NodeID": self.node_id,
            "NodeName": self.node,
            "PreemptedAllocations": None,
            "PreemptedByAllocation": "",
            "RescheduleTracker": None,
            "TaskGroup": a.group,
            "TaskStates": states,
        }
        if full:
            out["DeploymentID"] = a.deployment_id or ""
            out["AllocatedResources"] = {
                "Shared": {
                    "Networks": [
                        {"IP": "127.0.0.1", "Mode": "host", "DynamicPorts": [
                            {"Label": k, "Value": v, "To": 0, "HostNetwork": "default"}
                            for k, v in a.ports.items()]}
                    ],
                    "Ports": [{"HostIP": "127.0.0.1", "Label": k, "To": 0, "Value": v}
                              for k, v in a.ports.items()],
                }
            }  # fmt: skip
        return out


class _DeploymentFailed(Exception):
    pass


def _interpolate(text: str, env: dict[str, str]) -> str:
    """Nomad's ${VAR} interpolation; unknown variables are left as written."""
    return _VAR.sub(lambda m: env.get(m.group(1), m.group(0)), text)


def _duration(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)?", text.strip())
    if not m:
        return 300.0
    return (
        float(m.group(1)) * {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1e-9}[m.group(2)]
    )
