"""The HTTP side of a takeover in the old process: its listener is already served by the new
process; what it still holds are its client connections.

No request may fail: a request in flight finishes here, and its response carries
`Connection: close` (the proxy is draining), so the client's next request opens a connection
the new process accepts. A keep-alive connection that stays idle for IDLE_CLOSE_AFTER is
closed: a client idle that long is not in the middle of sending (closing one that is about to
send is the one race HTTP/1.1 leaves to the client's retry of idempotent requests; waiting a
moment of idleness makes it rare). What is left after `grace` seconds is cut, as on shutdown.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..http.proxy import HttpProxy

IDLE_CLOSE_AFTER = 1.0
STEP = 0.02


async def drain(http: HttpProxy, grace: float) -> int:
    """Stop accepting, finish what is in flight, close the rest gracefully; the number of
    connections that had to be cut after `grace`."""
    server = http._server
    if server is not None:
        server.close()
    # Connections accepted just before the close get their connection_made first: one that
    # saw `draining` there would be closed before it was read.
    await asyncio.sleep(STEP)
    http.draining = True
    http.pool.closing = True
    deadline = time.monotonic() + grace
    while http.clients and time.monotonic() < deadline:
        now = time.monotonic()
        for c in list(http.clients):
            if c.idle() and c.tunnel is None and now - c.last_activity >= IDLE_CLOSE_AFTER:
                c.close()
        await asyncio.sleep(STEP)
    cut = len(http.clients)
    for c in list(http.clients):
        c.abort()
    http.pool.close_all()
    if http._sweeper is not None:
        http._sweeper.cancel()
    return cut
