"""The local stack: the proxy, the file registry and sample drimEAP instances as local processes.

Everything lives under a state directory (default ./.zerodown):
    registry.json   the routing state the proxy watches
    stack.json      pids and ports of the processes, and the admin token (mode 0600)
    proxy.toml      the proxy's configuration, with the admin token (mode 0600)
    release.lock    the release lock (deploy, switch, rollback; see release_lock.py)
    history.jsonl   the audit trail of release actions (audit.py)
    logs/           one log file per process
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from . import registry
from .backend import Refused

APP = "drimeap"
GROUPS = ("blue", "green")


def default_state_dir() -> Path:
    return Path(os.environ.get("ZERODOWN_STATE_DIR", ".zerodown")).resolve()


@dataclass
class StackPaths:
    root: Path

    @property
    def registry(self) -> Path:
        return self.root / "registry.json"

    @property
    def stack(self) -> Path:
        return self.root / "stack.json"

    @property
    def proxy_config(self) -> Path:
        return self.root / "proxy.toml"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def ready(self, name: str) -> Path:
        return self.root / "run" / f"{name}.ready"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still answers kill(0): reap it if it has exited.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def load_stack(paths: StackPaths) -> dict[str, Any]:
    try:
        return orjson.loads(paths.stack.read_bytes())
    except FileNotFoundError:
        raise Refused(f"no local stack in {paths.root}: start one with 'zerodown up'") from None


def write_private(path: Path, text: str | bytes) -> None:
    """Write a file only its owner can read (it holds the admin token), atomically: the
    temporary file is created 0600, so the token is never readable by others, not even for a
    moment, and an older 0644 file is replaced, not rewritten in place."""
    data = text.encode() if isinstance(text, str) else text
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(fd, 0o600)  # O_CREAT's mode applies to a new file only (and after the umask)
        f.write(data)
    os.replace(tmp, path)


def save_stack(paths: StackPaths, stack: dict[str, Any]) -> None:
    write_private(paths.stack, orjson.dumps(stack, option=orjson.OPT_INDENT_2))


def spawn(paths: StackPaths, name: str, args: list[str]) -> subprocess.Popen[bytes]:
    """Start `python -m orchestrator <args>` detached, logging to logs/<name>.log."""
    paths.logs.mkdir(parents=True, exist_ok=True)
    ready = paths.ready(name)
    ready.parent.mkdir(parents=True, exist_ok=True)
    ready.unlink(missing_ok=True)
    log = open(paths.logs / f"{name}.log", "ab")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "orchestrator", *args, "--ready-file", str(ready)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    finally:
        log.close()


def wait_ready(
    paths: StackPaths, name: str, proc: subprocess.Popen[bytes], timeout: float = 20.0
) -> dict[str, Any]:
    ready = paths.ready(name)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready.exists():
            return orjson.loads(ready.read_bytes())
        if proc.poll() is not None:
            tail = _tail(paths.logs / f"{name}.log")
            raise Refused(f"{name} exited with code {proc.returncode} before it was ready: {tail}")
        time.sleep(0.02)
    proc.terminate()
    raise Refused(f"{name} was not ready within {timeout:g}s (see {paths.logs / (name + '.log')})")


def _tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except FileNotFoundError:
        return "(no log)"
    return lines[-1][-300:] if lines else "(empty log)"


def start_instance(
    paths: StackPaths, iid: str, version: str, hsms: bool, device_id: int = 0
) -> dict[str, Any]:
    args = ["sample-app", "--version", version, "--http-port", "0", "--instance-id", iid]
    if hsms:
        args += ["--hsms-port", "0", "--device-id", str(device_id)]
    proc = spawn(paths, iid, args)
    ports = wait_ready(paths, iid, proc)
    return {"pid": proc.pid, "http_port": ports["http"], "hsms_port": ports.get("hsms")}


def stop_pids(pids: list[int], timeout: float = 10.0) -> None:
    """SIGTERM every pid, wait for all of them (bounded), SIGKILL the ones still alive."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    pending = list(pids)
    while pending and time.monotonic() < deadline:
        pending = [p for p in pending if _alive(p)]
        if pending:
            time.sleep(0.02)
    for pid in pending:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def stop_pid(pid: int, timeout: float = 10.0) -> None:
    stop_pids([pid], timeout)


def up(
    state_dir: Path,
    http_listen: str = "0.0.0.0:8080",
    hsms_listen: str = "0.0.0.0:5000",
    admin_listen: str = "127.0.0.1:8081",
    version: str = "v1",
    per_group: int = 2,
    hsms: bool = True,
    device_id: int = 0,
    progress: Any = print,
) -> dict[str, Any]:
    paths = StackPaths(state_dir)
    if paths.stack.exists():
        stack = orjson.loads(paths.stack.read_bytes())
        if any(_alive(p["pid"]) for p in _all_procs(stack)):
            raise Refused(f"a local stack is already running in {state_dir}: 'zerodown down' first")
        paths.stack.unlink()
    paths.root.mkdir(parents=True, exist_ok=True)
    paths.registry.unlink(missing_ok=True)
    token = secrets.token_urlsafe(24)
    stack: dict[str, Any] = {"token": token, "app": APP, "instances": {}, "proxy": None}
    save_stack(paths, stack)
    instances = []
    try:
        for group in GROUPS:
            for n in range(1, per_group + 1):
                iid = f"{APP}-{group}-{n}"
                info = start_instance(paths, iid, version, hsms, device_id)
                stack["instances"][iid] = {"pid": info["pid"]}
                save_stack(paths, stack)
                instances.append(
                    {
                        "id": iid,
                        "group": group,
                        "version": version,
                        "address": "127.0.0.1",
                        "http_port": info["http_port"],
                        "hsms_port": info["hsms_port"],
                        "healthy": True,
                    }
                )
                progress(f"started {iid} ({version}) on http :{info['http_port']}")

        def init(reg: dict[str, Any]) -> None:
            reg["apps"] = {
                APP: {
                    "active": GROUPS[0],
                    "hsms_device_id": device_id,
                    "instances": instances,
                }
            }
            reg["proxies"] = []

        registry.update(paths.registry, init)
        write_private(
            paths.proxy_config,
            "\n".join(
                [
                    "[proxy]",
                    f'http_listen = "{http_listen}"',
                    f'hsms_listen = "{hsms_listen}"',
                    f'admin_listen = "{admin_listen}"',
                    f'admin_token = "{token}"',
                    'name = "local"',
                    "[hsms]",
                    f"enabled = {'true' if hsms else 'false'}",
                    f"device_id = {device_id}",
                    "[health_check]",
                    "enabled = true",
                    'path = "/health"',
                    "interval = 1.0",
                    "timeout = 1.0",
                    "[discovery]",
                    'provider = "file"',
                    f'file = "{paths.registry}"',
                    "",
                ]
            ),
        )
        proc = spawn(paths, "proxy", ["proxy", "--config", str(paths.proxy_config)])
        stack["proxy"] = {"pid": proc.pid}
        save_stack(paths, stack)
        ports = wait_ready(paths, "proxy", proc)
        admin = f"127.0.0.1:{ports['admin']}"
        stack["proxy"].update(ports)
        stack["proxy"]["admin_addr"] = admin
        save_stack(paths, stack)
        registry.update(
            paths.registry,
            lambda reg: reg.__setitem__("proxies", [{"name": "local", "admin": admin}]),
        )
        progress(
            f"proxy up: http :{ports['http']}"
            + (f", hsms :{ports['hsms']}" if "hsms" in ports else "")
            + f", admin {admin}"
        )
        return stack
    except BaseException:
        down(state_dir, progress=lambda _m: None)
        raise


def _all_procs(stack: dict[str, Any]) -> list[dict[str, Any]]:
    procs = list(stack.get("instances", {}).values())
    if stack.get("proxy"):
        procs.append(stack["proxy"])
    return procs


def down(state_dir: Path, progress: Any = print) -> int:
    paths = StackPaths(state_dir)
    if not paths.stack.exists():
        raise Refused(f"no local stack in {state_dir}: nothing to stop")
    stack = orjson.loads(paths.stack.read_bytes())
    pids = [p["pid"] for p in _all_procs(stack)]
    stop_pids(pids)
    stopped = len(pids)
    paths.stack.unlink(missing_ok=True)
    paths.registry.unlink(missing_ok=True)
    progress(f"stopped {stopped} processes")
    return stopped
