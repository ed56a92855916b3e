"""The client side of the HTTP data path: one asyncio Protocol per client connection.

httptools parses requests; each parsed request becomes a RequestCycle that is routed with the
snapshot of the moment it is dispatched, sent on a pooled upstream connection, and answered in
order (pipelined requests wait their turn, with their bodies buffered up to a bound).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING

import httptools

from .headers import PREVIEW_HEADER, TOKEN_HEADER, error_response, hop_by_hop_for

if TYPE_CHECKING:
    from ..routing import AppRoute, Instance
    from .proxy import HttpProxy
    from .upstream import UpstreamProtocol

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})

# Reasons for pausing reads from the client (bit flags: several can hold at once).
PAUSE_UPSTREAM = 1  # the backend is slow to take the request body
PAUSE_BUFFER = 2  # too much body buffered while no upstream is attached yet
PAUSE_DRAIN = 4  # shutting down: read nothing new
PAUSE_PIPELINE = 8  # too many pipelined requests waiting for their turn
BUFFER_LIMIT = 256 * 1024
PIPELINE_LIMIT = 16


class HeadersTooLarge(Exception):
    pass


class RequestCycle:
    """One request/response exchange, from parsed head to the last response byte."""

    __slots__ = (
        "client",
        "method",
        "path",
        "host",
        "http11",
        "keep_alive",
        "upgrade",
        "chunked",
        "preview",
        "request_id",
        "head",
        "body_buf",
        "buffered",
        "retained",
        "request_done",
        "app",
        "instance",
        "tried",
        "attempts",
        "upstream",
        "status",
        "start",
        "local",
        "tunnel_pending",
        "aborted",
        "sent_once",
        "body_seen",
    )

    def __init__(self, client: ClientProtocol) -> None:
        self.client = client
        self.method = b""
        self.path = b""
        self.host = b""
        self.request_id = ""
        self.head = b""
        self.http11 = True
        self.keep_alive = True
        self.upgrade = False
        self.chunked = False
        self.preview = False
        self.body_buf: list[bytes] = []
        self.buffered = 0
        self.retained: list[bytes] | None = None
        self.request_done = False
        self.app: AppRoute | None = None
        self.instance: Instance | None = None
        self.tried: list[Instance] = []
        self.attempts = 0
        self.upstream: UpstreamProtocol | None = None
        self.status = 0
        self.local: tuple[int, str] | None = None
        self.tunnel_pending: list[bytes] | None = None
        self.aborted = False
        self.sent_once = False
        self.body_seen = 0
        self.start = time.perf_counter()

    def draining(self) -> bool:
        return self.client.proxy.draining

    # -- request body -------------------------------------------------------------------------

    def feed_body(self, data: bytes) -> None:
        self.body_seen += len(data)
        if self.body_seen > self.client.proxy.cfg.max_body_bytes:
            self.client.body_too_large(self)
            return
        if self.chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        self._forward(data)

    def end_body(self) -> None:
        self.request_done = True
        if self.chunked:
            self._forward(b"0\r\n\r\n")

    def _forward(self, data: bytes) -> None:
        if self.retained is not None:
            self.retained.append(data)
            if sum(map(len, self.retained)) > self.client.proxy.cfg.retry_body_bytes:
                self.retained = None  # too large to replay: not retryable
        up = self.upstream
        if up is not None:
            up.send(data)
            return
        self.body_buf.append(data)
        self.buffered += len(data)
        if self.buffered > BUFFER_LIMIT:
            self.client.pause_reading_for(PAUSE_BUFFER)

    def take_buffered(self) -> list[bytes]:
        """Head and buffered body, for sending on a freshly attached upstream connection."""
        if self.sent_once:
            # A replay after a failed attempt: only possible when the whole body was retained.
            parts = [self.head, *(self.retained or ())]
        else:
            parts = [self.head, *self.body_buf]
        self.body_buf = []
        self.sent_once = True
        if self.buffered:
            self.buffered = 0
            self.client.resume_reading_for(PAUSE_BUFFER)
        return parts

    def response_started(self, status: int) -> None:
        self.status = status


class ClientProtocol(asyncio.Protocol):
    __slots__ = (
        "proxy",
        "transport",
        "peer",
        "parser",
        "current",
        "receiving",
        "queue",
        "write_paused",
        "pause_bits",
        "last_activity",
        "head_started",
        "in_head",
        "head_bytes",
        "head_size",
        "closing",
        "tunnel",
        "local_host",
        "_url",
        "_headers",
        "_lnames",
    )

    def __init__(self, proxy: HttpProxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.parser = httptools.HttpRequestParser(self)
        self.current: RequestCycle | None = None
        self.receiving: RequestCycle | None = None
        self.queue: deque[RequestCycle] = deque()
        self.write_paused = False
        self.pause_bits = 0
        self.last_activity = time.monotonic()
        self.head_started = 0.0
        self.in_head = False
        self.head_bytes = 0
        self.head_size = 0
        self.closing = False
        self.tunnel: UpstreamProtocol | None = None
        self.local_host = b""
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._lnames: list[bytes] = []  # lower-cased names, parallel to _headers (lowered once)

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else ""
        local = transport.get_extra_info("sockname")
        self.local_host = f"{local[0]}:{local[1]}".encode() if local else b"localhost"
        self.proxy.clients.add(self)
        if self.proxy.draining:
            self.pause_reading_for(PAUSE_DRAIN)
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.proxy.clients.discard(self)
        tunnel, self.tunnel = self.tunnel, None
        if tunnel is not None:
            tunnel.close()
        for cycle in (self.current, *self.queue):
            if cycle is not None:
                cycle.aborted = True
                up = cycle.upstream
                if up is not None and up.cycle is cycle:
                    # The client went away mid-exchange: the backend connection is in an unknown
                    # state, never return it to the pool.
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
            cur.tunnel_pending.append(data)  # upgrade requested, waiting for the backend's 101
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
            if isinstance(exc.__context__, HeadersTooLarge):
                self.reject(431, "request headers are larger than the proxy accepts")
            else:
                raise
            return
        except httptools.HttpParserError as exc:
            self.reject(400, f"malformed HTTP request: {exc}")
            return
        if self.in_head and self.head_bytes > self.proxy.cfg.max_header_bytes:
            self.reject(431, "request headers are larger than the proxy accepts")

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.tunnel is not None and self.tunnel.transport is not None:
            self.tunnel.transport.pause_reading()
            return
        cur = self.current
        if cur is not None and cur.upstream is not None and cur.upstream.transport is not None:
            cur.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.tunnel is not None and self.tunnel.transport is not None:
            self.tunnel.transport.resume_reading()
            return
        cur = self.current
        if cur is not None and cur.upstream is not None and cur.upstream.transport is not None:
            if not cur.upstream.closed:
                cur.upstream.transport.resume_reading()

    # -- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.in_head = True
        self.head_started = time.monotonic()
        self.head_size = 0
        self._url = b""
        self._headers = []
        self._lnames = []

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.proxy.cfg.max_header_bytes:
            raise HeadersTooLarge()

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.in_head:
            self._headers.append((name, value))
            self._lnames.append(name.lower())
            self.head_size += len(name) + len(value) + 4
            if self.head_size > self.proxy.cfg.max_header_bytes or len(self._headers) > 200:
                raise HeadersTooLarge()
        # else: a chunked trailer; trailers are not forwarded

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.head_bytes = 0
        cycle = self.proxy.prepare(self, self.parser, self._url, self._headers, self._lnames)
        self.receiving = cycle
        if self.current is None:
            self.dispatch(cycle)
        else:
            self.queue.append(cycle)
            if len(self.queue) >= PIPELINE_LIMIT:
                self.pause_reading_for(PAUSE_PIPELINE)

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
            if len(self.queue) < PIPELINE_LIMIT:
                self.resume_reading_for(PAUSE_PIPELINE)
            self.dispatch(nxt)

    def respond_error(self, cycle: RequestCycle, status: int, message: str) -> None:
        """Answer `cycle` from the proxy itself (502/503/504/413...)."""
        cycle.status = status
        close = not cycle.request_done or not cycle.keep_alive or self.proxy.draining
        if close:
            cycle.keep_alive = False
        self.write(error_response(status, message, close, cycle.request_id))
        if cycle is self.current:
            self.response_complete(cycle)

    def reject(self, status: int, message: str) -> None:
        """Bad input from the client: answer and close (the byte stream cannot be resynced)."""
        self.proxy.count_client_error(status)
        if self.transport is None or self.closing:
            return
        if self.current is None:
            self.transport.write(error_response(status, message, close=True))
            self.close()
        else:
            # Let the exchange in progress finish, then answer this one and close.
            bad = RequestCycle(self)
            bad.local = (status, message)
            bad.keep_alive = False
            bad.request_done = True
            self.queue.append(bad)
            self.receiving = None
            self.closing = True  # stop parsing further input

    def body_too_large(self, cycle: RequestCycle) -> None:
        self.proxy.count_client_error(413)
        up = cycle.upstream
        if up is not None:
            cycle.upstream = None
            up.abort()
        self.closing = True  # stop parsing the rest of the body
        if self.transport is not None:
            self.transport.pause_reading()
        if cycle.status == 0:
            cycle.keep_alive = False
            if cycle is self.current:
                self.respond_error(cycle, 413, "request body is larger than the proxy accepts")
            else:
                cycle.local = (413, "request body is larger than the proxy accepts")
        else:
            self.close()

    # -- upgrade (WebSocket) tunnel -----------------------------------------------------------

    def _upgrade_requested(self, leftover: bytes) -> None:
        cycle = self.current
        if cycle is None or not cycle.upgrade:
            self.reject(400, "upgrade must be the only request in flight")
            return
        cycle.tunnel_pending = [leftover] if leftover else []

    def start_tunnel(self, cycle: RequestCycle, upstream: UpstreamProtocol) -> None:
        self.tunnel = upstream
        pending = cycle.tunnel_pending or []
        cycle.tunnel_pending = None
        for chunk in pending:
            upstream.send(chunk)
        self.proxy.count_response(cycle)
        self.current = None

    def tunnel_closed(self, cycle: RequestCycle) -> None:
        self.tunnel = None
        self.close()

    # -- output and flow control --------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def writelines(self, parts: tuple[bytes, ...]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(parts)

    def pause_reading_for(self, bit: int) -> None:
        if not self.pause_bits and self.transport is not None:
            self.transport.pause_reading()
        self.pause_bits |= bit

    def resume_reading_for(self, bit: int) -> None:
        if self.pause_bits & bit:
            self.pause_bits &= ~bit
            if not self.pause_bits and self.transport is not None and not self.closing:
                self.transport.resume_reading()

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def idle(self) -> bool:
        return self.current is None and not self.in_head and self.receiving is None


def build_upstream_head(
    proxy: HttpProxy,
    cycle: RequestCycle,
    method: bytes,
    url: bytes,
    headers: list[tuple[bytes, bytes]],
    peer: str,
    lnames: list[bytes] | None = None,
) -> bytes:
    """The request head sent to the backend: hop-by-hop removed, X-Forwarded-* and
    X-Request-Id set, body framing re-declared. `lnames`: the header names lower-cased."""
    if lnames is None:
        lnames = [name.lower() for name, _ in headers]
    drop = hop_by_hop_for(headers, lnames)
    parts = [method, b" ", url, b" HTTP/1.1\r\n"]
    xff = b""
    host = b""
    request_id = b""
    upgrade = b""
    for (name, value), ln in zip(headers, lnames, strict=True):
        if ln in drop:
            if ln == b"upgrade":
                upgrade = value
            continue
        if ln == b"x-forwarded-for":
            xff = xff + b", " + value if xff else value
            continue
        if ln == b"host":
            host = value
        elif ln == b"x-request-id":
            request_id = value
        elif ln == PREVIEW_HEADER or ln == TOKEN_HEADER or ln.startswith(b"x-forwarded-"):
            continue
        parts.append(b"%s: %s\r\n" % (name, value))
    if not host:
        # HTTP/1.0 clients may omit Host; backends speaking 1.1 require it.
        host = cycle.client.local_host
        parts.append(b"Host: %s\r\n" % host)
    if not request_id:
        request_id = proxy.new_request_id()
        parts.append(b"X-Request-Id: %s\r\n" % request_id)
    cycle.request_id = request_id.decode("latin-1")
    cycle.host = host
    peer_b = peer.encode()
    parts.append(b"X-Forwarded-For: %s\r\n" % (xff + b", " + peer_b if xff else peer_b))
    parts.append(b"X-Forwarded-Proto: http\r\n")
    if host:
        parts.append(b"X-Forwarded-Host: %s\r\n" % host)
    if cycle.chunked:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    if cycle.upgrade and upgrade:
        parts.append(b"Connection: Upgrade\r\nUpgrade: %s\r\n" % upgrade)
    parts.append(b"\r\n")
    return b"".join(parts)
