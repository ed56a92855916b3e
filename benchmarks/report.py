"""Markdown tables and the raw JSON of a benchmark run.

Tables compare zerodown with each nginx variant; ratio columns are "nginx variant / zerodown"
for latencies (above 1: zerodown is faster) and "zerodown / nginx" for throughput (above 1:
zerodown does more).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import orjson

LABELS = {
    "zerodown": "zerodown",
    "nginx-watch": "nginx + 3 s watch loop (old stack)",
    "nginx-reload": "nginx, immediate reload",
    "direct": "direct to one backend",
}


def _f(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _ratio(num: float | None, den: float | None) -> str:
    if num is None or den is None or den <= 0:
        return "–"
    return f"{num / den:.2f}x"


def generator_table(check: dict[str, Any]) -> str:
    s = check["summary"]
    pct = 100 * s["achieved_rate"] / s["target_rate"]
    return (
        "| target rps | achieved rps | % of target | failures | dropped | p50 ms | p99 ms "
        "| start lag p99 ms | processes |\n|---|---|---|---|---|---|---|---|---|\n"
        f"| {s['target_rate']:.0f} | {s['achieved_rate']:.0f} | {pct:.1f} % | {s['failures']} "
        f"| {s['dropped']} | {_f(s['p50_ms'])} | {_f(s['p99_ms'])} "
        f"| {_f(s['start_lag_p99_ms'])} | {s['processes']} |\n"
    )


def steady_table(rate: str, per_proxy: dict[str, Any], switch_every: float = 10.0) -> str:
    every = f"a switch every {switch_every:g} s" if switch_every else "no switches"
    workers = next(iter(per_proxy.values()), {}).get("workers", "?")
    head = (
        f"**{int(rate):,} requests/s open loop, {every}, {workers} worker(s) per proxy**\n\n"
        "| proxy | requests | success | failures | dropped | avg ms | p50 | p90 | p95 | p99 "
        "| max | achieved rps | proxy CPU us/req | keep-alive retries | responses per version |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for name, r in per_proxy.items():
        s = r["summary"]
        versions = ", ".join(f"{k}: {v}" for k, v in sorted(s["per_version"].items()))
        rows.append(
            f"| {LABELS.get(name, name)} | {s['requests']} | {100 * s['success_rate']:.2f} % "
            f"| {s['failures']} | {s['dropped']} | {_f(s['avg_ms'])} | {_f(s['p50_ms'])} "
            f"| {_f(s['p90_ms'])} | {_f(s['p95_ms'])} | {_f(s['p99_ms'])} | {_f(s['max_ms'], 1)} "
            f"| {s['achieved_rate']:.0f} | {_f(r.get('cpu_us_per_request'), 0)} "
            f"| {s['retries']} | {versions} |"
        )
    text = head + "\n".join(rows) + "\n"
    zd = per_proxy.get("zerodown")
    others = [n for n in per_proxy if n != "zerodown"]
    if zd and others:
        z = zd["summary"]
        text += "\n| nginx variant / zerodown | p50 | p95 | p99 | max |\n|---|---|---|---|---|\n"
        for name in others:
            s = per_proxy[name]["summary"]
            text += (
                f"| {LABELS.get(name, name)} | {_ratio(s['p50_ms'], z['p50_ms'])} "
                f"| {_ratio(s['p95_ms'], z['p95_ms'])} | {_ratio(s['p99_ms'], z['p99_ms'])} "
                f"| {_ratio(s['max_ms'], z['max_ms'])} |\n"
            )
    return text


def _med_max(values: list[float | None]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.median(vals), max(vals)


def propagation_table(steady: dict[str, Any]) -> str:
    text = (
        "| rate | proxy | switches | first new-version response ms (median / max) "
        "| last old-version response ms (median / max) | applied ms (median) "
        "| old responses to requests started after the first new one "
        "| ... after the switch was applied |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    for rate, per_proxy in steady.items():
        for name, r in per_proxy.items():
            props = r["propagation"]
            fn = _med_max([p["first_new_ms"] for p in props])
            lo = _med_max([p["last_old_ms"] for p in props])
            ap = _med_max([p["applied_ms"] for p in props])
            missing = sum(1 for p in props if p["first_new_ms"] is None)
            olds = [p.get("old_after_applied") for p in props]
            after = "–" if any(o is None for o in olds) or not olds else str(sum(olds))
            note = f" ({missing} never answered by the new version)" if missing else ""
            text += (
                f"| {int(rate):,} | {LABELS.get(name, name)} | {len(props)}{note} "
                f"| {_f(fn[0], 1)} / {_f(fn[1], 1)} | {_f(lo[0], 1)} / {_f(lo[1], 1)} "
                f"| {_f(ap[0], 1)} | {sum(p['mixed'] for p in props)} | {after} |\n"
            )
    return text


def closed_table(closed: dict[str, Any]) -> str:
    """One row per pinning mode, proxy and worker count ({"unpinned": ..., "pinned": ...})."""
    text = (
        "| pinning | proxy | workers | requests/s | avg ms | p50 | p90 | p99 | max | errors "
        "| proxy CPU us/req | zerodown / nginx rps | zerodown / nginx CPU |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    for mode, per_proxy in closed.items():
        if "skipped" in per_proxy:
            text += f"| {mode} | skipped: {per_proxy['skipped']} |||||||||||| \n"
            continue
        nginx = per_proxy.get("nginx-reload", {})
        for name, per_workers in per_proxy.items():
            label = "nginx" if name == "nginx-reload" else LABELS.get(name, name)
            for workers, r in per_workers.items():
                ratio = cpu_ratio = "–"
                if name == "zerodown" and workers in nginx:
                    ratio = _ratio(r["rps"], nginx[workers]["rps"])
                    cpu_ratio = _ratio(
                        r.get("cpu_us_per_request"), nginx[workers].get("cpu_us_per_request")
                    )
                text += (
                    f"| {mode} | {label} | {workers} | {r['rps']:.0f} | {_f(r['avg_ms'])} "
                    f"| {_f(r['p50_ms'])} | {_f(r['p90_ms'])} | {_f(r['p99_ms'])} "
                    f"| {_f(r['max_ms'], 1)} | {r['errors'] + r['non_2xx']} "
                    f"| {_f(r.get('cpu_us_per_request'), 0)} | {ratio} | {cpu_ratio} |\n"
                )
    return text


def markdown(results: dict[str, Any]) -> str:
    parts = []
    if "generator" in results:
        parts.append(
            "### Load generator against nginx directly\n\n" + generator_table(results["generator"])
        )
    if "steady" in results:
        parts.append("### Open loop with switches\n")
        every = results.get("config", {}).get("switch_every", 10.0)
        for rate, per_proxy in results["steady"].items():
            parts.append(steady_table(rate, per_proxy, every))
        parts.append("### Switch propagation\n\n" + propagation_table(results["steady"]))
    if "closed" in results:
        parts.append(
            "### Closed loop (wrk, 50 connections; pinned: the proxy alone on one core, wrk "
            "and the backends on the other)\n\n" + closed_table(results["closed"])
        )
    if "datapath" in results:
        d = results["datapath"]
        parts.append(
            "### HTTP data path, Python work only (no sockets)\n\n"
            f"{d['us_per_request']:.2f} us of CPU per proxied request "
            f"(best of {d['rounds']} x {d['requests']} requests)\n"
        )
    if "hsms" in results:
        parts.append(str(results["hsms"].get("markdown", "")))
    if "instructions" in results:
        from .instructions import instructions_table

        parts.append(
            "### Instructions per request (callgrind)\n\n"
            + instructions_table(results["instructions"])
        )
    if "fab" in results:
        from .fab import fab_table

        parts.append("### Scale of a fab\n\n" + fab_table(results["fab"]))
    return "\n".join(parts)


def write_results(out_dir: Path, results: dict[str, Any]) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / "results.json"
    raw.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    md = out_dir / "summary.md"
    md.write_text(markdown(results))
    return raw, md
