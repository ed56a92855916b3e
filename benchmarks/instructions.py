"""`zerodown bench instructions`: instructions per proxied request, counted by callgrind.

A figure that does not move with the machine's load, to judge optimisations by. The proxy under
test runs under `valgrind --tool=callgrind` (one process: zerodown with one worker, nginx with
`master_process off` and one worker); the four static nginx backends and the client run outside
valgrind. The client sends a fixed sequence of keep-alive GETs over `connections` connections,
one request in flight at a time, round robin over the connections (a fixed order of events, so
the proxy's event loop does the same work on every run). Each proxy runs twice, with `small` and
with `large` requests; start-up, connection set-up and shutdown are the same in both runs, so

    instructions per proxied request = (total(large) - total(small)) / (large - small)

Counted: every user-space instruction of the proxy process (interpreter, uvloop, libc; nginx's
C), not the kernel's. zerodown runs with its active health checks off (nginx has none) and the
registry polled once a second (20 ms by default: time-driven work, which under valgrind's
slowdown would grow with the run's wall time instead of the number of requests).

`datapath` (optional target): benchmarks.datapath.measure(n, 1) under callgrind, the same
difference: the Python data path with in-memory transports, no sockets and no event loop.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .datapath import REQUEST
from .nginx import BenchError
from .targets import ROOT, Backends, NginxProxy, Proxy, ZerodownProxy, workdir

TARGETS = ("zerodown", "nginx", "datapath")
Log = Callable[[str], None]
# Under callgrind a Python proxy starts in ~20-60 s on a loaded 2-core machine.
START_TIMEOUT = 600.0
# Appended to the proxy's [discovery] section: the first line still belongs to it.
ZERODOWN_EXTRA = "poll_interval = 1.0\n[health_check]\nenabled = false\n"
_TOTALS = re.compile(rb"^(?:totals|summary):\s+(\d+)", re.M)


def valgrind_binary() -> str:
    path = shutil.which("valgrind")
    if not path:
        raise BenchError("valgrind is not installed: run `make sysdeps` (apt-get install valgrind)")
    return path


def callgrind_wrapper(out_file: Path) -> tuple[str, ...]:
    return (valgrind_binary(), "--tool=callgrind", f"--callgrind-out-file={out_file}")


def callgrind_total(out_file: Path) -> int:
    """The instruction count (Ir) of a finished callgrind run, from its output file."""
    try:
        data = out_file.read_bytes()
    except OSError as exc:
        raise BenchError(f"callgrind wrote no output ({out_file}): {exc}") from None
    m = _TOTALS.search(data)
    if not m:
        raise BenchError(f"no totals line in callgrind output {out_file}")
    return int(m.group(1))


def _read_response(sock: socket.socket, buf: bytearray) -> bytes:
    """One HTTP/1.1 response with a Content-Length; returns its status line."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise BenchError("the proxy closed a keep-alive connection mid-sequence")
        buf += chunk
    head_end = buf.index(b"\r\n\r\n") + 4
    head = bytes(buf[:head_end])
    m = re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.I)
    if not m:
        raise BenchError(f"response without Content-Length: {head[:200]!r}")
    end = head_end + int(m.group(1))
    while len(buf) < end:
        chunk = sock.recv(65536)
        if not chunk:
            raise BenchError("the proxy closed a connection in the middle of a body")
        buf += chunk
    del buf[:end]
    return head.split(b"\r\n", 1)[0]


def drive(port: int, requests: int, connections: int, timeout: float = 120.0) -> None:
    """`requests` keep-alive GETs over `connections` connections, one in flight at a time."""
    socks = [
        socket.create_connection(("127.0.0.1", port), timeout=timeout) for _ in range(connections)
    ]
    try:
        for s in socks:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        bufs = [bytearray() for _ in socks]
        for i in range(requests):
            k = i % connections
            socks[k].sendall(REQUEST)
            status = _read_response(socks[k], bufs[k])
            if not status.startswith(b"HTTP/1.1 200"):
                raise BenchError(f"request {i + 1} answered {status.decode(errors='replace')!r}")
    except TimeoutError:
        raise BenchError(f"no answer from the proxy within {timeout:g} s") from None
    finally:
        for s in socks:
            s.close()


def _proxy(name: str, backends: Backends, tmp: Path, out_file: Path) -> Proxy:
    wrapper = callgrind_wrapper(out_file)
    if name == "zerodown":
        z = ZerodownProxy(backends, tmp, wrapper=wrapper, start_timeout=START_TIMEOUT)
        z.extra_config = ZERODOWN_EXTRA
        return z
    n = NginxProxy(backends, tmp, wrapper=wrapper, start_timeout=START_TIMEOUT)
    n.master = False
    return n


def count_proxy(
    name: str, backends: Backends, tmp: Path, requests: int, connections: int
) -> dict[str, Any]:
    """One run of `name` under callgrind: start, the fixed sequence, stop; total instructions."""
    run_dir = tmp / f"{name}-{requests}"
    run_dir.mkdir(parents=True)
    out_file = run_dir / "callgrind.out"
    proxy = _proxy(name, backends, run_dir, out_file)
    t0 = time.monotonic()
    try:
        port = proxy.start(1)
        drive(port, requests, connections)
    finally:
        proxy.stop()
    return {"requests": requests, "instructions": callgrind_total(out_file),
            "seconds": round(time.monotonic() - t0, 1)}  # fmt: skip


def count_datapath(tmp: Path, requests: int) -> dict[str, Any]:
    """benchmarks.datapath.measure(requests, 1) under callgrind (in-memory transports)."""
    out_file = tmp / f"datapath-{requests}.out"
    code = f"from benchmarks.datapath import measure; measure({requests}, 1)"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "0"}
    t0 = time.monotonic()
    cmd = [*callgrind_wrapper(out_file), sys.executable, "-c", code]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=START_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise BenchError(f"the datapath run did not finish within {START_TIMEOUT:g} s") from None
    if proc.returncode != 0:
        raise BenchError(f"the datapath run failed: {proc.stderr.strip()[-300:]}")
    return {"requests": requests, "instructions": callgrind_total(out_file),
            "seconds": round(time.monotonic() - t0, 1)}  # fmt: skip


def per_request(small: dict[str, Any], large: dict[str, Any]) -> float:
    return (large["instructions"] - small["instructions"]) / (large["requests"] - small["requests"])


def instructions(
    targets: tuple[str, ...],
    small: int,
    large: int,
    connections: int,
    log: Log,
    rounds: int = 1,
) -> dict[str, Any]:
    """Instructions per proxied request of each target (`rounds` times each, to show spread)."""
    if not 0 < small < large:
        raise BenchError(f"--small must be positive and below --large, got {small} and {large}")
    if connections < 1 or connections > small:
        raise BenchError("--connections must be between 1 and --small")
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise BenchError(f"unknown target {', '.join(bad)}: choose from {', '.join(TARGETS)}")
    valgrind_binary()
    out: dict[str, Any] = {"small": small, "large": large, "connections": connections}
    # PYTHONHASHSEED fixed: set and dict layouts, hence the interpreter's work, are the same
    # on every run (the zerodown proxy inherits it).
    old_seed = os.environ.get("PYTHONHASHSEED")
    os.environ["PYTHONHASHSEED"] = "0"
    try:
        with workdir("zd-bench-instr-") as tmp:
            base = Path(tmp)
            backends = Backends(base)
            try:
                if any(t != "datapath" for t in targets):
                    backends.start()
                for target in targets:
                    runs = []
                    for r in range(rounds):
                        pair = []
                        for n in (small, large):
                            rdir = base / f"round{r}"
                            rdir.mkdir(exist_ok=True)
                            if target == "datapath":
                                pair.append(count_datapath(rdir, n))
                            else:
                                pair.append(count_proxy(target, backends, rdir, n, connections))
                        per = per_request(*pair)
                        runs.append({"small": pair[0], "large": pair[1], "per_request": per})
                        log(f"  {target:<9} round {r + 1}: {per:,.0f} instructions/request "
                            f"({pair[0]['seconds']:g} s + {pair[1]['seconds']:g} s)")  # fmt: skip
                    vals = [x["per_request"] for x in runs]
                    out[target] = {
                        "per_request": sum(vals) / len(vals),
                        "spread_pct": 100 * (max(vals) - min(vals)) / min(vals) if vals[0] else 0,
                        "runs": runs,
                    }
            finally:
                backends.stop()
    finally:
        if old_seed is None:
            os.environ.pop("PYTHONHASHSEED", None)
        else:
            os.environ["PYTHONHASHSEED"] = old_seed
    if "zerodown" in out and "nginx" in out and out["nginx"]["per_request"] > 0:
        out["ratio"] = out["zerodown"]["per_request"] / out["nginx"]["per_request"]
    return out


def instructions_table(r: dict[str, Any]) -> str:
    text = (
        f"Instructions per proxied request (callgrind, user space; (total of {r['large']:,} "
        f"requests - total of {r['small']:,}) / {r['large'] - r['small']:,}, keep-alive GETs "
        f"over {r['connections']} connection(s), one in flight)\n\n"
        "| target | instructions/request | runs | spread |\n|---|---|---|---|\n"
    )
    labels = {"zerodown": "zerodown, 1 worker", "nginx": "nginx, 1 worker",
              "datapath": "zerodown data path only (in-memory, `datapath`)"}  # fmt: skip
    for name in TARGETS:
        if name in r:
            t = r[name]
            text += (
                f"| {labels[name]} | {t['per_request']:,.0f} | {len(t['runs'])} "
                f"| {t['spread_pct']:.2f} % |\n"
            )
    if "ratio" in r:
        text += f"\nzerodown / nginx: **{r['ratio']:.2f}x**\n"
    return text


def add_arguments(p: Any) -> None:
    p.add_argument("--targets", default="zerodown,nginx",
                   help=f"comma separated, from {','.join(TARGETS)} (default zerodown,nginx)")  # fmt: skip
    p.add_argument(
        "--small", type=int, default=1000, help="requests of the short run (default 1000)"
    )
    p.add_argument(
        "--large", type=int, default=3000, help="requests of the long run (default 3000)"
    )
    p.add_argument("--connections", type=int, default=10,
                   help="keep-alive connections the requests are spread over (default 10)")  # fmt: skip
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat each pair of runs, to show the spread (default 1)")  # fmt: skip


def run_from_args(args: Any, log: Log) -> dict[str, Any]:
    if not 1 <= args.rounds <= 5:
        raise BenchError(f"--rounds must be between 1 and 5, got {args.rounds}")
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    return instructions(targets, args.small, args.large, args.connections, log, args.rounds)
