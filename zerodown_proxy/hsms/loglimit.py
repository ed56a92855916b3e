"""A per-tool allowance for per-frame warning lines (bad SType, orphan reply, abort, reject...).

Such warnings are caused by the peer's traffic, so their number is the peer's to choose: 100k bad
frames once wrote 100k log lines (47 MB). Every event is still counted in /metrics; the log gets
the first `limit` lines of each `interval` per tool and then one summary line saying how many
were left out and of which kinds. Session events (selected, closed, failover) are not limited.
"""

from __future__ import annotations


class LogLimiter:
    __slots__ = ("limit", "interval", "logged", "held", "_start")

    def __init__(self, limit: int, interval: float, now: float) -> None:
        self.limit = limit
        self.interval = interval
        self.logged = 0  # lines written in the current interval
        self.held: dict[str, int] = {}  # kind -> lines left out in the current interval
        self._start = now

    def allow(self, kind: str) -> bool:
        """May one more warning of `kind` be logged now? (Counts it either way.)"""
        if self.logged < self.limit:
            self.logged += 1
            return True
        held = self.held
        held[kind] = held.get(kind, 0) + 1
        return False

    def roll(self, now: float, final: bool = False) -> dict[str, int] | None:
        """At the end of an interval (or of the connection, `final`): start a new one, and return
        what was left out of the log in the one that ended (None if nothing was)."""
        if not final and now - self._start < self.interval:
            return None
        held = self.held
        self._start = now
        self.logged = 0
        if not held:
            return None
        self.held = {}
        return held
