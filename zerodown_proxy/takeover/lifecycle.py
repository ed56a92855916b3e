"""One proxy process from start to exit: started fresh or as a takeover's successor, serving,
then stopped by SIGTERM/SIGINT or by handing everything to its own successor.

Signals (nginx's conventions): SIGTERM/SIGINT stop gracefully; SIGUSR2 starts a takeover (a new
process from the code installed now, same command line); SIGHUP re-reads the configuration
file (live_config.py). A worker of a multi-worker supervisor is taken over through the channel
its supervisor names (ZERODOWN_TAKEOVER_CHANNEL): its successor, started by the new supervisor,
connects there.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from . import sdnotify, wire
from .donor import Donor, TakeoverFailed
from .receiver import Receiver, channel_path

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger("zerodown.takeover")

WORKER_CHANNEL_ENV = "ZERODOWN_TAKEOVER_CHANNEL"


def write_ready(ready_file: str, ports: dict[str, int]) -> None:
    tmp = Path(ready_file + ".tmp")
    tmp.write_bytes(orjson.dumps(ports))
    os.replace(tmp, ready_file)


async def serve(
    cfg: Config,
    ready_file: str | None = None,
    reuse_port: bool = False,
    supervisor_admin: str | None = None,
    config_path: str | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> int:
    from ..server import ProxyServer

    path = channel_path()
    worker_channel = os.environ.pop(WORKER_CHANNEL_ENV, None)
    receiver = Receiver(path) if path else None
    inherited = None
    if receiver is not None:
        try:
            inherited = await receiver.connect()
        except (wire.ChannelError, OSError) as exc:
            log.error("takeover: cannot get the sockets from the old process: %s", exc)
            return 1
    server = ProxyServer(cfg, reuse_port, supervisor_admin, config_path, inherited)
    if receiver is not None:
        server.before_serving = lambda: receiver.caught_up(server)
    try:
        ports = await server.start()
        if receiver is not None:
            await receiver.ready(server)
    except (wire.ChannelError, OSError) as exc:
        log.error("not starting: %s", exc)
        if receiver is not None:
            receiver.fail(str(exc))
        await server.stop()
        return 1
    if ready_file:
        write_ready(ready_file, ports)
    if not reuse_port:  # the main process (a worker's supervisor speaks for it)
        sdnotify.ready()

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    donor = Donor(server)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if reuse_port:  # a worker: its supervisor is the process replaced
        loop.add_signal_handler(
            signal.SIGUSR2, lambda: log.warning("SIGUSR2 ignored: send it to the supervisor")
        )
    if worker_channel:  # its supervisor's successor starts ours, which connects there
        loop.create_task(_offer_worker(donor, worker_channel))
    elif not reuse_port:
        assert server.admin is not None
        server.admin.takeover = donor.takeover
        loop.add_signal_handler(signal.SIGUSR2, lambda: loop.create_task(_on_sigusr2(donor)))
    from ..live_config import LiveConfig

    live = LiveConfig(server, config_path, overrides)
    loop.add_signal_handler(signal.SIGHUP, live.reload_logged)
    assert server.admin is not None
    server.admin.reload_config = live.reload
    stopped = loop.create_task(stop.wait())
    finished = loop.create_task(donor.finished.wait())
    await asyncio.wait({stopped, finished}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    finished.cancel()
    if receiver is not None:
        receiver.close()
    await server.stop()
    return 0


async def _on_sigusr2(donor: Donor) -> None:
    try:
        result = await donor.takeover()
    except TakeoverFailed:
        return  # logged by the donor
    log.info("SIGUSR2: replaced by pid %d", result["pid"])


async def _offer_worker(donor: Donor, path: str) -> None:
    """A worker waits on its channel for its successor, for as long as it runs."""
    while not donor.finished.is_set():
        try:
            await donor.takeover(channel_path=path, wait=None)
            return
        except TakeoverFailed:
            await asyncio.sleep(0.5)  # logged by the donor; wait for the next one
