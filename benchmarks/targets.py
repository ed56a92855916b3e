"""The systems under test: four static nginx backends and the proxies that front them.

Proxies share one interface: `start(workers)` returns the HTTP port, `switch(group)` flips the
Active group the way that stack does it and returns when its switch command would return, and
`stop()`. Every switch is timed from the same point for every proxy: the moment the
configuration source has been written (zerodown: the registry file; nginx: the re-rendered
upstream file, plus the reload command for the immediate variant).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .nginx import (
    BenchError,
    Nginx,
    backend_conf,
    free_port,
    nginx_binary,
    proxy_conf,
    upstream_conf,
    wait_port,
    write_atomic,
)

ROOT = Path(__file__).resolve().parent.parent
GROUP_VERSION = {"blue": "v1", "green": "v2"}


@dataclass(frozen=True, slots=True)
class BackendInfo:
    name: str
    group: str
    version: str
    port: int


class Backends:
    """Two nginx static responders per group (blue = v1, green = v2), one worker each."""

    def __init__(self, workdir: Path, per_group: int = 2, wrapper: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.per_group = per_group
        self.wrapper = wrapper  # command prefix, e.g. taskset to pin them to a core
        self.items: list[BackendInfo] = []
        self._procs: list[Nginx] = []

    def start(self) -> None:
        for group, version in GROUP_VERSION.items():
            for i in range(1, self.per_group + 1):
                name = f"{group}-{i}"
                self.items.append(self._start_one(name, group, version))

    def _start_one(self, name: str, group: str, version: str) -> BackendInfo:
        last: Exception | None = None
        for _ in range(3):  # a port picked free may be taken before nginx binds it
            port = free_port()
            prefix = self.workdir / f"backend-{name}"
            ng = Nginx(prefix, backend_conf(prefix, port, version, name), self.wrapper)
            try:
                ng.start(port)
            except BenchError as exc:
                ng.stop()
                last = exc
                continue
            self._procs.append(ng)
            return BackendInfo(name, group, version, port)
        raise BenchError(f"backend {name} did not start: {last}")

    def ports(self, group: str) -> list[int]:
        return [b.port for b in self.items if b.group == group]

    def stop(self) -> None:
        for ng in self._procs:
            ng.stop()
        self._procs.clear()


class Proxy(ABC):
    name = "proxy"
    label = "proxy"

    def __init__(
        self,
        backends: Backends,
        workdir: Path,
        wrapper: tuple[str, ...] = (),
        start_timeout: float = 30.0,
    ) -> None:
        self.backends = backends
        self.workdir = workdir
        self.active = "blue"
        # A command prefix for the proxy process (taskset to pin it, valgrind to count its
        # instructions); start_timeout also bounds its stop (valgrind is ~50x slower).
        self.wrapper = wrapper
        self.start_timeout = start_timeout

    @abstractmethod
    def start(self, workers: int) -> int: ...

    @abstractmethod
    def switch(self, group: str) -> tuple[float, float | None]:
        """Make `group` Active; returns (monotonic time the command returned, applied or None)."""

    @abstractmethod
    def stop(self) -> None: ...

    def pid(self) -> int | None:
        """The proxy's main process (its workers are its children)."""
        return None

    def cpu_seconds(self) -> float:
        """CPU time (user + system) used so far by the proxy and its workers, reaped or live."""
        import psutil

        pid = self.pid()
        if pid is None:
            return 0.0
        try:
            main = psutil.Process(pid)
            t = main.cpu_times()
            total = t.user + t.system + t.children_user + t.children_system
            for child in main.children(recursive=True):
                try:
                    c = child.cpu_times()
                    total += c.user + c.system
                except psutil.NoSuchProcess:
                    pass
        except psutil.NoSuchProcess:
            return 0.0
        return total


class Direct(Proxy):
    """No proxy: straight to one backend (the generator's and the backends' own limit)."""

    name = "direct"
    label = "direct to one nginx backend"

    def start(self, workers: int) -> int:
        return self.backends.ports("blue")[0]

    def switch(self, group: str) -> tuple[float, float | None]:
        raise BenchError("the direct target cannot switch")

    def stop(self) -> None:
        pass


class ZerodownProxy(Proxy):
    """zerodown with the file registry, as `zerodown up` runs it."""

    name = "zerodown"
    label = "zerodown (file registry)"

    def __init__(self, backends: Backends, workdir: Path, **kw: Any) -> None:
        super().__init__(backends, workdir, **kw)
        self.extra_config = ""  # TOML appended to proxy.toml (sections not written below)
        self.hsms_config = "enabled = false\n"  # the [hsms] section's body
        self.log_level = "warning"
        self.ports: dict[str, int] = {}  # what the proxy's ready file said (http, admin, hsms)
        self.dir = workdir / "zerodown"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.registry = self.dir / "registry.json"
        self.generation = 0
        self.proc: subprocess.Popen | None = None
        self.admin = 0

    def apps(self, active: str) -> dict[str, Any]:
        """The registry's "apps" with `active` as drimeap's Active group (one app, the backends)."""
        instances = [
            {
                "id": f"drimeap-{b.name}",
                "group": b.group,
                "version": b.version,
                "address": "127.0.0.1",
                "http_port": b.port,
                "hsms_port": None,
                "healthy": True,
            }
            for b in self.backends.items
        ]
        return {"drimeap": {"active": active, "instances": instances}}

    def _write_registry(self, active: str) -> None:
        self.generation += 1
        doc = {"generation": self.generation, "apps": self.apps(active), "proxies": []}
        write_atomic(self.registry, json.dumps(doc))

    def start(self, workers: int) -> int:
        self._write_registry(self.active)
        cfg = self.dir / "proxy.toml"
        cfg.write_text(
            "[proxy]\n"
            'http_listen = "127.0.0.1:0"\nhsms_listen = "127.0.0.1:0"\n'
            'admin_listen = "127.0.0.1:0"\n'
            f"workers = {workers}\n"
            f'log_level = "{self.log_level}"\naccess_log = false\nshutdown_grace = 5.0\n'
            "[hsms]\n"
            + self.hsms_config
            + f'[discovery]\nprovider = "file"\nfile = "{self.registry}"\n'
            + self.extra_config
        )
        ready = self.dir / "ready.json"
        ready.unlink(missing_ok=True)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        for var in ("CONSUL_HTTP_ADDR", "ZERODOWN_REGISTRY", "ZERODOWN_ADMIN_TOKEN"):
            env.pop(var, None)
        log = open(self.dir / "proxy.log", "ab")
        self.proc = subprocess.Popen(
            [*self.wrapper, sys.executable, "-m", "zerodown_proxy", "--config", str(cfg)]
            + ["--ready-file", str(ready)],
            stdout=log,
            stderr=log,
            env=env,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + self.start_timeout
        while not ready.exists():
            if self.proc.poll() is not None:
                raise BenchError(f"zerodown proxy exited ({self.proc.returncode}); see {log.name}")
            if time.monotonic() > deadline:
                raise BenchError(f"zerodown proxy did not become ready in {self.start_timeout:g} s")
            time.sleep(0.02)
        ports = json.loads(ready.read_text())
        self.ports = ports
        self.admin = ports["admin"]
        wait_port(ports["http"], self.start_timeout, self.proc)
        self._wait_applied(self.generation, self.start_timeout)
        return ports["http"]

    def _generation(self) -> int:
        url = f"http://127.0.0.1:{self.admin}/v1/status"
        with urllib.request.urlopen(url, timeout=2) as r:
            return int(json.loads(r.read())["generation"])

    def _wait_applied(self, generation: int, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._generation() >= generation:
                return time.monotonic()
            time.sleep(0.002)
        raise BenchError(f"zerodown did not apply generation {generation} in {timeout}s")

    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def switch(self, group: str) -> tuple[float, float | None]:
        self._write_registry(group)
        returned = time.monotonic()
        self.active = group
        return returned, self._wait_applied(self.generation, 10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(max(15.0, self.start_timeout))
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


class NginxProxy(Proxy):
    """nginx with the Active group rendered into upstream.conf and reloaded right away."""

    name = "nginx-reload"
    label = "nginx, immediate reload"

    def __init__(self, backends: Backends, workdir: Path, **kw: Any) -> None:
        super().__init__(backends, workdir, **kw)
        self.prefix = workdir / self.name
        self.ng: Nginx | None = None
        self.master = True  # False: one process without a master (workers must be 1)

    def _render(self, group: str) -> None:
        write_atomic(self.prefix / "upstream.conf", upstream_conf(self.backends.ports(group)))

    def start(self, workers: int) -> int:
        self.prefix.mkdir(parents=True, exist_ok=True)
        self._render(self.active)
        last: Exception | None = None
        for _ in range(3):
            port = free_port()
            conf = proxy_conf(self.prefix, port, workers, self.master)
            self.ng = Nginx(self.prefix, conf, self.wrapper)
            try:
                self.ng.start(port, self.start_timeout)
                return port
            except BenchError as exc:
                self.ng.stop()
                last = exc
        raise BenchError(f"nginx proxy did not start: {last}")

    def pid(self) -> int | None:
        return self.ng.proc.pid if self.ng is not None and self.ng.proc is not None else None

    def switch(self, group: str) -> tuple[float, float | None]:
        self._render(group)
        assert self.ng is not None
        self.ng.reload()
        self.active = group
        return time.monotonic(), None

    def stop(self) -> None:
        if self.ng is not None:
            self.ng.stop(max(10.0, self.start_timeout))


WATCH_SCRIPT = r"""#!/bin/bash
# The old stack's reload loop: every 3 s, if the rendered upstream file changed,
# `nginx -t && nginx -s reload`.
NGINX="$1"; PREFIX="$2"; CONF="$3"; FILE="$4"
last=$(md5sum "$FILE" | cut -d' ' -f1)
while true; do
  sleep 3
  cur=$(md5sum "$FILE" | cut -d' ' -f1)
  if [ "$cur" != "$last" ]; then
    "$NGINX" -p "$PREFIX" -c "$CONF" -t -q && "$NGINX" -p "$PREFIX" -c "$CONF" -s reload
    last="$cur"
  fi
done
"""


class NginxWatchProxy(NginxProxy):
    """The old stack: consul-template renders the file; a 3 s watch loop tests and reloads."""

    name = "nginx-watch"
    label = "nginx + 3 s watch loop (old stack)"

    def __init__(self, backends: Backends, workdir: Path, **kw: Any) -> None:
        super().__init__(backends, workdir, **kw)
        self.watcher: subprocess.Popen | None = None

    def start(self, workers: int) -> int:
        port = super().start(workers)
        script = self.prefix / "watch.sh"
        script.write_text(WATCH_SCRIPT)
        assert self.ng is not None
        log = open(self.prefix / "watch.log", "ab")
        self.watcher = subprocess.Popen(
            ["bash", str(script), nginx_binary(), str(self.prefix), str(self.ng.conf)]
            + [str(self.prefix / "upstream.conf")],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        return port

    def switch(self, group: str) -> tuple[float, float | None]:
        self._render(group)  # consul-template's write; the watch loop does the rest
        self.active = group
        return time.monotonic(), None

    def stop(self) -> None:
        if self.watcher is not None and self.watcher.poll() is None:
            os.killpg(self.watcher.pid, signal.SIGTERM)
            self.watcher.wait(5)
        super().stop()


PROXIES: dict[str, type[Proxy]] = {
    "zerodown": ZerodownProxy,
    "nginx-watch": NginxWatchProxy,
    "nginx-reload": NginxProxy,
}


def workdir(prefix: str = "zd-bench-") -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix=prefix)
