"""What ties a multi-worker proxy's worker to its supervisor (supervisor.py): the flags it is
started with (the supervisor's own overrides, forwarded) and its death with the supervisor."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
from typing import Any

from .cli import OVERRIDES

log = logging.getLogger("zerodown.workers")

PR_SET_PDEATHSIG = 1  # linux/prctl.h
# Keys the supervisor sets itself, per worker, instead of forwarding them.
_PER_WORKER = {("proxy", "http_listen"), ("proxy", "hsms_listen"), ("proxy", "admin_listen"),
               ("proxy", "workers"), ("proxy", "name")}  # fmt: skip


def worker_argv(overrides: dict[str, dict[str, Any]] | None) -> list[str]:
    """The flags a worker is given to run with its supervisor's overrides."""
    out: list[str] = []
    for flag, section, key in OVERRIDES:
        value = (overrides or {}).get(section, {}).get(key)
        if value is None or (section, key) in _PER_WORKER:
            continue
        if isinstance(value, bool):  # a switch flag (--no-register) means its one value
            out.append(flag)
        else:
            out += [flag, str(value)]
    return out


def die_with_supervisor(supervisor_pid: int) -> bool:
    """In a worker: have the kernel send SIGTERM when the supervisor dies. False when it is
    already gone (this process was re-parented before the request took effect)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError) as exc:  # not Linux: the supervisor's stop() must do
        log.warning("cannot tie this worker to its supervisor's life (prctl: %s)", exc)
    return os.getppid() == supervisor_pid
