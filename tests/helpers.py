"""Test helpers: real proxy and sample-app processes on 127.0.0.1 with ephemeral ports."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent


def wait_until(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def async_wait_until(
    cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def write_registry(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(orjson.dumps(data))
    os.replace(tmp, path)


def instance(
    iid: str, group: str, version: str, port: int, healthy: bool = True, hsms: int | None = None
) -> dict[str, Any]:
    return {
        "id": iid,
        "group": group,
        "version": version,
        "address": "127.0.0.1",
        "http_port": port,
        "hsms_port": hsms,
        "healthy": healthy,
    }


def registry(generation: int, active: str, instances: list[dict[str, Any]], **app: Any) -> dict:
    return {
        "generation": generation,
        "apps": {"drimeap": {"active": active, "instances": instances, **app}},
        "proxies": [],
    }


class Proc:
    """A `python -m orchestrator ...` child with a ready file."""

    def __init__(self, args: list[str], workdir: Path, name: str) -> None:
        self.ready_file = workdir / f"{name}.ready"
        self.log_path = workdir / f"{name}.log"
        self.ready_file.unlink(missing_ok=True)
        self.log = open(self.log_path, "wb")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        for var in ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "CONSUL_CACERT", "ZERODOWN_ADMIN_TOKEN",
                    "ZERODOWN_REGISTRY"):  # fmt: skip
            env.pop(var, None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", *args, "--ready-file", str(self.ready_file)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=workdir,
        )
        self.ports: dict[str, int] = wait_until(self._ready, 20, f"{name} to be ready")

    def _ready(self) -> dict[str, int] | None:
        if self.proc.poll() is not None:
            raise AssertionError(f"process exited early ({self.proc.returncode}): {self.output()}")
        if self.ready_file.exists():
            return orjson.loads(self.ready_file.read_bytes())
        return None

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

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


class ProxyProc(Proc):
    def __init__(
        self, workdir: Path, registry_path: Path, config: str = "", name: str = "proxy"
    ) -> None:
        cfg = workdir / f"{name}.toml"
        cfg.write_text(
            "\n".join(
                [
                    "[proxy]",
                    'http_listen = "127.0.0.1:0"',
                    'hsms_listen = "127.0.0.1:0"',
                    'admin_listen = "127.0.0.1:0"',
                    'admin_token = "test-token"',
                    "shutdown_grace = 5.0",
                    config,
                    "" if "[hsms]" in config else "[hsms]\nenabled = false",
                    "[discovery]",
                    f'file = "{registry_path}"',
                    "",
                ]
            )
            if "[discovery]" not in config
            else config
        )
        super().__init__(["proxy", "--config", str(cfg)], workdir, name)
        self.http = self.ports["http"]
        self.admin = self.ports["admin"]
        self.hsms = self.ports.get("hsms")

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


class SampleApp(Proc):
    def __init__(self, workdir: Path, iid: str, version: str, hsms: bool = False) -> None:
        args = ["sample-app", "--version", version, "--http-port", "0", "--instance-id", iid]
        if hsms:
            args += ["--hsms-port", "0"]
        super().__init__(args, workdir, iid)
        self.port = self.ports["http"]
        self.hsms_port = self.ports.get("hsms")
