"""Load balancing, outlier ejection, health verdicts, panic mode and the retry budget (pure, no
sockets)."""

from __future__ import annotations

import logging
import time

from zerodown_proxy.config import HttpSection, OutlierSection
from zerodown_proxy.health.active import ProbeResult
from zerodown_proxy.http.balancer import Balancer, RetryBudget
from zerodown_proxy.metrics import Registry
from zerodown_proxy.routing import AppState, Instance, RegistryState, Router
from zerodown_proxy.watcher import Watcher


def inst(n: int, group: str = "blue") -> Instance:
    return Instance(f"i{n}", "app", group, "v1", "127.0.0.1", 9000 + n)


class FakeChecker:
    """The two things the balancer reads from the active checker."""

    def __init__(self) -> None:
        self.down: set[tuple[str, int]] = set()
        self.listeners: list = []

    def subscribe(self, fn) -> None:
        self.listeners.append(fn)

    def mark(self, i: Instance, down: bool, passed: bool | None = None) -> None:
        (self.down.add if down else self.down.discard)(i.http_key)
        result = ProbeResult(i.http_key, not down if passed is None else passed,
                             time.monotonic(), "test", down, True)  # fmt: skip
        for fn in self.listeners:
            fn(result)


def balancer(
    group: tuple[Instance, ...], checker: FakeChecker | None = None, **outlier
) -> tuple[Balancer, Registry]:
    reg = Registry()
    b = Balancer(HttpSection(), reg)
    router = Router()
    watcher = Watcher(router)
    watcher.submit(RegistryState(1, (AppState("app", "blue", group),)))
    b.attach(router, OutlierSection(**outlier), checker)  # type: ignore[arg-type]
    return b, reg


def answer(b: Balancer, i: Instance, status: int) -> None:
    b.started(i)
    b.finished(i, status)


def test_round_robin_skips_ejected_and_tried_instances():
    group = (inst(1), inst(2), inst(3))
    b, _ = balancer(group, consecutive_connect_failures=2)
    assert {b.pick(group, []).id for _ in range(6)} == {"i1", "i2", "i3"}
    for _ in range(2):
        b.started(group[0])
        b.failed(group[0], "connect")
        b.finished(group[0], 502)
    assert b.status()["ejected"]["127.0.0.1:9001"]["reason"] == "consecutive_connect_failures"
    picks = {b.pick(group, [group[1]]).id for _ in range(6)}
    assert picks == {"i3"}


def test_least_conn_prefers_the_least_busy_and_counts_by_endpoint():
    b = Balancer(HttpSection(balance="least_conn"), Registry())
    group = (inst(1), inst(2))
    b.started(group[0])
    assert b.pick(group, []).id == "i2"
    b.finished(group[0], 200)
    assert b.status()["inflight"] == {}


def test_consecutive_5xx_eject_and_a_success_resets_the_count():
    group = (inst(1), inst(2))
    b, reg = balancer(group, consecutive_5xx=3)
    for _ in range(2):
        answer(b, group[0], 503)
    answer(b, group[0], 200)  # resets
    for _ in range(2):
        answer(b, group[0], 500)
    assert not b.avoid
    answer(b, group[0], 500)
    assert b.avoid == {group[0].http_key}
    assert {b.pick(group, []).id for _ in range(4)} == {"i2"}
    assert 'zerodown_http_ejections_total{instance="i1",reason="consecutive_5xx"} 1' in reg.render()
    assert "zerodown_http_ejected_instances 1" in reg.render()


def test_a_failure_and_the_proxys_own_502_for_it_count_once():
    group = (inst(1), inst(2), inst(3))
    b, _ = balancer(group, consecutive_5xx=2, consecutive_timeouts=2)
    # A timeout answered 504 by the proxy: one timeout, not also a 5xx.
    b.started(group[0])
    b.failed(group[0], "first_byte_timeout")
    b.finished(group[0], 504)
    b.started(group[0])
    b.failed(group[0], "reset")  # gateway failure: feeds consecutive_5xx
    b.finished(group[0], 502)
    assert not b.avoid
    b.started(group[0])
    b.failed(group[0], "timeout")
    b.finished(group[0], 0)  # retried elsewhere
    assert b.status()["ejected"]["127.0.0.1:9001"]["reason"] == "consecutive_timeouts"
    assert b.inflight[group[0].http_key] == 0 and not b._faulted


def test_ejection_grows_with_each_ejection_and_is_capped():
    group = (inst(1), inst(2))
    b, _ = balancer(group, consecutive_5xx=1, base_ejection_time=10, max_ejection_time=25)
    spans = []
    for _ in range(4):
        answer(b, group[0], 500)
        ej = b.outliers.ejected[group[0].http_key]
        spans.append(round(ej.until - ej.since))
        b.sweep(ej.until)  # returns at once: no decay
        assert not b.avoid
    assert spans == [10, 20, 25, 25]


def test_ejection_multiplier_decays_while_the_instance_behaves():
    group = (inst(1), inst(2))
    b, _ = balancer(group, consecutive_5xx=1, base_ejection_time=10, max_ejection_time=300)
    o = b.outliers
    key = group[0].http_key
    assert o.failure(key, "consecutive_5xx", "i1", 0.0).count == 1
    o.expire(10.0)
    assert o.failure(key, "consecutive_5xx", "i1", 11.0).count == 2  # back 1 s: 2 x base
    o.expire(31.0)
    # 25 s in service = two base intervals: the multiplier decays from 2 to 0, this is 1 again.
    assert o.failure(key, "consecutive_5xx", "i1", 56.0).count == 1


def test_max_ejection_percent_never_ejects_the_whole_group():
    pair = (inst(1), inst(2))
    b, _ = balancer(pair, consecutive_5xx=1, max_ejection_percent=100)
    answer(b, pair[0], 500)
    answer(b, pair[1], 500)
    assert b.avoid == {pair[0].http_key}  # the last one of a group is never ejected
    assert b.outliers.skipped == 1
    single = (inst(1),)
    b, _ = balancer(single, consecutive_5xx=1)
    answer(b, single[0], 500)
    assert not b.avoid
    ten = tuple(inst(n) for n in range(10))
    b, _ = balancer(ten, consecutive_5xx=1, max_ejection_percent=30)
    for i in ten:
        answer(b, i, 500)
    assert len(b.avoid) == 3


def test_health_down_is_skipped_and_all_down_routes_to_all_in_panic_mode(caplog):
    group = (inst(1), inst(2))
    checker = FakeChecker()
    b, reg = balancer(group, checker)
    checker.mark(group[0], down=True)
    assert {b.pick(group, []).id for _ in range(4)} == {"i2"}
    # A retry whose only untried instance is down goes back to the healthy one.
    assert b.pick(group, [group[1]]).id == "i2"
    with caplog.at_level(logging.WARNING, "zerodown.http"):
        checker.mark(group[1], down=True)
        assert {b.pick(group, []).id for _ in range(4)} == {"i1", "i2"}
    assert sum("panic mode" in r.message for r in caplog.records) == 1  # logged once
    assert 'zerodown_http_panic_routed_total{app="app"} 4' in reg.render()
    assert b.status()["panic"] == ["app/blue"]
    checker.mark(group[0], down=False)
    checker.mark(group[1], down=False)
    assert not b.avoid and b.status()["panic"] == []


def test_passing_health_check_ends_connect_and_timeout_ejections_not_5xx():
    group = (inst(1), inst(2), inst(3))
    checker = FakeChecker()
    b, _ = balancer(
        group, checker, consecutive_5xx=1, consecutive_timeouts=1, max_ejection_percent=100
    )
    b.started(group[0])
    b.failed(group[0], "first_byte_timeout")
    b.finished(group[0], 504)
    answer(b, group[1], 500)
    assert b.avoid == {group[0].http_key, group[1].http_key}
    checker.mark(group[0], down=False, passed=True)
    checker.mark(group[1], down=False, passed=True)
    assert b.avoid == {group[1].http_key}  # the 5xx ejection runs its course


def test_a_probe_started_before_the_ejection_does_not_end_it():
    group = (inst(1), inst(2))
    b, _ = balancer(group, consecutive_connect_failures=1)
    early = time.monotonic() - 1
    b.started(group[0])
    b.failed(group[0], "connect")
    b.finished(group[0], 502)
    b._on_probe(ProbeResult(group[0].http_key, True, early, "200", False, False))
    assert b.avoid == {group[0].http_key}


def test_removed_instances_are_forgotten():
    group = (inst(1), inst(2))
    reg = Registry()
    b = Balancer(HttpSection(), reg)
    router = Router()
    watcher = Watcher(router)
    watcher.submit(RegistryState(1, (AppState("app", "blue", group),)))
    b.attach(router, OutlierSection(consecutive_5xx=1))
    answer(b, group[0], 500)
    assert b.avoid
    watcher.submit(RegistryState(2, (AppState("app", "blue", (group[1], inst(3))),)))
    assert not b.avoid and not b.outliers.ejected


def test_retry_budget_allows_a_ratio_of_requests_plus_a_floor():
    budget = RetryBudget(ratio=0.2, floor=2)
    assert budget.try_retry() and budget.try_retry()
    assert not budget.try_retry() and budget.refused == 1
    for _ in range(10):
        budget.request()
    assert budget.try_retry() and budget.try_retry()
    assert not budget.try_retry()
