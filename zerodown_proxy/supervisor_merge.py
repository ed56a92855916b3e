"""The multi-worker supervisor's admin API speaks for all its workers: these merge what each
worker reports (Prometheus text, the HSMS status section) into one answer."""

from __future__ import annotations

from typing import Any


def merge_metrics(texts: list[str]) -> str:
    """Merge Prometheus text from several workers: one HELP/TYPE per family, samples labelled
    with the worker index, families kept contiguous."""
    families: dict[str, tuple[list[str], list[str]]] = {}
    for index, text in enumerate(texts):
        current: list[str] | None = None
        for line in text.splitlines():
            if not line:
                continue
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                name = line.split(" ", 3)[2]
                meta, samples = families.setdefault(name, ([], []))
                if line not in meta:
                    meta.append(line)
                current = samples
                continue
            if current is None:
                continue
            name, _, rest = line.partition(" ")
            if "{" in name:
                base, _, labels = name.partition("{")
                name = f'{base}{{worker="{index}",{labels}'
            else:
                name = f'{name}{{worker="{index}"}}'
            current.append(f"{name} {rest}")
    out: list[str] = []
    for meta, samples in families.values():
        out.extend(meta)
        out.extend(samples)
    return "\n".join(out) + "\n"


def merge_hsms(parts: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """One `hsms` status section for the whole proxy: every worker's tool sessions (each marked
    with its worker index), counters summed."""
    present = [(i, p) for i, p in enumerate(parts) if p]
    if not present:
        return None
    sessions = [{**s, "worker": i} for i, p in present for s in p.get("sessions", ())]
    sessions.sort(key=lambda s: s.get("connected_at") or 0)
    return {
        "port": present[0][1].get("port"),
        "listeners": present[0][1].get("listeners", {}),  # every worker binds the same apps
        "tool_sessions": sum(p.get("tool_sessions", 0) for _, p in present),
        "handovers": sum(p.get("handovers", 0) for _, p in present),
        "failovers": sum(p.get("failovers", 0) for _, p in present),
        "sessions": sessions,
    }
