"""Pilots and per-app HSMS listeners in the data model: parsing (contract/pilots.py), the
registry file, Consul (Meta hsms_listen, the pilots KV key), routing and tool placement."""

from __future__ import annotations

import copy
import dataclasses

import orjson
import pytest

from orchestrator.backend import Refused
from orchestrator.pilot import changed, check_standby
from zerodown_proxy.contract.consul import KvValue, parse_health
from zerodown_proxy.contract.model import ContractError, Instance, RegistryState, validate_state
from zerodown_proxy.contract.pilots import NO_PILOTS, PilotList, parse_pilot_list, parse_tool
from zerodown_proxy.contract.registry_file import RegistryError, parse_registry
from zerodown_proxy.discovery.consul_state import AppView, build_app
from zerodown_proxy.hsms.placement import place
from zerodown_proxy.routing import build_snapshot

from .test_consul_state import HSMS, HTTP, body


@pytest.mark.parametrize(
    ("text", "canon"),
    [
        ("10.1.2.3", "10.1.2.3"),
        (" 127.0.0.2 ", "127.0.0.2"),
        ("::ffff:10.1.2.3", "10.1.2.3"),
        ("fe80::1", "fe80::1"),
        ("7", "device:7"),
        ("device:0032", "device:32"),
        ("Header:X-Tool-Id=ETCH01", "header:x-tool-id=ETCH01"),
    ],
)
def test_tool_forms_have_one_canonical_text(text: str, canon: str) -> None:
    assert parse_tool(text) == canon


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("etch-01", "is not a tool: give an IP address"),
        ("40000", "a device id is 0-32767"),
        ("header:X Tool=1", "a header rule is header:NAME=VALUE"),
        ("header:X-Tool=", "a header rule is header:NAME=VALUE"),
        ("10.1.2.300", "is not a tool"),
    ],
)
def test_bad_tools_are_refused_with_the_accepted_forms(text: str, why: str) -> None:
    with pytest.raises(ContractError, match=why):
        parse_tool(text)


def test_pilot_list_needs_its_group_and_drops_duplicates() -> None:
    got = parse_pilot_list({"group": "green", "tools": ["7", "device:7", "10.0.0.1"]}, "x")
    assert got == PilotList("green", ("device:7", "10.0.0.1"))
    assert parse_pilot_list(None, "x") is NO_PILOTS
    assert parse_pilot_list({"group": None, "tools": []}, "x") is NO_PILOTS
    with pytest.raises(ContractError, match="need the Standby 'group'"):
        parse_pilot_list({"tools": ["7"]}, "x")
    with pytest.raises(ContractError, match="unknown key 'tool'"):
        parse_pilot_list({"group": "green", "tool": ["7"]}, "x")


def test_add_and_remove_refuse_what_would_change_nothing() -> None:
    cur = PilotList("green", ("10.0.0.1",))
    assert changed(cur, "add", "7", "drimeap", "green").tools == ("10.0.0.1", "device:7")
    assert changed(cur, "remove", "10.0.0.1", "drimeap", "green") is NO_PILOTS
    with pytest.raises(Refused, match="already a pilot of drimeap"):
        changed(cur, "add", "10.0.0.1", "drimeap", "green")
    # Pilots left for another Standby group (a switch happened) do not count.
    assert changed(cur, "add", "10.0.0.1", "drimeap", "blue").tools == ("10.0.0.1",)
    with pytest.raises(Refused, match=r"is not a pilot of drimeap \(pilots: none\)"):
        changed(cur, "remove", "10.0.0.1", "drimeap", "blue")


REGISTRY = {
    "generation": 3,
    "apps": {
        "drimeap": {
            "active": "blue",
            "hsms_listen": "0.0.0.0:5001",
            "pilots": {"group": "green", "tools": ["127.0.0.2", "device:7", "header:x-t=1"]},
            "instances": [
                {"id": "b1", "group": "blue", "version": "v1", "http_port": 1, "hsms_port": 2},
                {"id": "g1", "group": "green", "version": "v2", "http_port": 3, "hsms_port": 4},
            ],
        }
    },
}


def test_registry_file_pilots_and_listen_make_the_route_and_place_tools() -> None:
    snap = build_snapshot(parse_registry(orjson.dumps(REGISTRY)))
    app = snap.apps["drimeap"]
    assert app.hsms_listen == "0.0.0.0:5001" and snap.hsms_listeners() == {
        "drimeap": app.hsms_listen
    }
    assert snap.hsms_app(None) is None  # it has its own listener: [proxy] hsms_listen has no app
    assert app.pilots is not None and snap.pilot_headers == frozenset({b"x-t"})
    by_ip = place(snap, "drimeap", "127.0.0.2", None)
    by_device = place(snap, "drimeap", "127.0.0.9", 7)
    other = place(snap, "drimeap", "127.0.0.9", 1)
    assert [i.id for i in by_ip.instances] == ["g1"] and by_ip.pilot
    assert [i.id for i in by_device.instances] == ["g1"]
    assert [i.id for i in other.instances] == ["b1"] and not other.pilot
    assert app.pilots.http("127.0.0.2", None) and app.pilots.http("::1", {b"x-t": b" 1 "})
    assert not app.pilots.http("::1", {b"x-t": b"2"})


def test_pilots_for_a_group_that_is_not_standby_are_not_in_force() -> None:
    reg = copy.deepcopy(REGISTRY)
    reg["apps"]["drimeap"]["active"] = "green"  # switched, pilots not cleared yet
    snap = build_snapshot(parse_registry(orjson.dumps(reg)))
    assert snap.apps["drimeap"].pilots is None
    assert [i.id for i in place(snap, "drimeap", "127.0.0.2", 7).instances] == ["g1"]


def test_a_pilot_whose_standby_has_no_hsms_instance_stays_on_active() -> None:
    reg = copy.deepcopy(REGISTRY)
    reg["apps"]["drimeap"]["instances"][1]["healthy"] = False
    snap = build_snapshot(parse_registry(orjson.dumps(reg)))
    placed = place(snap, "drimeap", "127.0.0.2", None)
    assert [i.id for i in placed.instances] == ["b1"] and not placed.pilot


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"hsms_listen": "5001"}, "hsms_listen must be host:port"),
        ({"hsms_listen": 5001}, "hsms_listen must be host:port"),
        ({"pilots": {"group": "green", "tools": ["nope"]}}, "is not a tool"),
        ({"pilots": ["127.0.0.2"]}, "pilots must be an object"),
    ],
)
def test_registry_file_refuses_bad_pilots_and_listen(change: dict, why: str) -> None:
    reg = copy.deepcopy(REGISTRY)
    reg["apps"]["drimeap"].update(change)
    with pytest.raises(RegistryError, match=why):
        parse_registry(orjson.dumps(reg))


def test_two_apps_on_one_listen_address_break_the_model() -> None:
    state = parse_registry(orjson.dumps(REGISTRY))
    (a,) = state.apps
    inst = Instance("e1", "etcheap", "blue", "e1", "127.0.0.1", 5, 6)
    b = dataclasses.replace(a, name="etcheap", instances=(inst,), pilots=(), pilot_group=None)
    with pytest.raises(ContractError, match="hsms_listen 0.0.0.0:5001 is also app drimeap's"):
        validate_state(RegistryState(1, (a, b)))
    c = dataclasses.replace(b, hsms_listen="0.0.0.0:5002")
    validate_state(RegistryState(1, (a, c)))
    # A provider bug cannot put a non-canonical pilot into a snapshot.
    with pytest.raises(ContractError, match="not in canonical form"):
        validate_state(RegistryState(1, (dataclasses.replace(a, pilots=("7",)),)))


def _view(pilots: KvValue | None, listen: str | None = "127.0.0.1:5001") -> AppView:
    hsms = body(HSMS)
    for e in hsms:
        if listen is not None:
            e["Service"].setdefault("Meta", {})["hsms_listen"] = listen
    return AppView("drimeap", parse_health(body(HTTP)), parse_health(hsms), KvValue("blue", 40),
                   49, 46, pilots)  # fmt: skip


def test_consul_meta_hsms_listen_and_the_pilots_key() -> None:
    value = orjson.dumps({"group": "green", "tools": ["10.1.2.3"]}).decode()
    r = build_app(_view(KvValue(value, 57)))
    assert r.state.hsms_listen == "127.0.0.1:5001"
    assert (r.state.pilot_group, r.state.pilots) == ("green", ("10.1.2.3",))
    assert r.generation == 57  # a pilot change moves the app's generation (proxies wait on it)
    absent = build_app(_view(KvValue(None, 99), listen=None))
    assert absent.state.hsms_listen is None and absent.state.pilots == ()
    assert absent.generation == 40  # an absent key's 404 index is not the app's generation


@pytest.mark.parametrize(
    ("value", "why"),
    [("{not json", "the pilots key is not JSON"), ('{"group": "green", "tools": ["x y"]}',
                                                   "is not a tool")],
)  # fmt: skip
def test_a_bad_pilots_key_means_no_pilots_and_is_reported(value: str, why: str) -> None:
    r = build_app(_view(KvValue(value, 57)))
    assert r.state.pilots == () and r.state.pilot_group is None
    assert why in r.invalid["pilots"]
    assert r.state.active_group == "blue"  # routing goes on


def test_a_pilot_needs_a_standby_group_with_a_passing_instance() -> None:
    with pytest.raises(Refused, match="app drimeap has no Standby group; a pilot runs on"):
        check_standby("drimeap", None, [])
    with pytest.raises(Refused, match="Standby group green of drimeap has 0/2 passing instances"):
        check_standby("drimeap", "green", [("g1", False), ("g2", False)])
    assert check_standby("drimeap", "green", [("g1", False), ("g2", True)]) == "green"
