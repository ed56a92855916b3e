"""Pure logic on Nomad job JSON (the API form): which groups a job has, what version a group
runs, the edit a deploy makes to the Standby group, and whether Nomad's plan for that edit
leaves every other group alone. No I/O, so it is tested against the recorded API answers."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from zerodown_proxy.contract.consul import VERSION_TAG  # the tag's one owner

from .backend import Refused

# Plan counts that mean an allocation of the group would be replaced, added, moved or removed.
# InPlaceUpdate is deliberately absent: Nomad reports it for untouched groups on any job change
# (a job-version bump of the allocations, no restart).
TOUCHING_UPDATES = ("DestructiveUpdate", "Place", "Stop", "Migrate", "Canary")


def group_names(job: dict[str, Any]) -> list[str]:
    return [tg["Name"] for tg in job.get("TaskGroups") or []]


def task_group(job: dict[str, Any], name: str) -> dict[str, Any]:
    for tg in job.get("TaskGroups") or []:
        if tg["Name"] == name:
            return tg
    raise Refused(
        f"job {job.get('ID')} has no task group {name} (groups: {', '.join(group_names(job))})"
    )


def _services(tg: dict[str, Any]) -> list[dict[str, Any]]:
    out = list(tg.get("Services") or [])
    for task in tg.get("Tasks") or []:
        out.extend(task.get("Services") or [])
    return out


def group_version(tg: dict[str, Any]) -> str | None:
    """meta.version, else the zerodown-version= tag, else the ZERODOWN_VERSION env."""
    meta = tg.get("Meta") or {}
    if meta.get("version"):
        return str(meta["version"])
    for svc in _services(tg):
        for tag in svc.get("Tags") or []:
            if tag.startswith(VERSION_TAG):
                return tag[len(VERSION_TAG) :]
    for task in tg.get("Tasks") or []:
        env = task.get("Env") or {}
        if env.get("ZERODOWN_VERSION"):
            return str(env["ZERODOWN_VERSION"])
    return None


def _retag(image: str, version: str) -> str:
    """Replace the tag of a docker image reference (keeps registry host:port and digests out)."""
    name = image.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name = name[:colon]
    return f"{name}:{version}"


def with_version(
    job: dict[str, Any], group: str, version: str, image: str | None
) -> dict[str, Any]:
    """A copy of `job` where only task group `group` runs `version` (and `image` for docker
    tasks). Every other group, and every job-level field, is left byte-for-byte as read."""
    new = copy.deepcopy(job)
    tg = task_group(new, group)
    tasks = tg.get("Tasks") or []
    if not tasks:
        raise Refused(f"task group {group} of job {job.get('ID')} has no tasks")
    docker = [t for t in tasks if t.get("Driver") == "docker"]
    if image and not docker:
        drivers = ", ".join(sorted({str(t.get("Driver")) for t in tasks}))
        raise Refused(
            f"--image applies to docker tasks; group {group} uses the {drivers} driver "
            "(deploy the version without --image)"
        )
    for task in tasks:
        if task.get("Driver") == "docker":
            config = task.setdefault("Config", {}) or {}
            task["Config"] = config
            current = config.get("image")
            if image:
                config["image"] = image
            elif current:
                config["image"] = _retag(str(current), version)
            else:
                raise Refused(f"docker task {task['Name']} in group {group} has no image")
        env = task.get("Env") or {}
        env["ZERODOWN_VERSION"] = version
        task["Env"] = env
    meta = tg.get("Meta") or {}
    meta["version"] = version
    tg["Meta"] = meta
    for svc in _services(tg):
        tags = [t for t in (svc.get("Tags") or []) if not t.startswith(VERSION_TAG)]
        svc["Tags"] = [*tags, VERSION_TAG + version]
    return new


@dataclass(frozen=True, slots=True)
class PlanVerdict:
    """What Nomad's plan says a registration would do, judged for one target group."""

    target_changes: str  # e.g. "create/destroy update 2"
    others_touched: tuple[str, ...]  # one reason per other group that would be changed

    @property
    def ok(self) -> bool:
        return not self.others_touched


def _changed_fields(d: dict[str, Any], prefix: str = "", limit: int = 3) -> list[str]:
    """A few human-readable "Name old -> new" lines from a Nomad diff object."""
    out: list[str] = []
    for f in d.get("Fields") or []:
        if f.get("Type") != "None":
            out.append(f"{prefix}{f['Name']} {f.get('Old') or '-'} -> {f.get('New') or '-'}")
    for key in ("Objects", "Tasks"):
        for o in d.get(key) or []:
            if o.get("Type") != "None":
                out.extend(_changed_fields(o, f"{prefix}{o['Name']}.", limit))
    return out[:limit]


def judge_plan(plan: dict[str, Any], target: str) -> PlanVerdict:
    """Refuse-worthy effects of a plan on any group other than `target`: a Diff that is not
    "None", or allocations replaced/placed/stopped/migrated/canaried."""
    diff = plan.get("Diff") or {}
    updates = (plan.get("Annotations") or {}).get("DesiredTGUpdates") or {}
    reasons: list[str] = []
    job_fields = _changed_fields({"Fields": diff.get("Fields"), "Objects": diff.get("Objects")})
    if job_fields:
        reasons.append(f"job-level fields change ({'; '.join(job_fields)})")
    seen: set[str] = set()
    target_changes = "no change"
    for tgd in diff.get("TaskGroups") or []:
        name = tgd["Name"]
        seen.add(name)
        counts = updates.get(name) or {}
        if name == target:
            ups = tgd.get("Updates") or {}
            target_changes = ", ".join(f"{k} {v}" for k, v in ups.items()) or "no change"
            continue
        why: list[str] = []
        if tgd.get("Type", "None") != "None":
            fields = _changed_fields(tgd)
            why.append(f"Diff {tgd.get('Type')}" + (f" ({'; '.join(fields)})" if fields else ""))
        why.extend(f"{k} {counts[k]}" for k in TOUCHING_UPDATES if (counts.get(k) or 0) > 0)
        if why:
            reasons.append(f"group {name}: {', '.join(why)}")
    for name, counts in updates.items():
        if name == target or name in seen:
            continue
        why = [f"{k} {counts[k]}" for k in TOUCHING_UPDATES if (counts.get(k) or 0) > 0]
        if why:
            reasons.append(f"group {name}: {', '.join(why)}")
    return PlanVerdict(target_changes, tuple(reasons))


def failed_placements(plan: dict[str, Any], group: str) -> str | None:
    """Nomad's reason it could not place allocations of `group`, if the plan says so."""
    failed = (plan.get("FailedTGAllocs") or {}).get(group)
    if not failed:
        return None
    parts = [f"{k} {v}" for k, v in (failed.get("ConstraintFiltered") or {}).items()]
    parts += [f"{k} {v}" for k, v in (failed.get("DimensionExhausted") or {}).items()]
    return "; ".join(parts) or "no node can run it"
