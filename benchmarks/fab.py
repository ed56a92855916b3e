"""`zerodown bench fab`: the scale of a fab on one proxy.

1. HSMS (benchmarks/fab_hsms.py): `--tools` tools (default 1,000), an S6F11 from each every
   `--period` s, across `--switches` switches: disconnects, lost events, handover p99 of all
   sessions after each switch, proxy RSS per tool session.
2. Idle HTTP (benchmarks/fab_http.py): `--idle-clients` keep-alive clients (default 10,000),
   each after one request: proxy RSS per connection.
3. Growth (benchmarks/fab_http.py): per-request proxy CPU (wrk) and switch propagation with
   `--apps` apps (default 1,10,100) x `--instances` instances per group (default 2,20).

Every part raises RLIMIT_NOFILE first (children inherit it): a proxy holding 1,000 tools and
their 1,000 backend sessions, or 10,000 clients, needs more than the usual 1,024 descriptors.
"""

from __future__ import annotations

import argparse
import resource
from pathlib import Path
from typing import Any

from .nginx import BenchError
from .targets import workdir

PARTS = ("hsms", "idle", "growth")
NOFILE = 65536


def raise_nofile(want: int = NOFILE) -> int:
    """Raise the open-files limit as far as allowed (root: to `want`); returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limit in ((max(want, soft), max(want, hard)), (hard, hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, limit)
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers separated by commas, got {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma separated, from {','.join(PARTS)} (default: all)")  # fmt: skip
    p.add_argument("--tools", type=int, default=1000, help="HSMS tools (default 1000)")
    p.add_argument("--switches", type=int, default=5, help="switches under HSMS load (default 5)")
    p.add_argument("--switch-every", type=float, default=6.0,
                   help="seconds between switches (default 6)")  # fmt: skip
    p.add_argument("--period", type=float, default=1.0,
                   help="seconds between two S6F11 of one tool (default 1)")  # fmt: skip
    p.add_argument("--proxy-nice", type=int, default=0,
                   help="HSMS part: run the proxy under `nice -n N` (root may give N < 0: the "
                   "proxy ahead of a busy machine's other work; default 0)")  # fmt: skip
    p.add_argument("--idle-clients", type=int, default=10000,
                   help="idle keep-alive HTTP clients (default 10000)")  # fmt: skip
    p.add_argument("--apps", type=_ints, default=(1, 10, 100), help="app counts (default 1,10,100)")
    p.add_argument("--instances", type=_ints, default=(2, 20),
                   help="instances per group (default 2,20)")  # fmt: skip
    p.add_argument("--wrk-seconds", type=float, default=5.0,
                   help="closed-loop run per growth point (default 5)")  # fmt: skip


def run_from_args(args: argparse.Namespace, log: Any) -> dict[str, Any]:
    parts = tuple(x.strip() for x in args.parts.split(",") if x.strip())
    bad = [x for x in parts if x not in PARTS]
    if bad or not parts:
        raise BenchError(f"unknown part {', '.join(bad)}: choose from {', '.join(PARTS)}")
    if args.switches < 1 or args.switch_every <= 0 or args.period <= 0:
        raise BenchError("--switches must be at least 1, --switch-every and --period positive")
    nofile = raise_nofile()
    out: dict[str, Any] = {"nofile": nofile}
    with workdir("zd-bench-fab-") as tmp:
        base = Path(tmp)
        if "hsms" in parts:
            from .fab_hsms import run_fab_hsms

            log(f"fab hsms: {args.tools} tools, {args.switches} switches every "
                f"{args.switch_every:g} s, an S6F11 every {args.period:g} s per tool")  # fmt: skip
            (base / "hsms").mkdir()
            out["hsms"] = run_fab_hsms(base / "hsms", args.tools, args.switches,
                                       args.switch_every, args.period, log,
                                       nice=args.proxy_nice)  # fmt: skip
            h = out["hsms"]
            log(f"  {h['disconnects']} disconnects, {h['lost']} lost, handover p99 (worst "
                f"switch) {h['handover_p99_ms_worst']} ms")  # fmt: skip
        if "idle" in parts:
            from .fab_http import run_idle

            log(f"fab idle: {args.idle_clients} idle keep-alive HTTP clients")
            (base / "idle").mkdir()
            out["idle"] = run_idle(base / "idle", args.idle_clients, log)
        if "growth" in parts:
            from .fab_http import run_growth

            log(f"fab growth: apps {args.apps} x instances per group {args.instances}")
            (base / "growth").mkdir()
            out["growth"] = run_growth(base / "growth", args.apps, args.instances,
                                       args.wrk_seconds, log)  # fmt: skip
    return out


def _f(v: float | None, digits: int = 1) -> str:
    return "–" if v is None else f"{v:,.{digits}f}"


def fab_table(r: dict[str, Any]) -> str:
    text = ""
    if "hsms" in r:
        h = r["hsms"]
        text += (
            f"**{h['tools']:,} HSMS tools, an S6F11 each every {h['period']:g} s, "
            f"{h['switches']} switches {h['switch_every']:g} s apart, one proxy (1 worker)**\n\n"
            "| disconnects | lost | duplicated | S6F11 sent | S6F12 received | rejected / SxF0 "
            "| RTT p50 / p99 / max ms | handover p99 ms (worst switch) | proxy RSS per tool "
            "session | proxy CPU us/event |\n|---|---|---|---|---|---|---|---|---|---|\n"
            f"| {h['disconnects']} | {h['lost']} | {h['duplicated']} | {h['sent']:,} "
            f"| {h['replied']:,} | {h['rejected']} / {h['nacked']} "
            f"| {_f(h['rtt_ms']['p50'], 2)} / {_f(h['rtt_ms']['p99'], 2)} / "
            f"{_f(h['rtt_ms']['max'], 1)} | {_f(h['handover_p99_ms_worst'])} "
            f"| {h['rss_kib_per_session']:.1f} KiB | {_f(h['proxy_cpu_us_per_event'], 0)} |\n\n"
            "| switch | to | proxy applied ms | sessions handed over | handover p50 / p99 / max ms "
            "| proxy CPU for the switch ms | proxy / backends waiting for a CPU ms |\n"
            "|---|---|---|---|---|---|---|\n"
        )
        for k, s in enumerate(h["switch_log"], 1):
            m = s["handover_ms"]
            text += (
                f"| {k} | {s['to']} | {_f(s['applied_ms'])} | {s['sessions_handed_over']} "
                f"| {_f(m['p50'])} / {_f(m['p99'])} / {_f(m['max'])} "
                f"| {_f(s.get('switch_cpu_ms'), 0)} | {_f(s.get('switch_runqueue_wait_ms'), 0)} / "
                f"{_f(s.get('backends_runqueue_wait_ms'), 0)} |\n"
            )
        text += "\n"
    if "idle" in r:
        i = r["idle"]
        text += (
            f"**{i['clients']:,} idle keep-alive HTTP clients**: proxy RSS {i['rss_idle_mib']:.1f} "
            f"-> {i['rss_clients_mib']:.1f} MiB, **{i['rss_kib_per_connection']:.1f} KiB per "
            f"connection**; {i['failed']} failed, {i['closed_by_proxy']} closed by the proxy "
            f"while idle\n\n"
        )
    if "growth" in r:
        text += (
            "| apps | instances per group | registry instances | requests/s (wrk) "
            "| proxy CPU us/request | proxy idle CPU % | switch applied ms (median / max) "
            "| first new-version response ms (median / max) |\n"
            "|---|---|---|---|---|---|---|---|\n"
        )
        for g in r["growth"]:
            text += (
                f"| {g['apps']} | {g['per_group']} | {g['instances']:,} | {g['rps']:,.0f} "
                f"| {_f(g['cpu_us_per_request'], 0)} | {_f(g['idle_cpu_pct'])} "
                f"| {_f(g['applied_ms'][0])} / {_f(g['applied_ms'][1])} "
                f"| {_f(g['first_new_ms'][0])} / {_f(g['first_new_ms'][1])} |\n"
            )
    return text
