"""The benchmark scenarios: generator check, steady open-loop load with switches, closed loop.

Each scenario starts its own four nginx backends in a temporary directory, runs every proxy
under test alone against them with the same generator, and returns plain dicts (JSON-ready)
for report.py and plots.py. Nothing is left running when a scenario returns or raises.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .closed_loop import pin_cores, run_wrk, taskset
from .loadgen import LoadRun, LoadSpec
from .stats import SwitchEvent, propagation, summarise, time_series
from .targets import GROUP_VERSION, PROXIES, Backends, Direct, Proxy, workdir

Log = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class BenchConfig:
    seconds: float = 60.0  # each steady run
    rates: tuple[float, ...] = (1000.0, 10000.0)
    switch_every: float = 10.0
    warmup: float = 2.0  # unrecorded load at the target rate before each open-loop run
    proxies: tuple[str, ...] = ("zerodown", "nginx-watch", "nginx-reload")
    # Proxy workers in the open-loop runs, the same for every proxy. Two: one zerodown worker
    # needs ~0.6 of a core at 10,000 requests/s, too close to what is left of a 2-core machine
    # next to the generator and the backends (the closed-loop runs cover 1 and 2 workers).
    workers: int = 2
    closed_workers: tuple[int, ...] = (1, 2)
    closed_seconds: float = 20.0
    # Closed loop: "unpinned", and "pinned" = the proxy alone on one core, wrk and the
    # backends on the other (taskset), for zerodown and nginx alike.
    pinning: tuple[str, ...] = ("unpinned", "pinned")
    connections: int = 50
    check_rate: float = 10000.0
    check_seconds: float = 20.0
    max_in_flight: int = 1000
    processes: int = 0  # generator processes, 0 = automatic
    extra: dict[str, Any] = field(default_factory=dict)


def _other(group: str) -> str:
    return "green" if group == "blue" else "blue"


def _steady_one(proxy: Proxy, port: int, rate: float, cfg: BenchConfig, log: Log) -> dict[str, Any]:
    spec = LoadSpec(
        "127.0.0.1",
        port,
        rate=rate,
        seconds=cfg.seconds,
        max_in_flight=cfg.max_in_flight,
        processes=cfg.processes,
    )
    if cfg.warmup > 0:
        # Every proxy starts cold (no pooled backend connections, lazily created state); the
        # first second would measure that, not the steady state. Same warm-up for every proxy.
        LoadRun(replace(spec, seconds=cfg.warmup)).wait()
    cpu0 = proxy.cpu_seconds()
    run = LoadRun(spec)
    switches: list[SwitchEvent] = []
    try:
        k = 1
        while cfg.switch_every > 0 and k * cfg.switch_every < cfg.seconds:
            wait = run.t0 + k * cfg.switch_every - time.monotonic()
            if wait > 0:
                time.sleep(wait)  # pacing the switches of a running benchmark, not a test wait
            old = proxy.active
            new = _other(old)
            returned, applied = proxy.switch(new)
            switches.append(
                SwitchEvent(
                    at=returned - run.t0,
                    old=GROUP_VERSION[old],
                    new=GROUP_VERSION[new],
                    applied=None if applied is None else applied - run.t0,
                )
            )
            k += 1
        raw = run.wait()
    except BaseException:
        run.kill()
        raise
    cpu = proxy.cpu_seconds() - cpu0
    summary = summarise(raw)
    log(
        f"  {proxy.name:<13} {rate:>6.0f} rps: {summary.requests} req, "
        f"{summary.failures} failed, {summary.dropped} dropped, p95 {summary.p95_ms:.2f} ms, "
        f"p99 {summary.p99_ms:.2f} ms, max {summary.max_ms:.1f} ms, "
        f"proxy CPU {1e6 * cpu / max(1, summary.requests):.0f} us/request"
    )
    return {
        "summary": summary.to_dict(),
        "proxy_cpu_s": cpu,
        "cpu_us_per_request": 1e6 * cpu / max(1, summary.requests),
        "series": time_series(raw),
        "switches": [
            {"at": s.at, "old": s.old, "new": s.new, "applied": s.applied} for s in switches
        ],
        "propagation": [p.to_dict() for p in propagation(raw, switches)],
    }


def generator_check(cfg: BenchConfig, log: Log) -> dict[str, Any]:
    """The generator against one nginx backend directly: can it hold the target rate?"""
    with workdir() as tmp:
        backends = Backends(Path(tmp))
        try:
            backends.start()
            target = Direct(backends, Path(tmp))
            port = target.start(1)
            spec = LoadSpec(
                "127.0.0.1",
                port,
                rate=cfg.check_rate,
                seconds=cfg.check_seconds,
                max_in_flight=cfg.max_in_flight,
                processes=cfg.processes,
            )
            run = LoadRun(spec)
            raw = run.wait()
        finally:
            backends.stop()
    s = summarise(raw)
    ok = s.achieved_rate >= 0.99 * cfg.check_rate and s.failures == 0 and s.dropped == 0
    log(
        f"  generator: {s.achieved_rate:.0f} of {cfg.check_rate:.0f} rps "
        f"({100 * s.achieved_rate / cfg.check_rate:.1f} %), {s.failures} failed, "
        f"{s.dropped} dropped, p99 {s.p99_ms:.2f} ms, start lag p99 {s.start_lag_p99_ms:.2f} ms"
    )
    return {"summary": s.to_dict(), "series": time_series(raw), "reaches_target": ok}


def steady(cfg: BenchConfig, log: Log) -> dict[str, Any]:
    """Each rate x each proxy: open-loop load with a switch every `switch_every` seconds."""
    out: dict[str, Any] = {}
    with workdir() as tmp:
        backends = Backends(Path(tmp))
        try:
            backends.start()
            for rate in cfg.rates:
                per_proxy: dict[str, Any] = {}
                for name in cfg.proxies:
                    proxy = PROXIES[name](backends, Path(tmp) / f"{name}-{int(rate)}")
                    try:
                        port = proxy.start(cfg.workers)
                        per_proxy[name] = {
                            "label": proxy.label,
                            "workers": cfg.workers,
                            **_steady_one(proxy, port, rate, cfg, log),
                        }
                    finally:
                        proxy.stop()
                out[str(int(rate))] = per_proxy
        finally:
            backends.stop()
    return out


def closed(cfg: BenchConfig, log: Log) -> dict[str, Any]:
    """wrk -c N against each proxy at each worker count (and one backend directly), once per
    pinning mode: {"unpinned": {...}, "pinned": {...}} (pinned is skipped on one core)."""
    out: dict[str, Any] = {}
    cores = pin_cores()
    for mode in cfg.pinning:
        if mode == "pinned" and cores is None:
            log("  pinned: skipped (needs 2 cores and taskset)")
            out["pinned"] = {"skipped": "needs 2 cores and taskset (util-linux)"}
            continue
        proxy_pin, rest_pin = (
            (taskset(cores[0]), taskset(cores[1])) if mode == "pinned" and cores else ((), ())
        )
        log(
            f"  {mode}"
            + (
                f": proxy on core {cores[0]}, wrk and backends on core {cores[1]}"
                if proxy_pin and cores
                else ""
            )
        )
        out[mode] = _closed_mode(cfg, log, proxy_pin, rest_pin)
    return out


def _closed_mode(
    cfg: BenchConfig, log: Log, proxy_pin: tuple[str, ...], rest_pin: tuple[str, ...]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    names = ["zerodown", "nginx-reload"]  # without switches the two nginx variants are identical
    with workdir() as tmp:
        backends = Backends(Path(tmp), wrapper=rest_pin)
        try:
            backends.start()
            port = backends.ports("blue")[0]
            direct = run_wrk(port, cfg.closed_seconds, cfg.connections, wrapper=rest_pin)
            out["direct"] = {"1": direct.to_dict()}
            log(f"  direct (1 backend)  : {direct.rps:>9.0f} rps, p99 {direct.p99_ms:.2f} ms")
            for name in names:
                out[name] = {}
                for workers in cfg.closed_workers:
                    proxy = PROXIES[name](
                        backends, Path(tmp) / f"closed-{name}-{workers}", wrapper=proxy_pin
                    )
                    try:
                        port = proxy.start(workers)
                        cpu0 = proxy.cpu_seconds()
                        r = run_wrk(port, cfg.closed_seconds, cfg.connections, wrapper=rest_pin)
                        cpu = proxy.cpu_seconds() - cpu0
                    finally:
                        proxy.stop()
                    us = 1e6 * cpu / max(1, r.requests)
                    out[name][str(workers)] = {**r.to_dict(), "cpu_us_per_request": us}
                    log(
                        f"  {name:<13} {workers} worker(s): {r.rps:>9.0f} rps, p99 {r.p99_ms:.2f} ms"
                        f", {r.errors} socket errors, {r.non_2xx} non-2xx, CPU {us:.0f} us/request"
                    )
        finally:
            backends.stop()
    return out


def machine() -> dict[str, Any]:
    return {"cores": os.cpu_count(), "load_before": os.getloadavg()[0]}
