"""The fab's HSMS side: `tools` HSMS tools through one zerodown proxy, each sending an S6F11
every `period` seconds (open loop, evenly phased), across `switches` blue/green switches.

Backends: two benchmarks/hsms_responder.py processes per group (raw asyncio HSMS peers; the
secsgem sample host runs a thread per session). The tools are benchmarks/hsms_load.py sessions
in this process. Reported: disconnects and lost events (must both be 0; lost = sent and not
acknowledged with S6F12 <B 0>, or acknowledged but missing from the backends' records), per
switch the handover time of every tool session (from the registry write to the proxy's
`hsms_backend_selected` log event of kind handover for that tool: p50/p99/max over the
sessions), the S6F11 round trip, and the proxy's RSS per tool session (RSS with every session
selected on a backend minus the RSS before the first tool, divided by the tools).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from array import array
from pathlib import Path
from typing import Any

import orjson

from .hsms_load import LoadTool, connect_tools, merged, wait_drained
from .nginx import BenchError
from .targets import ROOT, Backends, ZerodownProxy

GROUPS = {"blue": "v1", "green": "v2"}
FAB_STRIDE = 100_000  # DATAIDs per tool: 1,000 tools x 100,000 stays below 2**32


def schedstat(pid: int | None) -> tuple[int, int]:
    """/proc/<pid>/schedstat: (ns on a CPU, ns runnable but waiting for one); (0, 0) if gone."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            on_cpu, waiting, _ = f.read().split()
        return int(on_cpu), int(waiting)
    except (OSError, ValueError):
        return 0, 0


class PacedTool(LoadTool):
    """A tool that sends when told (send_event), not when a reply frees its window."""

    stride = FAB_STRIDE

    def _fill(self) -> None:  # replies and expiries never trigger a send
        return


class Responders:
    """`per_group` hsms_responder processes per group."""

    def __init__(self, workdir: Path, per_group: int) -> None:
        self.workdir = workdir
        self.items: list[dict[str, Any]] = []
        try:
            for group, version in GROUPS.items():
                for k in range(1, per_group + 1):
                    self.items.append(self._start(f"{group}-{k}", group, version))
        except BaseException:
            self.stop()
            raise

    def _start(self, name: str, group: str, version: str) -> dict[str, Any]:
        ready = self.workdir / f"responder-{name}.json"
        record = self.workdir / f"responder-{name}.bin"
        log = open(self.workdir / f"responder-{name}.log", "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.hsms_responder", "--version", version]
            + ["--ready", str(ready), "--record", str(record)],
            stdout=log, stderr=log, env={**os.environ, "PYTHONPATH": str(ROOT)},
            start_new_session=True,
        )  # fmt: skip
        log.close()
        item = {"name": name, "group": group, "version": version, "proc": proc, "record": record}
        self.items.append(item)  # stopped by stop() even if it never becomes ready
        deadline = time.monotonic() + 60
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"HSMS responder {name} did not start (see {log.name})")
            time.sleep(0.02)
        self.items.pop()
        item.update(orjson.loads(ready.read_bytes()))
        return item

    def stop(self) -> dict[str, array]:
        """Stop every responder; their records (DATAIDs received) by name."""
        records: dict[str, array] = {}
        for it in self.items:
            proc: subprocess.Popen = it["proc"]
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            rec = array("I")
            if it["record"].exists():
                rec.frombytes(it["record"].read_bytes())
            records[it["name"]] = rec
        self.items = []
        return records


class FabHsmsProxy(ZerodownProxy):
    """zerodown with HSMS on, routing drimeap's tools to the responders."""

    def __init__(
        self, responders: Responders, workdir: Path, t3: float, wrapper: tuple[str, ...] = ()
    ) -> None:
        super().__init__(Backends(workdir), workdir, wrapper=wrapper)
        self.responders = responders
        self.hsms_config = f"enabled = true\nt3 = {t3:g}\n"
        self.log_level = "info"  # the per-tool hsms_backend_selected events

    def apps(self, active: str) -> dict[str, Any]:
        instances = [
            {"id": f"drimeap-{r['name']}", "group": r["group"], "version": r["version"],
             "address": "127.0.0.1", "http_port": r["http"], "hsms_port": r["hsms"],
             "healthy": True}
            for r in self.responders.items
        ]  # fmt: skip
        return {"drimeap": {"active": active, "instances": instances, "hsms_device_id": 0}}

    def _generation(self) -> int:
        # /health, not /v1/status: the status page lists every tool session (1,000 here), and
        # polling it every 2 ms during a switch would load the proxy the switch is timing.
        url = f"http://127.0.0.1:{self.admin}/health"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return int(json.loads(r.read())["generation"])
        except urllib.error.HTTPError as exc:  # 503 (e.g. stale) still carries the generation
            return int(json.loads(exc.read())["generation"])

    def status(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.admin}/v1/status"
        with urllib.request.urlopen(url, timeout=30) as r:
            return json.loads(r.read())

    def schedstat(self) -> tuple[int, int, int]:
        """(ns on a CPU, ns runnable but waiting for one) of the proxy's main thread, and the
        second figure for the backends (responders) together."""
        on_cpu, waiting = schedstat(self.pid())
        backends = sum(schedstat(r["proc"].pid)[1] for r in self.responders.items)
        return on_cpu, waiting, backends

    def rss(self) -> int:
        import psutil

        pid = self.pid()
        return psutil.Process(pid).memory_info().rss if pid else 0

    def wait_sessions(self, tools: int, version: str, timeout: float) -> float | None:
        """Seconds until all `tools` sessions are selected on `version`, none draining."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            sessions = self.status().get("hsms", {}).get("sessions", [])
            done = [
                s for s in sessions
                if s["backend"] and s["backend"]["state"] == "selected"
                and s["backend"]["version"] == version and not s["draining"]
            ]  # fmt: skip
            if len(done) >= tools:
                return time.monotonic() - t0
            time.sleep(0.25)
        return None


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def _connect(port: int, tools: int, t3: float) -> list[LoadTool]:
    """Connect and select in batches of 50 at once (a fab's tools do not come one by one)."""
    out: list[LoadTool] = []
    batch = 50
    for first in range(0, tools, batch):
        n = min(batch, tools - first)
        parts = await asyncio.gather(
            *(connect_tools([("127.0.0.1", port)], 1, 0, 0, t3, first + k + 1, PacedTool)
              for k in range(n))
        )  # fmt: skip
        out.extend(t for part in parts for t in part)
    return out


async def _drive(
    proxy: FabHsmsProxy, tools: list[LoadTool], seconds: float, period: float,
    switch_every: float, switches: int, t3: float,
) -> list[dict[str, Any]]:  # fmt: skip
    """Paced S6F11s from every tool for `seconds`; a switch every `switch_every` s."""
    n = len(tools)
    t0 = time.perf_counter()
    end = t0 + seconds
    for t in tools:
        t.start(end)
    done: list[dict[str, Any]] = []

    async def switcher() -> None:
        # The proxy's event-loop thread in the `window` s after each switch, less the same
        # length just before it (/proc/<pid>/schedstat, ns): the CPU the handovers cost, and
        # the time the proxy was runnable but waiting for a CPU (a loaded machine's share).
        window = max(0.2, min(5.0, switch_every / 2 - 0.1))
        for k in range(1, switches + 1):
            at = t0 + k * switch_every
            await asyncio.sleep(max(0.0, at - window - time.perf_counter()))
            before = proxy.schedstat()
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            start = proxy.schedstat()
            new = "green" if proxy.active == "blue" else "blue"
            wall = time.time()
            returned, applied = await asyncio.to_thread(proxy.switch, new)
            await asyncio.sleep(max(0.0, at + window - time.perf_counter()))
            after = proxy.schedstat()
            cpu, wait, bwait = (
                (a - s) - (s - b) for a, s, b in zip(after, start, before, strict=True)
            )
            done.append({"to": new, "wall": wall,
                         "applied_ms": 1000 * ((applied or returned) - returned),
                         "switch_cpu_ms": round(cpu / 1e6, 1),
                         "switch_runqueue_wait_ms": round(wait / 1e6, 1),
                         "backends_runqueue_wait_ms": round(bwait / 1e6, 1)})  # fmt: skip

    task = asyncio.create_task(switcher())
    i = 0
    next_expire = t0
    while True:
        at = t0 + (i // n) * period + (i % n) * period / n
        if at >= end:
            break
        now = time.perf_counter()
        if at > now:
            await asyncio.sleep(at - now)
        tools[i % n].send_event()
        i += 1
        if now >= next_expire:
            next_expire = now + 0.5
            for t in tools:
                t.expire(now)
    await task
    await wait_drained(tools, t3 + 2.0)
    return done


def _handover_times(log_path: Path, switches: list[dict[str, Any]]) -> None:
    """Per switch: every tool's handover time from the proxy's JSON log (ts - write time)."""
    events = []
    for line in log_path.read_text(errors="replace").splitlines():
        if '"hsms_backend_selected"' in line and '"handover"' in line:
            try:
                e = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if e.get("kind") == "handover":
                events.append(e)
    for k, sw in enumerate(switches):
        stop = switches[k + 1]["wall"] if k + 1 < len(switches) else float("inf")
        ms = [1000 * (e["ts"] - sw["wall"]) for e in events if sw["wall"] <= e["ts"] < stop]
        sw["sessions_handed_over"] = len(ms)
        sw["handover_ms"] = {
            "p50": _pct(ms, 0.5), "p99": _pct(ms, 0.99), "max": max(ms) if ms else None,
        }  # fmt: skip


def run_fab_hsms(
    workdir: Path, tools: int, switches: int, switch_every: float, period: float,
    log: Any, t3: float = 10.0, per_group: int = 2, nice: int = 0,
) -> dict[str, Any]:  # fmt: skip
    if not 1 <= tools <= 40_000:
        raise BenchError(f"--tools must be between 1 and 40000, got {tools}")
    seconds = (switches + 1) * switch_every
    responders = Responders(workdir, per_group)
    proxy: FabHsmsProxy | None = None
    records: dict[str, array] = {}
    try:
        # nice < 0 (root): the proxy ahead of the machine's other work, as if it had its core.
        wrapper = ("nice", "-n", str(nice)) if nice else ()
        proxy = FabHsmsProxy(responders, workdir, t3, wrapper)
        proxy.start(1)
        port = proxy.ports["hsms"]
        time.sleep(1.0)  # a settled idle proxy (first health checks done) for the baseline
        rss0 = proxy.rss()
        cpu0 = proxy.cpu_seconds()
        loop = asyncio.new_event_loop()
        try:
            t_conn = time.monotonic()
            sessions = loop.run_until_complete(_connect(port, tools, t3))
            connect_s = time.monotonic() - t_conn
            log(f"  {tools} tools selected through the proxy in {connect_s:.1f} s")
            ready_s = proxy.wait_sessions(tools, GROUPS["blue"], 120)
            if ready_s is None:
                raise BenchError(f"not all {tools} tool sessions got a backend session in 120 s")
            rss1 = proxy.rss()
            log(f"  RSS {rss0 / 2**20:.1f} MiB idle -> {rss1 / 2**20:.1f} MiB with {tools} "
                f"sessions: {(rss1 - rss0) / tools / 1024:.1f} KiB per tool session")  # fmt: skip
            sw = loop.run_until_complete(
                _drive(proxy, sessions, seconds, period, switch_every, switches, t3)
            )
            last = GROUPS[proxy.active]
            settled = proxy.wait_sessions(tools, last, 60)
            rss2 = proxy.rss()
            cpu = proxy.cpu_seconds() - cpu0
            for t in sessions:
                t.close()
            loop.run_until_complete(asyncio.sleep(0.5))
        finally:
            loop.close()
    finally:
        if proxy is not None:
            proxy.stop()
        records = responders.stop()
    assert proxy is not None
    _handover_times(proxy.dir / "proxy.log", sw)
    totals = merged(sessions)
    rtts = [r for t in sessions for r in t.stats.rtts]
    recorded: dict[int, int] = {}
    for rec in records.values():
        for d in rec:
            recorded[d] = recorded.get(d, 0) + 1
    acked = [d for t in sessions for d in t.stats.dataids_replied]
    missing = sum(1 for d in acked if d not in recorded)
    p99s = [s["handover_ms"]["p99"] for s in sw if s["handover_ms"]["p99"] is not None]
    return {
        "tools": tools, "nice": nice, "switches": switches, "switch_every": switch_every, "period": period,
        "seconds": seconds, **totals,
        "lost": totals["sent"] - totals["replied"] + missing,
        "acked_not_recorded": missing,
        "duplicated": sum(1 for c in recorded.values() if c > 1),
        "rtt_ms": {"p50": _ms(_pct(rtts, 0.5)), "p99": _ms(_pct(rtts, 0.99)),
                   "max": _ms(max(rtts) if rtts else None)},
        "switch_log": [{k: v for k, v in s.items() if k != "wall"} for s in sw],
        "handover_p99_ms_worst": max(p99s) if p99s else None,
        "all_handed_over": all(s["sessions_handed_over"] >= tools for s in sw),
        "settled_after_last_s": settled,
        "connect_s": round(connect_s, 2),
        "rss_idle_mib": rss0 / 2**20, "rss_sessions_mib": rss1 / 2**20,
        "rss_end_mib": rss2 / 2**20,
        "rss_kib_per_session": (rss1 - rss0) / tools / 1024,
        "proxy_cpu_us_per_event": 1e6 * cpu / max(1, totals["replied"]),
    }  # fmt: skip


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 3)
