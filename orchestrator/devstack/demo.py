"""`zerodown demo`: a zero-downtime release on the local stack, measured from the client's side.

up -> steady load from keep-alive clients through the proxy -> deploy v2 to Standby -> switch ->
more load -> summary -> down. Exit 0 only with zero errors and no v1 answer to a request sent
after the proxy applied the switch.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from ..backend import Refused
from ..local_stack import down, load_stack, up
from ..release_local import LocalBackend


@dataclass
class LoadStats:
    samples: list[tuple[float, float, str]] = field(default_factory=list)  # sent, done, version
    errors: list[str] = field(default_factory=list)


async def _client(url: str, stats: LoadStats, stop: asyncio.Event) -> None:
    conn = aiohttp.TCPConnector(limit=1, force_close=False)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        while not stop.is_set():
            sent = time.monotonic()
            try:
                async with session.get(url) as r:
                    await r.read()
                    if r.status != 200:
                        stats.errors.append(f"HTTP {r.status}")
                        continue
                    version = r.headers.get("X-Backend-Version", "?")
            except (TimeoutError, aiohttp.ClientError) as exc:
                stats.errors.append(f"{type(exc).__name__}: {exc}")
                continue
            stats.samples.append((sent, time.monotonic(), version))
            await asyncio.sleep(0.002)  # a steady ~few hundred req/s per client, not a flood


async def _demo(args: argparse.Namespace, state_dir: Path) -> int:
    say = print
    backend = LocalBackend(state_dir)
    stack = load_stack(backend.paths)
    url = f"http://127.0.0.1:{stack['proxy']['http']}/"
    stats = LoadStats()
    stop = asyncio.Event()
    clients = [asyncio.create_task(_client(url, stats, stop)) for _ in range(args.clients)]
    t0 = time.monotonic()
    say(f"load: {args.clients} keep-alive clients -> {url}")
    hsms = None
    if stack["proxy"].get("hsms"):
        from .demo_hsms import HsmsLoad

        hsms = HsmsLoad(stack["proxy"]["hsms"])
        await asyncio.to_thread(hsms.start)
        say(f"load: {len(hsms.tools)} HSMS tools sending S6F11 -> :{stack['proxy']['hsms']}")
    await asyncio.sleep(args.seconds)
    say("deploy v2 to the Standby group:")
    await backend.deploy("drimeap", "v2", None, lambda m: say("  " + m))
    say("switch:")
    switch_start = time.monotonic()
    outcome = await backend.switch("drimeap", None, lambda m: say("  " + m))
    applied = time.monotonic()  # every proxy has reported the new generation by now
    if hsms is not None:
        hsms.switch_applied()
    await asyncio.sleep(args.seconds)
    stop.set()
    await asyncio.gather(*clients)
    hs = await asyncio.to_thread(hsms.stop) if hsms is not None else None
    elapsed = time.monotonic() - t0

    before = Counter(v for sent, _, v in stats.samples if sent < switch_start)
    after = Counter(v for sent, _, v in stats.samples if sent >= applied)
    stale = after.get(outcome.from_version or "", 0)
    fmt = lambda c: ", ".join(f"{v}: {n}" for v, n in sorted(c.items())) or "none"  # noqa: E731
    ok = not stats.errors and stale == 0 and after and set(after) == {outcome.to_version}
    ok = ok and (hs is None or hs.ok(outcome.to_version))
    say("")
    say(f"zerodown demo summary ({elapsed:.1f} s, {args.clients} keep-alive clients)")
    say(f"  requests answered        {len(stats.samples)}")
    say(f"  errors                   {len(stats.errors)}"
        + (f"  (first: {stats.errors[0]})" if stats.errors else ""))  # fmt: skip
    say(f"  before the switch        {fmt(before)}")
    say(f"  after it was applied     {fmt(after)}")
    say(f"  {outcome.from_version} answers after the switch was applied: {stale}")
    say(f"  switch {outcome.from_group} -> {outcome.to_group} applied by "
        f"{outcome.proxies} proxy in {outcome.propagation_s * 1000:.1f} ms "
        f"(generation {outcome.generation})")  # fmt: skip
    if hs is not None:
        say(f"  HSMS event reports       {hs.replied}/{hs.sent} answered by {hs.tools} tools, "
            f"{hs.disconnects} reconnects, {hs.selects} selects"
            + (f"  (first error: {hs.errors[0]})" if hs.errors else ""))  # fmt: skip
        say(f"  HSMS S1F1 after switch   {fmt(Counter(hs.versions_after))}")
    say("  result: " + ("OK, zero downtime" if ok else "FAILED"))
    return 0 if ok else 1


def run_demo(args: argparse.Namespace) -> int:
    tmp = None
    if args.state_dir:
        state_dir = Path(args.state_dir).resolve()
    else:
        tmp = tempfile.TemporaryDirectory(prefix="zerodown-demo-")
        state_dir = Path(tmp.name)
    print(f"starting the local stack in {state_dir}")
    try:
        up(
            state_dir,
            http_listen=args.http_listen,
            hsms_listen=args.hsms_listen,
            admin_listen=args.admin_listen,
            version="v1",
            hsms=not getattr(args, "no_hsms", False),
            progress=lambda m: print("  " + m),
        )
    except Refused as exc:
        raise Refused(f"could not start the local stack: {exc}") from None
    try:
        return asyncio.run(_demo(args, state_dir))
    finally:
        down(state_dir, progress=lambda m: print("  " + m))
        if tmp is not None:
            tmp.cleanup()
