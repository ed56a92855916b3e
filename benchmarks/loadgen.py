"""The open-loop load generator: several uvloop processes sharing one constant-arrival schedule.

`start_load(spec)` spawns the processes, lets them connect, then gives them one common start
time on the system-wide monotonic clock (so switch times recorded by the caller line up with
request times). It returns at once; the caller may switch backends while the load runs and
then calls `LoadRun.wait()` for the merged raw records (`RawLoad`). Statistics are in stats.py.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .loadgen_worker import WorkerSpec


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """An open-loop run: `rate` requests/s for `seconds` against http://host:port/path."""

    host: str
    port: int
    rate: float
    seconds: float
    path: str = "/"
    host_header: str = "drimeap"
    max_in_flight: int = 1000  # k6 maxVUs analogue, over all processes
    preconnect: int = 32  # k6 preAllocatedVUs analogue, over all processes
    timeout: float = 10.0
    processes: int = 0  # 0: pick from the rate (1 process per 12,000 requests/s, up to the cores)

    def process_count(self) -> int:
        if self.processes > 0:
            return self.processes
        return max(1, min(os.cpu_count() or 1, int(np.ceil(self.rate / 12000))))


@dataclass(frozen=True, slots=True)
class RawLoad:
    """Merged per-request records of a run; times are seconds after the common start t0."""

    spec: LoadSpec
    t0: float  # time.monotonic() of slot 0
    sched: np.ndarray  # float64, scheduled start
    latency: np.ndarray  # float64, from scheduled start to the end of the response (or error)
    outcome: np.ndarray  # int8, loadgen_worker.OK / HTTP_ERROR / CONN_ERROR / TIMEOUT
    version: np.ndarray  # int16, index into `versions` (-1: no X-Backend-Version header)
    versions: tuple[str, ...]
    dropped: np.ndarray  # float64, scheduled starts of dropped iterations
    lag: np.ndarray  # float64, how late each request started (generator health)
    retries: int
    connect_errors: int
    processes: int

    @property
    def scheduled(self) -> int:
        return int(self.spec.rate * self.spec.seconds)


class LoadRun:
    """A running load; `t0` is known once every process is connected and ready."""

    def __init__(self, spec: LoadSpec, start_delay: float = 0.3) -> None:
        self.spec = spec
        self.n = spec.process_count()
        self._tmp = tempfile.TemporaryDirectory(prefix="zd-load-")
        self._outs = [str(Path(self._tmp.name) / f"w{i}.npz") for i in range(self.n)]
        # Plain child processes (not multiprocessing): nothing depends on how the caller's
        # __main__ was started, and each child is a clean interpreter with its own event loop.
        self._procs: list[subprocess.Popen] = []
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        for i in range(self.n):
            ws = WorkerSpec(
                host=spec.host,
                port=spec.port,
                path=spec.path,
                host_header=spec.host_header,
                rate=spec.rate,
                seconds=spec.seconds,
                max_in_flight=max(1, spec.max_in_flight // self.n),
                preconnect=spec.preconnect // self.n,
                timeout=spec.timeout,
                index=i,
                processes=self.n,
            )
            cmd = [sys.executable, "-m", "benchmarks.loadgen_worker", json.dumps(asdict(ws))]
            self._procs.append(
                subprocess.Popen(
                    cmd + [self._outs[i]], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
                )
            )
        deadline = time.monotonic() + 30
        for p in self._procs:
            assert p.stdout is not None
            ready, _, _ = select.select([p.stdout], [], [], max(0.1, deadline - time.monotonic()))
            if not ready or p.stdout.readline().strip() != b"ready":
                self.kill()
                raise RuntimeError("a load generator process did not start")
        # Preconnecting happens after "ready"; the delay leaves room for it before slot 0.
        self.t0 = time.monotonic() + start_delay
        for p in self._procs:
            assert p.stdin is not None
            p.stdin.write(f"{self.t0!r}\n".encode())
            p.stdin.close()

    def wait(self) -> RawLoad:
        limit = self.t0 + self.spec.seconds + self.spec.timeout + 30
        for p in self._procs:
            try:
                p.wait(max(0.1, limit - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill()
                raise RuntimeError("a load generator process did not finish in time") from None
            if p.returncode != 0:
                raise RuntimeError(f"a load generator process failed (exit code {p.returncode})")
        parts = [np.load(o) for o in self._outs]
        try:
            return _merge(self.spec, self.t0, parts, self.n)
        finally:
            self._tmp.cleanup()

    def kill(self) -> None:
        for p in self._procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        self._tmp.cleanup()


def _merge(spec: LoadSpec, t0: float, parts: list, n: int) -> RawLoad:
    # Each process numbers versions in the order it saw them; map to one global table.
    names: list[str] = []
    versions = []
    for part in parts:
        local = [str(v) for v in part["versions"]]
        for v in local:
            if v not in names:
                names.append(v)
        table = np.array([names.index(v) for v in local] + [-1], dtype=np.int16)
        versions.append(table[part["version"]])  # -1 indexes the trailing "no header" entry
    cat = np.concatenate
    return RawLoad(
        spec=spec,
        t0=t0,
        sched=cat([p["sched"] for p in parts]),
        latency=cat([p["latency"] for p in parts]),
        outcome=cat([p["outcome"] for p in parts]),
        version=cat(versions) if versions else np.zeros(0, np.int16),
        versions=tuple(names),
        dropped=cat([p["dropped"] for p in parts]),
        lag=cat([p["lag"] for p in parts]),
        retries=int(sum(int(p["counters"][0]) for p in parts)),
        connect_errors=int(sum(int(p["counters"][1]) for p in parts)),
        processes=n,
    )


def run_load(spec: LoadSpec) -> RawLoad:
    """Run a load to completion (no switching)."""
    return LoadRun(spec).wait()
