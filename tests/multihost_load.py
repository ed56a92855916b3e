"""Load for the multi-host test, run on its own host (network namespace): keep-alive GETs to
each target in turn until SIGTERM, then one JSON report: per target the responses, the errors
(with what went wrong) and every change of X-Backend-Version with its wall-clock time.

    python -m tests.multihost_load --out report.json --ready F NAME=HOST:PORT ...
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from pathlib import Path

import aiohttp
import orjson


async def drive(name: str, url: str, stop: asyncio.Event, report: dict) -> None:
    mine = report[name] = {"ok": 0, "errors": [], "versions": []}
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        while not stop.is_set():
            try:
                async with s.get(url) as r:
                    await r.read()
                    version = r.headers.get("X-Backend-Version", "?")
                    if r.status != 200:
                        mine["errors"].append(f"{time.time():.3f} status {r.status}")
                    else:
                        mine["ok"] += 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                mine["errors"].append(f"{time.time():.3f} {type(exc).__name__}: {exc}")
                await asyncio.sleep(0.05)
                continue
            if not mine["versions"] or mine["versions"][-1][1] != version:
                mine["versions"].append((round(time.time(), 3), version))
            await asyncio.sleep(0.01)  # ~50-100 requests/s per target


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--ready", required=True)
    p.add_argument("targets", nargs="+")
    args = p.parse_args()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    report: dict = {}
    tasks = []
    for t in args.targets:
        name, _, addr = t.partition("=")
        tasks.append(asyncio.create_task(drive(name, f"http://{addr}/", stop, report)))
    Path(args.ready).write_text("ready")
    await asyncio.gather(*tasks)
    Path(args.out).write_bytes(orjson.dumps(report))


if __name__ == "__main__":
    asyncio.run(main())
