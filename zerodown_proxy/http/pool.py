"""The idle pool: keep-alive backend connections waiting for their next request.

Keyed by (address, http_port). A connection goes back only while its instance is routable and
the proxy is not draining; demoted instances lose theirs at once (the next request cannot land
on them through the pool); the oldest is evicted when the proxy runs out of file descriptors.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ..config import HttpSection
from ..routing import Snapshot

if TYPE_CHECKING:
    from .upstream import UpstreamProtocol

Key = tuple[str, int]


class IdlePool:
    __slots__ = ("cfg", "idle", "routable", "closing")

    def __init__(self, cfg: HttpSection) -> None:
        self.cfg = cfg
        # The proxy reads this dict directly on the hot path (HttpProxy.idle is the same dict).
        self.idle: dict[Key, list[UpstreamProtocol]] = {}
        self.routable: frozenset[Key] = frozenset()
        # Set when the proxy starts draining: a released connection is closed, not pooled.
        self.closing = False

    def release(self, up: UpstreamProtocol) -> None:
        if up.closed or self.closing or up.key not in self.routable:
            up.close()
            return
        conns = self.idle.get(up.key)
        if conns is None:
            conns = self.idle[up.key] = []
        if len(conns) >= self.cfg.max_idle_per_instance:
            up.close()
            return
        up.idle_since = time.monotonic()
        conns.append(up)

    def discard(self, up: UpstreamProtocol) -> None:
        conns = self.idle.get(up.key)
        if conns and up in conns:
            conns.remove(up)

    def evict_one(self) -> bool:
        """Close one idle pooled connection (from the largest pool) to make room."""
        conns = max(self.idle.values(), key=len, default=None)
        if not conns:
            return False
        # The oldest. Its fd is freed (and uncounted) when the close completes, a moment later:
        # until then the budget is exceeded by that one closing socket, inside the reserve.
        conns.pop(0).close()
        return True

    def on_snapshot(self, old: Snapshot, new: Snapshot) -> None:
        keys = set()
        for app in new.apps.values():
            keys.update(i.http_key for i in app.active)
            keys.update(i.http_key for i in app.standby)
        self.routable = frozenset(keys)
        active = {i.http_key for app in new.apps.values() for i in app.active}
        # Demoted instances keep their in-flight requests but lose their idle connections, so
        # the next request cannot land on them through the pool.
        for key in list(self.idle):
            if key not in active:
                for up in self.idle.pop(key):
                    up.close()

    def expire(self, limit: float) -> None:
        """Close the connections idle since before `limit` (monotonic seconds)."""
        for key, conns in list(self.idle.items()):
            keep = [up for up in conns if up.idle_since > limit and not up.closed]
            for up in conns:
                if up not in keep:
                    up.close()
            self.idle[key] = keep

    def close_all(self) -> None:
        for conns in self.idle.values():
            for up in conns:
                up.close()
        self.idle.clear()

    def size(self) -> int:
        return sum(len(v) for v in self.idle.values())

    def status(self) -> dict[str, int]:
        return {f"{k[0]}:{k[1]}": len(v) for k, v in self.idle.items() if v}
