"""The partial-frame budget: reservations, first come first served, loans called in."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from zerodown_proxy.hsms.budget import PartialBudget


def budget(limit: int = 100) -> tuple[PartialBudget[str], list[str]]:
    granted: list[str] = []
    return PartialBudget(limit, granted.append), granted


def test_reservations_fit_until_the_limit_then_tools_wait_in_order():
    b, granted = budget()
    assert b.reserve("a", 60, 0.0) and b.reserve("b", 40, 0.0)
    assert b.used == 100 and b.waiting == 0
    assert not b.reserve("c", 50, 1.0) and not b.reserve("d", 10, 1.5)
    assert b.waiting == 2 and b.contended_since == 1.0
    b.release("b", 2.0)  # 40 free: c (50) is first in line, so d (10) is not let past it
    assert granted == [] and b.waiting == 2
    b.release("a", 3.0)
    assert granted == ["c", "d"] and b.used == 60 and b.waiting == 0
    assert b.held_by("c") == 50 and b.held_by("a") == 0


def test_a_new_message_replaces_the_old_reservation():
    b, granted = budget()
    assert b.reserve("a", 90, 0.0)
    assert not b.reserve("b", 20, 0.0)
    assert b.reserve("a", 5, 1.0)  # a finished its message and began a small one: b gets in
    assert granted == ["b"] and b.used == 25


def test_a_waiting_tool_that_leaves_is_forgotten():
    b, granted = budget()
    assert b.reserve("a", 100, 0.0) and not b.reserve("b", 50, 0.0)
    b.release("b", 1.0)
    b.release("a", 2.0)
    assert granted == [] and b.used == 0 and b.waiting == 0


def test_holders_are_hogs_only_while_others_wait_and_after_the_grace():
    b, _ = budget()
    assert b.reserve("old", 50, 0.0) and b.reserve("new", 50, 9.0)
    assert b.hogs(100.0, 5.0) == []  # nobody waits: a slow message may take its time
    assert not b.reserve("w", 10, 10.0)
    assert b.hogs(14.0, 5.0) == []  # the grace counts from when the wait began
    assert b.hogs(15.5, 5.0) == ["old", "new"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abcdef"), st.integers(0, 60), st.booleans())))
def test_never_over_the_limit_no_needless_wait_and_every_waiter_served_in_turn(ops):
    b, granted = budget(100)
    for now, (who, need, release) in enumerate(ops):
        if release:
            b.release(who, now)
        else:
            b.reserve(who, need, now)
        assert 0 <= b.used <= b.limit
        head = next(iter(b._waiting.values()), None)
        assert head is None or b.used + head[0] > b.limit  # nobody waits while it would fit
    waited = list(b._waiting)
    while b._held:  # holders finish one by one: each waiter gets its turn
        b.release(next(iter(b._held)), 1000)
    assert b.waiting == 0 and b.used == 0 and all(w in granted for w in waited)
