"""The fab's HTTP side: idle keep-alive clients, and growth with apps and instances.

Idle: `clients` connections to one zerodown proxy (1 worker), each sends one keep-alive GET,
reads the answer and stays open; proxy RSS with all of them idle minus RSS before, per
connection. The proxy's client cap is min([http] max_client_connections, (open files -
fd_reserve) / 2): with a lower open-files limit than the clients need, the run uses the cap
and says so.

Growth: a registry of `apps` apps (drimeap, app1, ...; one Host each) x `per_group` instances
per group, every instance its own port on one of two nginx processes (blue answers v1, green
v2). Per point: the proxy's idle CPU (its active health checks probe every instance every
second), wrk against drimeap (per-request proxy CPU from /proc), and three switches of
drimeap: time until the proxy applied the generation (admin API) and until the first response
from the new version.
"""

from __future__ import annotations

import asyncio
import re
import statistics
import time
import urllib.request
from pathlib import Path
from typing import Any

from .closed_loop import run_wrk
from .datapath import REQUEST
from .nginx import BenchError, Nginx, backend_conf, free_port
from .targets import GROUP_VERSION, Backends, ZerodownProxy

FD_RESERVE = 256  # the proxy's default [http] fd_reserve
_CL = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.I)


class IdleClient(asyncio.Protocol):
    """Sends one GET on connect, then stays idle; `answered` resolves True on a 200."""

    def __init__(self, answered: asyncio.Future[bool]) -> None:
        self.answered = answered
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(REQUEST)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        m = _CL.search(self.buf)
        if end >= 0 and m and len(self.buf) >= end + 4 + int(m.group(1)):
            if not self.answered.done():
                self.answered.set_result(self.buf.startswith(b"HTTP/1.1 200"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.answered.done():
            self.answered.set_result(False)


async def _open_idle(port: int, n: int) -> tuple[list[IdleClient], int]:
    loop = asyncio.get_running_loop()
    clients: list[IdleClient] = []
    failed = 0
    for first in range(0, n, 500):
        futs = [loop.create_future() for _ in range(min(500, n - first))]
        conns = await asyncio.gather(
            *(loop.create_connection(lambda f=f: IdleClient(f), "127.0.0.1", port) for f in futs),
            return_exceptions=True,
        )
        waiting = []
        for f, c in zip(futs, conns, strict=True):
            if isinstance(c, BaseException):
                failed += 1  # refused or reset at connect: its protocol never existed
            else:
                clients.append(c[1])  # type: ignore[arg-type]
                waiting.append(f)
        answers = await asyncio.wait_for(asyncio.gather(*waiting), 120)
        failed += sum(1 for ok in answers if not ok)
    return clients, failed


def run_idle(workdir: Path, clients: int, log: Any) -> dict[str, Any]:
    import resource

    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    cap = (nofile - FD_RESERVE) // 2 - 16  # a few for the warm-up connection and the admin
    n = min(clients, cap)
    if n < clients:
        log(f"  open-files limit {nofile}: the proxy takes at most {cap + 16} clients; "
            f"measuring {n}")  # fmt: skip
    backends = Backends(workdir, per_group=1)
    proxy = ZerodownProxy(backends, workdir)
    proxy.extra_config = f"[http]\nmax_client_connections = {clients + 100}\n"
    try:
        backends.start()
        port = proxy.start(1)
        urllib.request.urlopen(  # one proxied request: pools and lazy state exist before RSS
            urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"Host": "drimeap"}),
            timeout=10,
        ).read()
        time.sleep(1.0)
        rss0 = _rss(proxy)
        loop = asyncio.new_event_loop()
        try:
            t0 = time.monotonic()
            idle, failed = loop.run_until_complete(_open_idle(port, n))
            opened_s = time.monotonic() - t0
            loop.run_until_complete(asyncio.sleep(1.0))
            rss1 = _rss(proxy)
            closed = sum(1 for c in idle if c.lost)
            for c in idle:
                if c.transport is not None:
                    c.transport.close()
            loop.run_until_complete(asyncio.sleep(0.2))
        finally:
            loop.close()
    finally:
        proxy.stop()
        backends.stop()
    log(f"  {n} idle clients (opened in {opened_s:.1f} s): RSS {rss0 / 2**20:.1f} -> "
        f"{rss1 / 2**20:.1f} MiB, {(rss1 - rss0) / n / 1024:.2f} KiB per connection")  # fmt: skip
    return {
        "requested": clients, "clients": n, "nofile": nofile, "failed": failed,
        "closed_by_proxy": closed, "rss_idle_mib": rss0 / 2**20, "rss_clients_mib": rss1 / 2**20,
        "rss_kib_per_connection": (rss1 - rss0) / n / 1024,
    }  # fmt: skip


def _rss(proxy: ZerodownProxy) -> int:
    import psutil

    pid = proxy.pid()
    return psutil.Process(pid).memory_info().rss if pid else 0


class ManyInstances:
    """Two nginx processes (blue v1, green v2), each listening on `ports` ports."""

    def __init__(self, workdir: Path, ports: int) -> None:
        self.ports: dict[str, list[int]] = {}
        self.procs: list[Nginx] = []
        try:
            for group, version in GROUP_VERSION.items():
                self.ports[group] = self._start(workdir / f"many-{group}", group, version, ports)
        except BaseException:
            self.stop()
            raise

    def _start(self, prefix: Path, group: str, version: str, n: int) -> list[int]:
        last: Exception | None = None
        for _ in range(3):  # a port picked free may be taken before nginx binds it
            ports = _free_ports(n)
            ng = Nginx(prefix, backend_conf(prefix, ports[0], version, group, tuple(ports[1:])))
            try:
                ng.start(ports[-1], 30)
            except BenchError as exc:
                ng.stop()
                last = exc
                continue
            self.procs.append(ng)
            return ports
        raise BenchError(f"nginx with {n} ports did not start: {last}")

    def stop(self) -> None:
        for ng in self.procs:
            ng.stop()
        self.procs.clear()


def _free_ports(n: int) -> list[int]:
    out: set[int] = set()
    while len(out) < n:
        out.add(free_port())
    return sorted(out)


class GrowthProxy(ZerodownProxy):
    def __init__(self, many: ManyInstances, apps: int, per_group: int, workdir: Path) -> None:
        super().__init__(Backends(workdir), workdir)
        self.many = many
        self.napps = apps
        self.per_group = per_group

    def apps(self, active: str) -> dict[str, Any]:
        out = {}
        for j in range(self.napps):
            name = "drimeap" if j == 0 else f"app{j}"
            instances = [
                {"id": f"{name}-{g}-{i}", "group": g, "version": v, "address": "127.0.0.1",
                 "http_port": self.many.ports[g][j * self.per_group + i], "hsms_port": None,
                 "healthy": True}
                for g, v in GROUP_VERSION.items() for i in range(self.per_group)
            ]  # fmt: skip
            out[name] = {"active": active if j == 0 else "blue", "hosts": [name],
                         "instances": instances}  # fmt: skip
        return out

    def timed_switch(self, group: str, port: int) -> tuple[float, float]:
        """(ms until applied, ms until the first response from `group`'s version)."""
        self._write_registry(group)
        t0 = time.monotonic()
        self.active = group
        want = GROUP_VERSION[group]
        first = None
        while first is None and time.monotonic() - t0 < 30:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"Host": "drimeap"})
            with urllib.request.urlopen(req, timeout=10) as r:
                if r.headers.get("X-Backend-Version") == want:
                    first = time.monotonic()
        applied = self._wait_applied(self.generation, 30)
        if first is None:
            raise BenchError(f"no response from {want} within 30 s of the switch")
        return 1000 * (applied - t0), 1000 * (first - t0)


def _med_max(v: list[float]) -> tuple[float, float]:
    return statistics.median(v), max(v)


def run_growth(
    workdir: Path, apps: tuple[int, ...], per_group: tuple[int, ...], wrk_seconds: float, log: Any
) -> list[dict[str, Any]]:
    out = []
    for a in apps:
        for i in per_group:
            point = workdir / f"a{a}-i{i}"
            point.mkdir()
            many = ManyInstances(point, a * i)
            proxy = GrowthProxy(many, a, i, point)
            try:
                port = proxy.start(1)
                time.sleep(2.0)  # first rounds of health checks of every instance
                c0, t0 = proxy.cpu_seconds(), time.monotonic()
                time.sleep(2.0)
                idle = 100 * (proxy.cpu_seconds() - c0) / (time.monotonic() - t0)
                c0 = proxy.cpu_seconds()
                r = run_wrk(port, wrk_seconds, 50)
                cpu = proxy.cpu_seconds() - c0
                sw = [proxy.timed_switch("green" if k % 2 == 0 else "blue", port) for k in range(3)]
            finally:
                proxy.stop()
                many.stop()
            us = 1e6 * cpu / max(1, r.requests)
            g = {
                "apps": a, "per_group": i, "instances": 2 * a * i, "rps": r.rps,
                "errors": r.errors + r.non_2xx, "cpu_us_per_request": us,
                "idle_cpu_pct": idle, "applied_ms": _med_max([s[0] for s in sw]),
                "first_new_ms": _med_max([s[1] for s in sw]),
            }  # fmt: skip
            log(f"  {a} apps x {i} per group: {r.rps:.0f} rps, {us:.0f} us/request, idle CPU "
                f"{idle:.1f} %, switch applied {g['applied_ms'][0]:.0f} ms, first new "
                f"{g['first_new_ms'][0]:.0f} ms")  # fmt: skip
            out.append(g)
    return out
