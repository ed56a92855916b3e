"""The audit trail of release actions: every deploy, switch and rollback, refused and failed
ones included, one JSON record each.

A record says who (user, host, pid), what (action, app, backend, from/to group and version,
the version deployed, the generation written), and how it ended (`result`: ok | refused |
failed | interrupted, with the one-line `reason`). A rollback is recorded as `rollback`.
`refused` means nothing was changed; `failed` means something was (an instance restarted, a
job registered, the Active pointer written) before the command gave up.

`via` says what ran the command when it was not typed at a shell (the web dashboard).

Where records go: `history.jsonl` in the state directory (both backends) and, with the Nomad
backend, also the Consul KV key `<prefix>/<app>/history/<time_ns>`. Writing the trail never
makes a release fail: a record that cannot be written is reported as a warning.
"""

from __future__ import annotations

import base64
import getpass
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson

from zerodown_proxy.dashboard.release import AUDIT_VIA_ENV

from .backend import Progress, Refused
from .release_lock import LockBusy, ReleaseLock

Entry = dict[str, Any]
Writer = Callable[[Entry], Awaitable[None]]


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return os.environ.get("USER") or str(os.getuid())


def record(backend: str, app: str, entry: Entry, ns: int | None = None) -> Entry:
    """The full record for `entry` (action, result, reason and the action's own fields)."""
    ns = time.time_ns() if ns is None else ns
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns / 1e9)) + "Z",
        "time_ns": ns,
        "user": _user(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "backend": backend,
        "app": app,
        **_via(),
        **entry,
    }


def _via() -> Entry:
    """`via`: what ran the command for its user (the web dashboard sets it; none at a shell)."""
    via = os.environ.get(AUDIT_VIA_ENV)
    return {"via": via} if via else {}


def append_local(path: Path, rec: Entry, progress: Progress) -> None:
    """One line appended to `path` (one write on an O_APPEND descriptor: concurrent writers
    never interleave within a line)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, orjson.dumps(rec) + b"\n")
        finally:
            os.close(fd)
    except OSError as exc:
        progress(f"warning: could not append to the audit log {path}: {exc}")


def read_local(path: Path) -> list[Entry]:
    """The records in `path`, oldest first; a line that is not a record is skipped."""
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def from_kv(entries: list[dict[str, Any]]) -> list[Entry]:
    """Records from a Consul KV listing of `<prefix>/<app>/history/` (values base64 JSON)."""
    out = []
    for e in entries:
        try:
            rec = orjson.loads(base64.b64decode(e.get("Value") or b""))
        except (orjson.JSONDecodeError, ValueError):
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return sorted(out, key=lambda r: r.get("time_ns") or 0)


HISTORY_COLUMNS = ("TIME", "WHO", "ACTION", "FROM -> TO", "VERSIONS", "RESULT", "REASON")


def row(rec: Entry) -> tuple[str, ...]:
    """One record as the `zerodown history` table shows it (time in local time)."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime((rec.get("time_ns") or 0) / 1e9))
    who = f"{rec.get('user', '?')}@{rec.get('host', '?')}"
    if rec.get("action") == "deploy":
        groups = f"-> {rec['group']}" if rec.get("group") else "-"
        versions = f"{rec.get('from_version') or '?'} -> {rec.get('version') or '?'}"
    elif str(rec.get("action", "")).startswith("pilot-"):
        groups = f"{rec.get('tool', '?')} -> {rec.get('group') or '-'}"
        versions = f"pilots: {', '.join(rec.get('pilots') or []) or 'none'}"
    else:
        groups = (f"{rec.get('from') or '?'} -> {rec.get('to') or '?'}"
                  if rec.get("from") or rec.get("to") else "-")  # fmt: skip
        versions = (f"{rec.get('from_version') or '?'} -> {rec.get('to_version') or '?'}"
                    if rec.get("from_version") or rec.get("to_version") else "-")  # fmt: skip
    return (when, who, str(rec.get("action", "?")), groups, versions,
            str(rec.get("result", "?")), str(rec.get("reason") or ""))  # fmt: skip


def table(records: list[Entry]) -> list[str]:
    """The history as aligned columns, a header first; the reason is last and never cut."""
    rows = [HISTORY_COLUMNS, *(row(r) for r in records)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HISTORY_COLUMNS) - 1)]
    return [("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
            .rstrip() for r in rows]  # fmt: skip


@asynccontextmanager
async def release_action(
    lock: ReleaseLock,
    write: Writer,
    action: str,
    verb: str,
    progress: Progress,
) -> AsyncIterator[Entry]:
    """Run one release action under the release lock and audit how it ended.

    Yields the entry the action fills in (from/to, versions, generation...); it sets
    `entry["changed"] = True` once it changed something, which turns a later refusal into
    `failed`. The lock is released whatever happens."""
    entry: Entry = {"action": action}
    try:
        await lock.acquire(action, verb, progress)
    except LockBusy as exc:
        holder = exc.holder.to_dict() if exc.holder is not None else None
        await write({**entry, "result": "refused", "reason": str(exc), "holder": holder})
        raise
    try:
        previous = getattr(lock, "previous", None)
        if previous is not None:
            entry["previous_holder_died"] = previous.to_dict()
        yield entry
    except Refused as exc:
        await write({**_public(entry), "result": _failed(entry), "reason": str(exc)})
        raise
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
        await write({**_public(entry), "result": "failed", "reason": reason})
        raise
    except BaseException:  # Ctrl-C, cancellation
        await write({**_public(entry), "result": "interrupted", "reason": "interrupted"})
        raise
    else:
        await write({**_public(entry), "result": "ok"})
    finally:
        await lock.release()


def _failed(entry: Entry) -> str:
    return "failed" if entry.get("changed") else "refused"


def _public(entry: Entry) -> Entry:
    return {k: v for k, v in entry.items() if k != "changed"}
