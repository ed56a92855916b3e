"""The dashboard's release actions and history: the operator's own `zerodown` commands.

A switch or rollback from the page runs `zerodown switch` / `zerodown rollback` as a child
process, with the backend the CLI would pick for this proxy's discovery provider (file ->
the local stack whose registry this proxy watches, consul -> Consul + Nomad with this proxy's
config file). So the page gets exactly the CLI's checks, release lock, refusal reasons and audit
record (marked `via`), and the data plane never imports the control plane (layers import
downward only; a release action's blocking work stays out of the proxy's event loop).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from ..config import Config

ACTION_TIMEOUT = 180.0  # a switch waits for every proxy; a deploy is not offered here
HISTORY_TIMEOUT = 30.0
HISTORY_MAX_AGE = 15.0  # seconds a history answer is reused while the generation is unchanged
HISTORY_MIN_AGE = 1.0  # and reused whatever generation is asked for (a switch shows within 2 s)
AUDIT_VIA_ENV = "ZERODOWN_AUDIT_VIA"  # what audit.record writes as `via` (orchestrator/audit.py)


@dataclass(frozen=True, slots=True)
class Outcome:
    ok: bool
    message: str  # the CLI's answer: its result line, or its one-line refusal


class ReleaseDesk:
    def __init__(self, cfg: Config, config_path: str | None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self._history: dict[str, tuple[float, int, list[dict[str, Any]]]] = {}
        # One history run at a time: any number of open pages (or of requests naming new
        # generations or apps) costs at most one `zerodown history` process at once.
        self._reading = asyncio.Lock()

    def backend_args(self) -> list[str]:
        """The backend flags `zerodown` needs to act on what this proxy routes by."""
        if self.cfg.discovery.provider == "consul":
            args = ["--backend", "nomad"]
            if self.config_path:
                args += ["--config", str(Path(self.config_path).resolve())]
            return args
        # The local stack keeps its registry file in its state directory (local_stack.py).
        return ["--backend", "local", "--state-dir", str(self.cfg.registry_path().parent)]

    async def _run(
        self, argv: list[str], timeout: float, via: str | None = None
    ) -> tuple[int, str, str]:
        env = dict(os.environ)
        env.pop("ZERODOWN_BACKEND", None)  # --backend is given; a stray variable must not win
        if via:
            env[AUDIT_VIA_ENV] = via
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "orchestrator", *argv, *self.backend_args(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )  # fmt: skip
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return 1, "", f"zerodown: {argv[0]} did not finish within {timeout:g}s"
        return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")

    async def act(self, action: str, app: str, to_group: str | None, via: str) -> Outcome:
        """Run `zerodown switch|rollback` for `app`; its result line or its refusal."""
        if action not in ("switch", "rollback"):
            return Outcome(False, f"unknown action {action!r}: switch or rollback")
        argv = [action, "--app", app]
        if action == "switch" and to_group:
            argv += ["--to", to_group]
        code, out, err = await self._run(argv, ACTION_TIMEOUT, via)
        self._history.pop(app, None)
        if code == 0:
            lines = out.strip().splitlines()
            return Outcome(True, lines[-1] if lines else f"{action} done")
        return Outcome(False, cli_reason(err) or f"zerodown {action} exited with code {code}")

    async def history(self, app: str, generation: int) -> list[dict[str, Any]]:
        """`zerodown history --json` for `app`, oldest first (reused while fresh)."""
        async with self._reading:
            cached = self._history.get(app)
            now = time.monotonic()
            if (
                cached
                and now - cached[0] < HISTORY_MAX_AGE
                and (cached[1] == generation or now - cached[0] < HISTORY_MIN_AGE)
            ):
                return cached[2]
            code, out, err = await self._run(["history", "--app", app, "--json"], HISTORY_TIMEOUT)
            if code != 0:
                reason = cli_reason(err) or f"zerodown history exited with {code}"
                raise HistoryUnavailable(reason)
            records = parse_records(out)
            self._history[app] = (time.monotonic(), generation, records)  # as of its end
            return records


class HistoryUnavailable(Exception):
    """The audit trail could not be read; str() says why."""


def cli_reason(stderr: str) -> str | None:
    """The CLI's one-line reason (`zerodown: ...`, its last such line on stderr)."""
    for line in reversed(stderr.strip().splitlines()):
        if line.startswith("zerodown: "):
            return line.removeprefix("zerodown: ").strip()
    return None


def parse_records(text: str) -> list[dict[str, Any]]:
    """Audit records from `history --json`: one JSON array, or one JSON object per line."""
    text = text.strip()
    if not text:
        return []
    try:
        whole = orjson.loads(text)
    except orjson.JSONDecodeError:
        whole = None
    if isinstance(whole, list):
        return [r for r in whole if isinstance(r, dict)]
    if isinstance(whole, dict):
        return [whole]
    out = []
    for line in text.splitlines():
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out
