"""What a release verdict reads from the proxies: their Prometheus /metrics, reduced to the few
totals that judge a version (zerodown_http_requests_total, the latency histogram, the HSMS
error counters), and the difference between two readings.

The series are the proxy's own (zerodown_proxy/http/accounting.py, zerodown_proxy/hsms/
metrics.py); this module only reads their text exposition. A multi-worker proxy's supervisor
adds a `worker` label: every label this module does not ask for is summed over.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import aiohttp

REQUESTS = "zerodown_http_requests_total"
LATENCY_BUCKET = "zerodown_http_request_duration_seconds_bucket"
HSMS_FORWARDED = "zerodown_hsms_forwarded_total"
HSMS_ABORTED = "zerodown_hsms_aborted_total"
HSMS_REJECTED = "zerodown_hsms_rejected_total"
HSMS_PEER_REJECTS = "zerodown_hsms_peer_rejects_total"
HSMS_OLD_PRIMARIES = "zerodown_hsms_old_version_primaries_rejected_total"
# SxF0 the proxy sends because a tool went away is the tool's doing, not the release's.
TOOL_SIDE_ABORTS = frozenset({"tool_disconnected", "tool_deselected", "tool_gone"})
NO_BACKEND = "-"  # the version label of a response no backend answered (the proxy's own 502/503)

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample in a Prometheus text exposition."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m is None:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        labels = {k: v.replace('\\"', '"').replace("\\\\", "\\") for k, v in
                  _LABEL.findall(m.group(2) or "")}  # fmt: skip
        out.append((m.group(1), labels, value))
    return out


@dataclass(slots=True)
class Totals:
    """Counters of one version of one app (plus the HSMS side, which has no version label),
    summed over proxies and workers. Values are cumulative in a reading, deltas after `minus`."""

    requests: float = 0.0
    errors: float = 0.0  # 5xx
    buckets: dict[float, float] = field(default_factory=dict)  # le -> cumulative count
    hsms_primaries: float = 0.0
    hsms_errors: float = 0.0  # SxF0 sent by the proxy, Reject.req sent or received

    def add(self, other: Totals) -> None:
        self.requests += other.requests
        self.errors += other.errors
        for le, n in other.buckets.items():
            self.buckets[le] = self.buckets.get(le, 0.0) + n
        self.hsms_primaries += other.hsms_primaries
        self.hsms_errors += other.hsms_errors

    def minus(self, earlier: Totals) -> Totals:
        """What happened between `earlier` and this reading of the same proxy. A counter that
        went down means the proxy restarted: its whole current value is new."""

        def d(now: float, then: float) -> float:
            return now - then if now >= then else now

        return Totals(
            requests=d(self.requests, earlier.requests),
            errors=d(self.errors, earlier.errors),
            buckets={le: d(n, earlier.buckets.get(le, 0.0)) for le, n in self.buckets.items()},
            hsms_primaries=d(self.hsms_primaries, earlier.hsms_primaries),
            hsms_errors=d(self.hsms_errors, earlier.hsms_errors),
        )

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def hsms_error_rate(self) -> float:
        return self.hsms_errors / self.hsms_primaries if self.hsms_primaries else 0.0

    @property
    def timed(self) -> float:
        """Responses in the latency histogram (the +Inf bucket)."""
        return self.buckets.get(math.inf, 0.0)

    def quantile(self, q: float) -> float | None:
        """The q-quantile of the latency in seconds, interpolated inside its bucket as
        Prometheus' histogram_quantile does; None without observations."""
        total = self.timed
        if total <= 0:
            return None
        rank = q * total
        lower, below = 0.0, 0.0
        for le in sorted(self.buckets):
            count = self.buckets[le]
            if count >= rank:
                if math.isinf(le):
                    return lower  # beyond the last finite bucket: its bound is all we know
                if count == below:
                    return le
                return lower + (le - lower) * (rank - below) / (count - below)
            lower, below = le, count
        return lower


def totals(
    samples: Iterable[tuple[str, dict[str, str], float]], app: str, versions: Sequence[str]
) -> Totals:
    """The Totals of `app` for the given version labels (HSMS: the whole proxy)."""
    t = Totals()
    wanted = set(versions)
    for name, labels, value in samples:
        if name == REQUESTS:
            if labels.get("app") == app and labels.get("version") in wanted:
                t.requests += value
                if labels.get("code", "").startswith("5"):
                    t.errors += value
        elif name == LATENCY_BUCKET:
            if labels.get("app") == app and labels.get("version") in wanted:
                le = float(labels.get("le", "+Inf").replace("+Inf", "inf"))
                t.buckets[le] = t.buckets.get(le, 0.0) + value
        elif name == HSMS_FORWARDED:
            if labels.get("kind") == "primary":
                t.hsms_primaries += value
        elif name == HSMS_ABORTED:
            if labels.get("reason") not in TOOL_SIDE_ABORTS:
                t.hsms_errors += value
        elif name in (HSMS_REJECTED, HSMS_PEER_REJECTS):
            t.hsms_errors += value
        elif name == HSMS_OLD_PRIMARIES:
            # also counted in zerodown_hsms_rejected_total: the old backend's primaries, refused
            # on purpose while it drains after the switch
            t.hsms_errors -= value
    return t


async def fetch_metrics(
    session: aiohttp.ClientSession, admin: str, timeout: float = 5.0
) -> str | None:
    """One proxy's /metrics text, or None if it did not answer."""
    try:
        async with session.get(
            f"http://{admin}/metrics", timeout=aiohttp.ClientTimeout(total=timeout)
        ) as r:
            if r.status != 200:
                return None
            return await r.text()
    except (TimeoutError, aiohttp.ClientError):
        return None


@dataclass(slots=True)
class Reading:
    """Totals per proxy admin address at one moment (a proxy that did not answer is absent)."""

    per_proxy: dict[str, Totals]

    def since(self, earlier: Reading) -> Totals:
        """Sum over proxies read both times of what happened in between."""
        out = Totals()
        for admin, now in self.per_proxy.items():
            then = earlier.per_proxy.get(admin)
            if then is not None:
                out.add(now.minus(then))
        return out


async def read(
    session: aiohttp.ClientSession, admins: Sequence[str], app: str, versions: Sequence[str]
) -> Reading:
    texts = await asyncio.gather(*(fetch_metrics(session, a) for a in admins))
    return Reading(
        {a: totals(parse(t), app, versions) for a, t in zip(admins, texts, strict=True) if t}
    )
