"""A small Consul HTTP API test double, answering like the real agent (Consul 1.10) field for field.

The shapes, status codes, headers and plain-text error bodies follow the recordings in
/work/shared/api-samples/consul-exchanges.json. It runs an aiohttp server in its own thread and
event loop on 127.0.0.1:0, so both synchronous tests and tests running their own event loop (or
proxy child processes) can talk to it. State changes from any thread bump one global raft index
and wake the blocking queries waiting on the changed resource.

Contract (shared with other helpers; see CONSUL_DOUBLE.md)::

    c = FakeConsul(); url = c.start()
    c.register(service_id, name, address, port, tags=[...], meta={...}, check_status="passing")
    c.deregister(id); c.set_check(id, status); c.kv_set(k, v) -> idx; c.kv_get(k); c.kv_delete(k)
    c.services(name); c.set_down(bool); c.acl_token = "..."; c.garbage = True; c.hang = True
    c.hanging  # (extra) number of blocking queries currently held by `hang`
    c.wipe()   # (extra) forget all state and restart the index, like a restarted -dev agent

Endpoints: GET /v1/health/service/<name> (passing, tag, index, wait, dc), GET/PUT/DELETE
/v1/kv/<key> (raw, recurse, keys, index, wait, cas, flags, dc), PUT /v1/agent/service/register,
/v1/agent/service/deregister/<id>, /v1/agent/service/maintenance/<id> (enable, reason),
/v1/agent/check/pass|warn|fail|update/<id>, GET /v1/status/leader, and sessions with KV locks
(/v1/session/create|renew|destroy|info|list, `?acquire=` / `?release=`: consul_sessions.py). ACL: X-Consul-Token header,
`token=` or `Authorization: Bearer`.
    c.requests  # [(method, path_qs), ...]
    c.federate(other)  # (extra) answer `dc=<other.datacenter>` requests from `other`
    c.stop()

Semantics kept from the real agent: a blocking query (`index` > 0) returns as soon as the index
of *that* resource goes above `index`, or after `wait` plus a random jitter of up to wait/16 with
the same index; a missing KV key answers 404 with X-Consul-Index; `PUT ?cas=N` answers `true` or
`false`; TTL checks start critical, go critical when not refreshed within their TTL, and a
service whose check stays critical longer than DeregisterCriticalServiceAfter is reaped.
"""

from __future__ import annotations

import asyncio
import base64
import random
import re
import ssl
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import aiohttp
import orjson
from aiohttp import web

from .consul_sessions import Sessions

STATUSES = ("passing", "warning", "critical")
DEFAULT_WAIT = 300.0  # Consul: 5 minutes when `index` is given without `wait`
MAX_WAIT = 600.0  # Consul caps `wait` at 10 minutes
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_go_duration(text: str) -> float:
    """Go's time.ParseDuration ("5s", "100ms", "1m30s") -> seconds. Raises ValueError."""
    s = text.strip()
    if s in ("0", ""):
        if s == "0":
            return 0.0
        raise ValueError("empty duration")
    sign = -1.0 if s.startswith("-") else 1.0
    s = s.lstrip("+-")
    pos, total = 0, 0.0
    for m in _DURATION.finditer(s):
        if m.start() != pos:
            raise ValueError(f"invalid duration {text!r}")
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(s) or pos == 0:
        raise ValueError(f"invalid duration {text!r}")
    return sign * total


@dataclass(slots=True)
class _Check:
    check_id: str
    name: str
    status: str
    service_id: str = ""
    type: str = ""
    interval: str = ""
    timeout: str = ""
    notes: str = ""
    output: str = ""
    ttl: float | None = None
    ttl_deadline: float = 0.0
    deregister_after: float | None = None
    critical_since: float | None = None
    create_index: int = 0
    modify_index: int = 0


@dataclass(slots=True)
class _Service:
    id: str
    name: str
    address: str
    port: int
    tags: list[str]
    meta: dict[str, str]
    node: str
    create_index: int
    modify_index: int
    checks: list[_Check] = field(default_factory=list)


@dataclass(slots=True)
class _KV:
    key: str
    value: bytes
    flags: int
    create_index: int
    modify_index: int
    lock_index: int = 0  # sessions: how many times the key was acquired
    session: str | None = None  # sessions: the session holding it


@dataclass(slots=True)
class _Node:
    name: str
    id: str
    create_index: int
    modify_index: int


class FakeConsul:
    """Consul agent double; see the module docstring for the contract."""

    def __init__(
        self,
        datacenter: str = "dc1",
        leader: str = "127.0.0.1:8300",
        ssl_context: ssl.SSLContext | None = None,
        session_ttl_min: float = 10.0,
        host: str = "127.0.0.1",  # (extra) the address to listen on (a multi-host test's)
    ) -> None:
        self.host = host
        self.datacenter = datacenter
        self.ssl_context = ssl_context  # serve HTTPS (url becomes https://...)
        self.leader = leader
        self.acl_token: str | None = None
        self.garbage = False
        self.hang = False
        self.hanging = 0  # blocking queries currently held by `hang`
        self.requests: list[tuple[str, str]] = []
        self.federated: dict[str, FakeConsul] = {}  # datacenter -> double answering for it
        self.url = ""
        self.port = 0
        self._lock = threading.RLock()
        self._index = 10  # the raft index; a fresh dev agent is already past a few writes
        self._kv: dict[str, _KV] = {}
        self._kv_index = 1  # index of the kvs table (writes and tombstones)
        self._services: dict[str, _Service] = {}
        self._service_index: dict[str, int] = {}  # per service name: last change
        self._services_table = 1
        self._nodes: dict[str, _Node] = {}
        self._down = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._changed: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._inflight: dict[int, web.Request] = {}
        # Sessions and KV locks (consul_sessions.py); session_ttl_min is Consul's own setting.
        self.sessions = Sessions(self, ttl_min=session_ttl_min)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> str:
        """Start the server thread; returns the base URL ("http://127.0.0.1:PORT")."""
        if self._thread is not None:
            return self.url
        ready = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._startup())
            except BaseException as exc:  # report to the starting thread
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._shutdown())
            loop.close()

        self._thread = threading.Thread(target=main, name="fake-consul", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("FakeConsul did not start within 10 s")
        if failure:
            raise RuntimeError(f"FakeConsul did not start: {failure[0]}")
        scheme = "https" if self.ssl_context is not None else "http"
        self.url = f"{scheme}://{self.host}:{self.port}"
        return self.url

    def stop(self) -> None:
        if self._thread is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._thread = None

    async def _startup(self) -> None:
        self._changed = asyncio.Event()
        await self._listen(0)
        self._reaper = asyncio.get_running_loop().create_task(self._reap_loop())

    async def _shutdown(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        for req in list(self._inflight.values()):
            if req.transport is not None:
                req.transport.abort()
        if self._runner is not None:
            await self._runner.cleanup()
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in rest:
            t.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

    async def _listen(self, port: int) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        # A short shutdown timeout: blocking queries must not hold set_down(True) back.
        # handler_cancellation: a client that gives up (watchdog) releases its hung handler.
        self._runner = web.AppRunner(
            app, access_log=None, shutdown_timeout=0.2, handler_cancellation=True
        )
        await self._runner.setup()
        self._site = web.TCPSite(
            self._runner, self.host, port, reuse_address=True, ssl_context=self.ssl_context
        )
        await self._site.start()
        self.port = self._site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def _call(self, coro: Any, timeout: float = 10.0) -> Any:
        assert self._loop is not None, "FakeConsul is not started"
        if threading.current_thread() is self._thread:
            raise RuntimeError("call this from outside the FakeConsul thread")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # -- fault injection ------------------------------------------------------------------------

    def set_down(self, down: bool) -> None:
        """Down: the listener is closed (connection refused) and open connections are cut.
        Up again: listening on the same port."""
        self._call(self._set_down(down))

    async def _set_down(self, down: bool) -> None:
        if down == self._down:
            return
        self._down = down
        if down:
            self._wake()  # blocking handlers notice `_down` and abort their connection
            for req in list(self._inflight.values()):
                if req.transport is not None:
                    req.transport.abort()
            assert self._runner is not None
            await self._runner.cleanup()
            self._runner = self._site = None
        else:
            for _ in range(50):  # the port may linger for a moment after close
                try:
                    await self._listen(self.port)
                    return
                except OSError:
                    await asyncio.sleep(0.05)
            await self._listen(self.port)

    @property
    def down(self) -> bool:
        return self._down

    # -- state (thread-safe) --------------------------------------------------------------------

    def _bump(self) -> int:
        self._index += 1
        return self._index

    def _wake(self) -> None:
        """Wake every blocking query; each re-checks the index of its own resource."""
        loop = self._loop
        if loop is None:
            return

        def fire() -> None:
            if self._changed is not None:
                self._changed.set()
                self._changed = asyncio.Event()

        if threading.current_thread() is self._thread:
            fire()
        else:
            loop.call_soon_threadsafe(fire)

    def _node(self, name: str) -> _Node:
        node = self._nodes.get(name)
        if node is None:
            idx = self._bump()
            nid = str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{name}.fake-consul"))
            node = self._nodes[name] = _Node(name, nid, idx, idx)
        return node

    def register(
        self,
        service_id: str,
        name: str,
        address: str,
        port: int,
        tags: Iterable[str] = (),
        meta: dict[str, str] | None = None,
        check_status: str | None = "passing",
        node: str = "vm",
    ) -> int:
        """Register (or replace) a service instance with one check in `check_status`
        (None: no service check). Returns the new index."""
        checks = []
        if check_status is not None:
            if check_status not in STATUSES:
                raise ValueError(f"check status must be one of {STATUSES}")
            checks.append(
                {"CheckID": f"service:{service_id}", "Name": f"Service '{name}' check",
                 "Status": check_status, "Type": "http", "Interval": "2s", "Timeout": "1s"}
            )  # fmt: skip
        with self._lock:
            idx = self._register(service_id, name, address, port, list(tags), meta or {}, node)
            for c in checks:
                self._add_check(self._services[service_id], c)
        self._wake()
        return idx

    def _register(
        self,
        service_id: str,
        name: str,
        address: str,
        port: int,
        tags: list[str],
        meta: dict[str, str],
        node: str,
    ) -> int:
        self._node(node)
        old = self._services.get(service_id)
        idx = self._bump()
        svc = _Service(
            id=service_id,
            name=name,
            address=address,
            port=port,
            tags=tags,
            meta=meta,
            node=node,
            create_index=old.create_index if old else idx,
            modify_index=idx,
        )
        self._services[service_id] = svc
        if old is not None and old.name != name:
            self._service_index[old.name] = idx
        self._service_index[name] = idx
        self._services_table = idx
        return idx

    def _add_check(self, svc: _Service, d: dict[str, Any]) -> None:
        ttl = parse_go_duration(d["TTL"]) if d.get("TTL") else None
        after = d.get("DeregisterCriticalServiceAfter")
        kind = "ttl" if ttl else "http" if d.get("HTTP") else "tcp" if d.get("TCP") else ""
        kind = d.get("Type", kind)
        # TTL checks start critical until the first heartbeat (as in Consul); HTTP/TCP checks
        # are not probed by the double and count as passing unless told otherwise.
        status = d.get("Status") or ("critical" if kind == "ttl" else "passing")
        idx = self._bump()
        c = _Check(
            check_id=d["CheckID"],
            name=d.get("Name") or f"Service '{svc.name}' check",
            status=status,
            service_id=svc.id,
            type=kind,
            interval=d.get("Interval", ""),
            timeout=d.get("Timeout", ""),
            notes=d.get("Notes", ""),
            ttl=ttl,
            ttl_deadline=time.monotonic() + ttl if ttl else 0.0,
            deregister_after=parse_go_duration(after) if after else None,
            critical_since=time.monotonic() if status == "critical" else None,
            create_index=idx,
            modify_index=idx,
        )
        svc.checks = [x for x in svc.checks if x.check_id != c.check_id] + [c]
        self._service_index[svc.name] = idx
        self._services_table = idx

    def deregister(self, service_id: str) -> bool:
        """Remove a service instance and its checks. Returns False if it was unknown."""
        with self._lock:
            found = self._deregister(service_id)
        self._wake()
        return found

    def _deregister(self, service_id: str) -> bool:
        svc = self._services.pop(service_id, None)
        if svc is None:
            return False
        idx = self._bump()
        self._service_index[svc.name] = idx
        self._services_table = idx
        return True

    def set_check(self, service_id: str, status: str, output: str = "") -> None:
        """Set every check of a service to passing | warning | critical."""
        if status not in STATUSES:
            raise ValueError(f"check status must be one of {STATUSES}")
        with self._lock:
            svc = self._services.get(service_id)
            if svc is None:
                raise KeyError(f"unknown service id {service_id!r}")
            for c in svc.checks:
                self._update_check(svc, c, status, output)
        self._wake()

    def _update_check(self, svc: _Service, c: _Check, status: str, output: str) -> None:
        if c.ttl:
            c.ttl_deadline = time.monotonic() + c.ttl
        if c.status == status and c.output == output:
            return  # Consul does not bump the index for a heartbeat that changes nothing
        if status == "critical" and c.status != "critical":
            c.critical_since = time.monotonic()
        elif status != "critical":
            c.critical_since = None
        c.status, c.output = status, output
        c.modify_index = self._bump()
        self._service_index[svc.name] = c.modify_index
        self._services_table = c.modify_index

    def kv_set(self, key: str, value: str | bytes, flags: int = 0) -> int:
        """Write a key (no CAS). Returns its new ModifyIndex."""
        with self._lock:
            idx = self._kv_put(key, value.encode() if isinstance(value, str) else value, flags)
        self._wake()
        return idx

    def _kv_put(self, key: str, value: bytes, flags: int) -> int:
        idx = self._bump()
        old = self._kv.get(key)
        self._kv[key] = _KV(key, value, flags, old.create_index if old else idx, idx)
        if old is not None:  # a plain write keeps the lock (Consul does not check it)
            self._kv[key].lock_index, self._kv[key].session = old.lock_index, old.session
        self._kv_index = idx
        return idx

    def kv_get(self, key: str) -> tuple[str, int] | None:
        with self._lock:
            e = self._kv.get(key)
            return (e.value.decode(errors="replace"), e.modify_index) if e else None

    def kv_delete(self, key: str) -> bool:
        with self._lock:
            found = self._kv_delete(key, recurse=False)
        self._wake()
        return found

    def _kv_delete(self, key: str, recurse: bool) -> bool:
        keys = [k for k in self._kv if k.startswith(key)] if recurse else [key]
        found = False
        for k in keys:
            found = self._kv.pop(k, None) is not None or found
        if found:
            self._kv_index = self._bump()  # the tombstone index
        return found

    def services(self, name: str, passing: bool = False, tags: Iterable[str] = ()) -> list[dict]:
        """The body /v1/health/service/<name> would return."""
        with self._lock:
            return self._health(name, passing, list(tags))

    @property
    def index(self) -> int:
        """The current raft index."""
        return self._index

    def wipe(self) -> None:
        """(extra) Lose every service, check and key and start the raft index over, like a
        `-dev` agent restarted without its data: clients see indexes go backwards."""
        with self._lock:
            self._services.clear()
            self._service_index.clear()
            self._kv.clear()
            self._nodes.clear()
            self.sessions.by_id.clear()
            self.sessions.lock_delay_until.clear()
            self._index, self._kv_index, self._services_table = 10, 1, 1
        self._wake()

    # -- rendering ------------------------------------------------------------------------------

    def _node_json(self, n: _Node) -> dict[str, Any]:
        return {
            "ID": n.id,
            "Node": n.name,
            "Address": "127.0.0.1",
            "Datacenter": self.datacenter,
            "TaggedAddresses": {
                "lan": "127.0.0.1",
                "lan_ipv4": "127.0.0.1",
                "wan": "127.0.0.1",
                "wan_ipv4": "127.0.0.1",
            },
            "Meta": {"consul-network-segment": ""},
            "CreateIndex": n.create_index,
            "ModifyIndex": n.modify_index,
        }

    def _check_json(self, node: str, c: _Check, svc: _Service | None) -> dict[str, Any]:
        return {
            "Node": node,
            "CheckID": c.check_id,
            "Name": c.name,
            "Status": c.status,
            "Notes": c.notes,
            "Output": c.output,
            "ServiceID": svc.id if svc else "",
            "ServiceName": svc.name if svc else "",
            "ServiceTags": list(svc.tags) if svc else [],
            "Type": c.type,
            "Interval": c.interval,
            "Timeout": c.timeout,
            "ExposedPort": 0,
            "Definition": {},
            "CreateIndex": c.create_index,
            "ModifyIndex": c.modify_index,
        }

    def _serf(self, n: _Node) -> dict[str, Any]:
        c = _Check(
            "serfHealth", "Serf Health Status", "passing", output="Agent alive and reachable"
        )
        c.create_index = c.modify_index = n.create_index
        return self._check_json(n.name, c, None)

    def _service_json(self, s: _Service) -> dict[str, Any]:
        tagged = {}
        if s.address:
            tagged = {
                "lan_ipv4": {"Address": s.address, "Port": s.port},
                "wan_ipv4": {"Address": s.address, "Port": s.port},
            }
        return {
            "ID": s.id,
            "Service": s.name,
            "Tags": list(s.tags),
            "Address": s.address,
            "TaggedAddresses": tagged,
            "Meta": dict(s.meta),
            "Port": s.port,
            "Weights": {"Passing": 1, "Warning": 1},
            "EnableTagOverride": False,
            "Proxy": {"Mode": "", "MeshGateway": {}, "Expose": {}},
            "Connect": {},
            "CreateIndex": s.create_index,
            "ModifyIndex": s.modify_index,
        }

    def _health(self, name: str, passing: bool, tags: list[str]) -> list[dict[str, Any]]:
        out = []
        for s in sorted(self._services.values(), key=lambda s: (s.node, s.id)):
            if s.name != name or not all(t in s.tags for t in tags):
                continue
            node = self._nodes[s.node]
            checks = [self._serf(node)] + [self._check_json(s.node, c, s) for c in s.checks]
            if passing and any(c["Status"] != "passing" for c in checks):
                continue
            out.append({"Node": self._node_json(node), "Service": self._service_json(s),
                        "Checks": checks})  # fmt: skip
        return out

    def _service_idx(self, name: str) -> int:
        # An unknown service name reports the index of the whole services table, as Consul does.
        return self._service_index.get(name, self._services_table)

    # -- TTL expiry and reaping -----------------------------------------------------------------

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            now = time.monotonic()
            changed = False
            with self._lock:
                for svc in list(self._services.values()):
                    for c in svc.checks:
                        if c.ttl and c.status != "critical" and now > c.ttl_deadline:
                            self._update_check(svc, c, "critical", "TTL expired")
                            changed = True
                    if any(
                        c.deregister_after is not None
                        and c.critical_since is not None
                        and now - c.critical_since >= c.deregister_after
                        for c in svc.checks
                    ):
                        self._deregister(svc.id)
                        changed = True
                changed = self.sessions.expire(now) or changed
            if changed:
                self._wake()

    # -- HTTP -----------------------------------------------------------------------------------

    def _headers(self, index: int, json: bool = True) -> dict[str, str]:
        h = {
            "X-Consul-Index": str(max(index, 1)),
            "X-Consul-Knownleader": "true",
            "X-Consul-Lastcontact": "0",
        }
        if json:
            h["Content-Type"] = "application/json"
        return h

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path_qs))
        if self._down:  # a request that slipped in while going down
            return _abort(request)
        path = request.path
        if path == "/v1/status/leader" and request.method == "GET":
            return self._json(orjson.dumps(self.leader), {"Content-Type": "application/json"})
        if self.acl_token is not None and self._token(request) != self.acl_token:
            return web.Response(status=403, text="ACL not found")
        if self.garbage:  # e.g. a misconfigured load balancer in front of the agent
            return web.Response(
                status=200,
                body=b"<html><body>upstream said: \x00garbage{",
                headers={"Content-Type": "application/json"},
            )
        dc = request.query.get("dc")
        if dc and dc != self.datacenter and not path.startswith("/v1/agent/"):
            # Agent endpoints are always the local agent's (they take no dc); everything else
            # is forwarded to a federated datacenter, as the real agent forwards to its servers.
            remote = self.federated.get(dc)
            if remote is None:
                return web.Response(status=500, text="No path to datacenter")
            return await self._forward(request, remote)
        self._inflight[id(request)] = request
        try:
            if path.startswith("/v1/health/service/"):
                if request.method != "GET":
                    return _method_not_allowed(request)
                return await self._health_service(
                    request, unquote(path[len("/v1/health/service/") :])
                )
            if path.startswith("/v1/kv/"):
                return await self._kv_endpoint(request, unquote(path[len("/v1/kv/") :]))
            if path.startswith("/v1/session/"):
                return await self.sessions.endpoint(request, unquote(path[len("/v1/session/") :]))
            if path.startswith("/v1/agent/"):
                if request.method != "PUT":
                    return _method_not_allowed(request)
                return await self._agent(request, path[len("/v1/agent/") :])
            return web.Response(status=404, text="404 page not found\n")
        finally:
            self._inflight.pop(id(request), None)

    def federate(self, other: FakeConsul) -> None:
        """(extra) WAN-join another double: requests with `dc=<other.datacenter>` to this agent
        are answered by `other` (blocking queries included), as a real agent forwards them."""
        self.federated[other.datacenter] = other

    async def _forward(self, request: web.Request, remote: FakeConsul) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() in _FORWARDED}
        body = await request.read()
        self._inflight[id(request)] = request  # cut by set_down like any other request
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as s,
                s.request(request.method, remote.url + request.path_qs, data=body or None,
                          headers=headers, ssl=False) as r,
            ):  # fmt: skip
                data = await r.read()
                out = {k: v for k, v in r.headers.items() if k.lower().startswith("x-consul-")}
                if "Content-Type" in r.headers:
                    out["Content-Type"] = r.headers["Content-Type"]
                return web.Response(status=r.status, body=data, headers=out)
        except aiohttp.ClientError:
            return web.Response(status=500, text=f"rpc error: datacenter {remote.datacenter} "
                                                 "is unreachable")  # fmt: skip
        finally:
            self._inflight.pop(id(request), None)

    @staticmethod
    def _token(request: web.Request) -> str | None:
        token = request.headers.get("X-Consul-Token") or request.query.get("token")
        if token:
            return token
        auth = request.headers.get("Authorization", "")
        return auth[7:].strip() if auth.lower().startswith("bearer ") else None

    def _json(self, body: bytes, headers: dict[str, str], status: int = 200) -> web.Response:
        return web.Response(status=status, body=body, headers=headers)

    async def _block(self, request: web.Request, current: Any) -> web.Response | None:
        """Wait as a blocking query does. `current()` returns the resource's index.
        Returns a 400 response when the query parameters are malformed, else None."""
        q = request.query
        try:
            index = int(q["index"]) if "index" in q else 0
            if index < 0:
                raise ValueError
        except ValueError:
            return web.Response(status=400, text="Invalid index")
        try:
            wait = parse_go_duration(q["wait"]) if "wait" in q else DEFAULT_WAIT
        except ValueError:
            return web.Response(status=400, text="Invalid wait time")
        if index <= 0:
            return None
        wait = min(max(wait, 0.0), MAX_WAIT)
        deadline = time.monotonic() + wait + random.uniform(0, wait / 16)
        while True:
            if self.hang:  # never answers, even on a change: only the client's timeout ends it
                await self._hang()
            with self._lock:
                if current() > index:
                    return None
            if self._down:
                raise _Cut
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            changed = self._changed
            assert changed is not None
            try:
                await asyncio.wait_for(changed.wait(), left)
            except TimeoutError:
                return None

    async def _hang(self) -> None:
        self.hanging += 1
        try:
            while not self._down:
                changed = self._changed
                assert changed is not None
                await changed.wait()
        finally:
            self.hanging -= 1
        raise _Cut

    async def _health_service(self, request: web.Request, name: str) -> web.StreamResponse:
        try:
            error = await self._block(request, lambda: self._service_idx(name))
        except _Cut:
            return _abort(request)
        if error is not None:
            return error
        q = request.query
        passing = _flag(q, "passing")
        with self._lock:
            body = self._health(name, passing, q.getall("tag", []))
            headers = self._headers(self._service_idx(name))
        headers["X-Consul-Effective-Consistency"] = "leader"
        return self._json(orjson.dumps(body), headers)

    def _kv_json(self, e: _KV) -> dict[str, Any]:
        out = {
            "LockIndex": e.lock_index,
            "Key": e.key,
            "Flags": e.flags,
            "Value": base64.b64encode(e.value).decode() if e.value else None,
            "CreateIndex": e.create_index,
            "ModifyIndex": e.modify_index,
        }
        if e.session is not None:  # Consul: "Session" only while the key is held
            out["Session"] = e.session
        return out

    async def _kv_endpoint(self, request: web.Request, key: str) -> web.StreamResponse:
        q = request.query
        recurse = _flag(q, "recurse")
        if request.method == "GET":
            if recurse:

                def current() -> int:
                    return self._kv_index

            else:

                def current() -> int:
                    e = self._kv.get(key)
                    return e.modify_index if e else self._kv_index

            try:
                error = await self._block(request, current)
            except _Cut:
                return _abort(request)
            if error is not None:
                return error
            with self._lock:
                if recurse:
                    entries = [e for k, e in sorted(self._kv.items()) if k.startswith(key)]
                    index = self._kv_index
                else:
                    e = self._kv.get(key)
                    entries = [e] if e else []
                    index = e.modify_index if e else self._kv_index
            headers = self._headers(index, json=False)
            if not entries:
                return web.Response(status=404, headers=headers)
            if _flag(q, "raw") and not recurse:
                headers["Content-Type"] = "text/plain"
                return web.Response(status=200, body=entries[0].value, headers=headers)
            if _flag(q, "keys"):
                headers["Content-Type"] = "application/json"
                return self._json(orjson.dumps([e.key for e in entries]), headers)
            headers["Content-Type"] = "application/json"
            return self._json(orjson.dumps([self._kv_json(e) for e in entries]), headers)
        if request.method == "PUT":
            value = await request.read()
            try:
                flags = int(q.get("flags", "0"))
                cas = int(q["cas"]) if "cas" in q else None
            except ValueError:
                return web.Response(status=400, text="Invalid flags or cas index")
            if not key:
                return web.Response(status=400, text="Missing key name")
            lock_op = "acquire" if "acquire" in q else "release" if "release" in q else None
            if lock_op is not None:
                with self._lock:
                    got = self.sessions.kv_lock(key, value, flags, lock_op, q[lock_op])
                if isinstance(got, str):
                    return web.Response(status=500, text=got)
                if got:
                    self._wake()
                return self._json(
                    b"true" if got else b"false", {"Content-Type": "application/json"}
                )
            with self._lock:
                e = self._kv.get(key)
                ok = (
                    cas is None
                    or (cas == 0 and e is None)
                    or (e is not None and e.modify_index == cas)
                )
                if ok:
                    self._kv_put(key, value, flags)
            if ok:
                self._wake()
            return self._json(b"true" if ok else b"false", {"Content-Type": "application/json"})
        if request.method == "DELETE":
            try:
                cas = int(q["cas"]) if "cas" in q else None
            except ValueError:
                return web.Response(status=400, text="Invalid cas index")
            with self._lock:
                e = self._kv.get(key)
                ok = (
                    cas is None
                    or (e is not None and e.modify_index == cas)
                    or (e is None and cas == 0)
                )
                if ok:
                    self._kv_delete(key, recurse)
            if ok:
                self._wake()
            return self._json(b"true" if ok else b"false", {"Content-Type": "application/json"})
        return _method_not_allowed(request)

    async def _agent(self, request: web.Request, rest: str) -> web.StreamResponse:
        if rest == "service/register":
            raw = await request.read()
            try:
                body = _ci(orjson.loads(raw))
                if not isinstance(body, dict):
                    raise ValueError("not an object")
            except (orjson.JSONDecodeError, ValueError) as exc:
                return web.Response(status=400, text=f"Request decode failed: {exc}")
            name = body.get("Name")
            if not name or not isinstance(name, str):
                return web.Response(status=400, text="Missing service name")
            sid = body.get("ID") or name
            checks = list(body.get("Checks") or [])
            if body.get("Check"):
                checks.insert(0, body["Check"])
            for n, c in enumerate(checks):
                if not isinstance(c, dict):
                    return web.Response(status=400, text="Request decode failed: bad check")
                c.setdefault(
                    "CheckID", f"service:{sid}" if len(checks) == 1 else f"service:{sid}:{n + 1}"
                )
                if c.get("Status") and c["Status"] not in STATUSES:
                    return web.Response(
                        status=400, text="Status for checks must 'passing', 'warning', 'critical'"
                    )
                try:
                    if c.get("TTL"):
                        parse_go_duration(c["TTL"])
                    if c.get("DeregisterCriticalServiceAfter"):
                        parse_go_duration(c["DeregisterCriticalServiceAfter"])
                except ValueError as exc:
                    return web.Response(status=400, text=f"Request decode failed: {exc}")
            with self._lock:
                self._register(
                    sid, name, body.get("Address") or "", int(body.get("Port") or 0),
                    list(body.get("Tags") or []), dict(body.get("Meta") or {}), "vm",
                )  # fmt: skip
                for c in checks:
                    self._add_check(self._services[sid], c)
            self._wake()
            return web.Response(status=200)
        if rest.startswith("service/maintenance/"):
            sid = unquote(rest[len("service/maintenance/") :])
            enable = request.query.get("enable")
            if enable is None:
                return web.Response(status=400, text="Missing value for enable")
            if enable.lower() not in ("true", "false", "1", "0"):
                return web.Response(status=400, text="Invalid value for enable")
            reason = request.query.get("reason") or (
                "Maintenance mode is enabled for this service, "
                "but no reason was provided. This is a default message."
            )
            with self._lock:
                svc = self._services.get(sid)
                if svc is None:
                    return web.Response(status=404, text=f'Unknown service ID "{sid}"')
                check_id = f"_service_maintenance:{sid}"
                if enable.lower() in ("true", "1"):
                    if not any(c.check_id == check_id for c in svc.checks):
                        self._add_check(svc, {"CheckID": check_id, "Name": "Service Maintenance Mode",
                                              "Notes": reason, "Status": "critical",
                                              "Type": "maintenance"})  # fmt: skip
                elif any(c.check_id == check_id for c in svc.checks):
                    svc.checks = [c for c in svc.checks if c.check_id != check_id]
                    idx = self._bump()
                    self._service_index[svc.name] = idx
                    self._services_table = idx
            self._wake()
            return web.Response(status=200)
        if rest.startswith("service/deregister/"):
            sid = unquote(rest[len("service/deregister/") :])
            if not self.deregister(sid):
                return web.Response(
                    status=404,
                    text=f'Unknown service ID "{sid}". Ensure that the service ID is passed, not the service name.',
                )
            return web.Response(status=200)
        m = re.fullmatch(r"check/(pass|warn|fail|update)/(.+)", rest)
        if m:
            check_id = unquote(m.group(2))
            status = {"pass": "passing", "warn": "warning", "fail": "critical"}.get(m.group(1))
            output = request.query.get("note", "")
            if m.group(1) == "update":
                try:
                    body = _ci(orjson.loads(await request.read()))
                    status, output = body.get("Status"), body.get("Output", "")
                except (orjson.JSONDecodeError, AttributeError):
                    return web.Response(status=400, text="Request decode failed")
                if status not in STATUSES:
                    return web.Response(status=400, text="Invalid check status")
            with self._lock:
                found = None
                for svc in self._services.values():
                    for c in svc.checks:
                        if c.check_id == check_id:
                            found = (svc, c)
                if found is None:
                    return web.Response(
                        status=404,
                        text=f'Unknown check ID "{check_id}". Ensure that the check ID is passed, not the check name.',
                    )
                svc, c = found
                if not c.ttl:
                    return web.Response(
                        status=500, text=f'CheckID "{check_id}" does not have associated TTL'
                    )
                self._update_check(svc, c, status or "passing", output)
            self._wake()
            return web.Response(status=200)
        return web.Response(status=404, text="404 page not found\n")


class _Cut(Exception):
    """The double went down or hangs: the connection is dropped without an answer."""


def _abort(request: web.Request) -> web.StreamResponse:
    """Cut the connection without an answer (the client sees a disconnect)."""
    if request.transport is not None:
        request.transport.abort()
    return web.Response(status=500)  # never reaches the client: the transport is gone


def _method_not_allowed(request: web.Request) -> web.Response:
    return web.Response(status=405, text=f"method {request.method} not allowed")


def _flag(q: Any, name: str) -> bool:
    """Consul's boolean query flags: present without a value, or a true-ish value."""
    if name not in q:
        return False
    return q[name].lower() not in ("false", "0")


_FORWARDED = {"x-consul-token", "authorization", "content-type"}

_CANON = {
    k.lower(): k
    for k in (
        "ID", "Name", "Address", "Port", "Tags", "Meta", "Check", "Checks", "CheckID", "TTL",
        "HTTP", "TCP", "Interval", "Timeout", "Status", "Notes", "Output", "Type",
        "DeregisterCriticalServiceAfter", "ServiceID", "EnableTagOverride",
    )
}  # fmt: skip


def _ci(obj: Any) -> Any:
    """Consul accepts field names in any case (and snake_case); normalise them."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            canon = _CANON.get(str(k).lower().replace("_", ""), k)
            out[canon] = v if canon == "Meta" else _ci(v)
        return out
    if isinstance(obj, list):
        return [_ci(v) for v in obj]
    return obj
