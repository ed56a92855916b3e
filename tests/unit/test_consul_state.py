"""Consul answers -> one app's AppState (consul_state) and the snapshot the watcher resolves
from it, with the recorded real answers as fixtures. Parsing and the instance join are the
contract's (test_consul_contract.py)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from zerodown_proxy.contract.consul import (
    ConsulDataError,
    KvValue,
    join_instances,
    parse_health,
    parse_kv,
)
from zerodown_proxy.contract.model import RegistryState
from zerodown_proxy.discovery.consul_state import AppResult, AppView, build_app
from zerodown_proxy.routing import EMPTY, active_problem, build_snapshot, resolve


def build_state(results: list[AppResult], source: str) -> RegistryState:
    """What the provider emits: the apps' states, the highest app generation."""
    return RegistryState(
        max(r.generation for r in results), tuple(r.state for r in results), source
    )


RECORDINGS = Path(__file__).resolve().parent.parent / "fixtures" / "consul-exchanges.json"


def body(note_start: str) -> Any:
    for e in json.loads(RECORDINGS.read_text()):
        if e["note"].startswith(note_start):
            return copy.deepcopy(e["response"]["body"])
    raise KeyError(note_start)


HTTP = "all instances of the HTTP service"
HSMS = "the HSMS service of the same instances"
AFTER_DEPLOY = "after the deploy"


def view(http: Any, hsms: Any, active: KvValue, http_index: int = 49) -> AppView:
    return AppView("drimeap", parse_health(http), parse_health(hsms), active, http_index, 46)


def test_parse_recorded_health() -> None:
    entries = parse_health(body(HTTP))
    assert len(entries) == 4
    e = entries[0]
    assert e.name == "drimeap" and e.port == 31384 and e.address == "127.0.0.1"
    assert (e.group, e.version, e.passing) == ("green", "v1", True)
    assert e.join_keys() == ["alloc:50edb1d2-f0de-d758-1620-17d0d0988099"]


def test_parse_recorded_kv() -> None:
    kv = parse_kv(body("value is base64"), "zerodown/drimeap/active")
    assert kv == KvValue("blue", 52)
    assert parse_kv(body("blocking KV query that returns early"), "k") == KvValue("green", 54)


def test_join_http_and_hsms_by_nomad_alloc() -> None:
    joined = join_instances("drimeap", parse_health(body(HTTP)), parse_health(body(HSMS)))
    assert joined.unmatched_hsms == () and joined.ignored == () and joined.invalid == {}
    ports = {(i.group, i.http_port, i.hsms_port) for i in joined.instances}
    assert ports == {
        ("green", 31384, 26012),
        ("blue", 26242, 25680),
        ("green", 20590, 21357),
        ("blue", 26945, 21080),
    }


def test_kv_decides_active_and_generation() -> None:
    r = build_app(view(body(HTTP), body(HSMS), KvValue("green", 54)))
    assert active_problem(r.state) is None
    assert r.generation_source == "kv" and r.generation == 54
    snap = build_snapshot(build_state([r], "consul"))
    route = snap.apps["drimeap"]
    assert route.active_group == "green" and route.standby_group == "blue"
    assert {i.http_port for i in route.active} == {31384, 20590}
    assert snap.generation == 54 and snap.hsms_app() is route


def test_versions_after_deploy() -> None:
    r = build_app(view(body(AFTER_DEPLOY), [], KvValue("green", 80)))
    versions = {i.group: i.version for i in r.state.instances}
    assert versions == {"green": "v2", "blue": "v1"}
    assert all(i.hsms_port is None for i in r.state.instances)


def set_status(entries: list[dict[str, Any]], port: int, status: str) -> None:
    for e in entries:
        if e["Service"]["Port"] == port:
            e["Checks"][-1]["Status"] = status


def test_only_passing_instances_are_routable_and_warning_is_not_passing() -> None:
    http = body(HTTP)
    set_status(http, 31384, "critical")
    set_status(http, 20590, "warning")
    r = build_app(view(http, body(HSMS), KvValue("green", 60)))
    assert active_problem(r.state) == "app drimeap: Active group green has 0/2 passing instances"
    r = build_app(view(http, body(HSMS), KvValue("blue", 61)))
    assert active_problem(r.state) is None
    snap = build_snapshot(build_state([r], "consul"))
    assert snap.apps["drimeap"].standby == ()  # both green instances are out


def test_failing_hsms_side_keeps_http_but_drops_the_hsms_port() -> None:
    hsms = body(HSMS)
    set_status(hsms, 26012, "critical")
    r = build_app(view(body(HTTP), hsms, KvValue("green", 60)))
    inst = {i.http_port: i for i in r.state.instances}
    assert inst[31384].healthy and inst[31384].hsms_port is None
    assert inst[20590].hsms_port == 21357


def test_node_check_failing_makes_the_instance_unhealthy() -> None:
    http = body(HTTP)
    http[0]["Checks"][0]["Status"] = "critical"  # serfHealth of the node
    entries = parse_health(http)
    assert not entries[0].passing and "Serf Health Status: critical" in entries[0].check_summary


def test_missing_key_falls_back_to_old_stack_tags() -> None:
    http = body(HTTP)
    for e in http:
        e["Service"]["Tags"].append(
            "active" if "zerodown-group=blue" in e["Service"]["Tags"] else "standby"
        )
    r = build_app(view(http, body(HSMS), KvValue(None, 53), http_index=49))
    assert active_problem(r.state) is None and r.generation_source == "tags"
    assert r.state.active_group == "blue"
    assert r.generation == 53  # the 404's index (tombstone) is the highest here


def test_missing_key_without_tags_is_refused() -> None:
    r = build_app(view(body(HTTP), body(HSMS), KvValue(None, 1)))
    assert r.state.active_group is None and "no Active key" in active_problem(r.state)


def test_old_stack_without_group_tags_uses_role_as_group() -> None:
    http = [
        {"Node": {"Node": "n", "Address": "10.0.0.1"},
         "Service": {"ID": f"s{n}", "Service": "drimeap", "Port": 9000 + n,
                     "Tags": [role, "zerodown-group=" + role], "Address": ""},
         "Checks": [{"Status": "passing"}]}
        for n, role in enumerate(["active", "standby"])
    ]  # fmt: skip
    r = build_app(view(http, [], KvValue(None, 5)))
    assert r.state.active_group == "active"
    assert r.state.instances[0].address == "10.0.0.1"  # empty service address -> node address


def test_join_by_meta_id_suffix_and_address() -> None:
    def entry(sid: str, port: int, meta: dict[str, str] | None = None, addr: str = "127.0.0.1"):
        return {"Service": {"ID": sid, "Service": "x", "Port": port, "Address": addr,
                            "Tags": ["zerodown-group=blue"], "Meta": meta or {}},
                "Checks": []}  # fmt: skip

    http = [
        entry("a", 1, {"zerodown-instance": "i1"}),
        entry("b", 2),
        entry("c", 3, addr="10.1.1.1"),
    ]
    hsms = [
        entry("zz", 11, {"zerodown-instance": "i1"}),
        entry("b-hsms", 12),
        entry("q", 13, addr="10.1.1.1"),
        entry("lost", 14, addr="10.9.9.9"),
    ]
    joined = join_instances("x", parse_health(http), parse_health(hsms))
    assert {i.id: i.hsms_port for i in joined.instances} == {"a": 11, "b": 12, "c": 13}
    assert joined.unmatched_hsms == ("lost",)


def test_empty_kv_value_is_a_problem() -> None:
    r = build_app(view(body(HTTP), body(HSMS), KvValue("", 70)))
    assert active_problem(r.state) == "app drimeap: the Active key is empty"
    r = build_app(view(body(HTTP), body(HSMS), KvValue("blue\ngreen", 71)))
    assert "the Active key's value 'blue\\ngreen' is not a valid name" in active_problem(r.state)


@pytest.mark.parametrize(
    "bad",
    [{"not": "a list"}, [1], [{"Service": {"ID": "x", "Service": "y", "Port": "80"}}],
     [{"Service": {"ID": "x", "Service": "y", "Port": 80}, "Checks": "no"}]],
)  # fmt: skip
def test_garbage_health_is_rejected(bad: Any) -> None:
    with pytest.raises(ConsulDataError):
        parse_health(bad)


@pytest.mark.parametrize(
    "bad", [[], {}, [{"ModifyIndex": "1"}], [{"ModifyIndex": 1, "Value": "!!"}]]
)
def test_garbage_kv_is_rejected(bad: Any) -> None:
    with pytest.raises(ConsulDataError):
        parse_kv(bad, "k")


def test_generation_is_the_highest_app_generation() -> None:
    a = build_app(view(body(HTTP), body(HSMS), KvValue("green", 54)))
    b = build_app(AppView("other", parse_health(body(HTTP)), (), KvValue("blue", 90), 49, 1))
    assert build_state([a, b], "consul").generation == 90
    assert resolve(build_state([a, b], "consul"), EMPTY).snapshot.generation == 90


def test_consul_config_keys_and_validation(tmp_path: Path) -> None:
    from zerodown_proxy.config import ConfigError, load_config

    cfg = load_config(None, {"discovery": {"provider": "consul"}}, env={
        "CONSUL_HTTP_ADDR": "127.0.0.1:8501", "CONSUL_HTTP_TOKEN": "t", "CONSUL_CACERT": "/ca.pem"})  # fmt: skip
    c = cfg.consul
    assert (c.addr, c.token, c.cacert) == ("http://127.0.0.1:8501", "t", "/ca.pem")
    env = {"CONSUL_HTTP_ADDR": "consul:8501", "CONSUL_HTTP_SSL": "true"}
    assert load_config(None, env=env).consul.addr == "https://consul:8501"
    assert c.wait * 17 / 16 + c.watchdog > c.wait and c.backoff_max >= c.backoff_min
    f = tmp_path / "p.toml"
    for bad, message in (
        ('addr = "127.0.0.1:8500"', "addr must be http"),
        ("wait = 0", "wait must be greater than 0"),
        ("backoff_min = 5.0\nbackoff_max = 1.0", "backoff_max must be at least"),
        ("apps = []", "apps must name at least one app"),
    ):
        f.write_text(f'[discovery]\nprovider = "consul"\n[consul]\n{bad}\n')
        with pytest.raises(ConfigError, match=message):
            load_config(f, env={})


def test_hsms_device_id_from_service_meta() -> None:
    hsms = body(HSMS)
    for e in hsms:
        e["Service"]["Meta"]["hsms_device_id"] = "7"
    assert build_app(view(body(HTTP), hsms, KvValue("blue", 60))).state.hsms_device_id == 7
    hsms[0]["Service"]["Meta"]["hsms_device_id"] = "8"  # disagreement: not guessed
    assert build_app(view(body(HTTP), hsms, KvValue("blue", 60))).state.hsms_device_id is None
    assert build_app(view(body(HTTP), body(HSMS), KvValue("blue", 60))).state.hsms_device_id is None


def test_hsms_device_id_out_of_range_leaves_that_service_out() -> None:
    """Issue 9 section 4: hsms_device_id 99999 was accepted and later closed every tool's
    connection (struct.error). Same rule as the file registry: 0..32767."""
    hsms = body(HSMS)
    for e in hsms:
        e["Service"]["Meta"]["hsms_device_id"] = "7"
    bad = hsms[0]["Service"]
    bad["Meta"]["hsms_device_id"] = "99999"
    r = build_app(view(body(HTTP), hsms, KvValue("blue", 60)))
    assert r.state.hsms_device_id == 7  # from the valid ones
    assert "hsms_device_id must be an integer 0-32767" in r.invalid[bad["ID"]]
    assert sum(1 for i in r.state.instances if i.hsms_port is None) == 1  # that one: no HSMS
    build_snapshot(build_state([r], "consul"))  # and the state is valid for the watcher


def test_refused_view_keeps_the_active_group_but_refreshes_health() -> None:
    prev = build_snapshot(build_state([build_app(view(body(HTTP), body(HSMS), KvValue("blue", 52)))],
                                      "consul"))  # fmt: skip
    http = body(HTTP)
    set_status(http, 31384, "critical")  # green
    set_status(http, 20590, "critical")  # green
    set_status(http, 26242, "critical")  # one blue instance
    now = build_app(view(http, body(HSMS), KvValue("green", 54)))
    res = resolve(build_state([now], "consul"), prev)
    assert "green has 0/2 passing" in res.problems["drimeap"]
    kept = res.snapshot.apps["drimeap"]
    assert kept.active_group == "blue" and res.snapshot.generation == 52
    assert {i.http_port for i in kept.active} == {26945}
    set_status(http, 26945, "critical")  # no blue left either: the previous view stays as it was
    res = resolve(build_state([build_app(view(http, body(HSMS), KvValue("green", 55)))], "c"), prev)
    assert res.snapshot.apps["drimeap"] is prev.apps["drimeap"]
