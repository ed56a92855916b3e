"""`zerodown proxy-reload`: replace the running proxy process by a new one started from the code
installed now, nothing dropped (the proxy's takeover, zerodown_proxy/takeover/).

It calls the proxy's admin `POST /v1/takeover` with the admin token; the proxy answers once the
new process serves (or with the reason it could not: the old one keeps serving), then this waits
until the admin API itself is answered by the new process. Exit 0 with "pid A -> B", or 1 with
the reason in one sentence.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from zerodown_proxy.config import ConfigError, load_config

from .healthcheck import admin_address

DEFAULT_TIMEOUT = 60.0


@dataclass(frozen=True, slots=True)
class Outcome:
    ok: bool
    message: str


def admin_token(token: str | None, config: str | None) -> str:
    """--token, else $ZERODOWN_ADMIN_TOKEN, else [proxy] admin_token of --config."""
    if token:
        return token
    if os.environ.get("ZERODOWN_ADMIN_TOKEN"):
        return os.environ["ZERODOWN_ADMIN_TOKEN"]
    return load_config(config).proxy.admin_token if config else ""


def _call(url: str, token: str, timeout: float, method: str = "GET") -> tuple[int, dict]:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            body = json.loads(exc.read() or b"{}")
        except ValueError:
            body = {}
        return exc.code, body if isinstance(body, dict) else {}


def reload_proxy(
    admin: str | None, config: str | None, token: str | None, timeout: float = DEFAULT_TIMEOUT
) -> Outcome:
    try:
        host, port = admin_address(admin, config)
        secret = admin_token(token, config)
    except ConfigError as exc:
        return Outcome(False, str(exc))
    base = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    if not secret:
        return Outcome(False, "no admin token: pass --token, set ZERODOWN_ADMIN_TOKEN or --config")
    try:
        status, body = _call(f"{base}/v1/takeover", secret, timeout, "POST")
    except (OSError, ValueError) as exc:
        return Outcome(False, f"cannot reach the proxy's admin API at {base}: {exc}")
    if status != 200:
        why = body.get("error") or f"HTTP {status}"
        return Outcome(False, f"the proxy was not replaced: {why}")
    new, old = body.get("pid"), body.get("old_pid")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _, st = _call(f"{base}/v1/status", "", 5.0)
            if st.get("pid") == new:
                return Outcome(True, f"proxy replaced: pid {old} -> {new}")
        except (OSError, ValueError):
            pass  # the admin listener is changing hands
        time.sleep(0.1)
    return Outcome(False, f"new proxy pid {new} serves, but its admin API did not answer within "
                          f"{timeout:g}s")  # fmt: skip
