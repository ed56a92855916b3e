"""The release verdict's arithmetic (orchestrator/verify.py, scrape.py) on Prometheus text as
the proxy and the multi-worker supervisor expose it: no network."""

from __future__ import annotations

import math

import pytest

from orchestrator import scrape, verify
from orchestrator.backend import Refused
from orchestrator.scrape import Totals
from zerodown_proxy.http.accounting import HttpAccounting
from zerodown_proxy.metrics import Registry
from zerodown_proxy.supervisor_merge import merge_metrics


def policy(**kw) -> verify.Policy:
    return verify.policy_from(None, kw)


def exposition(answers: dict[tuple[str, int], int], latency: dict[str, list[float]]) -> str:
    """/metrics of a proxy that answered `answers` ((version, status) -> count), rendered by
    the proxy's own metric objects."""
    reg = Registry()
    acc = HttpAccounting.__new__(HttpAccounting)
    acc.m_requests = reg.counter("zerodown_http_requests_total", "", ("app", "version", "code"))
    acc.m_latency = reg.histogram("zerodown_http_request_duration_seconds", "", ("app", "version"))
    for (version, code), n in answers.items():
        acc.m_requests.inc(("drimeap", version, str(code)), n)
        acc.m_requests.inc(("other", version, str(code)), 1000)  # another app: never counted
    for version, values in latency.items():
        for v in values:
            acc.m_latency.observe(v, ("drimeap", version))
    return reg.render()


def test_durations():
    assert verify.parse_duration("60s") == 60
    assert verify.parse_duration("2m") == 120
    assert verify.parse_duration("500ms") == 0.5
    assert verify.parse_duration("1.5") == 1.5
    for bad in ("soon", "-1s", "1 d", ""):
        with pytest.raises(Refused, match="must be a duration"):
            verify.parse_duration(bad)


def test_totals_pick_app_and_versions_and_count_5xx():
    text = exposition({("v2", 200): 90, ("v2", 503): 6, ("-", 502): 4, ("v1", 500): 50}, {})
    t = scrape.totals(scrape.parse(text), "drimeap", ["v2", "-"])
    assert (t.requests, t.errors) == (100, 10)
    assert t.error_rate == pytest.approx(0.1)


def test_worker_labels_of_the_supervisor_are_summed():
    one = exposition({("v2", 200): 10, ("v2", 500): 1}, {"v2": [0.01] * 10})
    merged = merge_metrics([one, one, one])
    t = scrape.totals(scrape.parse(merged), "drimeap", ["v2"])
    assert (t.requests, t.errors, t.timed) == (33, 3, 30)


def test_p99_from_the_histogram_interpolates_inside_its_bucket():
    values = [0.003] * 98 + [0.2, 0.2]  # 98 in (0.002, 0.005], 2 in (0.1, 0.25]
    text = exposition({}, {"v2": values})
    t = scrape.totals(scrape.parse(text), "drimeap", ["v2"])
    assert t.timed == 100
    assert 0.1 < t.quantile(0.99) <= 0.25
    assert 0.002 < t.quantile(0.5) <= 0.005
    assert Totals().quantile(0.99) is None
    slow = scrape.totals(scrape.parse(exposition({}, {"v2": [30.0] * 5})), "drimeap", ["v2"])
    assert slow.quantile(0.99) == 10.0  # past the last finite bucket: its bound
    assert math.isinf(max(slow.buckets))


def test_deltas_and_a_restarted_proxy():
    before = Totals(requests=100, errors=1, buckets={0.01: 90, math.inf: 100})
    after = Totals(requests=150, errors=11, buckets={0.01: 100, math.inf: 150})
    d = after.minus(before)
    assert (d.requests, d.errors, d.buckets[0.01], d.buckets[math.inf]) == (50, 10, 10, 50)
    restarted = Totals(requests=7, errors=0, buckets={math.inf: 7}).minus(before)
    assert restarted.requests == 7  # a counter that went down started again from zero


def test_judge_fails_on_5xx_above_the_baseline_and_passes_within_it():
    p = policy(min_requests=20)
    base = Totals(requests=1000, errors=5)  # 0.5 %
    bad = judge(base, Totals(requests=100, errors=3), p)  # 3 % > 0.5 % + 1 point
    assert bad is not None and not bad.ok
    assert bad.reason == ("HTTP 5xx 3.00% of 100 requests (baseline 0.50% of 1000; limit "
                          "1.50%)")  # fmt: skip
    ok = verify.judge(base, Totals(requests=100, errors=1), p, final=True)
    assert ok is not None and ok.ok and ok.reason == "passed"
    assert verify.judge(base, Totals(requests=100, errors=1), p, final=False) is None


def judge(base: Totals, new: Totals, p: verify.Policy) -> verify.Verdict | None:
    return verify.judge(base, new, p, final=False)


def test_nothing_is_judged_below_the_minimum_request_count():
    p = policy(min_requests=50)
    assert judge(Totals(requests=1000), Totals(requests=49, errors=49), p) is None
    v = verify.judge(Totals(requests=1000), Totals(requests=49, errors=49), p, final=True)
    assert v is not None and v.ok and v.reason.startswith("not judged")
    assert v.lines[0] == "HTTP not judged: 49 requests in the window, fewer than the 50 needed"


def test_without_a_baseline_the_5xx_limit_is_absolute():
    p = policy(min_requests=20)
    v = judge(Totals(requests=3, errors=3), Totals(requests=100, errors=2), p)
    assert v is not None and "limit 1.00%" in v.reason  # the baseline's 100 % is not trusted


def latency(values: list[float]) -> Totals:
    return scrape.totals(scrape.parse(exposition({("v", 200): len(values)}, {"v": values})),
                         "drimeap", ["v"])  # fmt: skip


def test_latency_fails_past_factor_and_minimum_increase():
    p = policy(min_requests=20)
    base = latency([0.003] * 200)
    v = judge(base, latency([0.3] * 100), p)
    assert v is not None and not v.ok and v.reason.startswith("HTTP p99 ")
    # twice as slow, but only by a few milliseconds: under latency_min_increase (50 ms)
    assert verify.judge(base, latency([0.008] * 100), p, final=True).ok


def test_hsms_errors_against_primaries():
    p = policy(min_hsms_primaries=20)
    base = Totals(hsms_primaries=1000, hsms_errors=0)
    v = judge(base, Totals(hsms_primaries=100, hsms_errors=10), p)
    assert v is not None and not v.ok and v.reason.startswith("HSMS SxF0/Reject 10.00% of 100")
    assert verify.judge(base, Totals(hsms_primaries=100), p, final=True).ok


def test_hsms_counters_exclude_tool_side_aborts_and_the_drained_backend():
    text = "\n".join([
        'zerodown_hsms_forwarded_total{direction="up",kind="primary"} 80',
        'zerodown_hsms_forwarded_total{direction="down",kind="primary"} 20',
        'zerodown_hsms_forwarded_total{direction="up",kind="reply"} 500',
        'zerodown_hsms_aborted_total{reason="t3_timeout"} 2',
        'zerodown_hsms_aborted_total{reason="tool_disconnected"} 9',
        'zerodown_hsms_rejected_total{side="backend",reason="4"} 5',
        'zerodown_hsms_peer_rejects_total{side="tool",reason="3"} 1',
        "zerodown_hsms_old_version_primaries_rejected_total 4",
    ])  # fmt: skip
    t = scrape.totals(scrape.parse(text), "drimeap", ["v2"])
    assert (t.hsms_primaries, t.hsms_errors) == (100, 2 + 5 + 1 - 4)


def test_policy_comes_from_the_config_file_then_flags(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[verify]\nwindow = "2m"\nmin_requests = 10\nlatency_min_increase = "20ms"\n')
    p = verify.policy_from(str(cfg), {"min_requests": 30, "baseline": None})
    assert (p.window, p.min_requests, p.baseline, p.latency_min_increase) == (120, 30, 5, 0.02)
    cfg.write_text("[verify]\nwindow = 60\n")
    with pytest.raises(Refused, match=r"\[verify\] window must be a string"):
        verify.policy_from(str(cfg), {})
    with pytest.raises(Refused, match="latency_factor must be at least 1"):
        verify.policy_from(None, {"latency_factor": 0.5})
