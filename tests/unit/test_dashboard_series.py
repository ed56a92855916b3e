"""The dashboard's traffic series (pure logic): deltas per second, merging, quantiles; and how
it reads the CLI's answers."""

from __future__ import annotations

import pytest

from zerodown_proxy.dashboard.release import cli_reason, parse_records
from zerodown_proxy.dashboard.series import Sampler, merge, quantile, series
from zerodown_proxy.metrics import Registry


def _metrics() -> tuple[Registry, object, object]:
    m = Registry()
    requests = m.counter("zerodown_http_requests_total", "r", ("app", "version", "code"))
    latency = m.histogram("zerodown_http_request_duration_seconds", "l", ("app", "version"))
    return m, requests, latency


def test_sampler_keeps_what_was_counted_each_second_not_the_totals():
    _, requests, latency = _metrics()
    sampler = Sampler(requests, latency, size=3)
    requests.inc(("drimeap", "v1", "200"), 7)  # before the baseline: not traffic of any second
    latency.observe(0.003, ("drimeap", "v1"))
    sampler.tick(100)
    sampler.ring.clear()
    for _ in range(3):
        requests.inc(("drimeap", "v1", "200"))
        latency.observe(0.004, ("drimeap", "v1"))
    requests.inc(("drimeap", "v1", "503"))
    latency.observe(0.2, ("drimeap", "v1"))
    s = sampler.tick(101)
    v1 = s["apps"]["drimeap"]["v1"]
    assert (v1["n"], v1["err"], sum(v1["b"])) == (4, 1, 4)
    # A second without responses leaves the version out; the ring stays bounded.
    for t in (102, 103, 104):
        assert sampler.tick(t)["apps"] == {}
    assert [x["t"] for x in sampler.samples()] == [102, 103, 104]
    assert [x["t"] for x in sampler.samples(since=103)] == [104]


def test_series_computes_rate_error_share_and_quantiles_per_version():
    _, requests, latency = _metrics()
    sampler = Sampler(requests, latency)
    sampler.tick(10)
    for _ in range(98):
        requests.inc(("drimeap", "v2", "200"))
        latency.observe(0.0015, ("drimeap", "v2"))  # bucket (0.001, 0.002]
    for _ in range(2):
        requests.inc(("drimeap", "v2", "500"))
        latency.observe(3.0, ("drimeap", "v2"))  # bucket (2.5, 5.0]
    sampler.tick(11)
    out = series(sampler.raw(since=10))
    assert out["fields"] == ["t", "rps", "error_ratio", "p50_s", "p99_s"]
    ((t, rps, err, p50, p99),) = out["apps"]["drimeap"]["v2"]
    assert (t, rps, err) == (11, 100, 0.02)
    assert 0.001 < p50 <= 0.002
    assert 2.5 < p99 <= 5.0


def test_quantile_interpolates_inside_its_bucket_and_handles_edges():
    bounds = [0.1, 0.2, 0.4]
    assert quantile(0.5, bounds, [0, 10, 0, 0]) == pytest.approx(0.15)
    assert quantile(0.99, bounds, [0, 0, 0, 5]) == 0.4  # all above the largest bound
    assert quantile(0.5, bounds, [0, 0, 0, 0]) is None


def test_merge_adds_workers_samples_second_by_second():
    a = {
        "buckets": [0.1],
        "samples": [{"t": 5, "apps": {"x": {"v1": {"n": 2, "err": 1, "b": [2, 0]}}}}],
    }
    b = {
        "buckets": [0.1],
        "samples": [
            {"t": 5, "apps": {"x": {"v1": {"n": 3, "err": 0, "b": [1, 2]}}}},
            {"t": 6, "apps": {"x": {"v2": {"n": 1, "err": 0, "b": [1, 0]}}}},
        ],
    }
    merged = merge([a, None, b])  # None: a worker that did not answer
    assert merged["samples"] == [
        {"t": 5, "apps": {"x": {"v1": {"n": 5, "err": 1, "b": [3, 2]}}}},
        {"t": 6, "apps": {"x": {"v2": {"n": 1, "err": 0, "b": [1, 0]}}}},
    ]
    assert a["samples"][0]["apps"]["x"]["v1"]["n"] == 2  # the inputs are not changed
    assert merge([None]) == {"buckets": [], "samples": []}


def test_cli_answers_are_read_as_the_cli_writes_them():
    err = "switching drimeap\nzerodown: Standby group green has 1/2 passing instances; not switching.\n"
    assert cli_reason(err) == "Standby group green has 1/2 passing instances; not switching."
    assert cli_reason("Traceback ...\n") is None
    lines = '{"action": "switch", "result": "ok"}\nnot json\n{"action": "deploy"}\n'
    assert [r["action"] for r in parse_records(lines)] == ["switch", "deploy"]
    assert parse_records('[{"action": "rollback"}, 3]') == [{"action": "rollback"}]
    assert parse_records("") == []
