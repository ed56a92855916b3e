"""Multi-worker mode (`[proxy] workers = N`): N proxy processes share the listening ports with
SO_REUSEPORT; each follows the registry itself (one routing follower per worker), so the data
path never crosses a process boundary.

The supervisor reserves the ports (bound, not listening, so it never receives a connection),
starts the workers as `zerodown proxy ... --reuse-port`, restarts one that dies, and serves the
admin API for the whole proxy (supervisor_admin.py): /v1/status reports the *lowest* generation
any worker has applied (a switch counts as applied only when every worker has it), /metrics
merges the workers' metrics with a `worker` label, and its `hsms` section lists the tool
sessions of every worker.

Switches happen at one instant in every worker: the supervisor owns the switch gate (see
switch_gate.py). Workers prepare a switch in their slot and nudge the supervisor over an abstract
unix datagram socket; the supervisor commits when every live worker has prepared the same target
(also checked every GATE_CHECK_INTERVAL, for a lost nudge and for a worker that died). A worker
that holds a switch back for more than SWITCH_REPORT_AFTER is named in /v1/status (`switch`).
A worker that dies stops counting at once; its replacement counts from its start (it joins at the
committed target, or holds switches back until it has read the registry).

Workers get their supervisor's configuration: the same --config, and every flag the supervisor
was given (cli.OVERRIDES, forwarded by worker_argv), apart from the ones it sets per worker
(listen addresses, name, --workers 1). The supervisor's admin address reaches them as
--supervisor-admin (what a worker registers in Consul), its pid as --supervisor-pid.

No orphans, whatever happens to the supervisor (Linux only, as SO_REUSEPORT load balancing is):
- SIGTERM/SIGINT are handled from the first moment of run(), so stopping a supervisor that is
  still starting (registry missing, Consul down, a worker slow to start) stops its workers;
- each worker asks the kernel, with prctl(PR_SET_PDEATHSIG, SIGTERM), to be sent SIGTERM when
  its supervisor dies, SIGKILL included, and then shuts down gracefully like any SIGTERM. Chosen
  over a pipe the worker would watch because the kernel does it with no code on the worker's
  data path and no descriptor to keep out of other children. The signal follows the death of
  the *thread* that forked the worker: the supervisor spawns from its event loop thread, the
  main one. A worker whose supervisor died before prctl took effect sees a new parent pid and
  does not start.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from .config import Config, parse_addr
from .supervised import worker_argv
from .supervisor_admin import SupervisorAdmin
from .supervisor_merge import merge_hsms, merge_metrics
from .switch_gate import GATE_ENV, INDEX_ENV, NOTIFY_ENV, GateFile, waiting_for
from .takeover import sdnotify
from .takeover.lifecycle import WORKER_CHANNEL_ENV
from .takeover.supervisor_takeover import SupervisorDonor, SupervisorReceiver, worker_channel
from .takeover.wire import ENV as TAKEOVER_ENV

log = logging.getLogger("zerodown.workers")

GATE_CHECK_INTERVAL = 0.05  # safety net: a nudge lost, a worker gone
SWITCH_REPORT_AFTER = 2.0
FIRST_COMMIT_TIMEOUT = 10.0


def reserve_port(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((host, port))
    return s


class Supervisor:
    def __init__(
        self,
        cfg: Config,
        config_path: str | None,
        ready_file: str | None,
        overrides: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.ready_file = ready_file
        self.forwarded = worker_argv(overrides)
        self.admin_addr = ""  # host:port of this supervisor's admin API, once it listens
        self.n = cfg.proxy.workers
        self.run_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"zerodown-{os.getpid()}"
        self.procs: list[asyncio.subprocess.Process | None] = [None] * self.n
        self.admins: list[str | None] = [None] * self.n
        self.stopping = False
        self.restarts = 0
        self.reserved: list[socket.socket] = []
        self.listen: dict[str, str] = {}
        self.admin = SupervisorAdmin(self)
        # ZERODOWN_SWITCH_GATE=off runs the workers without the gate (each switches on its own
        # as soon as it reads the registry): only to demonstrate what the gate prevents.
        self.gated = os.environ.get(GATE_ENV, "") != "off"
        self.gate: GateFile | None = None
        self.notify_name = f"zerodown-gate-{os.getpid()}-{secrets.token_hex(4)}"
        self.waiting_since: float | None = None
        self.waiting: list[int] = []
        self._checker: asyncio.Task[None] | None = None
        self._notify: socket.socket | None = None
        # Takeover (takeover/supervisor_takeover.py): what this supervisor received from the one
        # it replaces (sockets by name, the old workers' channels), and whether it is itself
        # being replaced (its workers' exits are then expected, not restarted).
        self.inherited: dict[str, socket.socket] = {}
        self.takeover_from: dict[int, str] = {}
        self.handing_over = False
        path = os.environ.pop(TAKEOVER_ENV, None)
        self.receiver = SupervisorReceiver(path) if path else None
        self.donor = SupervisorDonor(self)

    def reserve(self) -> dict[str, int]:
        ports = {}
        keys = [("http", self.cfg.proxy.http_listen)]
        if self.cfg.hsms.enabled:
            keys.append(("hsms", self.cfg.proxy.hsms_listen))
        for key, addr in keys:
            host, port = parse_addr(addr)
            s = self.inherited.pop(f"reserved:{key}", None) or reserve_port(host, port)
            self.reserved.append(s)
            ports[key] = s.getsockname()[1]
            self.listen[key] = f"[{host}]:{ports[key]}" if ":" in host else f"{host}:{ports[key]}"
        return ports

    async def spawn(self, index: int) -> None:
        ready = self.run_dir / f"worker-{index}.ready"
        ready.unlink(missing_ok=True)
        args = [sys.executable, "-m", "zerodown_proxy", "--reuse-port", "--workers", "1"]
        if self.config_path:
            args += ["--config", self.config_path]
        args += self.forwarded
        args += ["--supervisor-admin", self.admin_addr, "--supervisor-pid", str(os.getpid())]
        args += ["--http-listen", self.listen["http"], "--admin-listen", "127.0.0.1:0"]
        if "hsms" in self.listen:
            args += ["--hsms-listen", self.listen["hsms"]]
        args += ["--name", f"{self.cfg.proxy.name or socket.gethostname()}-w{index}"]
        if index > 0 and "--no-register" not in self.forwarded:
            args.append("--no-register")  # one registration (the supervisor's admin) is enough
        args += ["--ready-file", str(ready)]
        env = dict(os.environ)
        env.pop(GATE_ENV, None)
        env[WORKER_CHANNEL_ENV] = worker_channel(self, index)  # where its successor will connect
        if index in self.takeover_from:  # take over from the old supervisor's worker `index`
            env[TAKEOVER_ENV] = self.takeover_from.pop(index)
        if self.gate is not None:
            env[GATE_ENV] = str(self.gate.path)
            env[NOTIFY_ENV] = self.notify_name
            env[INDEX_ENV] = str(index)
        proc = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.DEVNULL, env=env
        )
        self.procs[index] = proc
        deadline = time.monotonic() + 30
        while not ready.exists():
            if proc.returncode is not None or time.monotonic() > deadline:
                if proc.returncode is None:
                    proc.kill()  # hung in its start: it must not hold switches back
                    await proc.wait()
                self._worker_gone(index)
                raise RuntimeError(f"worker {index} did not start (exit code {proc.returncode})")
            await asyncio.sleep(0.02)
        ports = orjson.loads(ready.read_bytes())
        self.admins[index] = f"127.0.0.1:{ports['admin']}"
        asyncio.get_running_loop().create_task(self.watch(index, proc))

    async def watch(self, index: int, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if self.stopping or self.procs[index] is not proc or self.handing_over:
            return
        self.restarts += 1
        log.error("worker %d exited with code %s; restarting it", index, code)
        self.admins[index] = None
        self._worker_gone(index)
        while not self.stopping:
            try:
                await self.spawn(index)
                return
            except RuntimeError as exc:
                log.error("restart failed: %s", exc)
                await asyncio.sleep(1)

    # -- switch gate --------------------------------------------------------------------------

    def _live(self) -> list[int]:
        return [i for i, p in enumerate(self.procs) if p is not None and p.returncode is None]

    def _worker_gone(self, index: int) -> None:
        # A dead worker serves nothing: it must not hold the others' switch back.
        if self.gate is not None:
            self.gate.publish(index, 0)
            self.check_gate()

    def check_gate(self) -> None:
        gate = self.gate
        if gate is None or self.stopping:
            return
        live = self._live()
        target = gate.commit_if_ready(live)
        if target is not None:
            log.info("switch committed in all %d live workers (target %016x)", len(live), target)
        slots = [gate.slot(i) for i in live]
        waiting = [live[i] for i in waiting_for(gate.committed, slots)]
        if waiting and self.waiting_since is None:
            self.waiting_since = time.monotonic()
        elif not waiting and self.waiting_since is not None:
            self.waiting_since = None
        self.waiting = waiting

    def _nudged(self, sock: socket.socket) -> None:
        # A worker prepared a switch: check now. The datagrams carry nothing else; drain them.
        try:
            while sock.recv(64):
                pass
        except OSError:
            pass
        self.check_gate()

    async def _check_gate_forever(self) -> None:
        reported = False
        while True:
            await asyncio.sleep(GATE_CHECK_INTERVAL)
            self.check_gate()
            blocked = self.switch_status().get("blocked")
            if blocked and not reported:
                log.error("%s", blocked)
            reported = bool(blocked)

    def switch_status(self) -> dict[str, Any]:
        gate = self.gate
        if gate is None:
            return {"gated": False}
        body: dict[str, Any] = {
            "gated": True,
            "committed_target": f"{gate.committed:016x}",
            "commits": gate.commits,
            "prepared": [f"{gate.slot(i):016x}" if gate.slot(i) else None for i in range(self.n)],
            "waiting_for": self.waiting,
        }
        if self.waiting_since is not None:
            waited = time.monotonic() - self.waiting_since
            body["waiting_s"] = round(waited, 3)
            if waited > SWITCH_REPORT_AFTER:
                names = ", ".join(f"worker {i} (pid {self._pid(i)})" for i in self.waiting)
                body["blocked"] = (
                    f"a switch is held back for {waited:.1f}s: {names} did not prepare it "
                    "(not following the registry? see its discovery status); "
                    "all workers keep the previous Active group"
                )
        return body

    def _sighup(self) -> None:
        # Each worker re-reads the configuration itself (live_config.py).
        for p in self.procs:
            if p is not None and p.returncode is None:
                p.send_signal(signal.SIGHUP)

    def _pid(self, index: int) -> int | None:
        p = self.procs[index]
        return p.pid if p is not None else None

    async def _first_commit(self) -> None:
        # Readiness means routing: wait (bounded) until every worker applied the first target.
        deadline = time.monotonic() + FIRST_COMMIT_TIMEOUT
        while self.gate is not None and self.gate.committed == 0:
            self.check_gate()
            if time.monotonic() > deadline:
                log.warning("no routing committed after %gs; starting anyway", FIRST_COMMIT_TIMEOUT)
                return
            await asyncio.sleep(0.005)

    # -- lifecycle ----------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        # First of all: a SIGTERM at any moment, even while workers are still starting, must
        # stop them with us rather than kill us and leave them holding the ports.
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGUSR2, self.donor.signalled)
        loop.add_signal_handler(signal.SIGHUP, self._sighup)
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        startup = loop.create_task(self._start())
        stopped = loop.create_task(stop.wait())
        code = 0
        try:
            await asyncio.wait({startup, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if startup.done():
                code = startup.result()
                if code == 0:
                    finished = loop.create_task(self.donor.finished.wait())
                    await asyncio.wait({stopped, finished}, return_when=asyncio.FIRST_COMPLETED)
                    finished.cancel()
            else:
                log.info("stopping while starting: stopping the workers started so far")
                startup.cancel()
                await asyncio.gather(startup, return_exceptions=True)
        finally:
            stopped.cancel()
            await self._shutdown(loop)
        return code

    async def _start(self) -> int:
        """Ports, gate, admin API, workers, first commit, ready file. 0 when serving."""
        loop = asyncio.get_running_loop()
        if self.receiver is not None:  # a takeover's successor: sockets first, "ready" last
            return await self.receiver.start(self, self._start_serving(loop))
        return await self._start_serving(loop)

    async def _start_serving(self, loop: asyncio.AbstractEventLoop) -> int:
        try:
            ports = self.reserve()
        except OSError as exc:
            log.error("cannot bind the proxy's ports: %s", exc)
            return 1
        if self.gated:
            self.gate = GateFile.create(self.run_dir / "switch-gate", self.n)
            notify = self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            notify.bind("\0" + self.notify_name)
            notify.setblocking(False)
            loop.add_reader(notify.fileno(), self._nudged, notify)
            self._checker = loop.create_task(self._check_gate_forever())
        try:
            host, ports["admin"] = await self.admin.start(self.inherited.pop("admin", None))
        except OSError as exc:
            log.error("cannot bind the admin API on %s: %s", self.cfg.proxy.admin_listen, exc)
            return 1
        self.admin_addr = (
            f"[{host}]:{ports['admin']}" if ":" in host else f"{host}:{ports['admin']}"
        )
        try:
            await asyncio.gather(*(self.spawn(i) for i in range(self.n)))
        except RuntimeError as exc:
            log.error("%s", exc)
            return 1
        await self._first_commit()
        ports["pid"] = os.getpid()
        if self.ready_file:
            tmp = Path(self.ready_file + ".tmp")
            tmp.write_bytes(orjson.dumps(ports))
            os.replace(tmp, self.ready_file)
        sdnotify.ready()
        log.info("supervising %d workers", self.n, extra={"fields": {"ports": ports}})
        return 0

    async def _shutdown(self, loop: asyncio.AbstractEventLoop) -> None:
        await self.stop()
        await self.admin.cleanup()
        if self._checker is not None:
            self._checker.cancel()
        if self._notify is not None:
            loop.remove_reader(self._notify.fileno())
            self._notify.close()
        if self.gate is not None:
            self.gate.close()
        # The run dir (ready files, the gate) belongs to this supervisor alone: leave nothing.
        shutil.rmtree(self.run_dir, ignore_errors=True)

    async def stop(self) -> None:
        self.stopping = True
        for p in self.procs:
            if p is not None and p.returncode is None:
                p.send_signal(signal.SIGTERM)
        grace = self.cfg.proxy.shutdown_grace + 5
        for p in self.procs:
            if p is None:
                continue
            try:
                await asyncio.wait_for(p.wait(), grace)
            except TimeoutError:
                p.kill()
                await p.wait()
        await self.admin.close_session()
        for s in self.reserved:
            s.close()


def run_supervisor(
    cfg: Config,
    config_path: str | None,
    ready_file: str | None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> int:
    import uvloop

    return uvloop.run(Supervisor(cfg, config_path, ready_file, overrides).run())


__all__ = ["Supervisor", "merge_hsms", "merge_metrics", "run_supervisor"]
