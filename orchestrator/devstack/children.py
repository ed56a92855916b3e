"""Child processes of the local dev stack on 127.0.0.1 with ephemeral ports, for tests and
benchmarks: `python -m orchestrator <args> --ready-file F` (or `-m zerodown_proxy`), waited for
until it writes its bound ports to F, stopped with SIGTERM (then SIGKILL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[2]

# Variables that would make a child talk to something other than what its caller set up.
_SCRUBBED_ENV = ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "CONSUL_CACERT", "ZERODOWN_ADMIN_TOKEN",
                 "ZERODOWN_REGISTRY")  # fmt: skip


class ChildFailed(RuntimeError):
    """A child exited before it was ready, or was not ready in time; the message says which."""


def wait_until(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll `cond` every 10 ms until it returns something true; AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Child:
    """One child process with a ready file; `ports` holds what it wrote there."""

    def __init__(
        self,
        args: list[str],
        workdir: Path,
        name: str,
        timeout: float = 30.0,
        module: str = "orchestrator",
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.ready_file = workdir / f"{name}.ready"
        self.log_path = workdir / f"{name}.log"
        self.ready_file.unlink(missing_ok=True)
        self.log = open(self.log_path, "wb")
        child_env = {**os.environ, "PYTHONPATH": str(ROOT)}
        for var in _SCRUBBED_ENV:
            child_env.pop(var, None)
        child_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *args, "--ready-file", str(self.ready_file)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=child_env,
            cwd=workdir,
        )
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if self.proc.poll() is not None:
                raise ChildFailed(f"{name} exited early ({self.proc.returncode}): {self.output()}")
            if time.monotonic() > deadline:
                self.terminate()
                raise ChildFailed(f"{name} not ready after {timeout:g} s: {self.output()}")
            time.sleep(0.02)
        self.ports: dict[str, Any] = orjson.loads(self.ready_file.read_bytes())

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self, limit: int = 4000) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")[-limit:]

    def terminate(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class ProxyProc(Child):
    """`python -m zerodown_proxy` on ephemeral ports, with a file registry unless `config`
    has its own [discovery] section (then `config` is the whole file)."""

    def __init__(
        self, workdir: Path, registry_path: Path, config: str = "", name: str = "proxy"
    ) -> None:
        cfg = workdir / f"{name}.toml"
        if "[discovery]" in config:
            text = config
        else:
            text = "\n".join(
                [
                    "[proxy]",
                    'http_listen = "127.0.0.1:0"',
                    'hsms_listen = "127.0.0.1:0"',
                    'admin_listen = "127.0.0.1:0"',
                    'admin_token = "test-token"',
                    "shutdown_grace = 5.0",
                    config,
                    "" if "[hsms]" in config else "[hsms]\nenabled = false",
                    # Probes would add requests a byte-exact test backend does not expect.
                    "" if "[health_check" in config else "[health_check]\nenabled = false",
                    "[discovery]",
                    f'file = "{registry_path}"',
                    "",
                ]
            )
        cfg.write_text(text)
        super().__init__(["--config", str(cfg)], workdir, name, module="zerodown_proxy")
        self.http: int = self.ports["http"]
        self.admin: int = self.ports["admin"]
        self.hsms: int | None = self.ports.get("hsms")

    def status(self) -> dict[str, Any]:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/v1/status", timeout=5) as r:
            return orjson.loads(r.read())

    def wait_generation(self, generation: int, timeout: float = 5.0) -> dict[str, Any]:
        return wait_until(
            lambda: (s := self.status())["generation"] >= generation and s,
            timeout,
            f"proxy to apply generation {generation}",
        )


class SampleApp(Child):
    """`zerodown sample-app` on ephemeral ports (HTTP, and HSMS with `hsms=True`)."""

    def __init__(self, workdir: Path, iid: str, version: str, hsms: bool = False) -> None:
        args = ["sample-app", "--version", version, "--http-port", "0", "--instance-id", iid]
        if hsms:
            args += ["--hsms-port", "0"]
        super().__init__(args, workdir, iid)
        self.port: int = self.ports["http"]
        self.hsms_port: int | None = self.ports.get("hsms")
