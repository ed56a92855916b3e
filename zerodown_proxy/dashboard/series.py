"""Per-second traffic samples for the dashboard's charts, taken from the proxy's own counters.

Once a second `Sampler.tick` reads the per-version HTTP counters (responses by app, version and
code; the latency histogram by app and version) and keeps the *difference* since the last tick
in a bounded ring. Nothing runs on the request path: the data plane only increments the
counters it already keeps. The raw samples (counts and histogram bucket deltas) add up across
workers, so the multi-worker supervisor merges its workers' rings (`merge`) before the rates and
quantiles are computed (`series`).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

from ..metrics import Counter, Histogram

RING_SECONDS = 300  # five minutes of history per chart
Key = tuple[str, str]  # (app, version)


class Sampler:
    def __init__(self, requests: Counter, latency: Histogram, size: int = RING_SECONDS) -> None:
        self.requests = requests
        self.latency = latency
        self.ring: deque[dict[str, Any]] = deque(maxlen=size)
        self._last_n: dict[Key, list[float]] = {}  # (app, version) -> [responses, 5xx]
        self._last_b: dict[Key, list[float]] = {}  # (app, version) -> histogram row
        self._task: asyncio.Task[None] | None = None

    def _totals(self) -> dict[Key, list[float]]:
        totals: dict[Key, list[float]] = {}
        for (app, version, code), v in list(self.requests.values.items()):
            row = totals.setdefault((app, version), [0.0, 0.0])
            row[0] += v
            if code.startswith("5"):
                row[1] += v
        return totals

    def tick(self, now: float | None = None) -> dict[str, Any]:
        """Append one sample: what was counted since the previous tick, per app and version."""
        t = int(time.time() if now is None else now)
        apps: dict[str, dict[str, dict[str, Any]]] = {}
        for key, (n, err) in self._totals().items():
            last = self._last_n.get(key, [0.0, 0.0])
            self._last_n[key] = [n, err]
            row = self.latency.values.get(key)
            buckets = list(row[:-1]) if row is not None else []
            prev = self._last_b.get(key)
            self._last_b[key] = buckets
            dn = n - last[0]
            if dn <= 0:
                continue
            deltas = [b - (prev[i] if prev else 0) for i, b in enumerate(buckets)]
            apps.setdefault(key[0], {})[key[1]] = {"n": dn, "err": err - last[1], "b": deltas}
        sample = {"t": t, "apps": apps}
        self.ring.append(sample)
        return sample

    def samples(self, since: int = 0) -> list[dict[str, Any]]:
        return [s for s in self.ring if s["t"] > since]

    def raw(self, since: int = 0) -> dict[str, Any]:
        """The ring as the admin API serves it (the supervisor merges these)."""
        return {"buckets": list(self.latency.buckets), "samples": self.samples(since)}

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        t = int(time.time())
        self.tick(t)  # the counters as they are now are the baseline, not traffic
        self.ring.clear()
        while True:
            # Sample on the wall-clock second (sample t covers (t-1, t]), so workers' samples
            # line up; after a stall, carry on from now rather than label seconds twice.
            t = max(t + 1, int(time.time()))
            await asyncio.sleep(max(0.0, t - time.time()))
            self.tick(t)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass


def merge(raws: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Several workers' raw rings as one: counts and bucket deltas summed per second."""
    present = [r for r in raws if r]
    buckets = present[0]["buckets"] if present else []
    by_t: dict[int, dict[str, dict[str, dict[str, Any]]]] = {}
    for r in present:
        for s in r["samples"]:
            apps = by_t.setdefault(s["t"], {})
            for app, versions in s["apps"].items():
                for version, v in versions.items():
                    acc = apps.setdefault(app, {}).get(version)
                    if acc is None:
                        apps[app][version] = {"n": v["n"], "err": v["err"], "b": list(v["b"])}
                        continue
                    acc["n"] += v["n"]
                    acc["err"] += v["err"]
                    acc["b"] = [a + b for a, b in zip(acc["b"], v["b"], strict=False)]
    samples = [{"t": t, "apps": by_t[t]} for t in sorted(by_t)]
    return {"buckets": buckets, "samples": samples}


def quantile(q: float, bounds: list[float], counts: list[float]) -> float | None:
    """The q-quantile of one histogram (counts per bucket, the last one +Inf), interpolated
    linearly inside its bucket as Prometheus' histogram_quantile does; None when empty. A
    quantile in the +Inf bucket is reported as the largest finite bound."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0.0
    for i, c in enumerate(counts):
        if c > 0 and seen + c >= rank:
            if i >= len(bounds):
                return bounds[-1] if bounds else None
            lower = bounds[i - 1] if i > 0 else 0.0
            return lower + (bounds[i] - lower) * (rank - seen) / c
        seen += c
    return bounds[-1] if bounds else None


def series(raw: dict[str, Any]) -> dict[str, Any]:
    """Per app and version, one point per second: [t, requests/s, 5xx share, p50 s, p99 s]."""
    bounds = raw["buckets"]
    apps: dict[str, dict[str, list[list[float | None]]]] = {}
    for s in raw["samples"]:
        for app, versions in s["apps"].items():
            for version, v in versions.items():
                n = v["n"]
                point = [
                    s["t"],
                    n,
                    v["err"] / n if n else 0.0,
                    quantile(0.5, bounds, v["b"]),
                    quantile(0.99, bounds, v["b"]),
                ]
                apps.setdefault(app, {}).setdefault(version, []).append(point)
    return {"step_s": 1, "fields": ["t", "rps", "error_ratio", "p50_s", "p99_s"], "apps": apps}
