"""Outlier detection (after Envoy's): which instances to eject after failing real requests.

Pure logic, no I/O and no clock of its own (callers pass `now`), so every rule is a unit test.
Each instance has one counter per reason; a success resets them all. When a counter reaches its
threshold the instance is ejected for base_ejection_time x (its recent ejections), capped at
max_ejection_time, unless that would eject more than max_ejection_percent of its group (never
the whole group: the last instances keep serving, and the data path's panic mode covers the
rest). The multiplier decays by one for every base_ejection_time the instance stays in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import OutlierSection
from ..routing import Snapshot

Key = tuple[str, int]

# What the HTTP proxy reports via Balancer.failed(kind) -> the counter it feeds.
KIND_REASON = {
    "connect": "consecutive_connect_failures",
    "timeout": "consecutive_timeouts",
    "first_byte_timeout": "consecutive_timeouts",
    "reset": "consecutive_5xx",
    "protocol": "consecutive_5xx",
}
REASONS = ("consecutive_5xx", "consecutive_connect_failures", "consecutive_timeouts")
# An active health check that passes proves the instance connects and answers in time: it ends
# ejections for those reasons early. It says nothing about the 5xx real requests got.
HEALTH_CHECK_ENDS = frozenset({"consecutive_connect_failures", "consecutive_timeouts"})


@dataclass(frozen=True, slots=True)
class Ejection:
    instance: str
    reason: str
    since: float
    until: float
    count: int  # the multiplier used: this instance's recent ejections, this one included


class OutlierDetector:
    def __init__(self, cfg: OutlierSection) -> None:
        self.cfg = cfg
        self.thresholds = {r: getattr(cfg, r) for r in REASONS}
        self.ejected: dict[Key, Ejection] = {}
        self.skipped = 0  # ejections refused by max_ejection_percent
        self.counts: dict[Key, dict[str, int]] = {}  # failures in a row, by reason
        self._history: dict[Key, tuple[int, float]] = {}  # key -> (multiplier, returned at)
        self._group_of: dict[Key, tuple[str, str]] = {}
        self._group_size: dict[tuple[str, str], int] = {}

    def set_topology(self, snap: Snapshot) -> list[Key]:
        """Follow the routing: group sizes for max_ejection_percent; state of instances that are
        no longer routed is dropped (returned, so the caller can forget them too)."""
        group_of: dict[Key, tuple[str, str]] = {}
        size: dict[tuple[str, str], int] = {}
        for app in snap.apps.values():
            for group, instances in ((app.active_group, app.active),
                                     (app.standby_group or "", app.standby)):  # fmt: skip
                for i in instances:
                    group_of.setdefault(i.http_key, (app.name, group))
                if instances:
                    size[(app.name, group)] = len(instances)
        self._group_of, self._group_size = group_of, size
        gone = [k for k in self.ejected if k not in group_of]
        for k in gone:
            del self.ejected[k]
        for d in (self.counts, self._history):
            for k in [k for k in d if k not in group_of]:
                del d[k]
        return gone

    def success(self, key: Key) -> None:
        self.counts.pop(key, None)

    def failure(self, key: Key, reason: str, instance: str, now: float) -> Ejection | None:
        """Count one failure; returns the new Ejection when this one ejects the instance."""
        limit = self.thresholds[reason]
        if not self.cfg.enabled or limit == 0 or key in self.ejected:
            return None
        counts = self.counts.setdefault(key, {})
        n = counts.get(reason, 0) + 1
        if n < limit:
            counts[reason] = n
            return None
        counts.pop(reason, None)
        if not self._room_to_eject(key):
            self.skipped += 1
            return None
        mult, returned = self._history.get(key, (0, now))
        decay = int(max(now - returned, 0.0) / self.cfg.base_ejection_time)
        mult = max(0, mult - decay) + 1
        span = min(self.cfg.base_ejection_time * mult, self.cfg.max_ejection_time)
        ej = Ejection(instance, reason, now, now + span, mult)
        self.ejected[key] = ej
        self._history[key] = (mult, now)
        self.counts.pop(key, None)
        return ej

    def _room_to_eject(self, key: Key) -> bool:
        group = self._group_of.get(key)
        if group is None:
            return True  # topology unknown (no snapshot yet): nothing to protect
        n = self._group_size[group]
        allowed = min(max(1, math.floor(n * self.cfg.max_ejection_percent / 100)), n - 1)
        if self.cfg.max_ejection_percent == 0:
            allowed = 0
        ejected = sum(1 for k in self.ejected if self._group_of.get(k) == group)
        return ejected < allowed

    def expire(self, now: float) -> list[tuple[Key, Ejection]]:
        """End the ejections whose time is up; returns them."""
        done = [(k, e) for k, e in self.ejected.items() if e.until <= now]
        for k, _ in done:
            self._return(k, now)
        return done

    def health_check_passed(self, key: Key, started: float) -> Ejection | None:
        """A probe that started after the ejection passed: end a connect/timeout ejection."""
        e = self.ejected.get(key)
        if e is None or e.reason not in HEALTH_CHECK_ENDS or started < e.since:
            return None
        self._return(key, started)
        return e

    def _return(self, key: Key, now: float) -> None:
        e = self.ejected.pop(key)
        self._history[key] = (e.count, now)
