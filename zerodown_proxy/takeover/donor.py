"""The old process's side of a takeover (SIGUSR2 or admin POST /v1/takeover).

1. start the successor: the same command line (`sys.orig_argv`), from the code installed now,
   told where to find this process by the environment (wire.ENV) - or, for a worker, the new
   supervisor starts it (supervisor_takeover.py) and it connects to this worker's channel;
2. hand it the listening sockets (takeover/listeners.py) and wait, bounded by READY_TIMEOUT,
   until it says it is ready (serving, with routing at least as recent as ours); if it exits,
   fails or is silent instead, kill it: this process never stopped serving, and says why;
3. stop accepting: the listeners stay open in the successor, no connection is refused;
4. HTTP: finish in-flight requests here, close keep-alive clients gracefully (http_drain.py);
   HSMS: per tool, hold new primaries, drain, then send the connection and its state
   (tools.py), every tool at once;
5. say "done", and stop this process as on SIGTERM (nothing left to close gracefully).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from . import http_drain, tools, wire

if TYPE_CHECKING:
    from ..server import ProxyServer

log = logging.getLogger("zerodown.takeover")

READY_TIMEOUT = float(os.environ.get("ZERODOWN_TAKEOVER_READY_TIMEOUT", "30"))
CHANNEL_TIMEOUT = 10.0
T = TypeVar("T")


class TakeoverFailed(Exception):
    """The takeover did not happen; this process keeps serving. The message says why."""


def successor_argv() -> list[str]:
    """This process's own command line, run again by the interpreter running it now."""
    return [sys.executable, *sys.orig_argv[1:]]


async def race(
    aw: Awaitable[T], proc: asyncio.subprocess.Process | None, deadline: float | None, what: str
) -> T:
    """`aw`'s result, unless the successor exits or `deadline` passes first (None: no bound)."""
    task = asyncio.ensure_future(aw)
    waits: set[asyncio.Future[Any]] = {task}
    died = asyncio.ensure_future(proc.wait()) if proc is not None else None
    if died is not None:
        waits.add(died)
    try:
        done, _ = await asyncio.wait(
            waits, timeout=None if deadline is None else max(0.0, deadline - time.monotonic()),
            return_when=asyncio.FIRST_COMPLETED,
        )  # fmt: skip
        if task in done:
            return task.result()
        if died is not None and died in done:
            raise TakeoverFailed(f"the new process exited with code {died.result()} {what}")
        raise TakeoverFailed(f"the new process was not ready within {READY_TIMEOUT:g}s ({what})")
    finally:
        for f in waits:
            if not f.done():
                f.cancel()


class Channel:
    """The donor's end: a private directory with the channel socket, one successor."""

    def __init__(self, path: str | None = None) -> None:
        if path is None:
            self.dir: str | None = tempfile.mkdtemp(prefix="zerodown-takeover-")  # mode 0700
            path = str(Path(self.dir) / "channel")
        else:
            self.dir = None
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self.listening = wire.listen(path)
        self.listening.setblocking(False)

    async def accept(
        self, proc: asyncio.subprocess.Process | None, deadline: float | None
    ) -> wire.Channel:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await race(
                loop.sock_accept(self.listening), proc, deadline, "before it connected"
            )
            ch = wire.Channel(conn, CHANNEL_TIMEOUT)
            if ch.peer_uid() == os.getuid():
                return ch
            log.error("takeover channel: refused a process of another user (uid %d)",
                      ch.peer_uid())  # fmt: skip
            ch.close()

    def close(self) -> None:
        self.listening.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


async def recv(ch: wire.Channel, proc: asyncio.subprocess.Process | None, deadline: float,
               what: str) -> tuple[dict[str, Any], list[int]]:  # fmt: skip
    # The thread's read outlasts the deadline: `race` reports it, with the bound in its words.
    ch.sock.settimeout(max(1.0, deadline - time.monotonic() + 1.0))
    try:
        return await race(asyncio.to_thread(ch.recv), proc, deadline, what)
    except wire.ChannelError as exc:
        if isinstance(exc.__cause__, TimeoutError):
            raise TakeoverFailed(
                f"the new process was not ready within {READY_TIMEOUT:g}s ({what})"
            ) from exc
        if proc is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proc.wait(), 1.0)
            if proc.returncode is not None:
                raise TakeoverFailed(
                    f"the new process exited with code {proc.returncode} {what}"
                ) from exc
        raise TakeoverFailed(f"{exc} ({what})") from exc


async def offer_listeners(
    ch: wire.Channel,
    proc: asyncio.subprocess.Process | None,
    names: list[str],
    fds: list[int],
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Hello, listeners, ready: the successor's "ready" message (TakeoverFailed otherwise)."""
    deadline = time.monotonic() + READY_TIMEOUT
    hello, stray = await recv(ch, proc, deadline, "before it said hello")
    for fd in stray:
        os.close(fd)
    if hello.get("t") != "hello":
        raise TakeoverFailed(f"the new process sent {hello.get('t')!r} instead of hello")
    ch.send({"t": "listeners", "names": names, **extra}, fds)
    msg, stray = await recv(ch, proc, deadline, "before it was ready")
    for fd in stray:
        os.close(fd)
    if msg.get("t") == "failed":
        raise TakeoverFailed(f"the new process could not start: {msg.get('reason')}")
    if msg.get("t") != "ready":
        raise TakeoverFailed(f"the new process sent {msg.get('t')!r} instead of ready")
    return msg


async def stop_child(proc: asyncio.subprocess.Process | None) -> None:
    if proc is None or proc.returncode is not None:
        return
    proc.kill()
    await proc.wait()


class Donor:
    """Replaces one ProxyServer (a single proxy, or one worker of a supervisor)."""

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.running = False
        self.finished = asyncio.Event()  # set when everything is handed over

    async def takeover(
        self, channel_path: str | None = None, wait: float | None = READY_TIMEOUT
    ) -> dict[str, Any]:
        """Start the successor (unless `channel_path`: it is started by someone else and
        connects there, within `wait` s, None: whenever) and hand over. Returns once the
        successor is serving, with its pid; the rest of the handover runs on (`finished`)."""
        if self.running:
            raise TakeoverFailed("a takeover of this process is already running")
        self.running = True
        chan = Channel(channel_path)
        proc = None
        try:
            if channel_path is None:
                env = {**os.environ, wire.ENV: chan.path}
                proc = await asyncio.create_subprocess_exec(
                    *successor_argv(), env=env, stdin=asyncio.subprocess.DEVNULL
                )
            ch = await chan.accept(proc, None if wait is None else time.monotonic() + wait)
            pid = ch.peer_pid()
            names, fds = self.server.listeners.fds()
            gen = self.server.router.snapshot.generation
            await offer_listeners(ch, proc, names, fds, {"generation": gen})
        except (TakeoverFailed, OSError) as exc:
            await stop_child(proc)
            chan.close()
            self.running = False
            reason = str(exc) if isinstance(exc, TakeoverFailed) else f"cannot start it: {exc}"
            log.error("takeover failed, this process keeps serving: %s", reason,
                      extra={"fields": {"event": "takeover_failed", "reason": reason}})  # fmt: skip
            raise TakeoverFailed(reason) from exc
        chan.close()
        log.info("takeover: new process %d is serving; handing over", pid,
                 extra={"fields": {"event": "takeover_ready", "pid": pid}})  # fmt: skip
        asyncio.get_running_loop().create_task(self._hand_over(ch, pid))
        return {"pid": pid, "old_pid": os.getpid()}

    async def _hand_over(self, ch: wire.Channel, pid: int) -> None:
        srv = self.server
        started = time.monotonic()
        grace = srv.cfg.proxy.shutdown_grace
        if srv.admin is not None and getattr(srv.admin, "site", None) is not None:
            await srv.admin.site.stop()
        hsms = srv.hsms
        if hsms is not None and hsms._server is not None:
            hsms._server.close()
        http_task = (
            asyncio.get_running_loop().create_task(http_drain.drain(srv.http, grace))
            if srv.http is not None
            else None
        )
        handed = failed = 0
        if hsms is not None:
            for tool in list(hsms.tools):
                tools.hold(hsms, tool)
            results = await asyncio.gather(
                *(self._one_tool(ch, tool) for tool in list(hsms.tools)), return_exceptions=True
            )
            handed = sum(1 for r in results if r is True)
            failed = len(results) - handed
        try:
            ch.send({"t": "done"})
            await asyncio.wait_for(asyncio.to_thread(ch.recv), CHANNEL_TIMEOUT)
        except (wire.ChannelError, TimeoutError) as exc:
            log.warning("takeover: no goodbye from the new process: %s", exc)
        ch.close()
        registration = getattr(srv.provider, "registration", None)
        if registration is not None:  # the new process registered the same service id
            registration.handed_over = True
        cut = await http_task if http_task is not None else 0
        log.info(
            "takeover done: %d tool connections handed to pid %d in %.1f ms; this process stops",
            handed, pid, (time.monotonic() - started) * 1000,
            extra={"fields": {"event": "takeover_done", "pid": pid, "tools": handed,
                              "tools_not_handed": failed, "http_cut": cut}},
        )  # fmt: skip
        self.finished.set()

    async def _one_tool(self, ch: wire.Channel, tool: tools.ToolLink) -> bool:
        hsms = self.server.hsms
        await tools.drained(hsms, tool)
        taken = tools.export(hsms, tool)
        if taken is None:
            if not tool.closed:
                log.warning("tool %s could not be handed over (unsent bytes); it stays here",
                            tool.peer)  # fmt: skip
                tools.unhold(hsms, tool)
            return False
        state, fd, blob = taken
        try:
            ch.send({"t": "tool", "state": state}, [fd], blob)
        except wire.ChannelError as exc:
            log.error("tool %s not handed over: %s; it stays here", tool.peer, exc)
            tools.unhold(hsms, tool)
            return False
        tools.let_go(hsms, tool)
        return True


def adopt_socket(fd: int) -> socket.socket:
    return socket.socket(fileno=fd)
