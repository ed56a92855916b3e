"""The Nomad double answers like the recorded Nomad 1.1 agent (tests/fixtures/nomad-exchanges.json):
same fields, status codes, headers and plain-text errors, for the calls the orchestrator makes."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson

from orchestrator import jobspec

from ..fake_agents import NomadStack

REC = {
    (e["request"]["method"], e["request"]["url"], i): e
    for i, e in enumerate(
        json.loads((Path(__file__).parents[1] / "fixtures" / "nomad-exchanges.json").read_text())
    )
}
BY_INDEX = {i: e for (_, _, i), e in REC.items()}


def call(url: str, method: str = "GET", body: Any = None) -> tuple[int, dict[str, str], Any]:
    data = orjson.dumps(body) if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            raw, status, headers = r.read(), r.status, dict(r.headers)
    except urllib.error.HTTPError as exc:
        raw, status, headers = exc.read(), exc.code, dict(exc.headers)
    try:
        return status, headers, orjson.loads(raw)
    except orjson.JSONDecodeError:
        return status, headers, raw.decode()


def keys(obj: Any) -> set[str]:
    return set(obj)


def test_job_plan_register_deployment_allocations_versions_match_recordings(
    nomad_stack: NomadStack,
) -> None:
    base = nomad_stack.nomad.url + "/v1/job/drimeap"
    status, headers, job = call(base)
    rec = BY_INDEX[0]["response"]
    assert status == 200 and keys(job) == keys(rec["body"])
    assert {h for h in rec["headers"] if h.startswith("X-Nomad")} <= set(headers)
    for tg, rtg in zip(job["TaskGroups"], rec["body"]["TaskGroups"], strict=True):
        assert keys(tg) == keys(rtg)
        assert keys(tg["Tasks"][0]) == keys(rtg["Tasks"][0])
        assert keys(tg["Services"][0]) == keys(rtg["Services"][0])
        assert keys(tg["Services"][0]["Checks"][0]) == keys(rtg["Services"][0]["Checks"][0])
        assert keys(tg["Update"]) == keys(rtg["Update"])

    new = jobspec.with_version(job, "green", "v2", None)
    status, _, plan = call(base + "/plan", "POST", {"Job": new, "Diff": True})
    rec_plan = BY_INDEX[1]["response"]["body"]
    assert status == 200 and keys(plan) == keys(rec_plan)
    assert plan["Annotations"]["DesiredTGUpdates"] == rec_plan["Annotations"]["DesiredTGUpdates"]
    assert plan["JobModifyIndex"] == job["JobModifyIndex"]
    tgs = {t["Name"]: t for t in plan["Diff"]["TaskGroups"]}
    assert (tgs["blue"]["Type"], tgs["green"]["Type"]) == ("None", "Edited")
    assert keys(tgs["green"]) == keys(rec_plan["Diff"]["TaskGroups"][1])

    stale = job["JobModifyIndex"] + 1000
    status, headers, text = call(
        nomad_stack.nomad.url + "/v1/jobs", "POST",
        {"Job": new, "EnforceIndex": True, "JobModifyIndex": stale},
    )  # fmt: skip
    assert status == 500 and headers["Content-Type"] == "text/plain; charset=utf-8"
    assert text == (
        f"Enforcing job modify index {stale}: job exists with conflicting job modify index: "
        f"{job['JobModifyIndex']}"
    )
    assert BY_INDEX[3]["response"]["body"].startswith("Enforcing job modify index 1010: job exists")

    status, _, reg = call(
        nomad_stack.nomad.url + "/v1/jobs", "POST",
        {"Job": new, "EnforceIndex": True, "JobModifyIndex": job["JobModifyIndex"]},
    )  # fmt: skip
    assert status == 200 and keys(reg) == keys(BY_INDEX[4]["response"]["body"])
    assert reg["JobModifyIndex"] > job["JobModifyIndex"]

    status, _, dep = call(base + "/deployment")
    assert status == 200 and keys(dep) == keys(BY_INDEX[5]["response"]["body"])
    assert dep["JobSpecModifyIndex"] == reg["JobModifyIndex"] and dep["JobVersion"] == 1
    assert set(dep["TaskGroups"]) == {"blue", "green"}
    assert keys(dep["TaskGroups"]["green"]) == keys(
        BY_INDEX[5]["response"]["body"]["TaskGroups"]["green"]
    )
    done = nomad_stack.nomad.wait_deployment("drimeap", 90)  # bounded by its own deadlines
    assert done["Status"] == "successful"
    assert done["StatusDescription"] == BY_INDEX[6]["response"]["body"]["StatusDescription"]

    status, _, allocs = call(base + "/allocations")
    rec_alloc = BY_INDEX[7]["response"]["body"][0]
    assert status == 200 and all(keys(a) == keys(rec_alloc) for a in allocs)
    running = {(a["TaskGroup"], a["JobVersion"]) for a in allocs if a["ClientStatus"] == "running"}
    assert running == {("blue", 1), ("green", 1)}  # blue: in-place version bump, not replaced
    stopped = [a for a in allocs if a["ClientStatus"] == "complete"]
    assert {a["TaskGroup"] for a in stopped} == {"green"} and len(stopped) == 2
    assert all(a["DesiredStatus"] == "stop" for a in stopped)

    status, _, versions = call(base + "/versions")
    assert status == 200 and keys(versions) == keys(BY_INDEX[8]["response"]["body"])
    assert [(v["Version"], v["Stable"]) for v in versions["Versions"]] == [(1, True), (0, True)]

    status, _, text = call(nomad_stack.nomad.url + "/v1/job/nope")
    assert (status, text) == (404, "job not found")


def test_blocking_query_returns_early_on_change(nomad_stack: NomadStack) -> None:
    base = nomad_stack.nomad.url + "/v1/job/drimeap/deployment"
    status, headers, _ = call(base)
    index = int(headers["X-Nomad-Index"])
    status, headers2, _ = call(f"{base}?index={index}&wait=200ms")
    assert status == 200 and int(headers2["X-Nomad-Index"]) == index  # nothing changed
    nomad_stack.nomad.edit_job("drimeap", lambda job: job.update(Priority=70))
    status, headers3, dep = call(f"{base}?index={index}&wait=30s")
    assert int(headers3["X-Nomad-Index"]) > index and dep["JobVersion"] == 1
