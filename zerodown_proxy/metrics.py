"""Prometheus metrics, kept as plain dicts so the hot path pays one dict update per event.

Counters and gauges are keyed by a tuple of label values; rendering to the text exposition
format happens only when /metrics is scraped.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable


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

    def histogram(self, name: str, help: str, labels: tuple[str, ...] = ()) -> Histogram:
        return self._add(Histogram(name, help, labels))

    def _add(self, m):  # type: ignore[no-untyped-def]
        self._metrics.append(m)
        return m

    def render(self) -> str:
        lines: list[str] = []
        for m in self._metrics:
            lines.append(f"# HELP {m.name} {m.help}")
            lines.append(f"# TYPE {m.name} {m.kind}")
            lines.extend(m.render())
        return "\n".join(lines) + "\n"
