"""Takeover of a multi-worker proxy: the supervisor is the process replaced, and each of its
workers is replaced by a worker of the new supervisor, exactly as a single proxy is.

Old supervisor (`SupervisorDonor`, on SIGUSR2 or admin POST /v1/takeover):
1. stops restarting workers that exit (they will, once handed over) and starts its successor
   with the same command line, told where its channel is (wire.ENV);
2. hands it the reserved ports and the admin listener by name, and the path of every worker's
   own takeover channel (each worker listens on one from its start: lifecycle.py);
3. the new supervisor starts its workers, worker i told to take over from old worker i: each
   old worker gives its successor its listening sockets, then its tool connections, then exits
   (donor.py, tools.py); the new supervisor says "ready" once every new worker serves and the
   first switch-gate commit is done (its workers switch together from then on, with its gate);
4. the old supervisor stops its admin listener, waits for its workers to finish handing over
   (bounded), and exits.
If the successor fails before "ready", it is killed; old workers that were not taken over never
stopped serving, and any that exited is started again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from . import wire
from .donor import (
    READY_TIMEOUT,
    Channel,
    TakeoverFailed,
    offer_listeners,
    stop_child,
    successor_argv,
)

if TYPE_CHECKING:
    from ..supervisor import Supervisor

log = logging.getLogger("zerodown.takeover")

EXIT_MARGIN = 10.0


def worker_channel(sup: Supervisor, index: int) -> str:
    return str(sup.run_dir / f"worker-{index}.takeover")


class SupervisorDonor:
    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.running = False
        self.finished = asyncio.Event()

    async def takeover(self) -> dict[str, Any]:
        sup = self.sup
        if self.running:
            raise TakeoverFailed("a takeover of this proxy is already running")
        self.running = True
        sup.handing_over = True
        chan = Channel()
        proc = None
        try:
            env = {**os.environ, wire.ENV: chan.path}
            proc = await asyncio.create_subprocess_exec(
                *successor_argv(), env=env, stdin=asyncio.subprocess.DEVNULL
            )
            ch = await chan.accept(proc, time.monotonic() + READY_TIMEOUT)
            pid = ch.peer_pid()
            names = [f"reserved:{k}" for k in sup.listen] + ["admin"]
            fds = [s.fileno() for s in sup.reserved] + [sup.admin.listening_fd()]
            workers = {str(i): worker_channel(sup, i) for i in range(sup.n)}
            await offer_listeners(ch, proc, names, fds, {"listen": sup.listen, "workers": workers})
        except (TakeoverFailed, OSError) as exc:
            await stop_child(proc)
            chan.close()
            self.running = False
            sup.handing_over = False
            reason = str(exc) if isinstance(exc, TakeoverFailed) else f"cannot start it: {exc}"
            log.error("takeover failed, this proxy keeps serving: %s", reason,
                      extra={"fields": {"event": "takeover_failed", "reason": reason}})  # fmt: skip
            await self._restart_exited()
            raise TakeoverFailed(reason) from exc
        chan.close()
        ch.close()
        log.info("takeover: new supervisor %d is serving; waiting for the workers", pid,
                 extra={"fields": {"event": "takeover_ready", "pid": pid}})  # fmt: skip
        asyncio.get_running_loop().create_task(self._finish(pid))
        return {"pid": pid, "old_pid": os.getpid()}

    def signalled(self) -> None:
        """SIGUSR2."""
        asyncio.get_running_loop().create_task(self._on_signal())

    async def _on_signal(self) -> None:
        try:
            result = await self.takeover()
        except TakeoverFailed:
            return  # logged above
        log.info("SIGUSR2: replaced by pid %d", result["pid"])

    async def _restart_exited(self) -> None:
        sup = self.sup
        for i, p in enumerate(sup.procs):
            if p is not None and p.returncode is not None and not sup.stopping:
                log.warning("worker %d exited during the failed takeover; starting it again", i)
                with contextlib.suppress(RuntimeError):
                    await sup.spawn(i)

    async def _finish(self, pid: int) -> None:
        sup = self.sup
        # Not `stopping`: the old workers still serve what they hold, and a switch must still
        # be committed for them at one instant (exits are not restarted: `handing_over`).
        await sup.admin.stop_listening()
        bound = sup.cfg.hsms.t3 + sup.cfg.proxy.shutdown_grace + EXIT_MARGIN
        procs = [p for p in sup.procs if p is not None]
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), bound)
        except TimeoutError:
            log.error("takeover: workers still running after %gs; stopping them", bound)
        log.info("takeover done: replaced by supervisor %d", pid,
                 extra={"fields": {"event": "takeover_done", "pid": pid}})  # fmt: skip
        self.finished.set()


class SupervisorReceiver:
    """The new supervisor's side: sockets and old workers' channels, then "ready"."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.ch: wire.Channel | None = None

    async def start(self, sup: Supervisor, serving: Coroutine[Any, Any, int]) -> int:
        """Get the sockets, run `serving` (the supervisor's own start), then "ready" or why
        not; its exit code."""
        try:
            await self.inherit(sup)
        except (wire.ChannelError, OSError) as exc:
            serving.close()
            log.error("takeover: cannot get the sockets from the old supervisor: %s", exc)
            return 1
        code = await serving
        if code == 0:
            self.ready()
        else:
            self.fail(f"the new supervisor did not start (exit code {code})")
        return code

    async def inherit(self, sup: Supervisor) -> None:
        ch = self.ch = await asyncio.to_thread(wire.Channel.connect, self.path, 10.0)
        msg, sup.inherited = await asyncio.to_thread(wire.receive_listeners, ch)
        sup.takeover_from = {int(i): p for i, p in (msg.get("workers") or {}).items()}

    def ready(self) -> None:
        if self.ch is not None:
            self.ch.send({"t": "ready", "pid": os.getpid()})
            self.ch.close()
            self.ch = None

    def fail(self, reason: str) -> None:
        if self.ch is not None:
            with contextlib.suppress(wire.ChannelError):
                self.ch.send({"t": "failed", "reason": reason})
            self.ch.close()
            self.ch = None
