"""How the CLI reads instances from Consul's health answers (recorded from a real agent with
Nomad-registered services), and pairs each HTTP service with its HSMS twin."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from orchestrator.release_nomad import _instances

EXCHANGES = json.loads(
    (Path(__file__).parents[1] / "fixtures" / "consul-exchanges.json").read_text()
)
HTTP = EXCHANGES[0]["response"]["body"]  # /v1/health/service/drimeap
HSMS = EXCHANGES[2]["response"]["body"]  # /v1/health/service/drimeap-hsms?passing=1


def test_recorded_nomad_services_pair_by_allocation() -> None:
    got = _instances(HTTP, HSMS)
    assert len(got) == len(HTTP) == 4
    assert sorted(i.group for i in got) == ["blue", "blue", "green", "green"]
    assert all(i.hsms_port and i.hsms_port != i.http_port for i in got)
    assert {i.address for i in got} == {"127.0.0.1"}
    assert {i.registered for i in got} == {"passing"}
    assert all(i.id.endswith("-" + i.group) for i in got)


def test_a_failing_hsms_check_makes_the_instance_critical() -> None:
    hsms = copy.deepcopy(HSMS)
    hsms[0]["Checks"][-1]["Status"] = "critical"
    got = _instances(HTTP, hsms)
    assert sorted(i.registered for i in got) == ["critical", "passing", "passing", "passing"]


def test_hand_registered_services_pair_by_meta_or_id_suffix() -> None:
    def entry(sid: str, port: int, meta: dict | None = None) -> dict:
        e = copy.deepcopy(HTTP[0])
        e["Service"].update(ID=sid, Port=port, Meta=meta or {},
                            Tags=["zerodown-group=blue", "zerodown-version=v7"])  # fmt: skip
        return e

    http = [entry("eap-1", 8001), entry("eap-2", 8002, {"zerodown-instance": "two"})]
    hsms = [entry("eap-1-hsms", 5001), entry("whatever", 5002, {"zerodown-instance": "two"})]
    got = {i.id: i for i in _instances(http, hsms)}
    assert (got["eap-1"].hsms_port, got["eap-2"].hsms_port) == (5001, 5002)
    assert got["eap-1"].version == "v7"
    assert _instances([entry("lonely", 8003)], [])[0].hsms_port is None
