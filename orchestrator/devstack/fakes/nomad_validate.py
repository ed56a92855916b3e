"""The job validation the Nomad double applies to POST /v1/jobs and /v1/job/<id>/plan, as the real
agent does (Nomad 1.1: structs.Job.Validate -> TaskGroup.Validate -> validateServices ->
Service.Validate -> ServiceCheck.validate), with its wording and go-multierror's list format.

Only what a job of this project can get wrong is checked: service check intervals and
timeouts. Nomad (like Consul) refuses a check interval under 1 s; the live tests once used
500 ms and failed against a real agent ("Check http invalid: interval (500ms) cannot be lower
than 1s") while the double accepted it. Now the double refuses it too, with the same text
(HTTP 500, plain text), so that cannot pass unnoticed again.
"""

from __future__ import annotations

from typing import Any

NS = 1_000_000_000
MIN_CHECK_INTERVAL = NS  # minCheckInterval
MIN_CHECK_TIMEOUT = NS  # minCheckTimeout


def go_duration(ns: int) -> str:
    """Go's time.Duration.String() for the values a job carries."""
    if ns == 0:
        return "0s"
    if ns < 1_000:
        return f"{ns}ns"
    if ns < 1_000_000:
        return f"{_trim(ns / 1_000)}µs"
    if ns < NS:
        return f"{_trim(ns / 1_000_000)}ms"
    total = ns / NS
    hours, rest = divmod(total, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{int(hours)}h{int(minutes)}m{_trim(seconds)}s"
    if minutes:
        return f"{int(minutes)}m{_trim(seconds)}s"
    return f"{_trim(seconds)}s"


def _trim(x: float) -> str:
    return f"{x:.9f}".rstrip("0").rstrip(".")


def multierror(errors: list[str]) -> str:
    """hashicorp/go-multierror's ListFormatFunc."""
    if len(errors) == 1:
        return f"1 error occurred:\n\t* {errors[0]}\n\n"
    points = "\n\t".join(f"* {e}" for e in errors)
    return f"{len(errors)} errors occurred:\n\t{points}\n\n"


def _check(check: dict[str, Any]) -> str | None:
    kind = str(check.get("Type") or "").lower()
    timeout = int(check.get("Timeout") or 0)
    interval = int(check.get("Interval") or 0)
    min_i, min_t = go_duration(MIN_CHECK_INTERVAL), go_duration(MIN_CHECK_TIMEOUT)
    if kind in ("http", "tcp"):
        if kind == "http" and not check.get("Path"):
            return "http type must have a valid http path"
        if timeout == 0:
            return f"missing required value timeout. Timeout cannot be less than {min_i}"
        if timeout < MIN_CHECK_TIMEOUT:
            return (
                f"timeout ({go_duration(timeout)}) is lower than required minimum timeout {min_t}"
            )
    if interval == 0:
        return f"missing required value interval. Interval cannot be less than {min_i}"
    if interval < MIN_CHECK_INTERVAL:
        return f"interval ({go_duration(interval)}) cannot be lower than {min_i}"
    return None


def _services(services: list[dict[str, Any]]) -> list[str]:
    out = []
    for i, svc in enumerate(services):
        errs = [
            f"Check {c.get('Name') or ''} invalid: {why}"
            for c in svc.get("Checks") or []
            if (why := _check(c)) is not None
        ]
        if errs:
            out.append(f"Service[{i}] {svc.get('Name')} validation failed: {multierror(errs)}")
    return out


def validate_job(job: dict[str, Any]) -> str | None:
    """Nomad's error text for an invalid job, or None."""
    groups = []
    for tg in job.get("TaskGroups") or []:
        errs = []
        services = _services(tg.get("Services") or [])
        if services:
            errs.append(f"Task group service validation failed: {multierror(services)}")
        for task in tg.get("Tasks") or []:
            task_errs = _services(task.get("Services") or [])
            if task_errs:
                errs.append(f"Task {task.get('Name')} validation failed: {multierror(task_errs)}")
        if errs:
            groups.append(f"Task group {tg.get('Name')} validation failed: {multierror(errs)}")
    return multierror(groups) if groups else None
