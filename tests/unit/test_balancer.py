"""Load balancing, passive ejection and the retry budget (pure, no sockets)."""

from __future__ import annotations

from zerodown_proxy.config import HttpSection
from zerodown_proxy.http.balancer import Balancer, RetryBudget
from zerodown_proxy.metrics import Registry
from zerodown_proxy.routing import Instance


def inst(n: int) -> Instance:
    return Instance(f"i{n}", "app", "blue", "v1", "127.0.0.1", 9000 + n)


def test_round_robin_skips_ejected_and_tried_instances():
    b = Balancer(HttpSection(eject_after_failures=2), Registry())
    group = (inst(1), inst(2), inst(3))
    assert {b.pick(group, []).id for _ in range(6)} == {"i1", "i2", "i3"}
    b.failed(group[0], "connect")
    b.failed(group[0], "connect")
    assert "127.0.0.1:9001" in b.status()["ejected"]
    picks = {b.pick(group, [group[1]]).id for _ in range(6)}
    assert picks == {"i3"}


def test_least_conn_prefers_the_least_busy_and_counts_by_endpoint():
    b = Balancer(HttpSection(balance="least_conn"), Registry())
    group = (inst(1), inst(2))
    b.started(group[0])
    assert b.pick(group, []).id == "i2"
    b.finished(group[0], 200)
    assert b.status()["inflight"] == {}


def test_retry_budget_allows_a_ratio_of_requests_plus_a_floor():
    budget = RetryBudget(ratio=0.2, floor=2)
    assert budget.try_retry() and budget.try_retry()
    assert not budget.try_retry() and budget.refused == 1
    for _ in range(10):
        budget.request()
    assert budget.try_retry() and budget.try_retry()
    assert not budget.try_retry()
