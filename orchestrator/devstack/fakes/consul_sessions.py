"""Sessions and KV locks for the Consul double (FakeConsul), after Consul's documented
semantics (no recording of these exists in /work/shared/api-samples):

- PUT /v1/session/create {Name, TTL, Behavior, LockDelay, Node, NodeChecks} -> {"ID": uuid}.
  TTL must be 0 or within [session_ttl_min, 24h] (Consul's `session_ttl_min`, default 10 s),
  else HTTP 500 "Invalid Session TTL '<ns>', must be between [10s=24h0m0s]"; Behavior is
  release (default) or delete; LockDelay defaults to 15 s (a bare number below 1000 means
  seconds, as Consul reads it).
- PUT /v1/session/renew/<id> -> [session]; an unknown session -> 404 "Session id '<id>' not
  found". PUT /v1/session/destroy/<id> -> true. GET /v1/session/info/<id> -> [session] or [],
  GET /v1/session/list -> [sessions].
- A session with a TTL is invalidated when it is not renewed for 2 x TTL (Consul's timers
  run at twice the TTL); an invalidated or destroyed session releases (behavior=release) or
  deletes (behavior=delete) every key it holds, and those keys cannot be acquired for the
  session's LockDelay.
- PUT /v1/kv/<key>?acquire=<id>: true when the key was free (LockIndex + 1, Session set, value
  written) or already held by that session; false when another session holds it or the key is
  in lock-delay; an unknown session -> HTTP 500 'invalid session "<id>"'.
  ?release=<id>: true when that session held it (Session cleared, value written), else false.
- GET /v1/kv/<key> shows LockIndex and, while held, Session.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

if TYPE_CHECKING:
    from .consul import FakeConsul

MAX_TTL = 24 * 3600.0
TTL_MULTIPLIER = 2  # Consul invalidates a TTL session after 2 x TTL without a renew


@dataclass(slots=True)
class _Session:
    id: str
    name: str
    node: str
    behavior: str
    ttl: str
    ttl_s: float
    lock_delay: float
    create_index: int
    modify_index: int
    renewed: float = field(default_factory=time.monotonic)

    def json(self) -> dict[str, Any]:
        return {
            "ID": self.id,
            "Name": self.name,
            "Node": self.node,
            "LockDelay": int(self.lock_delay * 1e9),
            "Behavior": self.behavior,
            "TTL": self.ttl,
            "NodeChecks": ["serfHealth"],
            "ServiceChecks": None,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }


def _go_duration(seconds: float) -> str:
    """Go's Duration.String() for whole seconds and hours: 10s, 24h0m0s."""
    s = int(seconds)
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}h{m}m{sec}s" if h else (f"{m}m{sec}s" if m else f"{sec}s")


class Sessions:
    """Session state of one FakeConsul; every method runs under the double's lock."""

    def __init__(self, consul: FakeConsul, ttl_min: float = 10.0) -> None:
        self.consul = consul
        self.ttl_min = ttl_min
        self.by_id: dict[str, _Session] = {}
        self.lock_delay_until: dict[str, float] = {}  # key -> monotonic time

    # -- HTTP ----------------------------------------------------------------------------------

    async def endpoint(self, request: web.Request, rest: str) -> web.Response:
        from .consul import parse_go_duration

        method = request.method
        if rest == "create" and method == "PUT":
            raw = await request.read()
            try:
                body = orjson.loads(raw) if raw.strip() else {}
                if not isinstance(body, dict):
                    raise ValueError("not an object")
            except (orjson.JSONDecodeError, ValueError) as exc:
                return web.Response(status=400, text=f"Request decode failed: {exc}")
            behavior = body.get("Behavior") or "release"
            if behavior not in ("release", "delete"):
                return web.Response(status=500, text=f"Invalid Behavior setting '{behavior}'")
            ttl = str(body.get("TTL") or "")
            try:
                ttl_s = parse_go_duration(ttl) if ttl else 0.0
                delay = body.get("LockDelay", "15s")
                if isinstance(delay, int | float):
                    lock_delay = float(delay) if delay < 1000 else delay / 1e9
                else:
                    lock_delay = parse_go_duration(str(delay))
            except ValueError as exc:
                return web.Response(status=400, text=f"Request decode failed: {exc}")
            if ttl_s and not self.ttl_min <= ttl_s <= MAX_TTL:
                return web.Response(
                    status=500,
                    text=f"Invalid Session TTL '{int(ttl_s * 1e9)}', must be between "
                    f"[{_go_duration(self.ttl_min)}={_go_duration(MAX_TTL)}]",
                )
            with self.consul._lock:
                idx = self.consul._bump()
                s = _Session(
                    id=str(uuid.uuid4()),
                    name=str(body.get("Name") or ""),
                    node=str(body.get("Node") or "vm"),
                    behavior=behavior,
                    ttl=ttl,
                    ttl_s=ttl_s,
                    lock_delay=lock_delay,
                    create_index=idx,
                    modify_index=idx,
                )
                self.by_id[s.id] = s
            return self._json({"ID": s.id})
        kind, _, sid = rest.partition("/")
        if kind == "renew" and method == "PUT":
            with self.consul._lock:
                s = self.by_id.get(sid)
                if s is None:
                    return web.Response(status=404, text=f"Session id '{sid}' not found")
                s.renewed = time.monotonic()
                return self._json([s.json()])
        if kind == "destroy" and method == "PUT":
            with self.consul._lock:
                self.invalidate(sid)
            self.consul._wake()
            return self._json(True)
        if kind == "info" and method == "GET":
            with self.consul._lock:
                s = self.by_id.get(sid)
                return self._json([s.json()] if s else [])
        if rest == "list" and method == "GET":
            with self.consul._lock:
                return self._json([s.json() for s in self.by_id.values()])
        return web.Response(status=405 if kind in ("create", "renew", "destroy") else 404,
                            text=f"method {method} not allowed")  # fmt: skip

    def _json(self, body: Any) -> web.Response:
        headers = self.consul._headers(self.consul.index)
        return web.Response(status=200, body=orjson.dumps(body), headers=headers)

    # -- KV locks (called by the KV endpoint, under the lock) ----------------------------------

    def kv_lock(self, key: str, value: bytes, flags: int, op: str, sid: str) -> bool | str:
        """`op` is "acquire" or "release". Returns Consul's answer, or an error text (500)."""
        kv = self.consul._kv
        e = kv.get(key)
        if op == "release":
            if e is None or e.session != sid:
                return False
            self.consul._kv_put(key, value, flags)
            kv[key].session = None
            return True
        if sid not in self.by_id:
            return f'invalid session "{sid}"'
        if e is not None and e.session == sid:
            self.consul._kv_put(key, value, flags)
            return True
        if e is not None and e.session is not None:
            return False
        if self.lock_delay_until.get(key, 0.0) > time.monotonic():
            return False
        self.consul._kv_put(key, value, flags)
        kv[key].session = sid
        kv[key].lock_index += 1
        return True

    # -- invalidation ----------------------------------------------------------------------------

    def invalidate(self, sid: str) -> bool:
        s = self.by_id.pop(sid, None)
        if s is None:
            return False
        until = time.monotonic() + s.lock_delay
        for key, e in list(self.consul._kv.items()):
            if e.session != sid:
                continue
            if s.lock_delay:
                self.lock_delay_until[key] = until
            if s.behavior == "delete":
                self.consul._kv_delete(key, recurse=False)
            else:
                e.session = None
                e.modify_index = self.consul._bump()
                self.consul._kv_index = e.modify_index
        return True

    def expire(self, now: float) -> bool:
        """Invalidate the sessions whose TTL ran out (called by the double's reaper)."""
        gone = [
            s.id
            for s in self.by_id.values()
            if s.ttl_s and now - s.renewed > TTL_MULTIPLIER * s.ttl_s
        ]
        for sid in gone:
            self.invalidate(sid)
        return bool(gone)
