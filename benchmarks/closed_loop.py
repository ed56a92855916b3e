"""Closed-loop maximum throughput with wrk (N connections, each sends as soon as it is answered).

wrk is the usual tool for "how many requests a second can this proxy do"; its output is parsed
into a frozen result. Latencies here are service times (closed loop), not open-loop latencies.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from typing import Any

from .nginx import BenchError

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


@dataclass(frozen=True, slots=True)
class WrkResult:
    connections: int
    threads: int
    seconds: float
    requests: int
    rps: float
    avg_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: int  # connect/read/write/timeout socket errors
    non_2xx: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"cannot read wrk duration {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str, connections: int, threads: int, seconds: float) -> WrkResult:
    """Parse `wrk --latency` output."""
    lat = re.search(r"Latency\s+(\S+)\s+(\S+)\s+(\S+)", out)
    dist = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)$", out, re.M))
    req = re.search(r"(\d+) requests in", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not (lat and req and rps and dist):
        raise BenchError(f"unexpected wrk output: {out.strip()[:300]}")
    errors = 0
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if sock:
        errors = sum(int(x) for x in sock.groups())
    non2 = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return WrkResult(
        connections=connections,
        threads=threads,
        seconds=seconds,
        requests=int(req.group(1)),
        rps=float(rps.group(1)),
        avg_ms=_ms(lat.group(1)),
        p50_ms=_ms(dist["50"]),
        p90_ms=_ms(dist["90"]),
        p99_ms=_ms(dist["99"]),
        max_ms=_ms(lat.group(3)),
        errors=errors,
        non_2xx=int(non2.group(1)) if non2 else 0,
    )


def run_wrk(
    port: int,
    seconds: float,
    connections: int = 50,
    threads: int = 2,
    wrapper: tuple[str, ...] = (),
) -> WrkResult:
    """wrk against 127.0.0.1:port; `wrapper` prefixes the command (taskset to pin it)."""
    wrk = shutil.which("wrk")
    if not wrk:
        raise BenchError("wrk is not installed: run `make sysdeps` (apt-get install wrk)")
    secs = max(1, int(round(seconds)))
    cmd = [*wrapper, wrk, f"-t{threads}", f"-c{connections}", f"-d{secs}s", "--latency"]
    cmd += ["-H", "Host: drimeap", f"http://127.0.0.1:{port}/"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=secs + 60)
    except subprocess.TimeoutExpired:
        raise BenchError(f"wrk did not finish within {secs + 60} s") from None
    if proc.returncode != 0:
        raise BenchError(f"wrk failed ({proc.returncode}): {proc.stderr.strip()[:300]}")
    return parse_wrk(proc.stdout, connections, threads, secs)


def pin_cores() -> tuple[int, int] | None:
    """(the proxy's core, the core of wrk and the backends), or None with fewer than 2 cores."""
    import os

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2 or not shutil.which("taskset"):
        return None
    return cores[0], cores[1]


def taskset(core: int) -> tuple[str, ...]:
    return ("taskset", "-c", str(core))
