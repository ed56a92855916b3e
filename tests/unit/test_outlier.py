"""Outlier detection as a pure state machine: any sequence of events keeps its invariants."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from zerodown_proxy.config import OutlierSection
from zerodown_proxy.health.outlier import REASONS, OutlierDetector
from zerodown_proxy.routing import AppState, Instance, RegistryState, build_snapshot

events = st.lists(
    st.tuples(
        st.sampled_from(["fail", "ok", "expire", "probe"]),
        st.integers(0, 5),  # instance
        st.sampled_from(REASONS),
        st.floats(0, 5),  # time step
    ),
    max_size=200,
)


@settings(max_examples=200, deadline=None)
@given(events, st.integers(1, 6), st.integers(0, 100))
def test_a_group_is_never_wholly_ejected_and_ejections_end(seq, n, percent):
    insts = tuple(Instance(f"i{k}", "a", "blue", "v1", "127.0.0.1", 9000 + k) for k in range(n))
    cfg = OutlierSection(consecutive_5xx=2, consecutive_connect_failures=1,
                         consecutive_timeouts=1, base_ejection_time=3, max_ejection_time=10,
                         max_ejection_percent=percent)  # fmt: skip
    o = OutlierDetector(cfg)
    o.set_topology(build_snapshot(RegistryState(1, (AppState("a", "blue", insts),))))
    allowed = 0 if percent == 0 else min(max(1, n * percent // 100), n - 1)
    now = 0.0
    for kind, k, reason, step in seq:
        now += step
        key = insts[k % n].http_key
        if kind == "fail":
            ej = o.failure(key, reason, insts[k % n].id, now)
            if ej is not None:
                assert now < ej.until <= now + cfg.max_ejection_time
                assert abs((ej.until - ej.since) - min(3 * ej.count, 10)) < 1e-9
        elif kind == "ok":
            o.success(key)
        elif kind == "expire":
            o.expire(now)
        else:
            o.health_check_passed(key, now)
        assert len(o.ejected) <= allowed < max(n, 1)
    o.expire(now + cfg.max_ejection_time)
    assert not o.ejected
