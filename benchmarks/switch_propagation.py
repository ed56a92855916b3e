"""Switch propagation through Consul: time from the CAS write of `zerodown/<app>/active` until
every proxy reports the new generation at its admin /v1/status.

    python -m benchmarks.switch_propagation --proxies 3 --switches 50

Starts N `zerodown proxy` processes (Consul discovery provider) and one sample-app instance per
group, against the Consul test double — or the real Consul agent at CONSUL_HTTP_ADDR when set —
then performs the switches through NomadConsulBackend.switch (the code behind `zerodown
switch`), alternating blue/green. Nomad is not needed: the switch reads group sizes from Nomad
only when NOMAD_ADDR is set. The measured time includes the CLI's polling of the proxies'
admin API (every 5 ms), so it is an upper bound of the proxies' own reaction.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
APP = "drimeap"


def _proxy_config(consul_url: str, token: str) -> str:
    return "\n".join(
        [
            "[proxy]",
            'http_listen = "127.0.0.1:0"',
            'admin_listen = "127.0.0.1:0"',
            'admin_token = "bench-token"',
            "shutdown_grace = 2.0",
            "[hsms]",
            "enabled = false",
            "[discovery]",
            'provider = "consul"',
            "[consul]",
            f'addr = "{consul_url}"',
            f'token = "{token}"',
            "check_ttl = 5.0",
            "",
        ]
    )


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def _switches(backend: Any, n: int, pause: float) -> list[float]:
    from orchestrator.backend import Refused

    times = []
    for i in range(n):
        try:
            out = await backend.switch(APP, None, lambda msg: None)
        except Refused as exc:
            raise SystemExit(f"switch {i + 1} failed: {exc}") from None
        times.append(out.propagation_s)
        # Operators do not switch several times a second; the proxies' watches also rate-limit
        # themselves (min_request_interval), which back-to-back switches would measure instead.
        await asyncio.sleep(pause)
    return times


def run(args: argparse.Namespace) -> dict[str, Any]:
    from orchestrator.devstack.children import ProxyProc, SampleApp, wait_until
    from orchestrator.release_nomad import NomadConsulBackend, Settings

    work = Path(tempfile.mkdtemp(prefix="zd-switch-bench-"))
    real = os.environ.get("CONSUL_HTTP_ADDR")
    fake = None
    started: list[Any] = []
    if real:
        from orchestrator.hashicorp_api import normalize_addr

        consul_url = normalize_addr(real)
        token = os.environ.get("CONSUL_HTTP_TOKEN", "")
    else:
        from orchestrator.devstack.fakes.consul import FakeConsul

        fake = FakeConsul()
        consul_url = fake.start()
        token = ""
    try:
        apps = {g: SampleApp(work, f"bench-{g}", v) for g, v in (("blue", "v1"), ("green", "v2"))}
        started.extend(apps.values())
        for g, a in apps.items():
            tags = [f"zerodown-group={g}", f"zerodown-version={'v1' if g == 'blue' else 'v2'}"]
            if fake is not None:
                fake.register(f"bench-{g}", APP, "127.0.0.1", a.port, tags=tags)
            else:
                _register_real(consul_url, token, f"zd-bench-{g}", a.port, tags)
        key = f"zerodown/{APP}/active"
        if fake is not None:
            fake.kv_set(key, "blue")
        else:
            _put_real(consul_url, token, key, "blue")
        cfg = _proxy_config(consul_url, token)
        proxies = [
            ProxyProc(work, work / "unused.json", cfg, f"px{i}") for i in range(args.proxies)
        ]
        started.extend(proxies)
        if fake is not None:
            wait_until(lambda: len(fake.services("zerodown-proxy", passing=True)) == args.proxies,
                       20, "proxies registered")  # fmt: skip
        settings = Settings(
            nomad_addr=os.environ.get("NOMAD_ADDR", ""),
            consul_addr=consul_url,
            consul_token=token,
            consul_cacert=os.environ.get("CONSUL_CACERT", ""),
            audit_log=work / "history.jsonl",
        )
        times = asyncio.run(_switches(NomadConsulBackend(settings), args.switches, args.pause))
    finally:
        for p in reversed(started):
            p.terminate()
        if fake is not None:
            fake.stop()
        else:
            for g in ("blue", "green"):
                _deregister_real(consul_url, token, f"zd-bench-{g}")
    ms = [t * 1000 for t in times]
    return {
        "consul": "real agent " + consul_url if real else "test double",
        "proxies": args.proxies,
        "switches": len(ms),
        "median_ms": round(statistics.median(ms), 2),
        "p95_ms": round(_percentile(ms, 0.95), 2),
        "max_ms": round(max(ms), 2),
        "min_ms": round(min(ms), 2),
        "samples_ms": [round(x, 2) for x in ms],
    }


def _real(method: str, url: str, token: str, body: bytes | None = None) -> bytes:
    import urllib.request

    req = urllib.request.Request(url, data=body, method=method)
    if token:
        req.add_header("X-Consul-Token", token)
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read()


def _register_real(url: str, token: str, sid: str, port: int, tags: list[str]) -> None:
    body = {"ID": sid, "Name": APP, "Address": "127.0.0.1", "Port": port, "Tags": tags,
            "Check": {"HTTP": f"http://127.0.0.1:{port}/health", "Interval": "1s"}}  # fmt: skip
    _real("PUT", f"{url}/v1/agent/service/register", token, orjson.dumps(body))


def _deregister_real(url: str, token: str, sid: str) -> None:
    _real("PUT", f"{url}/v1/agent/service/deregister/{sid}", token)


def _put_real(url: str, token: str, key: str, value: str) -> None:
    _real("PUT", f"{url}/v1/kv/{key}", token, value.encode())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.switch_propagation",
                                description=__doc__.splitlines()[0])  # fmt: skip
    p.add_argument("--proxies", type=int, default=3)
    p.add_argument("--switches", type=int, default=50)
    p.add_argument("--pause", type=float, default=0.2, help="seconds between switches")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    if not 1 <= args.proxies <= 16 or not 1 <= args.switches <= 1000:
        p.error("--proxies must be 1..16 and --switches 1..1000")
    res = run(args)
    if args.json:
        print(orjson.dumps(res, option=orjson.OPT_INDENT_2).decode())
    else:
        print(f"switch propagation ({res['consul']}, {res['proxies']} proxies, "
              f"{res['switches']} switches): median {res['median_ms']} ms, "
              f"p95 {res['p95_ms']} ms, max {res['max_ms']} ms, min {res['min_ms']} ms")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
