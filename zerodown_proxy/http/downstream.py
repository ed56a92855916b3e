"""The client side of the HTTP data path: one asyncio Protocol per client connection.

httptools parses requests; the framing core (`framing.request_frame`) decides whether each head
is acceptable and how its body is delimited; each accepted request becomes a RequestCycle that
is routed with the snapshot of the moment it is dispatched, sent on a pooled upstream connection,
and answered in order (pipelined requests wait their turn, with their bodies buffered up to a
bound). This module only moves bytes and keeps the order; the decisions live in framing.py and
proxy.py.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING

import httptools

from ..flow import FlowControl, Pause
from .cycle import BUFFER_LIMIT, RequestCycle
from .framing import HOP_BY_HOP, NO_BODY, Refusal, RequestFrame, request_frame
from .headers import body_size, error_response
from .overload import RETRY_AFTER

if TYPE_CHECKING:
    from .proxy import HttpProxy
    from .upstream import UpstreamProtocol

PIPELINE_LIMIT = 16
# Stands for a request the proxy refuses without having parsed it (answered in its turn).
_UNREAD = RequestFrame(NO_BODY, 0, b"", b"-", False, False, HOP_BY_HOP)


class _Refused(Exception):
    """Raised from a parser callback to stop parsing: answer `refusal` and close."""

    def __init__(self, refusal: Refusal) -> None:
        self.refusal = refusal


class ClientProtocol(asyncio.Protocol):
    __slots__ = (
        "proxy",
        "cfg",
        "transport",
        "flow",
        "peer",
        "peer_b",
        "parser",
        "http11",
        "current",
        "receiving",
        "last",
        "queue",
        "last_activity",
        "head_started",
        "in_head",
        "head_bytes",
        "head_size",
        "closing",
        "tunnel",
        "tunnel_buffered",
        "local_host",
        "admitted",
        "_url",
        "_headers",
        "_lnames",
    )

    def __init__(self, proxy: HttpProxy) -> None:
        self.proxy = proxy
        self.cfg = proxy.cfg
        self.transport: asyncio.Transport | None = None
        self.flow = FlowControl()
        self.peer = ""
        self.peer_b = b""
        self.parser = httptools.HttpRequestParser(self)
        self.http11 = True
        self.current: RequestCycle | None = None
        self.receiving: RequestCycle | None = None
        self.last: RequestCycle | None = None
        self.queue: deque[RequestCycle] = deque()
        self.last_activity = time.monotonic()
        self.head_started = 0.0
        self.in_head = False
        self.head_bytes = 0
        self.head_size = 0
        self.closing = False
        self.tunnel: UpstreamProtocol | None = None
        self.tunnel_buffered = 0
        self.local_host = b""
        self.admitted = False
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._lnames: list[bytes] = []  # lower-cased names, parallel to _headers (lowered once)

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.flow.attach(self.transport)  # type: ignore[arg-type]
        refusal = self.proxy.admit(self)
        if refusal is not None:
            # Over the connection cap (or the file-descriptor budget): say so and close now,
            # so the fd comes back at once and the client knows why (see README, HTTP limits).
            self.closing = True
            self.flow.pause_reading(Pause.LIMIT)
            transport.write(error_response(503, refusal, True, retry_after=RETRY_AFTER))  # type: ignore[attr-defined]
            transport.close()
            return
        self.admitted = True
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else ""
        self.peer_b = self.peer.encode()
        local = transport.get_extra_info("sockname")
        self.local_host = f"{local[0]}:{local[1]}".encode() if local else b"localhost"
        if self.proxy.draining:
            self.flow.pause_reading(Pause.DRAIN)
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if self.admitted:
            self.proxy.client_gone(self)
        tunnel, self.tunnel = self.tunnel, None
        if tunnel is not None:
            tunnel.close()
        for cycle in (self.current, *self.queue):
            if cycle is not None:
                cycle.aborted = True
                up = cycle.upstream
                if up is not None:
                    # The client went away mid-exchange: the backend connection is in an unknown
                    # state, never return it to the pool.
                    up.detach()
                    up.abort()
                    self.proxy.count_client_abort(cycle)
        self.current = None
        self.queue.clear()

    def data_received(self, data: bytes) -> None:
        self.last_activity = time.monotonic()
        if self.tunnel is not None:
            self.tunnel.send(data)
            return
        cur = self.current
        if cur is not None and cur.tunnel_pending is not None:
            # Upgrade requested, waiting for the backend's 101: hold a bounded amount.
            cur.tunnel_pending.append(data)
            self.tunnel_buffered += len(data)
            if self.tunnel_buffered > BUFFER_LIMIT:
                self.flow.pause_reading(Pause.BUFFER)
            return
        if self.closing:
            return
        if self.receiving is None or self.in_head:
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgrade_requested(data[exc.args[0] :])
            return
        except httptools.HttpParserCallbackError as exc:
            ctx = exc.__context__
            if isinstance(ctx, _Refused):
                self.reject(ctx.refusal.status, ctx.refusal.reason)
            elif isinstance(ctx, HeadersTooLarge):
                self.reject(431, "request headers are larger than the proxy accepts")
            else:
                raise
            return
        except httptools.HttpParserError as exc:
            if self.receiving is not None and not self.in_head:
                self.body_invalid(self.receiving, f"malformed request body: {exc}")
            else:
                self.reject(400, f"malformed HTTP request: {exc}")
            return
        if self.in_head and self.head_bytes > self.cfg.max_header_bytes:
            self.reject(431, "request headers are larger than the proxy accepts")

    def pause_writing(self) -> None:
        self.flow.write_paused = True
        up = self.tunnel
        if up is None and self.current is not None:
            up = self.current.upstream
        if up is not None:
            up.peer_paused()

    def resume_writing(self) -> None:
        self.flow.write_paused = False
        up = self.tunnel
        if up is None and self.current is not None:
            up = self.current.upstream
        if up is not None:
            up.peer_resumed()

    # -- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.in_head = True
        self.head_started = self.last_activity  # set by data_received, just before parsing
        self.head_size = 0
        self._url = b""
        self._headers = []
        self._lnames = []

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.cfg.max_header_bytes:
            raise HeadersTooLarge()

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.in_head:
            self._headers.append((name, value))
            self._lnames.append(name.lower())
            self.head_size += len(name) + len(value) + 4
            if self.head_size > self.cfg.max_header_bytes or len(self._headers) > 200:
                raise HeadersTooLarge()
        # else: a chunked trailer; trailers are not forwarded

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.head_bytes = 0
        parser = self.parser
        method = parser.get_method()
        lnames = self._lnames
        if b"connection" in lnames:
            http11 = parser.get_http_version() == "1.1"  # formats a string: ~0.3 us
        else:
            # Without a Connection header llhttp keeps alive exactly the HTTP/1.1 requests.
            http11 = parser.should_keep_alive()
        self.http11 = http11
        frame = request_frame(method, http11, self._url, self._headers, lnames)
        if type(frame) is Refusal:
            raise _Refused(frame)
        cycle = self.proxy.prepare(self, method, frame, self._headers, self._lnames)  # type: ignore[arg-type]
        self.receiving = self.last = cycle
        if self.current is None:
            if cycle.local is None:  # dispatch(), inline for the common case
                self.current = cycle
                self.proxy.send_request(cycle)
            else:
                self.dispatch(cycle)
        else:
            self.queue.append(cycle)
            if len(self.queue) >= PIPELINE_LIMIT:
                self.flow.pause_reading(Pause.PIPELINE)

    def on_body(self, body: bytes) -> None:
        cycle = self.receiving
        if cycle is not None and cycle.local is None:
            cycle.feed_body(body)

    def on_message_complete(self) -> None:
        cycle = self.receiving
        self.receiving = None
        if cycle is not None:
            if cycle.local is None:
                cycle.end_body()
            else:
                cycle.request_done = True

    # -- request flow -------------------------------------------------------------------------

    def dispatch(self, cycle: RequestCycle) -> None:
        self.current = cycle
        if cycle.local is not None:
            status, message = cycle.local
            self.respond_error(cycle, status, message)
            return
        self.proxy.send_request(cycle)

    def response_complete(self, cycle: RequestCycle) -> None:
        """The upstream finished answering `cycle`: log it, then serve the next request."""
        if cycle is not self.current:
            return
        self.current = None
        self.proxy.count_response(cycle)
        if not cycle.keep_alive or not cycle.request_done or self.proxy.draining:
            self.close()
            return
        if self.queue:
            nxt = self.queue.popleft()
            if len(self.queue) < PIPELINE_LIMIT and self.flow.reasons:
                self.flow.resume_reading(Pause.PIPELINE)
            self.dispatch(nxt)

    def respond_error(
        self, cycle: RequestCycle, status: int, message: str, retry_after: int = 0
    ) -> None:
        """Answer `cycle` from the proxy itself (502/503/504/413...)."""
        cycle.status = status
        close = not cycle.request_done or not cycle.keep_alive or self.proxy.draining
        if close:
            cycle.keep_alive = False
        data = error_response(status, message, close, cycle.request_id, retry_after)
        cycle.sent = body_size(data)  # for the access log
        self.write(data)
        if cycle is self.current:
            self.response_complete(cycle)

    def reject(self, status: int, message: str) -> None:
        """Bad input from the client: answer and close (the byte stream cannot be resynced)."""
        self.proxy.count_client_error(status)
        if self.transport is None or self.closing:
            return
        self.receiving = None
        self.closing = True  # stop parsing further input
        if self.current is None:
            data = error_response(status, message, close=True)
            self.proxy.acc.log_refused(self.peer, status, body_size(data))
            self.transport.write(data)
            self.close()
        else:
            # Let the exchange in progress finish, then answer this one and close.
            bad = RequestCycle(self, self.cfg, b"-", _UNREAD)
            bad.local = (status, message)
            bad.keep_alive = False
            bad.request_done = True
            self.queue.append(bad)

    def body_invalid(self, cycle: RequestCycle, message: str) -> None:
        """The body after an accepted head cannot be parsed (bad chunk size, bare LF, ...): the
        backend already has part of it, so its connection is closed, never pooled, and the
        client gets its 400 now instead of waiting for a response that cannot come."""
        self.proxy.count_client_error(400)
        self.receiving = None
        self.closing = True
        self.flow.pause_reading(Pause.DRAIN)
        cycle.keep_alive = False
        cycle.request_done = True  # nothing more will be read for it
        up = cycle.upstream
        if up is not None:
            up.detach()
            up.abort()
        if cycle.status != 0:
            # The backend already answered (headers out): cutting is the only honest signal.
            self.proxy.abandon(cycle)
            self.abort()
        elif cycle is self.current:
            self.respond_error(cycle, 400, message)
        else:
            cycle.local = (400, message)  # answered in turn, after the requests before it

    def body_too_large(self, cycle: RequestCycle) -> None:
        self.proxy.count_client_error(413)
        up = cycle.upstream
        if up is not None:
            up.detach()
            up.abort()
        self.closing = True  # stop parsing the rest of the body
        self.flow.pause_reading(Pause.DRAIN)
        if cycle.status == 0:
            cycle.keep_alive = False
            if cycle is self.current:
                self.respond_error(cycle, 413, "request body is larger than the proxy accepts")
            else:
                cycle.local = (413, "request body is larger than the proxy accepts")
        else:
            self.proxy.abandon(cycle)
            self.close()

    # -- upgrade (WebSocket) tunnel -----------------------------------------------------------

    def _upgrade_requested(self, leftover: bytes) -> None:
        cycle = self.last
        self.closing = True  # httptools parses nothing after an upgrade head
        if cycle is None or not cycle.upgrade:
            self.reject(400, "unexpected protocol upgrade")
            return
        if cycle is not self.current:
            if cycle.status == 0:
                cycle.local = (400, "an Upgrade request cannot be pipelined behind another")
            cycle.keep_alive = False
            return
        cycle.tunnel_pending = [leftover] if leftover else []
        self.tunnel_buffered = len(leftover)

    def start_tunnel(self, cycle: RequestCycle, upstream: UpstreamProtocol) -> None:
        self.tunnel = upstream
        pending = cycle.tunnel_pending or []
        cycle.tunnel_pending = None
        for chunk in pending:
            upstream.send(chunk)
        self.tunnel_buffered = 0
        self.flow.resume_reading(Pause.BUFFER)
        self.proxy.count_response(cycle)
        self.current = None

    def tunnel_closed(self) -> None:
        self.tunnel = None
        self.close()

    # -- output -------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def writelines(self, parts: tuple[bytes, ...]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(parts)

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.abort()

    def idle(self) -> bool:
        return self.current is None and not self.in_head and self.receiving is None


class HeadersTooLarge(Exception):
    pass
