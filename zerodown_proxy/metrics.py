"""Prometheus metrics, kept as plain dicts so the hot path pays one dict update per event.

Counters and gauges are keyed by a tuple of label values; rendering to the text exposition
format happens only when /metrics is scraped. The exposition passes `promtool check metrics`:
counters end in `_total`, every family has HELP and TYPE. Besides what each part counts, the
proxy exposes (registered by `register_process_info`, `register_routing_info`):
`zerodown_build_info`, the Active/Standby group and version of every app, the proxy's own
health-check verdict per instance, and the process metrics the Prometheus client libraries
export (`process_cpu_seconds_total`, `process_resident_memory_bytes`, ...).
"""

from __future__ import annotations

import os
import resource
from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from .buildinfo import build_info

if TYPE_CHECKING:
    from .health.active import ActiveHealthChecker
    from .routing import Router


def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    if not names:
        return ""
    parts = []
    for n, v in zip(names, values, strict=True):
        v = str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        parts.append(f'{n}="{v}"')
    return "{" + ",".join(parts) + "}"


class Counter:
    kind = "counter"

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()) -> None:
        self.name, self.help, self.label_names = name, help, labels
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, labels: tuple[str, ...] = (), amount: float = 1) -> None:
        v = self.values
        v[labels] = v.get(labels, 0) + amount

    def get(self, labels: tuple[str, ...] = ()) -> float:
        return self.values.get(labels, 0)

    def bind(self, labels: tuple[str, ...] = ()) -> BoundCounter:
        """This counter with its labels fixed: the data path increments it without building a
        label tuple or hashing one each time."""
        return BoundCounter(self, labels)

    def render(self) -> list[str]:
        return [
            f"{self.name}{_labels(self.label_names, k)} {_num(v)}" for k, v in self.values.items()
        ]


class BoundCounter:
    """One label set of a Counter (see Counter.bind)."""

    __slots__ = ("_values", "_key")

    def __init__(self, counter: Counter, labels: tuple[str, ...]) -> None:
        self._values = counter.values
        self._key = labels
        self._values.setdefault(labels, 0)

    def inc(self, amount: float = 1) -> None:
        self._values[self._key] += amount


class CounterFn(Counter):
    """A counter whose value another object already keeps (read when /metrics is scraped)."""

    def __init__(self, name: str, help: str, fn: Callable[[], float]) -> None:
        super().__init__(name, help)
        self.fn = fn

    def render(self) -> list[str]:
        self.values[()] = self.fn()
        return super().render()


class Gauge(Counter):
    kind = "gauge"

    def __init__(
        self,
        name: str,
        help: str,
        labels: tuple[str, ...] = (),
        fn: Callable[[], float] | None = None,
    ) -> None:
        super().__init__(name, help, labels)
        self.fn = fn

    def set(self, value: float, labels: tuple[str, ...] = ()) -> None:
        self.values[labels] = value

    def render(self) -> list[str]:
        if self.fn is not None:
            self.values[()] = self.fn()
        return super().render()


LabelledValues = Iterable[tuple[tuple[str, ...], float]]


class GaugeSet(Counter):
    """A labelled gauge computed whole at scrape time: label sets that `fn` no longer yields
    (an instance removed from routing, a group renamed) disappear from the exposition."""

    kind = "gauge"

    def __init__(
        self, name: str, help: str, labels: tuple[str, ...], fn: Callable[[], LabelledValues]
    ) -> None:
        super().__init__(name, help, labels)
        self.fn = fn

    def render(self) -> list[str]:
        self.values = dict(self.fn())
        return super().render()


DEFAULT_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class Histogram:
    kind = "histogram"

    def __init__(
        self,
        name: str,
        help: str,
        labels: tuple[str, ...] = (),
        buckets: tuple[float, ...] = DEFAULT_BUCKETS,
    ) -> None:
        self.name, self.help, self.label_names = name, help, labels
        self.buckets = buckets
        # per label set: [counts per bucket..., +Inf count, sum]
        self.values: dict[tuple[str, ...], list[float]] = {}

    def observe(self, value: float, labels: tuple[str, ...] = ()) -> None:
        row = self.values.get(labels)
        if row is None:
            row = self.values[labels] = [0] * (len(self.buckets) + 2)
        row[bisect_left(self.buckets, value)] += 1
        row[-1] += value

    def render(self) -> list[str]:
        out = []
        names = self.label_names + ("le",)
        for k, row in self.values.items():
            acc = 0
            for i, b in enumerate(self.buckets):
                acc += row[i]
                out.append(f"{self.name}_bucket{_labels(names, k + (_num(b),))} {acc}")
            acc += row[len(self.buckets)]
            out.append(f"{self.name}_bucket{_labels(names, k + ('+Inf',))} {acc}")
            out.append(f"{self.name}_sum{_labels(self.label_names, k)} {_num(row[-1])}")
            out.append(f"{self.name}_count{_labels(self.label_names, k)} {acc}")
        return out


def _num(v: float) -> str:
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer()):
        return str(int(v))
    return repr(v)


class Registry:
    def __init__(self) -> None:
        self._metrics: list[Counter | Histogram] = []

    def counter(self, name: str, help: str, labels: tuple[str, ...] = ()) -> Counter:
        return self._add(Counter(name, help, labels))

    def gauge(
        self,
        name: str,
        help: str,
        labels: tuple[str, ...] = (),
        fn: Callable[[], float] | None = None,
    ) -> Gauge:
        return self._add(Gauge(name, help, labels, fn))

    def counter_fn(self, name: str, help: str, fn: Callable[[], float]) -> CounterFn:
        """A counter read from `fn` at scrape time (monotonic by contract of `fn`)."""
        return self._add(CounterFn(name, help, fn))

    def gauge_set(
        self, name: str, help: str, labels: tuple[str, ...], fn: Callable[[], LabelledValues]
    ) -> GaugeSet:
        """A labelled gauge whose whole set of samples `fn` yields at scrape time."""
        return self._add(GaugeSet(name, help, labels, fn))

    def histogram(self, name: str, help: str, labels: tuple[str, ...] = ()) -> Histogram:
        return self._add(Histogram(name, help, labels))

    def _add(self, m):  # type: ignore[no-untyped-def]
        self._metrics.append(m)
        return m

    def render(self) -> str:
        lines: list[str] = []
        for m in self._metrics:
            help_text = m.help.replace("\\", "\\\\").replace("\n", "\\n")
            lines.append(f"# HELP {m.name} {help_text}")
            lines.append(f"# TYPE {m.name} {m.kind}")
            lines.extend(m.render())
        return "\n".join(lines) + "\n"


# -- what every proxy process exposes besides its counters --------------------------------------


class _ProcSelf:
    """This process's CPU time, memory and file descriptors from /proc (Linux); the names and
    units are those of the Prometheus client libraries' process collector."""

    def __init__(self) -> None:
        self.ticks = os.sysconf("SC_CLK_TCK")
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.start_time = self._start_time()

    def _stat(self) -> list[str]:
        with open("/proc/self/stat", "rb") as f:
            raw = f.read().decode()
        # Fields after the command name, which is in parentheses and may contain spaces.
        return raw[raw.rindex(")") + 2 :].split()

    def _start_time(self) -> float:
        with open("/proc/stat", "rb") as f:
            btime = next(
                float(line.split()[1]) for line in f.read().decode().splitlines()
                if line.startswith("btime ")
            )  # fmt: skip
        return btime + float(self._stat()[19]) / self.ticks  # field 22: starttime

    def cpu_seconds(self) -> float:
        st = self._stat()
        return (float(st[11]) + float(st[12])) / self.ticks  # fields 14, 15: utime, stime

    def resident_bytes(self) -> float:
        return float(self._stat()[21]) * self.page  # field 24: rss (pages)

    def virtual_bytes(self) -> float:
        return float(self._stat()[20])  # field 23: vsize (bytes)

    @staticmethod
    def open_fds() -> float:
        return float(len(os.listdir("/proc/self/fd")))

    @staticmethod
    def max_fds() -> float:
        return float(resource.getrlimit(resource.RLIMIT_NOFILE)[0])


def register_process_info(m: Registry) -> None:
    """`zerodown_build_info` and, where /proc exists, the standard process metrics."""
    info = build_info()
    m.gauge_set(
        "zerodown_build_info",
        "The running zerodown: version, Python and platform (value always 1)",
        ("version", "python", "implementation", "platform", "machine"),
        lambda: [
            ((info.version, info.python, info.implementation, info.platform, info.machine), 1)
        ],
    )
    if not os.path.exists("/proc/self/stat"):
        return
    proc = _ProcSelf()
    m.counter_fn(
        "process_cpu_seconds_total", "Total user and system CPU time spent in seconds",
        proc.cpu_seconds,
    )  # fmt: skip
    m.gauge(
        "process_resident_memory_bytes", "Resident memory size in bytes", fn=proc.resident_bytes
    )
    m.gauge("process_virtual_memory_bytes", "Virtual memory size in bytes", fn=proc.virtual_bytes)
    m.gauge("process_open_fds", "Number of open file descriptors", fn=proc.open_fds)
    m.gauge("process_max_fds", "Maximum number of open file descriptors", fn=proc.max_fds)
    m.gauge(
        "process_start_time_seconds", "Start time of the process since unix epoch in seconds",
        fn=lambda: proc.start_time,
    )  # fmt: skip


def register_routing_info(m: Registry, router: Router, checker: ActiveHealthChecker) -> None:
    """What is routed now, read from the applied snapshot at scrape time: each app's Active and
    Standby group with its version, and the proxy's own health-check verdict per instance."""

    def groups() -> LabelledValues:
        for app in router.snapshot.apps.values():
            yield (app.name, "active", app.active_group, app.active_version or ""), 1
            if app.standby_group is not None:
                yield (app.name, "standby", app.standby_group, app.standby_version or ""), 1

    def checks() -> LabelledValues:
        for inst, state in checker.verdicts():
            if state != "unknown":
                yield (inst.app, inst.group, inst.id, inst.version), 1 if state == "up" else 0

    m.gauge_set(
        "zerodown_app_group_info",
        "Groups of each app in the applied routing, by role (active, standby) and version "
        "(value always 1)",
        ("app", "role", "group", "version"),
        groups,
    )
    m.gauge_set(
        "zerodown_health_check_up",
        "The proxy's own health check of each routed instance: 1 up, 0 down (absent until "
        "its first verdict)",
        ("app", "group", "instance", "version"),
        checks,
    )
