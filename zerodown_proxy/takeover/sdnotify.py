"""systemd's readiness protocol (sd_notify), so a unit with `Type=notify` and
`NotifyAccess=all` follows a takeover: the new main process says `MAINPID=<its pid>` and
`READY=1` before the old one exits, and systemd keeps the service running under the new pid
(instead of seeing its main process exit and stopping the unit).

A datagram to $NOTIFY_SOCKET (a path, or an abstract name written with a leading `@`); nothing
at all when the variable is not set (not started by systemd).
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("zerodown.proxy")


def notify(*fields: str) -> bool:
    """Send `fields` (e.g. "READY=1"); True when systemd was told."""
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall("\n".join(fields).encode())
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", addr, exc)
        return False
    return True


def ready() -> bool:
    """This process is the service's main process, and it serves."""
    return notify(f"MAINPID={os.getpid()}", "READY=1")
