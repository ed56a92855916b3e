"""The blocking-query loop (consul_client.Watch) with a scripted client: index handling,
resynchronisation after errors, watchdog timeout, backoff with a cap, and the rate limit."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from zerodown_proxy.discovery.consul_client import (
    BURST,
    Answer,
    ConsulClient,
    ConsulError,
    Watch,
)


class ScriptedClient:
    """Answers calls from a script; records (index, wait, timeout) of each call."""

    def __init__(self, script: list[Answer | ConsulError]) -> None:
        self.script = script
        self.calls: list[tuple[int, float, float]] = []

    async def get(self, path: str, index: int = 0, wait: float = 0.0, timeout: float = 10.0):
        self.calls.append((index, wait, timeout))
        if not self.script:
            raise asyncio.CancelledError  # end of script: stop the watch
        item = self.script.pop(0)
        if isinstance(item, ConsulError):
            raise item
        return item


def run_watch(
    script: list[Any], on_answer: Any = None, **kw: Any
) -> tuple[ScriptedClient, Watch, list[int], list[str], list[float]]:
    client = ScriptedClient(script)
    seen: list[int] = []
    errors: list[str] = []
    sleeps: list[float] = []

    def answered(w: Watch, a: Answer) -> None:
        if on_answer is not None:
            on_answer(w, a)
        seen.append(a.index)

    params = dict(wait=10.0, watchdog=2.0, min_interval=0.0, backoff_min=0.1, backoff_max=1.0)
    params.update(kw)
    w = Watch("t", "/x", client, answered, lambda w, e: errors.append(e.kind), **params)  # type: ignore[arg-type]

    async def fake_sleep(s: float) -> None:
        sleeps.append(s)

    w._sleep = fake_sleep

    async def go() -> None:
        with pytest.raises(asyncio.CancelledError):
            await w.run()

    asyncio.run(go())
    return client, w, seen, errors, sleeps


def ok(index: int) -> Answer:
    return Answer(200, index, [])


def test_first_call_is_not_blocking_then_blocks_on_the_last_index() -> None:
    client, w, seen, _, _ = run_watch([ok(5), ok(5), ok(9)])
    assert [c[0] for c in client.calls] == [0, 5, 5, 9]
    assert seen == [5, 9]  # an answer with the same index (wait expired) is not re-processed
    index, wait, timeout = client.calls[1]
    assert 9.0 <= wait <= 10.0  # jittered down a little
    assert timeout == pytest.approx(wait * 17 / 16 + 2.0)  # the watchdog exceeds wait + jitter


def test_index_going_backwards_is_reset_and_zero_is_never_blocked_on() -> None:
    client, w, seen, _, _ = run_watch([ok(50), ok(7), ok(7), ok(0), ok(0)])
    indexes = [c[0] for c in client.calls]
    assert indexes[:3] == [0, 50, 0]  # after 7 < 50: one non-blocking call
    assert indexes[3] == 7
    # An answer with index 0 is never blocked on: the index is kept at 1 at least, and the
    # drop from 7 counts as going backwards (a non-blocking call follows).
    assert indexes[4] == 0 and w.stats.index == 1
    assert w.stats.index_resets >= 2


def test_errors_back_off_exponentially_with_a_cap_and_resynchronise() -> None:
    down = ConsulError("unreachable", "refused")
    client, w, seen, errors, sleeps = run_watch([ok(3)] + [down] * 6 + [ok(4)])
    assert errors == ["unreachable"] * 6
    backoffs = sleeps[-6:]
    assert backoffs[0] <= 0.1 and backoffs[1] > backoffs[0]
    assert max(backoffs) <= 1.0 and backoffs[-1] >= 0.8  # capped at backoff_max (with jitter)
    assert client.calls[-2][0] == 0  # the call after errors is a non-blocking resync
    assert client.calls[-1][0] == 4  # then blocking again
    assert seen == [3, 4] and w.stats.consecutive_errors == 0 and w.stats.errors == 6


def test_a_body_the_provider_cannot_use_counts_as_garbage() -> None:
    bad = [6]

    def reject(w: Watch, a: Answer) -> None:
        if bad and a.index == bad[0]:
            bad.pop()
            raise ConsulError("garbage", "bad body")

    client, w, seen, errors, _ = run_watch([ok(5), ok(6), ok(6)], on_answer=reject)
    assert errors == ["garbage"]
    assert w.stats.index == 6 and seen == [5, 6]
    assert [c[0] for c in client.calls] == [0, 5, 0, 6]  # index kept at 5 until a good answer


def test_rate_limit_allows_a_burst_then_spaces_requests() -> None:
    client, w, _, _, sleeps = run_watch([ok(i) for i in range(1, 20)], min_interval=0.5)
    assert len(client.calls) == 20
    assert len(sleeps) >= 20 - BURST - 1  # beyond the burst, every call waited
    assert all(s <= 0.5 + 1e-6 for s in sleeps)


def test_backoff_values() -> None:
    w = Watch("t", "/x", ConsulClient("http://127.0.0.1:1"), lambda w, a: None,
              lambda w, e: None, 1, 1, 0, 0.1, 2.0)  # fmt: skip
    assert 0.08 <= w.backoff(1) <= 0.1
    assert 0.64 <= w.backoff(4) <= 0.8
    assert 1.6 <= w.backoff(50) <= 2.0


def test_a_bug_in_the_provider_does_not_end_the_watch() -> None:
    """Any exception from the answer callback is caught: counted as "internal", backed off,
    and the watch goes on (before, only ConsulError was caught and the watch task died)."""
    boom = [6]

    def buggy(w: Watch, a: Answer) -> None:
        if boom and a.index == boom[0]:
            boom.pop()
            raise KeyError("a bug")

    client, w, seen, errors, _ = run_watch([ok(5), ok(6), ok(6), ok(7)], on_answer=buggy)
    assert errors == ["internal"] and "a bug" in w.stats.last_error
    assert seen == [5, 6, 7]  # the failed answer is delivered again, then the watch follows
