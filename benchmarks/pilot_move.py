"""Pilot move time: how long after a pilot is added (or removed) the piloted tool's next primary
is answered by the Standby (or Active) version, while other tools keep their load.

Backends are `zerodown sample-app --hsms-port` processes (blue v1, green v2; secsgem hosts), the
proxy watches a registry file (exactly what `zerodown pilot add` writes in local mode). Four
raw-socket tools (benchmarks/hsms_load.py) connect from 127.0.0.2..5 and keep `window` S6F11
transactions open each; the tool at 127.0.0.3 is piloted and un-piloted `rounds` times. Per move:

- applied: from the registry write until the proxy reports the generation (admin /v1/status);
- answered: from the write until an S1F1 probe of the piloted tool first gets the other SOFTREV
  (probes back to back, so the resolution is one probe round trip);
- the proxy's own `zerodown_hsms_handover_seconds{kind="pilot"}`: from the snapshot being
  applied until the tool's new backend session was selected.

The load must lose nothing: disconnects, timed-out transactions and Reject.req are printed and
must be 0. `python -m benchmarks.pilot_move --rounds 20`.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from .hsms_bench import BenchError, Stack
from .hsms_load import LoadTool, merged

SOURCES = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
PILOT = 1  # the tool at 127.0.0.3
T3 = 45.0


async def _connect(port: int, window: int) -> list[LoadTool]:
    loop = asyncio.get_running_loop()
    tools = []
    for k, src in enumerate(SOURCES):
        _, proto = await loop.create_connection(
            lambda k=k: LoadTool(k, 0, window, T3), "127.0.0.1", port, local_addr=(src, 0)
        )
        tool: LoadTool = proto  # type: ignore[assignment]
        await tool.select(10.0)
        tools.append(tool)
    return tools


async def _until_version(tool: LoadTool, version: str, t0: float, timeout: float) -> float:
    while time.perf_counter() - t0 < timeout:
        if await tool.softrev(5.0) == version:
            return time.perf_counter() - t0
    raise BenchError(f"the piloted tool was not answered by {version} within {timeout:g} s")


def _pilot_histogram(metrics: str) -> tuple[float, float]:
    total = re.search(r'^zerodown_hsms_handover_seconds_sum\{kind="pilot"\} (\S+)$', metrics, re.M)
    count = re.search(r'^zerodown_hsms_handover_seconds_count\{kind="pilot"\} (\S+)$', metrics,
                      re.M)  # fmt: skip
    return (float(total.group(1)) if total else 0.0, float(count.group(1)) if count else 0.0)


async def _run(stack: Stack, rounds: int, window: int) -> dict[str, Any]:
    proxy = stack.start_proxy(T3)
    tools = await _connect(proxy.ports["hsms"], window)
    end = time.monotonic() + 3600
    for t in tools:
        t.start(end)
    applied: list[float] = []
    answered: list[float] = []
    try:
        for _ in range(rounds):
            for pilots, want in (({"group": "green", "tools": [SOURCES[PILOT]]}, "v2"),
                                 (None, "v1")):  # fmt: skip
                t0 = time.perf_counter()
                gen = await asyncio.to_thread(stack.write_registry, "blue", pilots)
                answer = asyncio.create_task(_until_version(tools[PILOT], want, t0, 10.0))
                await asyncio.to_thread(stack.wait_generation, gen, 10.0)
                applied.append(time.perf_counter() - t0)
                answered.append(await answer)
                for t in tools:
                    t.expire(time.monotonic())
                await asyncio.sleep(0.2)
    finally:
        for t in tools:
            t.close()
    metrics = _metrics(stack)
    total, count = _pilot_histogram(metrics)
    load = merged(tools)
    return {
        "moves": len(applied),
        "applied_ms": _summary(applied),
        "answered_ms": _summary(answered),
        "proxy_pilot_handover_ms_mean": round(total / count * 1000, 2) if count else None,
        "load": {
            k: load[k]
            for k in ("sent", "replied", "nacked", "timed_out", "rejected", "disconnects")
        },  # fmt: skip
    }


def _metrics(stack: Stack) -> str:
    import urllib.request

    with urllib.request.urlopen(stack.admin("/metrics"), timeout=10) as r:
        return r.read().decode()


def _summary(values: list[float]) -> dict[str, float]:
    ms = sorted(v * 1000 for v in values)
    return {
        "median": round(statistics.median(ms), 2),
        "p90": round(ms[int(0.9 * (len(ms) - 1))], 2),
        "max": round(ms[-1], 2),
        "min": round(ms[0], 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pilot_move",
                                description=__doc__.splitlines()[0])  # fmt: skip
    p.add_argument("--rounds", type=int, default=10, help="pilot add + remove cycles")
    p.add_argument("--window", type=int, default=4, help="open S6F11 transactions per tool")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if not 1 <= args.rounds <= 500 or not 1 <= args.window <= 64:
        p.error("--rounds must be 1..500 and --window 1..64")
    with tempfile.TemporaryDirectory(prefix="zerodown-pilot-") as tmp:
        stack = Stack(Path(tmp), instances=1, device_id=0)
        try:
            res = asyncio.run(_run(stack, args.rounds, args.window))
        finally:
            stack.stop()
    if args.json:
        print(orjson.dumps(res, option=orjson.OPT_INDENT_2).decode())
    else:
        a, w = res["applied_ms"], res["answered_ms"]
        print(f"pilot moves: {res['moves']} (add and remove, 4 tools under load)")
        print(f"  registry write -> proxy applied:   median {a['median']} ms, p90 {a['p90']} ms, "
              f"max {a['max']} ms")  # fmt: skip
        print(f"  registry write -> answered by new: median {w['median']} ms, p90 {w['p90']} ms, "
              f"max {w['max']} ms")  # fmt: skip
        print(f"  proxy: applied -> Standby session selected, mean "
              f"{res['proxy_pilot_handover_ms_mean']} ms")  # fmt: skip
        print(f"  load: {res['load']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
