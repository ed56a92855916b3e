"""What Nomad's scheduler and job differ would say about a job change, for the Nomad test double.

Written from Nomad's documented behaviour and the recorded plan answers
(/work/shared/api-samples/nomad-exchanges.json), independently of the orchestrator code it tests:
- a change in a group's tasks, networks or meta (or job-level datacenters/meta/constraints)
  replaces that group's allocations ("create/destroy update", DestructiveUpdate);
- any other change of the job version updates the other groups' allocations in place
  ("in-place update", InPlaceUpdate) — no restart, Diff Type "None" for them;
- count changes place or stop allocations.
"""

from __future__ import annotations

from typing import Any

# Job fields the server owns; they never count as a change.
VOLATILE_JOB = {
    "CreateIndex", "ModifyIndex", "JobModifyIndex", "SubmitTime", "Status", "StatusDescription",
    "Stable", "Version", "Dispatched", "NomadTokenID", "TaskGroups",
}  # fmt: skip
DESTRUCTIVE_JOB = ("Datacenters", "Meta", "Constraints", "Affinities", "Spreads")
DESTRUCTIVE_GROUP = ("Tasks", "Networks", "Meta", "EphemeralDisk", "Volumes", "Constraints",
                     "Affinities", "Spreads")  # fmt: skip
MAP_FIELDS = {"Meta", "Env"}  # flattened as Name[key], like Nomad's diff
SINGULAR = {"Services": "Service", "Checks": "Check", "Networks": "Network",
            "DynamicPorts": "Dynamic Port", "ReservedPorts": "Static Port",
            "Constraints": "Constraint", "Templates": "Template", "Artifacts": "Artifact"}  # fmt: skip

UPDATE_KEYS = ("Canary", "DestructiveUpdate", "Ignore", "InPlaceUpdate", "Migrate", "Place",
               "Preemptions", "Stop")  # fmt: skip


def _prim(v: Any) -> bool:
    return v is None or isinstance(v, str | int | float | bool)


def _s(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _field(name: str, old: Any, new: Any) -> dict[str, Any]:
    o, n = _s(old), _s(new)
    kind = "None" if o == n else "Added" if o == "" else "Deleted" if n == "" else "Edited"
    return {"Annotations": None, "Name": name, "New": n, "Old": o, "Type": kind}


def _obj_type(old: Any, new: Any, changed: bool) -> str:
    if old is None and new is not None:
        return "Added"
    if new is None and old is not None:
        return "Deleted"
    return "Edited" if changed else "None"


def _key(item: Any, i: int) -> Any:
    if isinstance(item, dict):
        return item.get("Name") or item.get("Label") or i
    return i


def diff_struct(
    old: dict[str, Any] | None, new: dict[str, Any] | None, skip: set[str], contextual: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(Fields, Objects) of a Nomad diff between two structs; only changes unless contextual."""
    old, new = old or {}, new or {}
    fields: list[dict[str, Any]] = []
    objects: list[dict[str, Any]] = []
    for key in sorted(set(old) | set(new)):
        if key in skip:
            continue
        o, n = old.get(key), new.get(key)
        if key in MAP_FIELDS and (isinstance(o, dict) or isinstance(n, dict)):
            for k in sorted(set(o or {}) | set(n or {})):
                f = _field(f"{key}[{k}]", (o or {}).get(k), (n or {}).get(k))
                if f["Type"] != "None" or contextual:
                    fields.append(f)
        elif _prim(o) and _prim(n):
            f = _field(key, o, n)
            if f["Type"] != "None" or contextual:
                fields.append(f)
        elif isinstance(o, dict) or isinstance(n, dict):
            sub_f, sub_o = diff_struct(o, n, set(), True)
            changed = o != n
            if changed:
                objects.append({"Fields": sub_f or None, "Name": key, "Objects": sub_o or None,
                                "Type": _obj_type(o, n, changed)})  # fmt: skip
        elif all(_prim(x) for x in (o or []) + (n or [])):
            if (o or []) != (n or []):
                sub = [_field(key, x, x) for x in (o or []) if x in (n or [])]
                sub += [_field(key, None, x) for x in (n or []) if x not in (o or [])]
                sub += [_field(key, x, None) for x in (o or []) if x not in (n or [])]
                objects.append({"Fields": sub, "Name": key, "Objects": None, "Type": "Edited"})
        else:
            olds = {_key(x, i): x for i, x in enumerate(o or [])}
            news = {_key(x, i): x for i, x in enumerate(n or [])}
            for k in list(olds) + [k for k in news if k not in olds]:
                a, b = olds.get(k), news.get(k)
                if a == b:
                    continue
                sub_f, sub_o = diff_struct(a, b, set(), True)
                objects.append({"Fields": sub_f or None, "Name": SINGULAR.get(key, key),
                                "Objects": sub_o or None, "Type": _obj_type(a, b, True)})  # fmt: skip
    return fields, objects


def _task_diffs(old_tg: dict[str, Any] | None, new_tg: dict[str, Any] | None) -> list[dict]:
    olds = {t["Name"]: t for t in (old_tg or {}).get("Tasks") or []}
    news = {t["Name"]: t for t in (new_tg or {}).get("Tasks") or []}
    out = []
    for name in sorted(set(olds) | set(news)):
        a, b = olds.get(name), news.get(name)
        f, o = diff_struct(a, b, {"Name"}, False)
        kind = _obj_type(a, b, a != b)
        out.append({"Annotations": ["forces create/destroy update"] if kind != "None" else None,
                    "Fields": f or None, "Name": name, "Objects": o or None, "Type": kind})  # fmt: skip
    return out


def group_kind(
    old_job: dict[str, Any] | None,
    new_job: dict[str, Any],
    old_tg: dict | None,
    new_tg: dict | None,
) -> str:
    """create | destroy | destructive | inplace | ignore"""
    if old_tg is None:
        return "create"
    if new_tg is None:
        return "destroy"
    if any(_norm(old_job.get(k)) != _norm(new_job.get(k)) for k in DESTRUCTIVE_JOB):  # type: ignore[union-attr]
        return "destructive"
    if any(_norm(old_tg.get(k)) != _norm(new_tg.get(k)) for k in DESTRUCTIVE_GROUP):
        return "destructive"
    return "inplace" if job_changed(old_job, new_job) else "ignore"


def _norm(v: Any) -> Any:
    return None if v in ({}, []) else v


def job_changed(old: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    if old is None:
        return True
    strip = lambda j: {k: v for k, v in j.items() if k not in VOLATILE_JOB - {"TaskGroups"}}  # noqa: E731
    return strip(old) != strip(new)


def plan(
    old: dict[str, Any] | None, new: dict[str, Any], running: dict[str, int]
) -> tuple[dict[str, Any], dict[str, dict[str, int]], dict[str, str]]:
    """(Diff, DesiredTGUpdates, kind per group) for registering `new` over `old`, given the
    number of running allocations per group."""
    old_groups = {tg["Name"]: tg for tg in (old or {}).get("TaskGroups") or []}
    new_groups = {tg["Name"]: tg for tg in new.get("TaskGroups") or []}
    jf, jo = diff_struct(old, new, VOLATILE_JOB | {"ID"}, False)
    tg_diffs = []
    updates: dict[str, dict[str, int]] = {}
    kinds: dict[str, str] = {}
    for name in sorted(set(old_groups) | set(new_groups)):
        a, b = old_groups.get(name), new_groups.get(name)
        kind = group_kind(old, new, a, b)
        kinds[name] = kind
        have = running.get(name, 0)
        want = (b or {}).get("Count", 0)
        u = dict.fromkeys(UPDATE_KEYS, 0)
        label: dict[str, int] = {}
        if kind == "create":
            u["Place"] = want
            label["create"] = want
        elif kind == "destroy":
            u["Stop"] = have
            label["destroy"] = have
        else:
            kept = min(have, want)
            if want > have:
                u["Place"] = want - have
                label["create"] = want - have
            elif have > want:
                u["Stop"] = have - want
                label["destroy"] = have - want
            key = {"destructive": ("DestructiveUpdate", "create/destroy update"),
                   "inplace": ("InPlaceUpdate", "in-place update"),
                   "ignore": ("Ignore", "ignore")}[kind]  # fmt: skip
            if kept:
                u[key[0]] = kept
                label[key[1]] = kept
        updates[name] = u
        gf, go = diff_struct(a, b, {"Name", "Tasks"}, False)
        tasks = _task_diffs(a, b)
        changed = bool(gf or go or any(t["Type"] != "None" for t in tasks))
        tg_diffs.append({"Fields": gf or None, "Name": name, "Objects": go or None,
                         "Tasks": tasks, "Type": _obj_type(a, b, changed),
                         "Updates": label or None})  # fmt: skip
    any_change = bool(jf or jo) or any(t["Type"] != "None" for t in tg_diffs)
    diff = {"Fields": jf or None, "ID": new["ID"], "Objects": jo or None,
            "TaskGroups": tg_diffs, "Type": _obj_type(old, new, any_change)}  # fmt: skip
    return diff, updates, kinds
