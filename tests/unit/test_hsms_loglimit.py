"""Per-tool allowance for per-frame warning lines."""

from __future__ import annotations

from zerodown_proxy.hsms.loglimit import LogLimiter


def test_the_first_lines_of_an_interval_are_logged_the_rest_counted_by_kind():
    lim = LogLimiter(limit=2, interval=10.0, now=0.0)
    assert [lim.allow("reject_1") for _ in range(3)] == [True, True, False]
    assert not lim.allow("orphan_reply")
    assert lim.roll(5.0) is None  # the interval has not ended
    assert lim.roll(10.0) == {"reject_1": 1, "orphan_reply": 1}
    assert lim.allow("reject_1") and lim.roll(20.0) is None  # nothing held back this time


def test_the_last_summary_is_given_when_the_connection_ends():
    lim = LogLimiter(limit=0, interval=10.0, now=0.0)
    assert not lim.allow("abort")
    assert lim.roll(1.0, final=True) == {"abort": 1}
