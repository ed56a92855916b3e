"""`zerodown bench hsms`: S6F11/S6F12 throughput and round-trip latency, direct to the backend vs
through the zerodown proxy, without and with blue/green switches.

Backends are `zerodown sample-app --hsms-port` processes (secsgem hosts; blue = v1, green = v2).
The load comes from benchmarks/hsms_load.py, a lean raw-socket HSMS client (see its docstring for
why not secsgem): `tools` sessions, each keeping `window` transactions open. Phases, same run and
same machine:

1. direct  — the tools connect straight to the Active group's HSMS ports (the baseline);
2. proxy   — the tools connect to the proxy's HSMS port, no switch;
3. proxy + switches — every `switch_every` s the registry file the proxy watches is rewritten
   with the other group Active (exactly what `zerodown switch` does in local mode).

Per switch: the transactions the tools had open at the instant of the write, how long until the
proxy reported the new generation (admin /v1/status), until an S1F1 probe first got the new
SOFTREV, and the slowest reply among the transactions open at the switch. From the proxy's
/metrics: handovers, handover time, rejects. After every phase the backends' records
(/hsms/received) are checked: every replied DATAID exactly once, none duplicated. CPU seconds of
the proxy and of the backends (psutil) per replied transaction show the proxy's own cost even when
the secsgem backends, not the proxy, bound the throughput. Two 1x1 phases (one tool, one open
transaction) give the unloaded per-hop latency, and one secsgem tool shows what a secsgem client
alone can drive.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson

from orchestrator.devstack.children import Child as _Child
from orchestrator.devstack.children import ChildFailed

from .hsms_load import DATAID_STRIDE, LoadTool, connect_tools, merged, wait_drained

ROOT = Path(__file__).resolve().parent.parent
GROUPS = {"blue": "v1", "green": "v2"}
ADMIN_TOKEN = "bench-token"


class BenchError(RuntimeError):
    """The benchmark could not run; the message says which part failed and why."""


# -- processes ---------------------------------------------------------------------------------


class Child(_Child):
    """A dev-stack child process whose start failure is a BenchError."""

    def __init__(self, args: list[str], workdir: Path, name: str, timeout: float = 30.0) -> None:
        module = "orchestrator"
        if args and args[0] == "proxy":
            module, args = "zerodown_proxy", args[1:]
        try:
            super().__init__(args, workdir, name, timeout, module=module)
        except ChildFailed as exc:
            raise BenchError(str(exc)) from None

    def stop(self) -> int | None:
        return self.terminate()


def _cpu_seconds(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def _http_json(url: str, timeout: float = 10.0) -> Any:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return orjson.loads(r.read())


def _http_text(url: str, timeout: float = 10.0) -> str:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read().decode()


class Stack:
    """Backends (blue v1, green v2), the registry file, and optionally the proxy."""

    def __init__(self, workdir: Path, instances: int, device_id: int) -> None:
        self.workdir = workdir
        self.device_id = device_id
        self.backends: dict[str, list[Child]] = {g: [] for g in GROUPS}
        self.proxy: Child | None = None
        self.registry = workdir / "registry.json"
        self.generation = 0
        self.active = "blue"
        try:
            for group, version in GROUPS.items():
                for k in range(1, instances + 1):
                    iid = f"drimeap-{group}-{k}"
                    args = ["sample-app", "--version", version, "--http-port", "0"]
                    args += [
                        "--hsms-port",
                        "0",
                        "--instance-id",
                        iid,
                        "--device-id",
                        str(device_id),
                    ]
                    self.backends[group].append(Child(args, workdir, iid))
        except BaseException:
            self.stop()  # no orphaned backends when one of them fails to start
            raise
        self.write_registry("blue")

    def write_registry(self, active: str, pilots: dict[str, Any] | None = None) -> int:
        """Rewrite the registry (`pilots`: contract/pilots.py's object, None: no pilots)."""
        self.generation += 1
        self.active = active
        instances = [
            {
                "id": c.name,
                "group": g,
                "version": GROUPS[g],
                "address": "127.0.0.1",
                "http_port": c.ports["http"],
                "hsms_port": c.ports["hsms"],
                "healthy": True,
            }
            for g, children in self.backends.items()
            for c in children
        ]
        app = {"active": active, "instances": instances, "hsms_device_id": self.device_id}
        if pilots is not None:
            app["pilots"] = pilots
        data = {"generation": self.generation, "apps": {"drimeap": app}, "proxies": []}
        tmp = self.registry.with_name(self.registry.name + ".tmp")
        tmp.write_bytes(orjson.dumps(data))
        os.replace(tmp, self.registry)  # atomic: the proxy never sees half a file
        return self.generation

    def start_proxy(self, t3: float) -> Child:
        cfg = self.workdir / "proxy.toml"
        cfg.write_text(
            "\n".join(
                [
                    "[proxy]",
                    'http_listen = "127.0.0.1:0"',
                    'hsms_listen = "127.0.0.1:0"',
                    'admin_listen = "127.0.0.1:0"',
                    f'admin_token = "{ADMIN_TOKEN}"',
                    'log_level = "info"',  # hsms_handover / hsms_backend_selected events
                    "[hsms]",
                    "enabled = true",
                    f"t3 = {t3}",
                    "[discovery]",
                    f'file = "{self.registry}"',
                    "",
                ]
            )
        )
        self.proxy = Child(["proxy", "--config", str(cfg)], self.workdir, "proxy")
        if not self.proxy.ports.get("hsms"):
            raise BenchError("the proxy started without an HSMS listener ([hsms] enabled = true)")
        self.wait_generation(self.generation, 10)
        return self.proxy

    def admin(self, path: str) -> str:
        assert self.proxy is not None
        return f"http://127.0.0.1:{self.proxy.ports['admin']}{path}"

    def wait_generation(self, generation: int, timeout: float) -> float:
        """Seconds until the proxy reports `generation` applied (polled every 2 ms)."""
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            if _http_json(self.admin("/v1/status"))["generation"] >= generation:
                return time.perf_counter() - t0
            time.sleep(0.002)
        raise BenchError(f"proxy did not apply generation {generation} within {timeout:g} s")

    def active_targets(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", c.ports["hsms"]) for c in self.backends[self.active]]

    def received(self) -> dict[str, tuple[list[int], int]]:
        """Per backend: (the DATAIDs it recorded, total S6F11 it ever received)."""
        out = {}
        for children in self.backends.values():
            for c in children:
                body = _http_json(f"http://127.0.0.1:{c.ports['http']}/hsms/received")
                out[c.name] = (body["s6f11"], body["total"])
        return out

    def cpu(self) -> dict[str, float]:
        """CPU seconds (user+system) used so far by the proxy and by all backends together."""
        out = {"backends": 0.0}
        for children in self.backends.values():
            for c in children:
                out["backends"] += _cpu_seconds(c.proc.pid)
        if self.proxy is not None:
            out["proxy"] = _cpu_seconds(self.proxy.proc.pid)
        return out

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        for children in self.backends.values():
            for c in children:
                c.stop()


# -- proxy metrics -----------------------------------------------------------------------------

_LINE = re.compile(r"^(zerodown_hsms_[a-zA-Z0-9_]+)(\{[^}]*\})?\s+(\S+)$")


def hsms_metrics(text: str) -> dict[str, float]:
    """Every zerodown_hsms_* sample of a Prometheus text page, keyed 'name{labels}'."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _LINE.match(line.strip())
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def _sum(metrics: dict[str, float], name: str) -> float:
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


def metric_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after if after[k] != before.get(k, 0.0)}


# -- phases ------------------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 3)


async def run_phase(
    stack: Stack,
    name: str,
    targets: list[tuple[str, int]],
    tools: int,
    window: int,
    seconds: float,
    t3: float,
    first_index: int,
    switch_every: float = 0.0,
) -> dict[str, Any]:
    before_rx = {k: total for k, (_, total) in stack.received().items()}
    before_m = hsms_metrics(_http_text(stack.admin("/metrics"))) if stack.proxy else {}
    cpu0 = stack.cpu()
    sessions = await connect_tools(targets, tools, stack.device_id, window, t3, first_index)
    switches: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    end = t0 + seconds
    for t in sessions:
        t.start(end)
    switcher = (
        asyncio.create_task(_switcher(stack, sessions, end, switch_every, switches))
        if switch_every > 0
        else None
    )
    while time.perf_counter() < end:
        now = time.perf_counter()
        for t in sessions:
            t.expire(now)
        await asyncio.sleep(0.05)
    if switcher is not None:
        await switcher
    await wait_drained(sessions, t3 + 1.0)
    for t in sessions:
        t.close()
    totals = merged(sessions)
    rtts = [r for t in sessions for r in t.stats.rtts]
    for sw in switches:
        _switch_stall(sw, sessions)
    cpu = {k: v - cpu0.get(k, 0.0) for k, v in stack.cpu().items()}
    after_m = hsms_metrics(_http_text(stack.admin("/metrics"))) if stack.proxy else {}
    integrity = _integrity(stack, before_rx, sessions)
    delta = metric_delta(before_m, after_m)
    return {
        "phase": name,
        "tools": tools,
        "window": window,
        "seconds": seconds,
        **totals,
        "tps": round(totals["replied"] / seconds, 1),
        "rtt_ms": {
            "p50": _ms(_pct(rtts, 0.50)),
            "p99": _ms(_pct(rtts, 0.99)),
            "max": _ms(max(rtts) if rtts else None),
        },
        "switches": switches,
        "proxy_metrics_delta": delta,
        "integrity": integrity,
        "cpu_us_per_tx": {
            k: round(v / totals["replied"] * 1e6, 1) if totals["replied"] else None
            for k, v in cpu.items()
        },
    }


async def _switcher(
    stack: Stack, sessions: list[LoadTool], end: float, every: float, out: list[dict[str, Any]]
) -> None:
    next_at = time.perf_counter() + every
    while next_at < end - 0.2:  # leave time for the last switch's probe
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        next_at += every
        to = "green" if stack.active == "blue" else "blue"
        gauge = _sum(
            hsms_metrics(await asyncio.to_thread(_http_text, stack.admin("/metrics"))),
            "zerodown_hsms_transactions_in_flight",
        )
        open_now = sum(len(t.open) for t in sessions)  # exact, sampled in the tools' own loop
        t_write = time.perf_counter()
        wall = time.time()
        gen = await asyncio.to_thread(stack.write_registry, to)
        applied = await asyncio.to_thread(stack.wait_generation, gen, 10.0)
        visible = await _first_new_softrev(sessions[0], GROUPS[to], t_write, deadline=5.0)
        out.append(
            {
                "to": to,
                "generation": gen,
                "t_write": t_write,
                "wall": wall,
                "open_at_switch": open_now,
                "proxy_in_flight_before": gauge,
                "applied_ms": round(applied * 1000, 2),
                "new_version_visible_ms": None if visible is None else round(visible * 1000, 2),
            }
        )


async def _first_new_softrev(
    tool: LoadTool, version: str, since: float, deadline: float
) -> float | None:
    """Probe S1F1 until the new version answers: the moment a tool's primaries reach it."""
    while time.perf_counter() - since < deadline:
        answer = await tool.softrev(2.0)
        if answer == version:
            return time.perf_counter() - since
        await asyncio.sleep(0.002)
    return None


def _switch_stall(sw: dict[str, Any], sessions: list[LoadTool]) -> None:
    """Slowest reply among the transactions open when the registry was written."""
    t = sw.pop("t_write")
    worst = 0.0
    n = 0
    for s in sessions:
        for rtt, done in zip(s.stats.rtts, s.stats.done_at, strict=True):
            if done - rtt <= t <= done:
                n += 1
                worst = max(worst, rtt)
    sw["open_replied"] = n
    sw["open_max_rtt_ms"] = round(worst * 1000, 2) if n else None


def _new_dataids(stack: Stack, before: dict[str, int]) -> list[int]:
    """DATAIDs the backends recorded since `before` (their totals then)."""
    out: list[int] = []
    for name, (ids, total) in stack.received().items():
        new = total - before.get(name, 0)
        if new > len(ids):
            raise BenchError(f"{name} dropped part of its S6F11 record; shorten the run")
        out.extend(ids[len(ids) - new :] if new else [])
    return out


def _integrity(stack: Stack, before: dict[str, int], sessions: list[LoadTool]) -> dict[str, Any]:
    """Check the backends' records against what the tools saw acknowledged."""
    seen: dict[int, int] = {}
    for d in _new_dataids(stack, before):
        seen[d] = seen.get(d, 0) + 1
    acked = [d for s in sessions for d in s.stats.dataids_replied]
    dup = sum(1 for c in seen.values() if c > 1)
    missing = sum(1 for d in acked if d not in seen)
    return {
        "acked": len(acked),
        "recorded": len(seen),
        "duplicated": dup,
        "acked_not_recorded": missing,
        "ok": dup == 0 and missing == 0,
    }


# -- driver ------------------------------------------------------------------------------------


async def _bench(
    stack: Stack, seconds: float, tools: int, window: int, switch_every: float, t3: float, log: Any
) -> dict[str, Any]:
    phases: list[dict[str, Any]] = []
    index = 1  # tool numbers keep DATAIDs unique across phases
    short = min(seconds, 3.0)  # the 1x1 latency phases need fewer samples

    async def phase(name: str, targets: list[tuple[str, int]], n: int, w: int, secs: float,
                    every: float = 0.0) -> None:  # fmt: skip
        nonlocal index
        log(f"{name}: {n} tool(s) x {w} open -> {targets[0][0]}:{targets[0][1]}, {secs:g} s")
        phases.append(await run_phase(stack, name, targets, n, w, secs, t3, index, every))
        index += n

    await phase("direct 1x1", stack.active_targets(), 1, 1, short)
    log(f"direct 1x1 with a secsgem tool (the client-side limit), {short:g} s")
    phases.append(await asyncio.to_thread(secsgem_phase, stack, short, t3, index))
    index += 1
    await phase("direct", stack.active_targets(), tools, window, seconds)
    try:
        proxy = await asyncio.to_thread(stack.start_proxy, t3)
    except BenchError as exc:
        log(f"proxy phases skipped: {exc}")
        return {"phases": phases, "proxy_error": str(exc)}
    target = [("127.0.0.1", proxy.ports["hsms"])]
    await phase("proxy 1x1", target, 1, 1, short)
    await phase("proxy", target, tools, window, seconds)
    if switch_every > 0:
        await phase("proxy+switches", target, tools, window, seconds, switch_every)
    status = await asyncio.to_thread(_http_json, stack.admin("/v1/status"))
    _proxy_log_events(proxy.log_path, phases)
    return {"phases": phases, "proxy_status": status}


def secsgem_phase(stack: Stack, seconds: float, t3: float, index: int) -> dict[str, Any]:
    """One secsgem SimTool, sequential, direct: shows what a secsgem tool alone can drive."""
    from orchestrator.devstack.hsms_sim import SimTool

    before_rx = {k: total for k, (_, total) in stack.received().items()}
    host, port = stack.active_targets()[0]
    tool = SimTool(host, port, stack.device_id, name="secsgem-tool", t3=t3)
    tool.start()
    try:
        tool.wait_selected(10)
        seq = 0
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            seq += 1
            tool.send_event(index * DATAID_STRIDE + seq)
    finally:
        tool.stop()
    st = tool.stats
    seen: dict[int, int] = {}
    for d in _new_dataids(stack, before_rx):
        seen[d] = seen.get(d, 0) + 1
    dup = sum(1 for c in seen.values() if c > 1)
    return {
        "phase": "direct 1x1 secsgem tool",
        "tools": 1,
        "window": 1,
        "seconds": seconds,
        **{k: st[k] for k in ("sent", "replied", "nacked", "timed_out", "rejected", "disconnects")},
        "late": 0,
        "host_primaries": st["host_primaries_answered"],
        "tps": round(st["replied"] / seconds, 1),
        "rtt_ms": {
            "p50": _ms(_pct(tool.rtts, 0.50)),
            "p99": _ms(_pct(tool.rtts, 0.99)),
            "max": _ms(max(tool.rtts) if tool.rtts else None),
        },
        "switches": [],
        "proxy_metrics_delta": {},
        "cpu_us_per_tx": {},
        "integrity": {
            "acked": st["replied"],
            "recorded": len(seen),
            "duplicated": dup,
            "acked_not_recorded": max(0, st["replied"] - len(seen)),
            "ok": dup == 0 and len(seen) >= st["replied"],
        },
    }


def _proxy_log_events(path: Path, phases: list[dict[str, Any]]) -> None:
    """Add the proxy's own view of each switch, from its JSON log: sessions handed over, the
    transactions still open on the old version, and how long the new backend session took."""
    events = []
    for line in path.read_text(errors="replace").splitlines():
        if '"hsms_handover"' in line or '"hsms_backend_selected"' in line:
            try:
                events.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                continue
    for ph in phases:
        sws = ph["switches"]
        for k, sw in enumerate(sws):
            start = sw["wall"]
            stop = sws[k + 1]["wall"] if k + 1 < len(sws) else float("inf")
            mine = [e for e in events if start <= e.get("ts", 0) < stop]
            handed = [e for e in mine if e.get("event") == "hsms_handover"]
            selected = [
                e
                for e in mine
                if e.get("event") == "hsms_backend_selected" and e.get("kind") == "handover"
            ]
            sw["proxy_sessions_handed_over"] = len(handed)
            sw["proxy_open_on_old"] = sum(int(e.get("open", 0)) for e in handed)
            ms = [float(e["ms"]) for e in selected if "ms" in e]
            sw["proxy_handover_ms_max"] = round(max(ms), 2) if ms else None
            sw["proxy_queued_max"] = max((int(e.get("queued", 0)) for e in selected), default=None)


def run_hsms_bench(
    seconds: float,
    tools: int,
    switch_every: float,
    out_dir: Path | str,
    *,
    window: int = 4,
    instances: int = 2,
    t3: float = 10.0,
    device_id: int = 0,
    log: Any = None,
) -> dict[str, Any]:
    """Run every phase and write hsms.json and hsms.md into out_dir; return the results."""
    if log is None:

        def log(msg: str) -> None:
            print(msg, file=sys.stderr, flush=True)

    if tools < 1 or (3 * tools + 1) * DATAID_STRIDE >= 2**32:
        raise BenchError("--tools must be between 1 and 142")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="zd-hsms-bench-") as tmp:
        stack = Stack(Path(tmp), instances, device_id)
        try:
            body = asyncio.run(_bench(stack, seconds, tools, window, switch_every, t3, log))
        finally:
            stack.stop()
    results = {
        "scenario": "hsms",
        "client": "benchmarks/hsms_load.py (raw asyncio HSMS; backends are secsgem sample-apps)",
        "params": {
            "seconds": seconds,
            "tools": tools,
            "window": window,
            "switch_every": switch_every,
            "instances_per_group": instances,
            "t3": t3,
        },
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        **body,
    }
    (out / "hsms.json").write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    (out / "hsms.md").write_text(markdown(results))
    return results


def markdown(r: dict[str, Any]) -> str:
    p = r["params"]
    lines = [
        f"### HSMS S6F11/S6F12 ({p['seconds']:g} s per load phase; load = {p['tools']} tools x "
        f"{p['window']} open transactions; 1x1 = one tool, one transaction at a time)",
        "",
        "| phase | tx/s | p50 ms | p99 ms | max ms | sent | replied | timed out | rejected | "
        "disconnects | lost/dup (backend record) | CPU µs/tx backend / proxy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for ph in r["phases"]:
        rtt, integ, cpu = ph["rtt_ms"], ph["integrity"], ph["cpu_us_per_tx"]
        lines.append(
            f"| {ph['phase']} | {ph['tps']:.0f} | {_f(rtt['p50'])} | {_f(rtt['p99'])} | "
            f"{_f(rtt['max'])} | {ph['sent']} | {ph['replied']} | {ph['timed_out']} | "
            f"{ph['rejected']} | {ph['disconnects']} | "
            f"{integ['acked_not_recorded']}/{integ['duplicated']} | "
            f"{_f(cpu.get('backends'), 0)} / {_f(cpu.get('proxy'), 0)} |"
        )
    if r.get("proxy_error"):
        lines += ["", f"Proxy phases not run: {r['proxy_error']}"]
    sw_phase = next((ph for ph in r["phases"] if ph["switches"]), None)
    if sw_phase:
        lines += [
            "",
            "| switch | to | open at switch (tools / proxy, old version) | proxy applied ms | "
            "handover ms (max) | primaries queued | new SOFTREV seen ms | slowest open tx ms |",
            "|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        for k, sw in enumerate(sw_phase["switches"], 1):
            lines.append(
                f"| {k} | {sw['to']} | {sw['open_at_switch']} / {sw.get('proxy_open_on_old', '-')} | "
                f"{_f(sw['applied_ms'])} | {_f(sw.get('proxy_handover_ms_max'))} | "
                f"{sw.get('proxy_queued_max', '-')} | {_f(sw['new_version_visible_ms'])} | "
                f"{_f(sw['open_max_rtt_ms'])} |"
            )
        d = sw_phase["proxy_metrics_delta"]
        hcount = d.get('zerodown_hsms_handover_seconds_count{kind="handover"}', 0.0)
        hsum = d.get('zerodown_hsms_handover_seconds_sum{kind="handover"}', 0.0)
        lines += [
            "",
            f"Proxy /metrics over the switch phase: handovers "
            f"{_sum(d, 'zerodown_hsms_handovers_total'):.0f}"
            + (f", mean handover {hsum / hcount * 1000:.1f} ms" if hcount else "")
            + f", rejected {_sum(d, 'zerodown_hsms_rejected_total'):.0f}"
            + " (old-version primaries "
            + f"{_sum(d, 'zerodown_hsms_old_version_primaries_rejected_total'):.0f})"
            + f", aborted {_sum(d, 'zerodown_hsms_aborted_total'):.0f}"
            + f", failovers {_sum(d, 'zerodown_hsms_failovers_total'):.0f}.",
        ]
    return "\n".join(lines) + "\n"


def _f(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


# -- CLI (wired as `zerodown bench hsms` by benchmarks/cli.py) ---------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--seconds", type=float, default=10.0, help="length of each phase (s) (default %(default)s)"
    )
    p.add_argument(
        "--tools", type=int, default=8, help="simulated tool sessions (default %(default)s)"
    )
    p.add_argument(
        "--window",
        type=int,
        default=4,
        help="S6F11 transactions open per tool (default %(default)s)",
    )
    p.add_argument(
        "--switch-every",
        type=float,
        default=2.0,
        help="switch period (s); 0 = none (default %(default)s)",
    )
    p.add_argument(
        "--instances", type=int, default=2, help="backend instances per group (default %(default)s)"
    )
    p.add_argument(
        "--t3", type=float, default=10.0, help="reply timeout T3 (s) (default %(default)s)"
    )
    p.add_argument(
        "--out", default=None, help="directory for hsms.json / hsms.md (default %(default)s)"
    )


def main(args: argparse.Namespace) -> int:
    out = Path(args.out or Path("bench-results") / time.strftime("%Y%m%d-%H%M%S"))
    try:
        if args.seconds <= 0 or args.window < 1 or args.instances < 1:
            raise BenchError("--seconds, --window and --instances must be positive")
        r = run_hsms_bench(
            args.seconds,
            args.tools,
            args.switch_every,
            out,
            window=args.window,
            instances=args.instances,
            t3=args.t3,
        )
    except (BenchError, OSError, TimeoutError) as exc:
        print(f"zerodown: hsms bench failed: {exc}", file=sys.stderr)
        return 1
    print(markdown(r))
    print(f"results: {out / 'hsms.json'}, {out / 'hsms.md'}")
    bad = [ph["phase"] for ph in r["phases"] if not ph["integrity"]["ok"] or ph["timed_out"]]
    if bad or r.get("proxy_error"):
        why = f"lost or duplicated transactions in {', '.join(bad)}" if bad else r["proxy_error"]
        print(f"zerodown: hsms bench incomplete: {why}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hsms_bench")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
