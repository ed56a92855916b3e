"""Every timeout of the HTTP side, checked by one periodic sweep (no timer per request).

Client: header, idle and read timeouts. Upstream: first byte and between-bytes read timeouts.
The idle pool's upstream_idle_timeout, the overload queue's max_queue_time, the capacity's
open-files limit and the balancer's ejection decay are refreshed on the same tick.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from .capacity import nofile_limit

if TYPE_CHECKING:
    from .proxy import HttpProxy

log = logging.getLogger("zerodown.http")

SWEEP_INTERVAL = 0.25


async def sweep_forever(proxy: HttpProxy) -> None:
    due = time.monotonic() + SWEEP_INTERVAL
    while True:
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        now = time.monotonic()
        # How late this tick runs is how long the event loop kept everything else waiting
        # (a saturated CPU, a long callback): bytes in socket buffers wait that long too.
        proxy.acc.m_loop_lag.observe(max(0.0, now - due))
        due = now + SWEEP_INTERVAL
        try:
            sweep(proxy, now)
        except Exception:
            log.exception("timeout sweep failed")


def sweep(proxy: HttpProxy, now: float) -> None:
    """One pass over the client connections, the idle pool, capacity and the balancer."""
    cfg = proxy.cfg
    # Waiting for the head is bounded by both (read_timeout: no silence is ever longer).
    first_byte = min(cfg.first_byte_timeout, cfg.read_timeout)
    for c in list(proxy.clients):
        cur = c.current
        if c.tunnel is not None:
            continue
        if cur is not None:
            up = cur.upstream
            if not cur.request_done and now - c.last_activity > cfg.read_timeout:
                proxy.count_client_error(408)
                c.abort()
            elif up is None:
                pass
            elif up.frame is None:
                if up.sent_at and now - up.sent_at > first_byte:
                    proxy.first_byte_timeout(cur, up)
            elif not c.flow.write_paused and now - up.last_activity > cfg.read_timeout:
                # Between bytes of a body: the long read_timeout (streams may pause).
                proxy.upstream_error(
                    cur, up, "timeout", f"no response data within {cfg.read_timeout:g}s"
                )
        elif c.in_head and now - c.head_started > cfg.client_header_timeout:
            c.reject(408, "timed out waiting for the request headers")
        elif c.idle() and now - c.last_activity > cfg.client_idle_timeout:
            c.close()
    proxy.pool.expire(now - cfg.upstream_idle_timeout)
    if proxy.queue.waiting:
        for cycle in proxy.queue.expire(now):
            proxy.queue.shed(cycle, "queue_timeout")
    proxy.capacity.resize(nofile_limit())
    proxy.balancer.sweep(now)
