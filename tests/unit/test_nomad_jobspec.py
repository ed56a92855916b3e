"""The deploy's job edit and plan verdict, checked against real Nomad 1.1 answers
(tests/fixtures/nomad-exchanges.json), and the FakeNomad differ checked against the same."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from orchestrator import jobspec
from orchestrator.backend import Refused
from orchestrator.devstack.fakes import nomad_diff
from orchestrator.devstack.fakes.nomad import canonicalize

EXCHANGES = json.loads(
    (Path(__file__).parents[1] / "fixtures" / "nomad-exchanges.json").read_text()
)
JOB = EXCHANGES[0]["response"]["body"]
PLAN_GREEN_ONLY = EXCHANGES[1]["response"]["body"]
PLAN_TOUCHES_BLUE = EXCHANGES[2]["response"]["body"]


def test_recorded_plan_green_only_is_accepted_despite_in_place_update_of_blue() -> None:
    # The surprise: blue shows InPlaceUpdate 2, but its Diff is None and nothing is replaced.
    assert PLAN_GREEN_ONLY["Annotations"]["DesiredTGUpdates"]["blue"]["InPlaceUpdate"] == 2
    verdict = jobspec.judge_plan(PLAN_GREEN_ONLY, "green")
    assert verdict.ok, verdict
    assert verdict.target_changes == "create/destroy update 2"


def test_recorded_plan_touching_blue_is_refused_with_the_reason() -> None:
    verdict = jobspec.judge_plan(PLAN_TOUCHES_BLUE, "green")
    assert not verdict.ok
    (reason,) = verdict.others_touched
    assert reason.startswith("group blue: Diff Edited")
    assert "Env[ZERODOWN_VERSION] v1 -> v2" in reason and "DestructiveUpdate 2" in reason


def test_plan_counts_alone_refuse_even_when_the_diff_says_none() -> None:
    plan = copy.deepcopy(PLAN_GREEN_ONLY)
    plan["Annotations"]["DesiredTGUpdates"]["blue"]["Stop"] = 1
    assert jobspec.judge_plan(plan, "green").others_touched == ("group blue: Stop 1",)
    plan = copy.deepcopy(PLAN_GREEN_ONLY)
    plan["Diff"]["Fields"] = [{"Name": "Datacenters", "Old": "dc1", "New": "dc2", "Type": "Edited"}]
    assert "job-level" in jobspec.judge_plan(plan, "green").others_touched[0]


def test_with_version_changes_only_the_target_group() -> None:
    new = jobspec.with_version(JOB, "green", "v2", None)
    blue_old, blue_new = (jobspec.task_group(j, "blue") for j in (JOB, new))
    assert blue_old == blue_new
    assert {k: v for k, v in new.items() if k != "TaskGroups"} == {
        k: v for k, v in JOB.items() if k != "TaskGroups"
    }
    green = jobspec.task_group(new, "green")
    assert green["Meta"]["version"] == "v2"
    assert green["Tasks"][0]["Env"]["ZERODOWN_VERSION"] == "v2"
    for svc in green["Services"]:
        assert svc["Tags"] == ["zerodown-group=green", "zerodown-version=v2"]
    assert jobspec.group_version(green) == "v2"
    assert JOB["TaskGroups"][1]["Meta"]["version"] == "v1"  # the input is not mutated


def test_image_only_for_docker_and_retagging() -> None:
    with pytest.raises(
        Refused, match="--image applies to docker tasks; group green uses the raw_exec"
    ):
        jobspec.with_version(JOB, "green", "v2", "drimeap:v2")
    docker = json.loads((Path(__file__).parents[2] / "deploy/nomad/drimeap.json").read_text())[
        "Job"
    ]
    new = jobspec.with_version(docker, "green", "v3", None)
    assert jobspec.task_group(new, "green")["Tasks"][0]["Config"]["image"] == "drimeap:v3"
    assert jobspec.task_group(new, "blue")["Tasks"][0]["Config"]["image"] == "drimeap:v1"
    new = jobspec.with_version(docker, "green", "v3", "registry.fab:5000/eap/drimeap:v3-rc1")
    assert jobspec.task_group(new, "green")["Tasks"][0]["Config"]["image"] == (
        "registry.fab:5000/eap/drimeap:v3-rc1"
    )
    assert (
        jobspec._retag("registry.fab:5000/eap/drimeap", "v4") == "registry.fab:5000/eap/drimeap:v4"
    )
    assert jobspec._retag("drimeap:v1@sha256:abc", "v4") == "drimeap:v4"


def test_fake_nomad_differ_matches_the_recorded_plans() -> None:
    """The double's plan for the same edits says what real Nomad said (types and counts)."""
    old = canonicalize(JOB)
    green_only = canonicalize(jobspec.with_version(JOB, "green", "v2", None))
    diff, updates, kinds = nomad_diff.plan(old, green_only, {"blue": 2, "green": 2})
    rec = PLAN_GREEN_ONLY
    assert updates == rec["Annotations"]["DesiredTGUpdates"]
    assert {t["Name"]: t["Type"] for t in diff["TaskGroups"]} == {"blue": "None", "green": "Edited"}
    assert {t["Name"]: t["Updates"] for t in diff["TaskGroups"]} == {
        t["Name"]: t["Updates"] for t in rec["Diff"]["TaskGroups"]
    }
    green = next(t for t in diff["TaskGroups"] if t["Name"] == "green")
    rec_green = next(t for t in rec["Diff"]["TaskGroups"] if t["Name"] == "green")
    assert green["Fields"] == rec_green["Fields"]
    assert green["Tasks"][0]["Fields"] == rec_green["Tasks"][0]["Fields"]
    assert green["Tasks"][0]["Annotations"] == ["forces create/destroy update"]
    assert kinds == {"blue": "inplace", "green": "destructive"}
    both = copy.deepcopy(green_only)
    jobspec.task_group(both, "blue")["Tasks"][0]["Env"]["ZERODOWN_VERSION"] = "v2"
    _diff, updates, _ = nomad_diff.plan(old, both, {"blue": 2, "green": 2})
    assert updates == PLAN_TOUCHES_BLUE["Annotations"]["DesiredTGUpdates"]
    assert jobspec.judge_plan({"Diff": _diff, "Annotations": {"DesiredTGUpdates": updates}},
                              "green").others_touched  # fmt: skip
