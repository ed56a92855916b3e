"""Several hosts, as in production, built from Linux network namespaces and veth pairs.

    host A (this test process): the Consul double and the CLI; the backends' host too
    host B, host C: a proxy each, admin API on 0.0.0.0:8081 (B advertises the address it
                    reaches Consul from, C an explicit advertise_admin)
    host D: load, keep-alive GETs to B and C all along

Two networks, as fab hosts often have: control (A, B, C: Consul, the CLI to admin APIs) and
data (A, B, C, D: the tools' and browsers' traffic, the backends). Under load a switch is
confirmed by both proxies; then B's control link goes down for ~10 s while a second switch is
made: B keeps routing on its last good snapshot with 0 errors, the CLI names B as not in sync
and fails saying so; after the link returns B catches up. Needs root and `ip` (iproute2);
skips saying why otherwise. Names are unique per run, and everything is deleted at the end.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from orchestrator.devstack.fakes.consul import FakeConsul

from ..helpers import ROOT, Child, wait_until

KEY = "zerodown/drimeap/active"


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


class Network:
    """Bridges in this namespace (host A), one namespace per other host, veth pairs."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(3)
        self.netns: list[str] = []
        self.links: list[str] = []
        used = ip("-o", "addr").stdout
        # Benchmark ranges (RFC 2544): never a real network's.
        free = [k for k in range(10, 250) if not any(f"198.{r}.{k}." in used for r in (18, 19))]
        n = free[secrets.randbelow(len(free))]
        self.ctl, self.data = f"198.18.{n}", f"198.19.{n}"

    def bridge(self, kind: str, addr: str) -> str:
        name = f"zd{self.tag}{kind}"
        ip("link", "add", name, "type", "bridge")
        self.links.append(name)
        ip("addr", "add", f"{addr}/24", "dev", name)
        ip("link", "set", name, "up")
        return name

    def host(self, letter: str) -> str:
        ns = f"zd-{self.tag}-{letter}"
        ip("netns", "add", ns)
        self.netns.append(ns)
        ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        return ns

    def plug(self, ns: str, bridge: str, addr: str, nic: str) -> str:
        """A veth from `ns` (named `nic` there) to `bridge`; returns the bridge-side name."""
        outer = f"zd{self.tag}{ns[-1]}{nic[0]}"
        ip("link", "add", outer, "type", "veth", "peer", "name", nic)
        self.links.append(outer)
        ip("link", "set", nic, "netns", ns)
        ip("link", "set", outer, "master", bridge, "up")
        ip("netns", "exec", ns, "ip", "addr", "add", f"{addr}/24", "dev", nic)
        ip("netns", "exec", ns, "ip", "link", "set", nic, "up")
        return outer

    def delete(self) -> None:
        for ns in self.netns:
            ip("netns", "del", ns, check=False)
        for link in self.links:
            ip("link", "del", link, check=False)


def can_make_namespaces() -> str | None:
    """Why this test cannot run here, or None."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) not found; `make testdeps` installs it"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"zd-probe-{secrets.token_hex(3)}"
    done = ip("netns", "add", probe, check=False)
    if done.returncode != 0:
        return f"cannot create a network namespace: {done.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    return None


@pytest.fixture
def net() -> Iterator[Network]:
    why = can_make_namespaces()
    if why:
        pytest.skip(why)
    n = Network()
    try:
        yield n
    finally:
        n.delete()


class InNs:
    """A child process in a network namespace, ready when it wrote its ready file."""

    def __init__(self, ns: str, args: list[str], workdir: Path, name: str) -> None:
        self.ready = workdir / f"{name}.ready"
        self.log_path = workdir / f"{name}.log"
        self.log = open(self.log_path, "wb")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        for var in ("CONSUL_HTTP_ADDR", "ZERODOWN_ADMIN_TOKEN", "ZERODOWN_REGISTRY"):
            env.pop(var, None)
        # `ip netns exec` execs the command: the pid is the Python process's.
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, *args], stdout=self.log,
            stderr=subprocess.STDOUT, env=env, cwd=workdir,
        )  # fmt: skip
        wait_until(lambda: self.ready.exists() or self.proc.poll() is not None, 30, f"{name}")
        assert self.proc.poll() is None, self.output()

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def proxy_config(consul: FakeConsul, advertise: str = "") -> str:
    return "\n".join([
        "[proxy]", 'http_listen = "0.0.0.0:8080"', 'admin_listen = "0.0.0.0:8081"',
        *([f'advertise_admin = "{advertise}"'] if advertise else []),
        'admin_token = "test-token"', "shutdown_grace = 2.0",
        "[hsms]", "enabled = false",
        "[discovery]", 'provider = "consul"', "stale_after = 30",
        "[consul]", f'addr = "{consul.url}"', "wait = 5.0", "watchdog = 2.0",
        "backoff_min = 0.1", "backoff_max = 1.0", "connect_timeout = 1.0",
        # Longer than the outage: B stays registered as passing, so the CLI waits for it.
        "check_ttl = 30.0", "",
    ])  # fmt: skip


def generation_of(admin: str) -> int | None:
    try:
        with urllib.request.urlopen(f"http://{admin}/v1/status", timeout=2) as r:
            return orjson.loads(r.read())["generation"]
    except OSError:
        return None


def cli(consul: FakeConsul, workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_", "NOMAD_"))}
    env.update({"PYTHONPATH": str(ROOT), "CONSUL_HTTP_ADDR": consul.url,
                "NOMAD_ADDR": "http://127.0.0.1:9", "ZERODOWN_STATE_DIR": str(workdir)})  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args, "--backend", "nomad"],
        capture_output=True, text=True, env=env, timeout=60, cwd=workdir,
    )  # fmt: skip


def test_two_proxies_on_two_hosts_one_loses_consul_and_catches_up(net, tmp_path):
    ctl_br = net.bridge("c", f"{net.ctl}.1")
    data_br = net.bridge("d", f"{net.data}.1")
    hosts = {letter: net.host(letter) for letter in "bcd"}
    b_ctl = net.plug(hosts["b"], ctl_br, f"{net.ctl}.2", "ctl0")
    net.plug(hosts["b"], data_br, f"{net.data}.2", "data0")
    net.plug(hosts["c"], ctl_br, f"{net.ctl}.3", "ctl0")
    net.plug(hosts["c"], data_br, f"{net.data}.3", "data0")
    net.plug(hosts["d"], data_br, f"{net.data}.4", "data0")

    consul = FakeConsul(host=f"{net.ctl}.1")
    consul.start()
    backends: list[Child] = []
    procs: list[InNs] = []
    try:
        for group, version in (("blue", "v1"), ("green", "v2")):
            app = Child(["sample-app", "--version", version, "--http-port", "0", "--host",
                         f"{net.data}.1", "--instance-id", f"{group}-1"], tmp_path, f"{group}-1")  # fmt: skip
            backends.append(app)
            port = app.ports["http"]
            tags = [f"zerodown-group={group}", f"zerodown-version={version}"]
            consul.register(f"drimeap-{group}-1", "drimeap", f"{net.data}.1", port, tags=tags)
        gen1 = consul.kv_set(KEY, "blue")
        for letter, advertise in (("b", ""), ("c", f"{net.ctl}.3")):
            cfg = tmp_path / f"proxy-{letter}.toml"
            cfg.write_text(proxy_config(consul, advertise))
            procs.append(InNs(hosts[letter], ["-m", "zerodown_proxy", "--config", str(cfg),
                                              "--ready-file", str(tmp_path / f"proxy-{letter}.ready")],
                              tmp_path, f"proxy-{letter}"))  # fmt: skip
        # Both registered with an admin address host A can reach: B's the one it reaches
        # Consul from (it listens on 0.0.0.0), C's the explicit one.
        admins = wait_until(
            lambda: len(e := consul.services("zerodown-proxy", passing=True)) == 2
            and sorted(x["Service"]["Meta"]["admin"] for x in e),
            30, "both proxies registered and passing",
        )  # fmt: skip
        b_admin, c_admin = f"{net.ctl}.2:8081", f"{net.ctl}.3:8081"
        assert admins == [b_admin, c_admin]
        for admin in admins:
            wait_until(lambda a=admin: (generation_of(a) or 0) >= gen1, 30, f"{admin} routing")

        out = tmp_path / "load.json"
        load = InNs(hosts["d"], ["-m", "tests.multihost_load", "--out", str(out), "--ready",
                                 str(tmp_path / "load.ready"), f"b={net.data}.2:8080",
                                 f"c={net.data}.3:8080"], tmp_path, "load")  # fmt: skip
        procs.append(load)
        time.sleep(1.0)  # some load before the switch (the load runs in its own process)

        # 1. A switch under load is confirmed by both proxies.
        done = cli(consul, tmp_path, "switch")
        assert done.returncode == 0, done.stdout + done.stderr
        gens = [generation_of(b_admin), generation_of(c_admin)]
        assert gens[0] == gens[1] and gens[0] is not None and gens[0] > gen1, gens
        gen2 = gens[0]

        # 2. B loses its link to Consul (and to the CLI) while the next switch is made.
        ip("link", "set", b_ctl, "down")
        cut_at = time.time()
        try:
            done = cli(consul, tmp_path, "switch")
        finally:
            wait_until(lambda: time.time() - cut_at >= 10, 15, "10 s of outage")
            ip("link", "set", b_ctl, "up")
        restored_at = time.time()
        assert done.returncode == 1, done.stdout + done.stderr
        assert "did not apply it" in done.stderr and b_admin in done.stderr, done.stderr
        assert c_admin not in done.stderr, done.stderr
        gen3 = generation_of(c_admin)
        assert gen3 is not None and gen3 > gen2

        # 3. B catches up once its link is back.
        wait_until(lambda: (generation_of(b_admin) or 0) >= gen3, 30, "B to catch up")
        caught_up_at = time.time()
        time.sleep(1.0)  # load on the caught-up routing
        load.stop()
        report = orjson.loads(out.read_bytes())
    finally:
        for p in reversed(procs):
            p.stop()
        for app in backends:
            app.terminate()
        consul.stop()

    for name in ("b", "c"):
        assert report[name]["errors"] == [], (name, report[name]["errors"][:5])
        assert report[name]["ok"] > 100, report[name]
    # B routed on its last good snapshot (green, v2) through the outage, blue (v1) after.
    b_versions = report["b"]["versions"]
    assert [v for _, v in b_versions] == ["v1", "v2", "v1"], b_versions
    back_to_v1 = b_versions[-1][0]
    assert back_to_v1 >= restored_at - 0.5 and back_to_v1 <= caught_up_at + 2, (
        b_versions, cut_at, restored_at, caught_up_at,
    )  # fmt: skip
    assert [v for _, v in report["c"]["versions"]] == ["v1", "v2", "v1"], report["c"]
