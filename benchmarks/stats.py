"""Statistics over raw load records: the k6-style summary, a per-second series, switch propagation.

Everything here is pure (numpy arrays in, frozen dataclasses out), so it is testable without a
network. Latencies are reported in milliseconds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .loadgen import RawLoad
from .loadgen_worker import CONN_ERROR, HTTP_ERROR, OK, TIMEOUT


@dataclass(frozen=True, slots=True)
class Summary:
    """What k6 prints for an open-loop run, plus versions and generator health."""

    target_rate: float
    seconds: float
    scheduled: int
    requests: int  # finished (success or failure)
    successes: int
    failures: int
    http_errors: int
    conn_errors: int
    timeouts: int
    dropped: int
    success_rate: float  # successes / requests
    achieved_rate: float  # finished requests per second of scheduled time
    avg_ms: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    per_version: dict[str, int]
    retries: int
    start_lag_p99_ms: float  # how late the generator started requests (its own health)
    processes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class SwitchEvent:
    """One switch during a run; times in seconds after t0."""

    at: float  # when the switch command returned (the configuration source was written)
    old: str
    new: str
    applied: float | None = None  # when the proxy reported it applied (zerodown only)


@dataclass(frozen=True, slots=True)
class Propagation:
    at: float
    old: str
    new: str
    first_new_ms: float | None  # switch returned -> first response from the new version
    last_old_ms: float | None  # switch returned -> last response from the old version
    applied_ms: float | None
    # Old-version responses to requests that *started* after the first new-version response
    # arrived: both versions serving new requests at once.
    mixed: int
    # Old-version responses to requests that started after the proxy reported the switch
    # applied (zerodown only; the "no old-version response after a switch is applied").
    old_after_applied: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pct(lat_ms: np.ndarray, q: float) -> float:
    return float(np.percentile(lat_ms, q)) if lat_ms.size else 0.0


def summarise(raw: RawLoad) -> Summary:
    lat = raw.latency * 1000.0
    ok = raw.outcome == OK
    n = int(raw.outcome.size)
    successes = int(ok.sum())
    per_version: dict[str, int] = {}
    for vid, count in zip(*np.unique(raw.version[ok], return_counts=True), strict=True):
        per_version[raw.versions[vid] if vid >= 0 else "(none)"] = int(count)
    return Summary(
        target_rate=raw.spec.rate,
        seconds=raw.spec.seconds,
        scheduled=raw.scheduled,
        requests=n,
        successes=successes,
        failures=n - successes,
        http_errors=int((raw.outcome == HTTP_ERROR).sum()),
        conn_errors=int((raw.outcome == CONN_ERROR).sum()),
        timeouts=int((raw.outcome == TIMEOUT).sum()),
        dropped=int(raw.dropped.size),
        success_rate=successes / n if n else 0.0,
        achieved_rate=n / raw.spec.seconds if raw.spec.seconds else 0.0,
        avg_ms=float(lat.mean()) if n else 0.0,
        p50_ms=_pct(lat, 50),
        p90_ms=_pct(lat, 90),
        p95_ms=_pct(lat, 95),
        p99_ms=_pct(lat, 99),
        max_ms=float(lat.max()) if n else 0.0,
        per_version=per_version,
        retries=raw.retries,
        start_lag_p99_ms=_pct(raw.lag * 1000.0, 99),
        processes=raw.processes,
    )


def time_series(raw: RawLoad) -> dict[str, Any]:
    """Per second of the run: completed responses, failures, dropped, p50/p95/p99 (ms)."""
    secs = max(1, int(np.ceil(raw.spec.seconds)))
    done_sec = np.clip((raw.sched + raw.latency).astype(np.int64), 0, secs)  # by completion
    start_sec = np.clip(raw.sched.astype(np.int64), 0, secs - 1)  # latency by scheduled second
    counts = np.bincount(done_sec, minlength=secs + 1)
    throughput = counts[:secs]
    fails = np.bincount(start_sec[raw.outcome != OK], minlength=secs)
    dropped = np.bincount(np.clip(raw.dropped.astype(np.int64), 0, secs - 1), minlength=secs)
    order = np.argsort(start_sec, kind="stable")
    bounds = np.searchsorted(start_sec[order], np.arange(secs + 1))
    lat_ms = raw.latency[order] * 1000.0
    p50: list[float | None] = []
    p95: list[float | None] = []
    p99: list[float | None] = []
    for s in range(secs):
        chunk = lat_ms[bounds[s] : bounds[s + 1]]
        if chunk.size:
            a, b, c = (float(x) for x in np.percentile(chunk, [50, 95, 99]))
        else:
            a = b = c = None  # nothing started in that second (all dropped): no latency
        p50.append(a)
        p95.append(b)
        p99.append(c)
    return {
        "second": list(range(secs)),
        "throughput": [int(x) for x in throughput],
        "failures": [int(x) for x in fails],
        "dropped": [int(x) for x in dropped],
        "p50_ms": p50,
        "p95_ms": p95,
        "p99_ms": p99,
        "late": int(counts[secs:].sum()),  # responses that completed after the last second
    }


def propagation(raw: RawLoad, switches: list[SwitchEvent]) -> list[Propagation]:
    """Per switch: how long until the new version answers and the old one stops answering."""
    done = raw.sched + raw.latency
    ok = raw.outcome == OK
    out = []
    for k, sw in enumerate(switches):
        end = switches[k + 1].at if k + 1 < len(switches) else np.inf
        window = ok & (done >= sw.at) & (done < end)
        try:
            new_id = raw.versions.index(sw.new)
        except ValueError:
            new_id = -2
        try:
            old_id = raw.versions.index(sw.old)
        except ValueError:
            old_id = -2
        new_mask = window & (raw.version == new_id)
        old_mask = window & (raw.version == old_id)
        first_new = float(done[new_mask].min()) if new_mask.any() else None
        last_old = float(done[old_mask].max()) if old_mask.any() else None
        mixed = 0
        if first_new is not None:
            mixed = int((old_mask & (raw.sched >= first_new)).sum())
        old_after = None
        if sw.applied is not None:
            old_after = int((old_mask & (raw.sched >= sw.applied)).sum())
        out.append(
            Propagation(
                at=sw.at,
                old=sw.old,
                new=sw.new,
                first_new_ms=None if first_new is None else (first_new - sw.at) * 1000.0,
                last_old_ms=0.0 if last_old is None else (last_old - sw.at) * 1000.0,
                applied_ms=None if sw.applied is None else (sw.applied - sw.at) * 1000.0,
                mixed=mixed,
                old_after_applied=old_after,
            )
        )
    return out
