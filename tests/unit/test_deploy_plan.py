"""`deploy --dry-run` rendering of Nomad's plan answers as recorded from a real agent
(tests/fixtures/nomad-exchanges.json), and the local stack's restart list."""

from __future__ import annotations

from pathlib import Path

import orjson

from orchestrator import deploy_plan

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "nomad-exchanges.json"


def recorded_plans() -> list[dict]:
    return [
        e["response"]["body"]
        for e in orjson.loads(FIXTURES.read_bytes())
        if e["request"]["url"].endswith("/plan")
    ]


def test_standby_only_plan_renders_like_nomad_job_plan():
    plan = recorded_plans()[0]
    lines = deploy_plan.render_nomad_plan(plan)
    assert lines[0] == '+/- Job: "drimeap"'
    assert 'Task Group: "blue" (2 in-place update)' in lines
    green = lines.index('+/- Task Group: "green" (2 create/destroy update)')
    assert lines[green + 1] == '  +/- Meta[version]: "v1" => "v2"'
    assert '  +/- Task: "app" (forces create/destroy update)' in lines
    assert '    +/- Env[ZERODOWN_VERSION]: "v1" => "v2"' in lines
    assert '      + Tags: "zerodown-version=v2"' in lines
    assert '      - Tags: "zerodown-version=v1"' in lines
    assert lines[-4:] == ["Scheduler dry-run:", "- All tasks successfully allocated.", "",
                          f"Job Modify Index: {plan['JobModifyIndex']}"]  # fmt: skip
    summary, refusal = deploy_plan.nomad_summary(plan, "drimeap", "blue", "green", "v2")
    assert refusal is None
    assert summary == [
        "Standby group green: create/destroy update 2 -> v2 (2 create/destroy update)",
        "Active group blue: untouched (2 in-place update: job version only, no restart)",
        "dry run: nothing was registered (job drimeap unchanged)",
    ]


def test_a_plan_touching_the_active_group_says_the_deploy_would_refuse():
    plan = recorded_plans()[1]
    lines = deploy_plan.render_nomad_plan(plan)
    assert '+/- Task Group: "blue" (2 create/destroy update)' in lines
    summary, refusal = deploy_plan.nomad_summary(plan, "drimeap", "blue", "green", "v2")
    assert not any(s.startswith("Active group blue: untouched") for s in summary)
    assert refusal is not None and refusal.startswith(
        "dry run: Nomad's plan would also change group blue: Diff Edited"
    )
    assert refusal.endswith("(Active is blue); a deploy would refuse; nothing was registered")


def test_local_plan_lists_restarts_and_untouched_instances():
    inst = [
        {"id": "drimeap-blue-1", "group": "blue", "version": "v1"},
        {"id": "drimeap-green-1", "group": "green", "version": "v1"},
        {"id": "drimeap-green-2", "group": "green", "version": "v1"},
    ]
    lines = deploy_plan.local_plan("drimeap", inst, "blue", "green", "v2")
    assert [ln.split()[:2] for ln in lines[1:4]] == [
        ["restart", "drimeap-green-1"], ["restart", "drimeap-green-2"], ["keep", "drimeap-blue-1"],
    ]  # fmt: skip
    assert lines[-1] == ("2 Standby instance(s) of group green would restart on v2; Active "
                         "group blue untouched; nothing was changed")  # fmt: skip
