"""The per-tool transaction table: one owner for what is open in both directions."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from zerodown_proxy.hsms.codec import Frame
from zerodown_proxy.hsms.transactions import HostPrimary, ToolPrimary, Transactions


def tp(system: int, sent: float = 0.0) -> ToolPrimary:
    return ToolPrimary(system, 3, 0x86, 11, sent)


def test_a_backend_reply_closes_the_tool_primary_it_answers_and_only_on_its_session():
    tx: Transactions[str] = Transactions()
    tx.add_link("a")
    tx.add_link("b")
    tx.tool_primary("a", 1, tp(77))
    assert tx.tool_reply("b", 1) is None  # same number, other session: not this transaction
    assert tx.open_on("a") == 1 and len(tx) == 1
    rec = tx.tool_reply("a", 1)
    assert rec == tp(77) and rec.header() == Frame(3, 0x86, 11, 0, 0, 77)
    assert tx.tool_reply("a", 1) is None and tx.open_on("a") == 0 and len(tx) == 0


def test_host_primaries_count_on_the_session_that_opened_them():
    tx: Transactions[str] = Transactions()
    tx.add_link("a")
    tx.add_link("b")
    tx.host_primary(10, HostPrimary("a", 500, 0, 0x82, 0.0))
    tx.host_primary(11, HostPrimary("b", 500, 0, 0x82, 0.0))
    tx.host_primary(12, HostPrimary("a", 501, 0, 0x82, 0.0))
    assert (tx.open_on("a"), tx.open_on("b"), len(tx)) == (2, 1, 3)
    assert tx.host_reply(99) is None
    rec = tx.host_reply(10)
    assert rec is not None and rec.link == "a" and rec.header() == Frame(0, 0x82, 0, 0, 0, 500)
    assert (tx.open_on("a"), tx.open_on("b")) == (1, 1)
    assert [(r.link, r.system) for r in tx.drop_host_primaries()] == [("b", 500), ("a", 501)]
    assert (tx.open_on("a"), tx.open_on("b"), len(tx)) == (0, 0, 0)


def test_removing_a_session_returns_what_was_open_on_it_both_ways_and_nothing_else():
    tx: Transactions[str] = Transactions()
    for link in "ab":
        tx.add_link(link)
    tx.tool_primary("a", 1, tp(1))
    tx.tool_primary("b", 1, tp(2))
    tx.host_primary(5, HostPrimary("a", 50, 0, 0x82, 0.0))
    tx.host_primary(6, HostPrimary("b", 60, 0, 0x82, 0.0))
    up, down = tx.remove_link("a")
    assert [r.system for r in up] == [1] and [r.system for r in down] == [50]
    assert tx.open_on("a") == 0 and tx.open_on("b") == 2 and len(tx) == 2
    assert tx.host_reply(5) is None and tx.host_reply(6) is not None
    assert tx.remove_link("a") == ([], [])  # twice is harmless


def test_expired_closes_only_what_is_older_than_t3():
    tx: Transactions[str] = Transactions()
    tx.add_link("a")
    for k, sent in enumerate([0.0, 1.0, 5.0]):
        tx.tool_primary("a", k, tp(k, sent))
        tx.host_primary(k, HostPrimary("a", 100 + k, 0, 0x82, sent))
    up, down = tx.expired(now=4.5, t3=3.0)
    assert [r.system for _, r in up] == [0, 1] and [r.system for r in down] == [100, 101]
    assert tx.open_on("a") == 2
    assert tx.expired(now=4.5, t3=3.0) == ([], [])


ops = st.lists(
    st.tuples(
        st.sampled_from(["tool", "treply", "host", "hreply", "drop", "remove", "expire"]),
        st.sampled_from(["a", "b", "c"]),
        st.integers(0, 5),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_counts_always_agree_with_a_plain_model(seq):
    tx: Transactions[str] = Transactions()
    up: dict[tuple[str, int], float] = {}  # (link, system) -> sent
    down: dict[int, tuple[str, float]] = {}  # system -> (link, sent)
    links: set[str] = set()
    for t, (op, link, n) in enumerate(seq):
        if link not in links:
            tx.add_link(link)
            links.add(link)
        if op == "tool":
            if (link, n) in up:
                continue  # a session never reuses the system bytes of an open transaction
            tx.tool_primary(link, n, tp(n, float(t)))
            up[(link, n)] = float(t)
        elif op == "treply":
            assert (tx.tool_reply(link, n) is not None) == ((link, n) in up)
            up.pop((link, n), None)
        elif op == "host":
            tx.host_primary(n, HostPrimary(link, n, 0, 0x82, float(t)))
            down[n] = (link, float(t))
        elif op == "hreply":
            rec = tx.host_reply(n)
            assert (rec.link if rec else None) == (down.pop(n)[0] if n in down else None)
        elif op == "drop":
            assert len(tx.drop_host_primaries()) == len(down)
            down.clear()
        elif op == "remove":
            got_up, got_down = tx.remove_link(link)
            assert len(got_up) == sum(1 for k in up if k[0] == link)
            assert len(got_down) == sum(1 for v in down.values() if v[0] == link)
            up = {k: v for k, v in up.items() if k[0] != link}
            down = {k: v for k, v in down.items() if v[0] != link}
            links.discard(link)
        elif op == "expire":
            now = float(t)
            old_up = [(lk, s) for (lk, s), sent in up.items() if now - sent > 10]
            old_down = [s for s, (_, sent) in down.items() if now - sent > 10]
            got_up, got_down = tx.expired(now, 10)
            # Each session's records are in time order: exactly the old ones expire.
            assert sorted((lk, r.system) for lk, r in got_up) == sorted(old_up)
            assert sorted(r.system for r in got_down) == sorted(old_down)
            for k in old_up:
                del up[k]
            for s in old_down:
                del down[s]
        for lk in "abc":
            want = sum(1 for k in up if k[0] == lk) + sum(1 for v in down.values() if v[0] == lk)
            assert tx.open_on(lk) == want
        assert len(tx) == len(up) + len(down)
