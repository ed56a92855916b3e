"""How the release commands read instances from Consul's health answers (recorded from a real
agent with Nomad-registered services): the contract's one join, so the CLI names and pairs
instances exactly as the proxy does."""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path
from typing import Any

from orchestrator.consul_view import ConsulView
from zerodown_proxy.contract.consul import Keys, join_instances, parse_health
from zerodown_proxy.contract.model import Instance

EXCHANGES = json.loads(
    (Path(__file__).parents[1] / "fixtures" / "consul-exchanges.json").read_text()
)
HTTP = EXCHANGES[0]["response"]["body"]  # /v1/health/service/drimeap
HSMS = EXCHANGES[2]["response"]["body"]  # /v1/health/service/drimeap-hsms?passing=1


class RecordedConsul:
    """The two health calls ConsulView makes, answered from bodies."""

    addr = "http://recorded"

    def __init__(self, http: list[dict[str, Any]], hsms: list[dict[str, Any]]) -> None:
        self.bodies = {"drimeap": http, "drimeap-hsms": hsms}

    async def health(self, service: str, tag: str | None = None) -> list[dict[str, Any]]:
        return self.bodies.get(service, [])


def instances(http: list[dict], hsms: list[dict]) -> list[Instance]:
    view = ConsulView(RecordedConsul(http, hsms), Keys())  # type: ignore[arg-type]
    return asyncio.run(view.registered("drimeap"))


def test_recorded_nomad_services_pair_by_allocation() -> None:
    got = instances(HTTP, HSMS)
    assert len(got) == len(HTTP) == 4
    assert sorted(i.group for i in got) == ["blue", "blue", "green", "green"]
    assert all(i.hsms_port and i.hsms_port != i.http_port for i in got)
    assert {i.address for i in got} == {"127.0.0.1"}
    assert {i.checks for i in got} == {"passing"}
    assert all(i.id == f"{i.alloc[:8]}-{i.group}" for i in got)
    # The proxy's provider builds the very same instances (one join, one id rule).
    proxy = join_instances("drimeap", parse_health(HTTP), parse_health(HSMS)).instances
    assert sorted(got, key=lambda i: i.id) == sorted(proxy, key=lambda i: i.id)


def test_a_failing_hsms_check_makes_the_instance_critical() -> None:
    hsms = copy.deepcopy(HSMS)
    hsms[0]["Checks"][-1]["Status"] = "critical"
    got = instances(HTTP, hsms)
    assert sorted(i.checks for i in got) == ["critical", "passing", "passing", "passing"]
    (failing,) = [i for i in got if i.checks == "critical"]
    assert failing.healthy and failing.hsms_port is None  # HTTP still routable, no new HSMS


def test_hand_registered_services_pair_by_meta_or_id_suffix() -> None:
    def entry(sid: str, port: int, meta: dict | None = None) -> dict:
        e = copy.deepcopy(HTTP[0])
        e["Service"].update(ID=sid, Port=port, Meta=meta or {},
                            Tags=["zerodown-group=blue", "zerodown-version=v7"])  # fmt: skip
        return e

    http = [entry("eap-1", 8001), entry("eap-2", 8002, {"zerodown-instance": "two"})]
    hsms = [entry("eap-1-hsms", 5001), entry("whatever", 5002, {"zerodown-instance": "two"})]
    got = {i.id: i for i in instances(http, hsms)}
    assert (got["eap-1"].hsms_port, got["eap-2"].hsms_port) == (5001, 5002)
    assert got["eap-1"].version == "v7"
    assert instances([entry("lonely", 8003)], [])[0].hsms_port is None
