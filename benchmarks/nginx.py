"""nginx processes for the benchmarks: static backends and nginx as the proxy under test.

Each instance gets its own prefix directory (config, pid, logs, temp paths) so nothing touches
the system nginx, listens on 127.0.0.1 only, and runs in the foreground (`daemon off`) as a child
we can stop by pid. nginx cannot bind port 0 and report it, so ports are picked free by the
kernel, released, and handed to nginx; a start that loses that race is retried on a new port.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


class BenchError(RuntimeError):
    """A benchmark cannot run; the message says what to install or fix."""


def nginx_binary() -> str:
    path = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else "")
    if not path:
        raise BenchError("nginx is not installed: run `make sysdeps` (apt-get install nginx-light)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise BenchError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def _common(prefix: Path, workers: int, master: bool = True) -> str:
    user = f"user {getpass.getuser()};\n" if os.geteuid() == 0 else ""
    return (
        f"{user}worker_processes {workers};\n"
        f"daemon off;\nmaster_process {'on' if master else 'off'};\n"
        f"pid {prefix}/nginx.pid;\n"
        f"error_log {prefix}/error.log warn;\n"
        "events { worker_connections 8192; multi_accept on; }\n"
    )


def _http_common(prefix: Path) -> str:
    return (
        "access_log off;\n"
        "keepalive_requests 1000000;\n"
        "keepalive_timeout 75s;\n"
        f"client_body_temp_path {prefix}/client_body;\n"
        f"proxy_temp_path {prefix}/proxy;\n"
        f"fastcgi_temp_path {prefix}/fastcgi;\n"
        f"uwsgi_temp_path {prefix}/uwsgi;\n"
        f"scgi_temp_path {prefix}/scgi;\n"
    )


class Nginx:
    """One nginx master (+ workers) in the foreground with its own prefix directory."""

    def __init__(self, prefix: Path, conf: str, wrapper: tuple[str, ...] = ()) -> None:
        self.prefix = prefix
        self.wrapper = wrapper  # a command prefix (taskset, valgrind) for start() only
        prefix.mkdir(parents=True, exist_ok=True)
        self.conf = prefix / "nginx.conf"
        self.conf.write_text(conf)
        self.bin = nginx_binary()
        self.proc: subprocess.Popen | None = None

    def cmd(self, *extra: str) -> list[str]:
        return [self.bin, "-p", str(self.prefix), "-c", str(self.conf), *extra]

    def start(self, port: int, timeout: float = 10.0) -> None:
        log = open(self.prefix / "stderr.log", "ab")
        self.proc = subprocess.Popen(
            [*self.wrapper, *self.cmd()], stdout=log, stderr=log, start_new_session=True
        )
        log.close()
        wait_port(port, timeout, self.proc)

    def reload(self) -> None:
        """`nginx -t && nginx -s reload`, as the old stack's script does."""
        t = subprocess.run(self.cmd("-t", "-q"), capture_output=True, text=True)
        if t.returncode != 0:
            raise BenchError(f"nginx -t failed: {t.stderr.strip()}")
        r = subprocess.run(self.cmd("-s", "reload"), capture_output=True, text=True)
        if r.returncode != 0:
            raise BenchError(f"nginx -s reload failed: {r.stderr.strip()}")

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # fast shutdown of master and workers
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def backend_conf(
    prefix: Path, port: int, version: str, name: str, more_ports: tuple[int, ...] = ()
) -> str:
    """A static responder: a fixed body and the X-Backend-Version header, one worker
    (listening on `port` and every one of `more_ports`: many instances, one process)."""
    body = f"drimeap {version} {name}\\n"
    listens = "".join(f"    listen 127.0.0.1:{p};\n" for p in more_ports)
    return _common(prefix, 1) + (
        "http {\n"
        + _http_common(prefix)
        + f"  server {{ listen 127.0.0.1:{port};\n"
        + listens
        + "    location / { default_type text/plain;\n"
        f"      add_header X-Backend-Version {version} always;\n"
        f"      add_header X-Instance {name} always;\n"
        f'      return 200 "{body}"; }}\n'
        "  }\n}\n"
    )


def upstream_conf(ports: list[int]) -> str:
    """What consul-template rendered in the old stack: the Active group's servers."""
    servers = "".join(f"  server 127.0.0.1:{p} max_fails=3 fail_timeout=10s;\n" for p in ports)
    return f"upstream drimeap {{\n{servers}  keepalive 128;\n}}\n"


def proxy_conf(prefix: Path, port: int, workers: int, master: bool = True) -> str:
    """nginx as the edge proxy, with the same per-request work zerodown does (XFF, request id).
    `master=False`: one process, no master (for valgrind, which follows a single process)."""
    return _common(prefix, workers, master) + (
        "http {\n" + _http_common(prefix) + f"  include {prefix}/upstream.conf;\n"
        f"  server {{ listen 127.0.0.1:{port};\n"
        "    location / {\n"
        "      proxy_pass http://drimeap;\n"
        "      proxy_http_version 1.1;\n"
        '      proxy_set_header Connection "";\n'
        "      proxy_set_header Host $host;\n"
        "      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n"
        "      proxy_set_header X-Forwarded-Proto $scheme;\n"
        "      proxy_set_header X-Forwarded-Host $host;\n"
        "      proxy_set_header X-Request-Id $request_id;\n"
        "      proxy_next_upstream error timeout;\n"
        "    }\n  }\n}\n"
    )


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
