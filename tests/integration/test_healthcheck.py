"""`zerodown healthcheck` (the Docker HEALTHCHECK) and `zerodown --version` / `version`, run as
the real command against a real proxy process and against hostile peers on raw sockets."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator

import pytest

from ..helpers import ROOT, instance, registry, write_registry


def zerodown(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("ZERODOWN_ADMIN_LISTEN", None)
    return subprocess.run([sys.executable, "-m", "orchestrator", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)  # fmt: skip


def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_version_flag_and_command_print_package_python_and_platform():
    for args in (["--version"], ["version"]):
        r = zerodown(*args)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[0] == f"zerodown {project_version()}"
        assert lines[1].startswith(f"python {sys.version.split()[0]} (")
        assert lines[2].startswith("platform ") and os.uname().machine in lines[2]


def test_healthcheck_is_1_until_routing_is_applied_then_0(tmp_path, start_proxy, sample_app):
    app = sample_app("drimeap-blue-1", "v1")
    reg = tmp_path / "registry.json"
    # Active group with no healthy instance: the proxy refuses the snapshot, has no routing.
    write_registry(reg, registry(1, "blue", [instance("drimeap-blue-1", "blue", "v1", app.port,
                                                      healthy=False)]))  # fmt: skip
    proxy = start_proxy(reg)
    admin = f"127.0.0.1:{proxy.admin}"
    r = zerodown("healthcheck", "--admin", admin)
    assert r.returncode == 1
    assert "no routing yet" in r.stderr and admin in r.stderr
    assert r.stderr.count("\n") == 1  # one line, no traceback

    write_registry(reg, registry(2, "blue", [instance("drimeap-blue-1", "blue", "v1", app.port)]))
    proxy.wait_generation(2)
    r = zerodown("healthcheck", "--admin", admin)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"ok: the proxy at {admin} routes generation 2"


def test_healthcheck_without_a_proxy_says_connection_refused():
    with socket.socket() as s:  # a port nobody listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        r = zerodown("healthcheck", "--admin", f"127.0.0.1:{port}")
    assert r.returncode == 1
    assert "connection refused" in r.stderr and "Traceback" not in r.stderr


@pytest.fixture
def peer() -> Iterator[Callable[[Callable[[socket.socket], None]], int]]:
    """A raw TCP server on 127.0.0.1:0 that hands each connection to `behave`."""
    servers: list[socket.socket] = []
    conns: list[socket.socket] = []

    def start(behave: Callable[[socket.socket], None]) -> int:
        srv = socket.create_server(("127.0.0.1", 0))
        servers.append(srv)

        def serve() -> None:
            while True:
                try:
                    conn, _ = srv.accept()
                except OSError:
                    return
                conns.append(conn)
                threading.Thread(target=behave, args=(conn,), daemon=True).start()

        threading.Thread(target=serve, daemon=True).start()
        return srv.getsockname()[1]

    yield start
    for s in servers + conns:
        s.close()


def _silent(conn: socket.socket) -> None:
    conn.recv(4096)  # reads the request, never answers


def _drip(conn: socket.socket) -> None:
    conn.recv(4096)
    try:
        for b in b"HTTP/1.1 200 OK\r\nContent-Length: 30\r\n\r\n" * 100:
            conn.sendall(bytes([b]))
            time.sleep(0.05)
    except OSError:
        return


def _garbage(conn: socket.socket) -> None:
    conn.recv(4096)
    conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
    conn.close()


def _not_json(conn: socket.socket) -> None:
    conn.recv(4096)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
    conn.close()


def _huge(conn: socket.socket) -> None:
    conn.recv(4096)
    try:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n" + b"x" * 10_000_000)
    except OSError:
        return


@pytest.mark.parametrize(
    ("behave", "expect"),
    [
        (_silent, "did not answer within 1 s"),
        (_drip, "did not answer within 1 s"),  # one deadline for the whole exchange
        (_garbage, "does not speak HTTP"),
        (_not_json, "not a zerodown proxy's JSON"),
        (_huge, "not a zerodown proxy's JSON"),
    ],
)
def test_healthcheck_against_hostile_peers_fails_in_time_with_one_line(peer, behave, expect):
    port = peer(behave)
    t0 = time.monotonic()
    r = zerodown("healthcheck", "--admin", f"127.0.0.1:{port}", "--timeout", "1")
    took = time.monotonic() - t0
    assert r.returncode == 1, r.stdout
    assert expect in r.stderr and r.stderr.count("\n") == 1, r.stderr
    # The bound is the point: 1 s of deadline plus the interpreter's start on a busy machine.
    assert took < 15, took


def test_healthcheck_reads_the_admin_address_from_the_proxy_config(tmp_path):
    cfg = tmp_path / "proxy.toml"
    cfg.write_text('[proxy]\nadmin_listen = "127.0.0.1:0"\n')
    r = zerodown("healthcheck", "--config", str(cfg))
    assert r.returncode == 1 and "port 0" in r.stderr and "--admin" in r.stderr
    r = zerodown("healthcheck", "--config", str(tmp_path / "missing.toml"))
    assert r.returncode == 1 and "config file not found" in r.stderr
