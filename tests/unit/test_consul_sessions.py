"""The Consul double's sessions and KV locks follow Consul's documented semantics (create,
renew, destroy, TTL invalidation after 2 x TTL, behavior release/delete, lock-delay, acquire and
release with LockIndex and Session)."""

from __future__ import annotations

import base64
import http.client
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from orchestrator.devstack.fakes.consul import FakeConsul
from tests.helpers import wait_until


@pytest.fixture
def consul() -> Iterator[FakeConsul]:
    c = FakeConsul(session_ttl_min=0.2)
    c.start()
    try:
        yield c
    finally:
        c.stop()


def call(c: FakeConsul, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", c.port, timeout=10)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    try:
        conn.request(method, path, body=data)
        r = conn.getresponse()
        raw = r.read()
    finally:
        conn.close()
    try:
        return r.status, json.loads(raw)
    except ValueError:
        return r.status, raw.decode()


def session(c: FakeConsul, **body: Any) -> str:
    status, out = call(c, "PUT", "/v1/session/create", body)
    assert status == 200 and set(out) == {"ID"}, out
    return out["ID"]


def kv(c: FakeConsul, key: str) -> dict[str, Any] | None:
    status, out = call(c, "GET", f"/v1/kv/{key}")
    return None if status == 404 else out[0]


def test_create_validates_ttl_like_consul() -> None:
    c = FakeConsul()  # Consul's default session_ttl_min: 10 s
    c.start()
    try:
        status, text = call(c, "PUT", "/v1/session/create", {"TTL": "5s"})
        assert (status, text) == (
            500,
            "Invalid Session TTL '5000000000', must be between [10s=24h0m0s]",
        )
        status, text = call(c, "PUT", "/v1/session/create", {"Behavior": "explode"})
        assert (status, text) == (500, "Invalid Behavior setting 'explode'")
        sid = session(c, Name="lock", TTL="15s", LockDelay="1s")
        status, (info,) = call(c, "GET", f"/v1/session/info/{sid}")
        assert status == 200
        assert set(info) == {"ID", "Name", "Node", "LockDelay", "Behavior", "TTL", "NodeChecks",
                             "ServiceChecks", "CreateIndex", "ModifyIndex"}  # fmt: skip
        assert (info["Name"], info["TTL"], info["LockDelay"], info["Behavior"]) == (
            "lock", "15s", 1_000_000_000, "release",
        )  # fmt: skip
        assert call(c, "GET", "/v1/session/info/nope") == (200, [])
        assert call(c, "PUT", "/v1/session/renew/nope") == (404, "Session id 'nope' not found")
    finally:
        c.stop()


def test_acquire_release_lock_index_and_session(consul: FakeConsul) -> None:
    a, b = session(consul, LockDelay="0s"), session(consul, LockDelay="0s")
    assert call(consul, "PUT", f"/v1/kv/lock?acquire={a}", b"A") == (200, True)
    e = kv(consul, "lock")
    assert (e["Session"], e["LockIndex"], base64.b64decode(e["Value"])) == (a, 1, b"A")
    assert call(consul, "PUT", f"/v1/kv/lock?acquire={b}", b"B") == (200, False)
    assert call(consul, "PUT", f"/v1/kv/lock?acquire={a}", b"A2") == (200, True)  # re-entrant
    assert kv(consul, "lock")["LockIndex"] == 1
    assert call(consul, "PUT", f"/v1/kv/lock?release={b}", b"") == (200, False)
    assert call(consul, "PUT", f"/v1/kv/lock?release={a}", b"done") == (200, True)
    e = kv(consul, "lock")
    assert "Session" not in e and e["LockIndex"] == 1 and base64.b64decode(e["Value"]) == b"done"
    assert call(consul, "PUT", f"/v1/kv/lock?acquire={b}", b"B") == (200, True)
    assert kv(consul, "lock")["LockIndex"] == 2
    assert call(consul, "PUT", "/v1/kv/lock?acquire=0000", b"x") == (
        500,
        'invalid session "0000"',
    )
    assert call(consul, "PUT", "/v1/kv/other?release=0000", b"x") == (200, False)


def test_destroy_releases_or_deletes_and_lock_delay_blocks(consul: FakeConsul) -> None:
    holder = session(consul, LockDelay="0.5s")
    other = session(consul, LockDelay="0s")
    assert call(consul, "PUT", f"/v1/kv/rel?acquire={holder}", b"h") == (200, True)
    assert call(consul, "PUT", f"/v1/session/destroy/{holder}") == (200, True)
    e = kv(consul, "rel")
    assert e is not None and "Session" not in e  # behavior=release keeps the key
    t0 = time.monotonic()
    assert call(consul, "PUT", f"/v1/kv/rel?acquire={other}", b"o") == (200, False)  # delay
    wait_until(
        lambda: call(consul, "PUT", f"/v1/kv/rel?acquire={other}", b"o") == (200, True),
        5,
        "the lock-delay to pass",
    )
    assert time.monotonic() - t0 >= 0.4

    deleter = session(consul, Behavior="delete", LockDelay="0s")
    assert call(consul, "PUT", f"/v1/kv/del?acquire={deleter}", b"d") == (200, True)
    assert call(consul, "PUT", f"/v1/session/destroy/{deleter}") == (200, True)
    assert kv(consul, "del") is None
    assert call(consul, "PUT", f"/v1/session/destroy/{deleter}") == (200, True)  # idempotent


def test_ttl_session_is_invalidated_after_twice_its_ttl_unless_renewed(
    consul: FakeConsul,
) -> None:
    kept = session(consul, TTL="0.4s", LockDelay="0s")
    lapsed = session(consul, TTL="0.4s", LockDelay="0s")
    assert call(consul, "PUT", f"/v1/kv/k?acquire={lapsed}", b"x") == (200, True)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 1.2:  # renew one of them every 0.2 s
        status, (info,) = call(consul, "PUT", f"/v1/session/renew/{kept}")
        assert status == 200 and info["ID"] == kept
        time.sleep(0.2)
    assert call(consul, "GET", f"/v1/session/info/{lapsed}") == (200, [])
    assert "Session" not in kv(consul, "k")
    assert call(consul, "PUT", f"/v1/session/renew/{lapsed}")[0] == 404
    assert [s["ID"] for s in call(consul, "GET", "/v1/session/list")[1]] == [kept]
