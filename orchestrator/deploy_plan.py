"""`zerodown deploy VERSION --dry-run`: what a deploy would change, printed, nothing changed.

Nomad backend: the answer of Nomad's plan endpoint (POST /v1/job/:job_id/plan with Diff) for
the job a deploy would register, rendered as `nomad job plan` prints it (the diff per task group
with `+`/`-`/`+/-` markers and the allocation counts of Annotations.DesiredTGUpdates), then what
it means for blue/green: the Standby group's changes, and that the Active group is untouched
(only an in-place job-version bump) — or why the deploy would be refused (jobspec.judge_plan, the
same verdict the deploy itself applies).
Local backend: the Standby instances that would be restarted on the new version, and the Active
ones left running.
"""

from __future__ import annotations

from typing import Any

from . import jobspec

_MARK = {"Added": "+", "Deleted": "-", "Edited": "+/-", "None": ""}
# Annotations.DesiredTGUpdates -> the words `nomad job plan` uses, in its order
_UPDATE_WORDS = (
    ("Place", "create"), ("Stop", "destroy"), ("Migrate", "migrate"),
    ("InPlaceUpdate", "in-place update"), ("DestructiveUpdate", "create/destroy update"),
    ("Canary", "canary"), ("Ignore", "ignore"),
)  # fmt: skip


def _mark(kind: str | None) -> str:
    m = _MARK.get(kind or "None", "+/-")
    return f"{m} " if m else ""


def _field(f: dict[str, Any], indent: str) -> str:
    kind = f.get("Type")
    name = f.get("Name")
    if kind == "Added":
        return f'{indent}{_mark(kind)}{name}: "{f.get("New", "")}"'
    if kind == "Deleted":
        return f'{indent}{_mark(kind)}{name}: "{f.get("Old", "")}"'
    if kind == "Edited":
        return f'{indent}{_mark(kind)}{name}: "{f.get("Old", "")}" => "{f.get("New", "")}"'
    return f'{indent}{name}: "{f.get("New", "")}"'


def _changes(d: dict[str, Any], indent: str) -> list[str]:
    """Changed fields and objects of a diff node, nested `{ }` as `nomad job plan` does."""
    out = [_field(f, indent) for f in d.get("Fields") or [] if f.get("Type") != "None"]
    for o in d.get("Objects") or []:
        if o.get("Type") == "None":
            continue
        out.append(f"{indent}{_mark(o.get('Type'))}{o.get('Name')} {{")
        out.extend(_changes(o, indent + "  "))
        out.append(f"{indent}}}")
    return out


def group_counts(updates: dict[str, Any]) -> str:
    """'2 create/destroy update' from one group's DesiredTGUpdates."""
    parts = [f"{updates[k]} {w}" for k, w in _UPDATE_WORDS if (updates.get(k) or 0) > 0]
    return ", ".join(parts)


def render_nomad_plan(plan: dict[str, Any]) -> list[str]:
    """The plan as `nomad job plan` prints it (job diff, then the scheduler dry-run)."""
    diff = plan.get("Diff") or {}
    updates = (plan.get("Annotations") or {}).get("DesiredTGUpdates") or {}
    out = [f'{_mark(diff.get("Type"))}Job: "{diff.get("ID", "?")}"']
    out.extend(_changes(diff, ""))
    for tg in diff.get("TaskGroups") or []:
        name = tg.get("Name")
        counts = group_counts(updates.get(name) or {})
        out.append(
            f'{_mark(tg.get("Type"))}Task Group: "{name}"' + (f" ({counts})" if counts else "")
        )
        out.extend(_changes(tg, "  "))
        for task in tg.get("Tasks") or []:
            if task.get("Type") == "None":
                continue
            notes = ", ".join(task.get("Annotations") or [])
            out.append(f'  {_mark(task.get("Type"))}Task: "{task.get("Name")}"'
                       + (f" ({notes})" if notes else ""))  # fmt: skip
            out.extend(_changes(task, "    "))
    out += ["", "Scheduler dry-run:"]
    failed = plan.get("FailedTGAllocs") or {}
    if not failed:
        out.append("- All tasks successfully allocated.")
    for group in sorted(failed):
        why = jobspec.failed_placements(plan, group)
        out.append(f'- WARNING: Failed to place all allocations.\n  Task Group "{group}": {why}')
    out += ["", f"Job Modify Index: {plan.get('JobModifyIndex', '?')}"]
    return out


def nomad_summary(
    plan: dict[str, Any], job_id: str, active: str, standby: str, version: str
) -> tuple[list[str], str | None]:
    """(What the plan means for blue/green, the reason a deploy would refuse or None)."""
    verdict = jobspec.judge_plan(plan, standby)
    updates = (plan.get("Annotations") or {}).get("DesiredTGUpdates") or {}
    lines = [f"Standby group {standby}: {verdict.target_changes} -> {version}"
             f" ({group_counts(updates.get(standby) or {}) or 'no allocation change'})"]  # fmt: skip
    if verdict.ok:
        bump = group_counts(updates.get(active) or {})
        lines.append(f"Active group {active}: untouched" + (f" ({bump}: job version only, no "
                     "restart)" if bump else ""))  # fmt: skip
    failed = jobspec.failed_placements(plan, standby)
    if not verdict.ok:
        return lines, (f"dry run: Nomad's plan would also change "
                       f"{'; '.join(verdict.others_touched)} (Active is {active}); a deploy would "
                       f"refuse; nothing was registered")  # fmt: skip
    if failed:
        return lines, f"dry run: Nomad cannot place group {standby}: {failed}; nothing registered"
    lines.append(f"dry run: nothing was registered (job {job_id} unchanged)")
    return lines, None


def local_plan(
    app: str, instances: list[dict[str, Any]], active: str, standby: str, version: str
) -> list[str]:
    """Which local instances a deploy would restart (every Standby one) and leave running."""
    out = [f"deploy {version} of {app} (local stack), dry run:"]
    for i in instances:
        if i["group"] == standby:
            out.append(f"  restart  {i['id']:<22} group {standby:<8} {i['version']} -> {version}")
    for i in instances:
        if i["group"] == active:
            out.append(f"  keep     {i['id']:<22} group {active:<8} {i['version']} (Active, "
                       "untouched)")  # fmt: skip
    n = sum(1 for i in instances if i["group"] == standby)
    out.append(f"{n} Standby instance(s) of group {standby} would restart on {version}; Active "
               f"group {active} untouched; nothing was changed")  # fmt: skip
    return out
