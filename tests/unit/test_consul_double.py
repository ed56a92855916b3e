"""The Consul double answers like the recorded real agent (status codes, headers, body shapes,
blocking queries, CAS, ACL and fault injection)."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from orchestrator.devstack.fakes.consul import FakeConsul, parse_go_duration
from tests.helpers import wait_until

# Recorded from a real Consul 1.10 agent (copied from the shared api-samples).
RECORDINGS = Path(__file__).resolve().parent.parent / "fixtures" / "consul-exchanges.json"


def recordings() -> list[dict[str, Any]]:
    return json.loads(RECORDINGS.read_text())


def rec(note_start: str) -> dict[str, Any]:
    for e in recordings():
        if e["note"].startswith(note_start):
            return e
    raise KeyError(note_start)


class Resp:
    def __init__(self, status: int, headers: dict[str, str], body: bytes, elapsed: float) -> None:
        self.status, self.headers, self.body, self.elapsed = status, headers, body, elapsed

    def json(self) -> Any:
        return json.loads(self.body)


def call(
    c: FakeConsul,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> Resp:
    conn = http.client.HTTPConnection("127.0.0.1", c.port, timeout=timeout)
    t0 = time.monotonic()
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        data = r.read()
        return Resp(r.status, dict(r.getheaders()), data, time.monotonic() - t0)
    finally:
        conn.close()


def shape(obj: Any) -> Any:
    """The structure of a JSON value: key sets and value types, recursively."""
    if isinstance(obj, dict):
        return {k: shape(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [shape(obj[0])] if obj else []
    return type(obj).__name__


def register_like_recording(c: FakeConsul) -> None:
    for e in rec("all instances of the HTTP service")["response"]["body"]:
        s = e["Service"]
        c.register(s["ID"], s["Service"], s["Address"], s["Port"], tags=s["Tags"], meta=s["Meta"])


X_HEADERS = ("X-Consul-Index", "X-Consul-Knownleader", "X-Consul-Lastcontact")


def test_parse_go_duration() -> None:
    assert parse_go_duration("5s") == 5.0
    assert parse_go_duration("100ms") == pytest.approx(0.1)
    assert parse_go_duration("1m30s") == 90.0
    for bad in ("5", "s", "5x", ""):
        with pytest.raises(ValueError):
            parse_go_duration(bad)


def test_health_service_matches_recording(consul: FakeConsul) -> None:
    register_like_recording(consul)
    recorded = rec("all instances of the HTTP service")["response"]
    r = call(consul, "GET", "/v1/health/service/drimeap")
    assert r.status == 200
    assert set(recorded["headers"]) <= set(r.headers)
    assert r.headers["Content-Type"] == "application/json"
    body = r.json()
    assert len(body) == 4
    assert shape(body) == shape(recorded["body"])
    # sorted by service id like the agent, ports and tags as registered
    assert [e["Service"]["ID"] for e in body] == [e["Service"]["ID"] for e in recorded["body"]]
    assert [e["Service"]["Port"] for e in body] == [e["Service"]["Port"] for e in recorded["body"]]
    assert body[0]["Checks"][0]["CheckID"] == "serfHealth"
    assert int(r.headers["X-Consul-Index"]) >= 1


def test_passing_and_tag_filters(consul: FakeConsul) -> None:
    register_like_recording(consul)
    ids = [e["Service"]["ID"] for e in consul.services("drimeap")]
    consul.set_check(ids[0], "critical")
    consul.set_check(ids[1], "warning")
    every = call(consul, "GET", "/v1/health/service/drimeap").json()
    assert [c["Status"] for c in every[0]["Checks"]] == ["passing", "critical"]
    passing = call(consul, "GET", "/v1/health/service/drimeap?passing=1").json()
    assert [e["Service"]["ID"] for e in passing] == ids[2:]
    blue = call(consul, "GET", "/v1/health/service/drimeap?tag=zerodown-group%3Dblue").json()
    assert {e["Service"]["Tags"][0] for e in blue} == {"zerodown-group=blue"}
    assert len(blue) == 2
    assert call(consul, "GET", "/v1/health/service/nope").json() == []


def test_kv_404_cas_base64_raw(consul: FakeConsul) -> None:
    missing = call(consul, "GET", "/v1/kv/zerodown/drimeap/active")
    assert missing.status == 404 and missing.body == b""
    assert set(X_HEADERS) <= set(missing.headers)
    assert "application/json" not in missing.headers.get("Content-Type", "")
    put = "/v1/kv/zerodown/drimeap/active?cas=0"
    first = call(consul, "PUT", put, b"blue")
    assert (first.status, first.json(), first.headers["Content-Type"]) == (
        200,
        True,
        "application/json",
    )
    assert call(consul, "PUT", put, b"blue").json() is False
    got = call(consul, "GET", "/v1/kv/zerodown/drimeap/active")
    recorded = rec("value is base64")["response"]
    assert got.status == 200 and shape(got.json()) == shape(recorded["body"])
    entry = got.json()[0]
    assert entry["Value"] == "Ymx1ZQ==" and entry["Key"] == "zerodown/drimeap/active"
    assert got.headers["X-Consul-Index"] == str(entry["ModifyIndex"])
    raw = call(consul, "GET", "/v1/kv/zerodown/drimeap/active?raw")
    assert (raw.body, raw.headers["Content-Type"]) == (b"blue", "text/plain")
    mi = entry["ModifyIndex"]
    assert call(consul, "PUT", f"/v1/kv/zerodown/drimeap/active?cas={mi}", b"green").json() is True
    assert call(consul, "PUT", f"/v1/kv/zerodown/drimeap/active?cas={mi}", b"blue").json() is False
    value, index = consul.kv_get("zerodown/drimeap/active")
    assert value == "green" and index > mi
    listing = call(consul, "GET", "/v1/kv/zerodown/?recurse=true").json()
    assert [e["Key"] for e in listing] == ["zerodown/drimeap/active"]
    assert call(consul, "DELETE", "/v1/kv/zerodown/drimeap/active").json() is True
    gone = call(consul, "GET", "/v1/kv/zerodown/drimeap/active")
    assert gone.status == 404 and int(gone.headers["X-Consul-Index"]) > index


def later(delay: float, fn: Any) -> threading.Thread:
    t = threading.Timer(delay, fn)
    t.start()
    return t


def test_blocking_kv_returns_early_on_change_and_after_wait_otherwise(consul: FakeConsul) -> None:
    idx = consul.kv_set("zerodown/drimeap/active", "blue")
    same = call(consul, "GET", f"/v1/kv/zerodown/drimeap/active?index={idx}&wait=200ms")
    assert same.status == 200 and same.headers["X-Consul-Index"] == str(idx)
    assert same.elapsed >= 0.2  # it did block for `wait`
    t = later(0.05, lambda: consul.kv_set("zerodown/drimeap/active", "green"))
    changed = call(consul, "GET", f"/v1/kv/zerodown/drimeap/active?index={idx}&wait=30s")
    t.join()
    assert int(changed.headers["X-Consul-Index"]) > idx
    assert changed.json()[0]["Value"] == "Z3JlZW4="
    assert changed.elapsed < 20  # woken by the write, not by the 30 s wait


def test_blocking_on_missing_key_wakes_on_create(consul: FakeConsul) -> None:
    missing = call(consul, "GET", "/v1/kv/zerodown/drimeap/active")
    idx = int(missing.headers["X-Consul-Index"])
    t = later(0.05, lambda: consul.kv_set("zerodown/drimeap/active", "blue"))
    r = call(consul, "GET", f"/v1/kv/zerodown/drimeap/active?index={idx}&wait=30s")
    t.join()
    assert r.status == 200 and r.elapsed < 20


def test_blocking_health_wakes_on_check_change_only_for_its_service(consul: FakeConsul) -> None:
    register_like_recording(consul)
    consul.register("hsms-1", "drimeap-hsms", "127.0.0.1", 9101)
    r = call(consul, "GET", "/v1/health/service/drimeap")
    idx = int(r.headers["X-Consul-Index"])
    sid = r.json()[0]["Service"]["ID"]
    # a change to another service does not wake this query
    t = later(0.05, lambda: consul.set_check("hsms-1", "critical"))
    same = call(consul, "GET", f"/v1/health/service/drimeap?index={idx}&wait=300ms")
    t.join()
    assert same.headers["X-Consul-Index"] == str(idx) and same.elapsed >= 0.3
    t = later(0.05, lambda: consul.set_check(sid, "critical"))
    woke = call(consul, "GET", f"/v1/health/service/drimeap?index={idx}&wait=30s")
    t.join()
    assert int(woke.headers["X-Consul-Index"]) > idx and woke.elapsed < 20
    assert woke.json()[0]["Checks"][1]["Status"] == "critical"


def test_index_ahead_of_server_blocks_until_wait(consul: FakeConsul) -> None:
    """After an agent restart a client's index can be ahead: Consul blocks the full wait."""
    consul.register("a", "drimeap", "127.0.0.1", 9001)
    r = call(consul, "GET", "/v1/health/service/drimeap?index=999999&wait=200ms")
    assert r.status == 200 and r.elapsed >= 0.2
    assert int(r.headers["X-Consul-Index"]) < 999999


def test_bad_query_parameters(consul: FakeConsul) -> None:
    assert call(consul, "GET", "/v1/kv/x?index=1&wait=5").status == 400
    assert call(consul, "GET", "/v1/kv/x?index=abc").status == 400
    r = call(consul, "GET", "/v1/health/service/drimeap?dc=dc9")
    assert (r.status, r.body) == (500, b"No path to datacenter")
    assert call(consul, "GET", "/v1/health/service/drimeap?dc=dc1").status == 200


def test_acl_token(consul: FakeConsul) -> None:
    consul.acl_token = "secret"
    denied = call(consul, "GET", "/v1/kv/zerodown/drimeap/active")
    assert (denied.status, denied.body) == (403, b"ACL not found")
    wrong = call(consul, "GET", "/v1/health/service/x", headers={"X-Consul-Token": "nope"})
    assert wrong.status == 403
    ok = call(consul, "GET", "/v1/health/service/x", headers={"X-Consul-Token": "secret"})
    assert ok.status == 200
    assert call(consul, "GET", "/v1/health/service/x?token=secret").status == 200
    assert call(consul, "GET", "/v1/status/leader").json() == "127.0.0.1:8300"


def test_garbage(consul: FakeConsul) -> None:
    consul.garbage = True
    r = call(consul, "GET", "/v1/health/service/drimeap")
    assert r.status == 200
    with pytest.raises(ValueError):
        r.json()


def test_hang_blocks_blocking_queries_only(consul: FakeConsul) -> None:
    idx = consul.kv_set("k", "v")
    consul.hang = True
    assert call(consul, "GET", "/v1/kv/k").status == 200  # non-blocking still answers
    with pytest.raises(TimeoutError):
        call(consul, "GET", f"/v1/kv/k?index={idx}&wait=100ms", timeout=0.5)
    consul.hang = False
    assert call(consul, "GET", f"/v1/kv/k?index={idx}&wait=50ms").status == 200


def test_hang_also_holds_a_query_already_waiting(consul: FakeConsul) -> None:
    idx = consul.kv_set("k", "v")

    def hang_then_change() -> None:
        consul.hang = True
        consul.kv_set("k", "w")

    t = later(0.1, hang_then_change)
    with pytest.raises(TimeoutError):
        call(consul, "GET", f"/v1/kv/k?index={idx}&wait=30s", timeout=1.0)
    t.join()
    wait_until(lambda: consul.hanging == 0, 5, "the cut query to be released")  # client left


def test_set_down_refuses_then_comes_back_on_the_same_port(consul: FakeConsul) -> None:
    consul.kv_set("k", "v")
    port = consul.port
    consul.set_down(True)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    consul.kv_set("k", "w")  # state can still be changed while down
    consul.set_down(False)
    assert consul.port == port
    assert call(consul, "GET", "/v1/kv/k?raw").body == b"w"


def test_set_down_cuts_an_open_blocking_query(consul: FakeConsul) -> None:
    idx = consul.kv_set("k", "v")
    t = later(0.1, lambda: consul.set_down(True))
    with pytest.raises((ConnectionError, http.client.RemoteDisconnected)):
        call(consul, "GET", f"/v1/kv/k?index={idx}&wait=30s", timeout=10)
    t.join()


def test_agent_registration_ttl_and_deregistration(consul: FakeConsul) -> None:
    reg = rec("a proxy registers itself")
    r = call(
        consul, "PUT", "/v1/agent/service/register", json.dumps(reg["request"]["body"]).encode()
    )
    assert (r.status, r.body) == (200, b"")
    # TTL checks start critical until the first heartbeat
    assert call(consul, "GET", "/v1/health/service/zerodown-proxy?passing=1").json() == []
    hb = call(consul, "PUT", "/v1/agent/check/pass/zerodown-proxy-1-ttl")
    assert (hb.status, hb.body) == (200, b"")
    found = call(consul, "GET", "/v1/health/service/zerodown-proxy?passing=1").json()
    recorded = rec("the CLI finds every proxy")["response"]["body"]
    assert shape(found) == shape(recorded)
    strip = ("CreateIndex", "ModifyIndex", "ID")
    assert {k: v for k, v in found[0]["Service"].items() if k not in strip} == {
        k: v for k, v in recorded[0]["Service"].items() if k not in strip
    }
    assert found[0]["Checks"][1]["Type"] == "ttl" and found[0]["Checks"][1]["Name"] == "proxy ttl"
    unknown = call(consul, "PUT", "/v1/agent/check/pass/nope")
    assert unknown.status == 404 and b"Unknown check ID" in unknown.body
    assert call(consul, "PUT", "/v1/agent/service/deregister/zerodown-proxy-1").status == 200
    assert consul.services("zerodown-proxy") == []
    again = call(consul, "PUT", "/v1/agent/service/deregister/zerodown-proxy-1")
    assert again.status == 404 and b"Unknown service ID" in again.body
    bad = call(consul, "PUT", "/v1/agent/service/register", b"{not json")
    assert bad.status == 400 and bad.body.startswith(b"Request decode failed")


def test_ttl_expiry_and_reaping(consul: FakeConsul) -> None:
    body = {"ID": "p1", "Name": "zerodown-proxy", "Port": 1,
            "Check": {"CheckID": "p1-ttl", "TTL": "300ms", "Status": "passing",
                      "DeregisterCriticalServiceAfter": "300ms"}}  # fmt: skip
    assert (
        call(consul, "PUT", "/v1/agent/service/register", json.dumps(body).encode()).status == 200
    )
    assert consul.services("zerodown-proxy", passing=True)
    wait_until(lambda: not consul.services("zerodown-proxy", passing=True), 5, "TTL expiry")
    assert consul.services("zerodown-proxy")[0]["Checks"][1]["Output"] == "TTL expired"
    wait_until(lambda: not consul.services("zerodown-proxy"), 5, "reaping")


def test_requests_are_recorded(consul: FakeConsul) -> None:
    call(consul, "GET", "/v1/kv/a?raw")
    assert ("GET", "/v1/kv/a?raw") in consul.requests


def test_service_maintenance_mode(consul: FakeConsul) -> None:
    consul.register("a", "drimeap", "127.0.0.1", 9001)
    assert call(consul, "PUT", "/v1/agent/service/maintenance/a").status == 400
    assert call(consul, "PUT", "/v1/agent/service/maintenance/a?enable=true&reason=x").status == 200
    checks = consul.services("drimeap")[0]["Checks"]
    assert checks[-1]["CheckID"] == "_service_maintenance:a" and checks[-1]["Status"] == "critical"
    assert checks[-1]["Notes"] == "x"
    assert consul.services("drimeap", passing=True) == []
    assert call(consul, "PUT", "/v1/agent/service/maintenance/a?enable=false").status == 200
    assert len(consul.services("drimeap", passing=True)) == 1
    assert call(consul, "PUT", "/v1/agent/service/maintenance/zz?enable=true").status == 404
