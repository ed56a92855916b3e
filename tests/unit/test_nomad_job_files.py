"""deploy/nomad: the job files as DESIGN.md wants them, and the HCL and JSON forms agreeing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from orchestrator import jobspec

DIR = Path(__file__).resolve().parents[2] / "deploy" / "nomad"
FORMS = [("drimeap", "docker"), ("drimeap-raw-exec", "raw_exec")]
NS = 1_000_000_000


def _seconds(text: str) -> int:
    m = re.fullmatch(r"(\d+)(s|m)", text)
    assert m, text
    return int(m.group(1)) * (60 if m.group(2) == "m" else 1) * NS


def _hcl_groups(text: str) -> dict[str, str]:
    """Body of each `group "x" { ... }` block, by brace matching."""
    out = {}
    for m in re.finditer(r'^\s*group "([^"]+)" \{', text, re.M):
        depth, i = 1, m.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        out[m.group(1)] = text[m.end() : i - 1]
    return out


@pytest.mark.parametrize(("name", "driver"), FORMS)
def test_json_job_shape(name: str, driver: str) -> None:
    job = json.loads((DIR / f"{name}.json").read_text())["Job"]
    assert job["ID"] == "drimeap" and job["Type"] == "service"
    assert jobspec.group_names(job) == ["blue", "green"]
    for tg in job["TaskGroups"]:
        g = tg["Name"]
        assert tg["Count"] == 2
        assert tg["Meta"] == {"version": "v1"}
        assert [p["Label"] for p in tg["Networks"][0]["DynamicPorts"]] == ["http", "hsms"]
        services = {s["Name"]: s for s in tg["Services"]}
        assert set(services) == {"drimeap", "drimeap-hsms"}
        for s in services.values():
            assert s["Tags"] == [f"zerodown-group={g}", "zerodown-version=v1"]
        (http_check,) = services["drimeap"]["Checks"]
        assert services["drimeap"]["PortLabel"] == "http"
        assert (http_check["Type"], http_check["Path"]) == ("http", "/health")
        (tcp_check,) = services["drimeap-hsms"]["Checks"]
        assert services["drimeap-hsms"]["PortLabel"] == "hsms" and tcp_check["Type"] == "tcp"
        (task,) = tg["Tasks"]
        assert task["Driver"] == driver
        assert task["Env"] == {"ZERODOWN_VERSION": "v1"}
        u = tg["Update"]
        # The whole Standby group at once, judged by checks, no canaries (they would be
        # routable with the group's tags), a failed Standby deploy reverts by itself.
        assert u["MaxParallel"] == tg["Count"] and u["Canary"] == 0
        assert u["HealthCheck"] == "checks" and u["AutoRevert"] is True
        assert u["MinHealthyTime"] < u["HealthyDeadline"] < u["ProgressDeadline"]
        assert jobspec.group_version(tg) == "v1"
    if driver == "docker":
        assert {t["Config"]["image"] for tg in job["TaskGroups"] for t in tg["Tasks"]} == {
            "drimeap:v1"
        }
    else:
        args = job["TaskGroups"][0]["Tasks"][0]["Config"]["args"]
        assert job["TaskGroups"][0]["Tasks"][0]["Config"]["command"] == "zerodown"
        assert (
            args[0] == "sample-app"
            and "${NOMAD_PORT_http}" in args
            and "${NOMAD_PORT_hsms}" in args
        )


@pytest.mark.parametrize(("name", "driver"), FORMS)
def test_hcl_and_json_agree(name: str, driver: str) -> None:
    hcl = (DIR / f"{name}.nomad.hcl").read_text()
    job = json.loads((DIR / f"{name}.json").read_text())["Job"]
    assert re.search(r'^job "drimeap" \{', hcl, re.M)
    groups = _hcl_groups(hcl)
    assert list(groups) == jobspec.group_names(job)
    for tg in job["TaskGroups"]:
        body = groups[tg["Name"]]
        assert int(re.search(r"count\s*=\s*(\d+)", body).group(1)) == tg["Count"]
        assert re.search(r'version\s*=\s*"([^"]+)"', body).group(1) == tg["Meta"]["version"]
        assert re.search(r'driver\s*=\s*"([^"]+)"', body).group(1) == driver
        assert re.search(r'ZERODOWN_VERSION\s*=\s*"([^"]+)"', body).group(1) == "v1"
        assert re.findall(r'port "(\w+)"', body) == ["http", "hsms"]
        hcl_services = re.findall(
            r'service \{\s*name = "([^"]+)"\s*port = "(\w+)"\s*tags = \[([^\]]*)\]', body
        )
        assert [
            (n, p, [t.strip().strip('"') for t in tags.split(",")]) for n, p, tags in hcl_services
        ] == [(s["Name"], s["PortLabel"], s["Tags"]) for s in tg["Services"]]
        checks = re.findall(r'check \{\s*name\s*=\s*"([^"]+)"\s*type\s*=\s*"(\w+)"', body)
        assert checks == [(c["Name"], c["Type"]) for s in tg["Services"] for c in s["Checks"]]
        assert re.search(r'path\s*=\s*"([^"]+)"', body).group(1) == "/health"
        u = tg["Update"]
        for hcl_key, json_key in (("min_healthy_time", "MinHealthyTime"),
                                  ("healthy_deadline", "HealthyDeadline"),
                                  ("progress_deadline", "ProgressDeadline")):  # fmt: skip
            assert _seconds(re.search(rf'{hcl_key}\s*=\s*"([^"]+)"', body).group(1)) == u[json_key]
        assert int(re.search(r"max_parallel\s*=\s*(\d+)", body).group(1)) == u["MaxParallel"]
        assert re.search(r"auto_revert\s*=\s*(\w+)", body).group(1) == str(u["AutoRevert"]).lower()
        task = tg["Tasks"][0]
        assert (
            _seconds(re.search(r'kill_timeout\s*=\s*"([^"]+)"', body).group(1))
            == task["KillTimeout"]
        )
        if driver == "docker":
            assert re.search(r'image\s*=\s*"([^"]+)"', body).group(1) == task["Config"]["image"]
        else:
            hcl_args = re.search(r"args = \[(.*?)\]", body, re.S).group(1)
            assert re.findall(r'"([^"]*)"', hcl_args) == task["Config"]["args"]


# -- blue and green are the same group under two names ------------------------------------------
# Blue/green assumes the two groups are interchangeable: a switch moves all traffic from one to
# the other. These tests compare them field by field; only the name and the group tag differ.


def _as_group(obj: object, name: str) -> object:
    """`obj` (a task group or part of it) with its own name replaced by a placeholder."""
    if isinstance(obj, dict):
        return {k: _as_group(v, name) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_as_group(v, name) for v in obj]
    if obj == name:
        return "<group>"
    if obj == f"zerodown-group={name}":
        return "zerodown-group=<group>"
    return obj


def _differences(a: object, b: object, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _differences(a.get(k), b.get(k), f"{path}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for d in _differences(x, y, f"{path}[{i}]")
        ]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


@pytest.mark.parametrize(("name", "driver"), FORMS)
def test_json_groups_are_identical_but_for_their_name(name: str, driver: str) -> None:
    job = json.loads((DIR / f"{name}.json").read_text())["Job"]
    blue, green = (_as_group(tg, tg["Name"]) for tg in job["TaskGroups"])
    assert _differences(blue, green) == []


@pytest.mark.parametrize(("name", "driver"), FORMS)
def test_hcl_groups_are_identical_but_for_their_name(name: str, driver: str) -> None:
    groups = _hcl_groups((DIR / f"{name}.nomad.hcl").read_text())

    def normal(body: str, group: str) -> list[str]:
        lines = [ln.split("#", 1)[0].strip() for ln in body.splitlines()]
        return [ln.replace(f"zerodown-group={group}", "zerodown-group=<group>")
                for ln in lines if ln]  # fmt: skip

    (b, bbody), (g, gbody) = groups.items()
    assert normal(bbody, b) == normal(gbody, g)


def test_group_comparison_catches_a_difference() -> None:
    job = json.loads((DIR / "drimeap.json").read_text())["Job"]
    job["TaskGroups"][1]["Services"][0]["Checks"][0]["Interval"] = 3_000_000_000
    blue, green = (_as_group(tg, tg["Name"]) for tg in job["TaskGroups"])
    assert _differences(blue, green) == [
        ".Services[0].Checks[0].Interval: 2000000000 != 3000000000"
    ]


@pytest.mark.parametrize(("name", "driver"), FORMS)
def test_hcl_and_json_agree_on_checks_update_and_resources(name: str, driver: str) -> None:
    hcl = (DIR / f"{name}.nomad.hcl").read_text()
    job = json.loads((DIR / f"{name}.json").read_text())["Job"]
    for tg in job["TaskGroups"]:
        body = _hcl_groups(hcl)[tg["Name"]]
        intervals = [_seconds(x) for x in re.findall(r'interval\s*=\s*"([^"]+)"', body)]
        timeouts = [_seconds(x) for x in re.findall(r'(?<!\w)timeout\s*=\s*"([^"]+)"', body)]
        checks = [c for s in tg["Services"] for c in s["Checks"]]
        assert intervals == [c["Interval"] for c in checks]
        assert timeouts == [c["Timeout"] for c in checks]
        assert all(c["Interval"] >= NS for c in checks)  # Nomad refuses checks under 1 s
        u = tg["Update"]
        assert int(re.search(r"canary\s*=\s*(\d+)", body).group(1)) == u["Canary"]
        assert re.search(r'health_check\s*=\s*"(\w+)"', body).group(1) == u["HealthCheck"]
        assert (
            re.search(r"auto_promote\s*=\s*(\w+)", body).group(1) == str(u["AutoPromote"]).lower()
        )
        res = tg["Tasks"][0]["Resources"]
        assert int(re.search(r"cpu\s*=\s*(\d+)", body).group(1)) == res["CPU"]
        assert int(re.search(r"memory\s*=\s*(\d+)", body).group(1)) == res["MemoryMB"]
