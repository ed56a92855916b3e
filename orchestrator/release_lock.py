"""The release lock: deploy, switch and rollback each hold it for their whole run, as `consul
lock` and Terraform's state lock do, so two release commands never interleave. A second one
refuses at once and names the holder:

    another release command is running (switch, pid 4242 on host fab-ops-1, since 12:03:55);
    not switching.

The compare-and-set on the routing generation stays underneath: the lock makes the second
command refuse before it reads anything, the CAS still catches a writer that does not take it.

Two implementations, one per backend:

- `FileReleaseLock` (local stack): flock(LOCK_EX | LOCK_NB) on `<state dir>/release.lock`,
  the holder's identity written into the file. A holder that dies, even by SIGKILL, loses the
  lock with its file descriptor: the kernel releases it, nothing to recover by hand. The next
  holder finds the dead one's record still in the file and says so.
- `ConsulReleaseLock` (Nomad backend): a Consul session (TTL, behavior=release, short
  lock-delay) and `PUT <prefix>/<app>/lock?acquire=<session>` with the holder as the value,
  renewed every TTL/3 while held; released, then the session destroyed, at the end. A holder
  that dies stops renewing, and Consul invalidates its session within 2 x TTL (that is how
  Consul times sessions), which frees the lock. Faster, and still safe: when the recorded
  holder ran on *this* machine (same kernel boot id and pid namespace, so its pid means the
  same process here) and that process no longer exists (pid gone, or reused by a process that
  started at another time), its session is destroyed at once and the lock taken. A holder on
  another host is never second-guessed: only its TTL frees the lock. A holder that was merely
  frozen and whose session expired finds out before it writes: `confirm()` renews the session
  right before the routing write and the job registration, and refuses if it was lost.
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import getpass
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import orjson

from .backend import Progress, Refused
from .hashicorp_api import ApiError, ConsulApi


class LockBusy(Refused):
    """Another release command holds the lock; str() is the one-line refusal."""

    def __init__(self, message: str, holder: Holder | None) -> None:
        super().__init__(message)
        self.holder = holder


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot), or None if there is no such process.
    Told apart from a later process that got the same pid."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return None
    fields = stat.rpartition(")")[2].split()  # after "(comm)": field 3 (state) onwards
    if not fields or fields[0] in ("Z", "X"):  # exited, only not reaped yet
        return None
    try:
        return int(fields[19])  # field 22: starttime
    except (IndexError, ValueError):
        return None


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return os.environ.get("USER") or str(os.getuid())


@dataclass(frozen=True, slots=True)
class Holder:
    """Who holds (or held) the release lock."""

    action: str  # deploy | switch | rollback
    pid: int
    host: str
    user: str
    since: float  # epoch seconds
    boot_id: str = ""  # the kernel's boot id: same machine, same boot
    pid_ns: str = ""  # the pid namespace: the pid names the same process here
    started: int | None = None  # the process's start time, against pid reuse

    @classmethod
    def me(cls, action: str) -> Holder:
        pid = os.getpid()
        return cls(
            action=action,
            pid=pid,
            host=socket.gethostname(),
            user=_user(),
            since=time.time(),
            boot_id=_read("/proc/sys/kernel/random/boot_id"),
            pid_ns=_pid_ns(),
            started=_start_ticks(pid),
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> Holder | None:
        try:
            d = orjson.loads(raw)
            return cls(
                action=str(d["action"]),
                pid=int(d["pid"]),
                host=str(d["host"]),
                user=str(d.get("user", "")),
                since=float(d["since"]),
                boot_id=str(d.get("boot_id", "")),
                pid_ns=str(d.get("pid_ns", "")),
                started=int(d["started"]) if d.get("started") is not None else None,
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    def describe(self) -> str:
        when = time.strftime("%H:%M:%S", time.localtime(self.since))
        return f"{self.action}, pid {self.pid} on host {self.host}, since {when}"

    def alive(self) -> bool | None:
        """Is the holder still running? None when this machine cannot tell (another host or
        pid namespace): then only the holder's own lease (the session TTL) may free the lock."""
        if not self.boot_id or self.boot_id != _read("/proc/sys/kernel/random/boot_id"):
            return None
        if not self.pid_ns or self.pid_ns != _pid_ns():
            return None
        started = _start_ticks(self.pid)
        if started is None:
            return False
        return self.started is None or started == self.started


def _pid_ns() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def busy_message(holder: Holder | None, verb: str, where: str) -> str:
    who = holder.describe() if holder is not None else f"holder unknown: {where}"
    return f"another release command is running ({who}); not {verb}."


# -- local stack: flock ---------------------------------------------------------------------


class FileReleaseLock:
    """flock on a file in the state directory; see the module docstring."""

    # A holder writes its record right after it got the lock: a reader that finds the lock
    # taken but the record missing (or naming a finished process) looks again this long.
    SETTLE = 1.0

    def __init__(self, path: Path) -> None:
        self.path = path
        self.holder: Holder | None = None
        self.previous: Holder | None = None  # a holder that died without releasing
        self._fd: int | None = None

    async def acquire(self, action: str, verb: str, progress: Progress) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + self.SETTLE
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = Holder.from_json(os.pread(fd, 4096, 0) or b"")
                if (holder is not None and holder.alive() is not False) or (
                    time.monotonic() > deadline
                ):
                    os.close(fd)
                    message = busy_message(holder, verb, f"{self.path} is empty")
                    raise LockBusy(message, holder) from None
                await asyncio.sleep(0.02)
        # Ours. A record left in the file is a holder that died (the kernel dropped its lock).
        self.previous = Holder.from_json(os.pread(fd, 4096, 0) or b"")
        if self.previous is not None:
            progress(
                f"note: the previous release command ({self.previous.describe()}) ended "
                "without finishing; check 'zerodown status' before going on"
            )
        self.holder = Holder.me(action)
        os.ftruncate(fd, 0)
        os.pwrite(fd, self.holder.to_json(), 0)
        self._fd = fd

    async def confirm(self, verb: str) -> None:
        """Nothing to do: the kernel holds the lock for as long as this process lives."""

    async def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # an empty file: nobody holds it, nobody died holding it
        finally:
            os.close(fd)  # closing the last descriptor drops the flock


# -- Nomad backend: a Consul session lock ------------------------------------------------------


class ConsulReleaseLock:
    """A Consul session lock on `key`; see the module docstring."""

    TTL = 15.0  # seconds; Consul accepts 10 s .. 24 h
    LOCK_DELAY = "1s"  # after a session ends, its locks stay blocked this long

    def __init__(self, consul: ConsulApi, key: str, ttl: float | None = None) -> None:
        self.consul = consul
        self.key = key
        self.ttl = ttl or self.TTL
        self.holder: Holder | None = None
        self.session: str | None = None
        self.lost: str | None = None  # why the session was lost while held
        self._renewer: asyncio.Task[None] | None = None

    def _params(self, **extra: str) -> dict[str, str]:
        return dict(extra)  # ConsulApi.call adds dc= itself

    async def _create_session(self) -> str:
        body = {
            "Name": f"zerodown release lock {self.key}",
            "TTL": f"{self.ttl:g}s",
            "Behavior": "release",
            "LockDelay": self.LOCK_DELAY,
        }
        out = await self.consul.json(
            "PUT", "/v1/session/create", params=self._params() or None, body=body
        )
        if not isinstance(out, dict) or not out.get("ID"):
            raise ApiError(f"Consul at {self.consul.addr}: session/create answered {out!r:.80}")
        return str(out["ID"])

    async def _destroy(self, session: str) -> None:
        await self.consul.call(
            "PUT", f"/v1/session/destroy/{quote(session)}", params=self._params() or None
        )

    async def _renew(self, session: str) -> bool:
        """False when Consul no longer knows the session (expired or destroyed)."""
        reply = await self.consul.call(
            "PUT",
            f"/v1/session/renew/{quote(session)}",
            params=self._params() or None,
            ok=(200, 404),
        )
        return reply.status == 200

    async def _kv(self, op: str, session: str, value: bytes) -> bool:
        reply = await self.consul.call(
            "PUT", f"/v1/kv/{quote(self.key)}", params=self._params(**{op: session}), body=value
        )
        return reply.text() == "true"

    async def _current(self) -> tuple[Holder | None, str | None]:
        """The recorded holder and the session that holds the key now (None: not held)."""
        reply = await self.consul.call(
            "GET", f"/v1/kv/{quote(self.key)}", params=self._params() or None, ok=(200, 404)
        )
        if reply.status == 404:
            return None, None
        try:
            entry = orjson.loads(reply.body)[0]
        except (orjson.JSONDecodeError, LookupError, TypeError):
            raise ApiError(
                f"Consul at {self.consul.addr}: unexpected answer for key {self.key}"
            ) from None
        value = base64.b64decode(entry.get("Value") or b"")
        return Holder.from_json(value), entry.get("Session") or None

    async def acquire(self, action: str, verb: str, progress: Progress) -> None:
        me = Holder.me(action)
        session = await self._create_session()
        try:
            # Bounded: the lock-delay that follows a released or recovered lock is 1 s.
            deadline = time.monotonic() + 5.0
            while not await self._kv("acquire", session, me.to_json()):
                holder, theirs = await self._current()
                if theirs is not None:
                    if holder is None or holder.alive() is not False:
                        raise LockBusy(busy_message(holder, verb, f"Consul key {self.key}"), holder)
                    # Its holder ran here and is gone: it will never renew again.
                    progress(
                        f"note: the release lock {self.key} was held by a command that is no "
                        f"longer running ({holder.describe()}); taking it over"
                    )
                    await self._destroy(theirs)
                elif time.monotonic() > deadline:
                    raise LockBusy(
                        f"the release lock {self.key} stayed blocked (Consul lock-delay) after "
                        f"its last holder ({holder.describe() if holder else 'unknown'}) ended; "
                        f"not {verb}.",
                        holder,
                    )
                await asyncio.sleep(0.1)
        except BaseException:
            await self._destroy_quietly(session)
            raise
        self.holder, self.session = me, session
        self._renewer = asyncio.get_running_loop().create_task(self._renew_forever(session))

    async def _renew_forever(self, session: str) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                if not await self._renew(session):
                    self.lost = f"Consul no longer knows session {session[:8]}"
                    return
            except ApiError:
                pass  # Consul unreachable for now: confirm() asks again before any write

    async def confirm(self, verb: str) -> None:
        """Right before a write: refuse if the lock was lost (session expired while this
        process was frozen or cut off from Consul)."""
        if self.session is None:
            raise Refused(f"the release lock {self.key} is not held; not {verb}.")
        if self.lost is None and not await self._renew(self.session):
            self.lost = f"Consul no longer knows session {self.session[:8]}"
        if self.lost is not None:
            raise Refused(
                f"lost the release lock {self.key} ({self.lost}: its TTL ran out); another "
                f"command may be releasing; not {verb}."
            )

    async def _destroy_quietly(self, session: str) -> None:
        try:
            await self._destroy(session)
        except ApiError:
            pass  # its TTL ends it anyway

    async def release(self) -> None:
        session, self.session = self.session, None
        if self._renewer is not None:
            self._renewer.cancel()
            self._renewer = None
        if session is None:
            return
        try:
            # Release first, then destroy: destroying a session that still holds the key would
            # put the key under lock-delay for the next command.
            assert self.holder is not None
            await self._kv("release", session, self.holder.to_json())
        except ApiError:
            pass
        await self._destroy_quietly(session)


class ReleaseLock(Protocol):
    holder: Holder | None

    async def acquire(self, action: str, verb: str, progress: Progress) -> None: ...

    async def confirm(self, verb: str) -> None: ...

    async def release(self) -> None: ...


@asynccontextmanager
async def held(
    lock: ReleaseLock,
    action: str,
    verb: str,
    progress: Progress,
    on_refused: Callable[[Refused], Awaitable[None]],
) -> AsyncIterator[ReleaseLock]:
    """Hold `lock` for the block. Not getting it (held by another command, or the lock's store
    unreachable) goes to `on_refused` (the audit) first."""
    try:
        await lock.acquire(action, verb, progress)
    except Refused as exc:
        await on_refused(exc)
        raise
    try:
        yield lock
    finally:
        await lock.release()
