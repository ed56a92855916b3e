"""The upstream side of the HTTP data path: one asyncio Protocol per pooled backend connection.

An UpstreamProtocol carries one request at a time (`attach`), parses the response with httptools,
and streams it to the client connection that owns the request. Back-pressure runs both ways:
a slow client pauses reading from the backend, a slow backend pauses reading from the client.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import httptools

from .headers import HOP_BY_HOP, hop_by_hop_for

if TYPE_CHECKING:
    from .downstream import RequestCycle
    from .proxy import HttpProxy

_NO_BODY_STATUS = frozenset({204, 304})


class UpstreamProtocol(asyncio.Protocol):
    __slots__ = (
        "proxy",
        "key",
        "instance_id",
        "transport",
        "parser",
        "cycle",
        "last_activity",
        "idle_since",
        "closed",
        "reused",
        "_headers",
        "_lnames",
        "_reason",
        "_status",
        "_got_bytes",
        "_informational",
        "_rechunk",
        "_close_delimited",
        "_pending_head",
        "_reset_parser",
        "_tunnel",
    )

    def __init__(self, proxy: HttpProxy, key: tuple[str, int], instance_id: str) -> None:
        self.proxy = proxy
        self.key = key
        self.instance_id = instance_id
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.cycle: RequestCycle | None = None
        self.last_activity = time.monotonic()
        self.idle_since = self.last_activity
        self.closed = False
        self.reused = False
        self._tunnel: asyncio.Transport | None = None
        self._reset()

    def _reset(self) -> None:
        self._headers: list[tuple[bytes, bytes]] = []
        self._lnames: list[bytes] = []  # lower-cased names, parallel to _headers (lowered once)
        self._reason = b""
        self._status = 0
        self._got_bytes = False
        self._informational = False
        self._rechunk = False
        self._close_delimited = False
        self._pending_head: bytes | None = None
        self._reset_parser = False

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.last_activity = time.monotonic()
        if self._tunnel is not None:
            self._tunnel.write(data)
            return
        cycle = self.cycle
        if cycle is None:
            # Bytes on an idle pooled connection: the backend is confused; drop the connection.
            self.close()
            return
        self._got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._start_tunnel(data[exc.args[0] :])
        except httptools.HttpParserError as exc:
            self.proxy.upstream_error(cycle, self, "protocol", f"malformed response: {exc}")
        if self._reset_parser:
            self.parser = httptools.HttpResponseParser(self)
            self._reset_parser = False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        cycle = self.cycle
        if self._tunnel is not None:
            self._tunnel.close()
            self._tunnel = None
            if cycle is not None:
                self.cycle = None
                cycle.client.tunnel_closed(cycle)
            return
        if cycle is None:
            self.proxy.pool_discard(self)
            return
        if self._close_delimited and self._status:
            self._finish(keep=False)  # EOF ends a close-delimited body
            return
        if not self._got_bytes:
            self.proxy.upstream_lost_before_response(cycle, self)
        else:
            self.proxy.upstream_error(
                cycle, self, "reset", "backend closed the connection mid-response"
            )

    def pause_writing(self) -> None:
        if self.cycle is not None:
            self.cycle.client.pause_reading_for(1)

    def resume_writing(self) -> None:
        if self.cycle is not None:
            self.cycle.client.resume_reading_for(1)

    # -- driven by the client side ------------------------------------------------------------

    def attach(self, cycle: RequestCycle) -> None:
        """Send `cycle`'s request (head and whatever body has arrived) on this connection."""
        self.cycle = cycle
        cycle.upstream = self
        self._reset()
        self.last_activity = time.monotonic()
        parts = cycle.take_buffered()
        if len(parts) == 1:
            self.transport.write(parts[0])  # type: ignore[union-attr]
        else:
            self.transport.writelines(parts)  # type: ignore[union-attr]
        if cycle.client.write_paused:
            self.transport.pause_reading()  # type: ignore[union-attr]

    def send(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    def abort(self) -> None:
        self.closed = True
        self.cycle = None
        if self.transport is not None:
            self.transport.abort()

    # -- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._headers:
            self._headers = []
            self._lnames = []

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._status == 0:
            self._headers.append((name, value))
            self._lnames.append(name.lower())

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        cycle = self.cycle
        assert cycle is not None
        if 100 <= status < 200 and status != 101:
            # Interim response (100 Continue, 103 Early Hints): relay to HTTP/1.1 clients only.
            self._informational = True
            if cycle.http11:
                cycle.client.write(self._build_head(status, cycle, interim=True))
            return
        self._status = status
        self._informational = False
        head_only = cycle.method == b"HEAD" or status in _NO_BODY_STATUS
        lnames = self._lnames
        has_length = b"content-length" in lnames
        chunked = b"transfer-encoding" in lnames
        if head_only or (has_length and not chunked) or status == 101:
            framing_close = False
        elif cycle.http11:
            self._rechunk = True
            framing_close = False
            self._close_delimited = not chunked
        else:
            framing_close = True  # HTTP/1.0 client: the body ends when we close
            self._close_delimited = not chunked
        if framing_close or cycle.draining():
            cycle.keep_alive = False
        head = self._build_head(status, cycle)
        cycle.response_started(status)
        if status == 101:
            cycle.client.write(head)  # the tunnel starts when httptools raises HttpParserUpgrade
        elif head_only:
            cycle.client.write(head)
            if cycle.method == b"HEAD" and status not in _NO_BODY_STATUS:
                # httptools cannot be told the body is absent: finish now, parse anew next time.
                self._reset_parser = True
                self._finish(keep=True)
        else:
            self._pending_head = head

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if cycle is None or self._informational:
            return
        client = cycle.client
        if self._rechunk:
            frame = b"%x\r\n" % len(body)
            if self._pending_head is not None:
                client.writelines((self._pending_head, frame, body, b"\r\n"))
                self._pending_head = None
            else:
                client.writelines((frame, body, b"\r\n"))
        elif self._pending_head is not None:
            if len(body) < 16384:
                client.write(self._pending_head + body)
            else:
                client.writelines((self._pending_head, body))
            self._pending_head = None
        else:
            client.write(body)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        if self.cycle is None or self._reset_parser or self._status == 101:
            return
        self._finish(keep=self.parser.should_keep_alive())

    # -- internals ----------------------------------------------------------------------------

    def _build_head(self, status: int, cycle: RequestCycle, interim: bool = False) -> bytes:
        lnames = self._lnames
        drop = hop_by_hop_for(self._headers, lnames)
        parts = [b"HTTP/1.1 %d %s\r\n" % (status, self._reason or b"-")]
        if status == 101:
            for (name, value), ln in zip(self._headers, lnames, strict=True):
                if ln not in HOP_BY_HOP or ln in (b"upgrade", b"connection"):
                    parts.append(b"%s: %s\r\n" % (name, value))
            parts.append(b"\r\n")
            return b"".join(parts)
        for (name, value), ln in zip(self._headers, lnames, strict=True):
            if ln not in drop:
                parts.append(b"%s: %s\r\n" % (name, value))
        if not interim:
            if self._rechunk:
                parts.append(b"Transfer-Encoding: chunked\r\n")
            if not cycle.keep_alive:
                parts.append(b"Connection: close\r\n")
            elif not cycle.http11:
                parts.append(b"Connection: keep-alive\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def _finish(self, keep: bool) -> None:
        cycle = self.cycle
        if cycle is None:
            return
        self.cycle = None
        client = cycle.client
        tail = b"0\r\n\r\n" if self._rechunk else b""
        if self._pending_head is not None:
            client.write(self._pending_head + tail)
            self._pending_head = None
        elif tail:
            client.write(tail)
        if keep and cycle.request_done and not self._close_delimited:
            self.proxy.pool_release(self)
        else:
            self.close()
        cycle.client.response_complete(cycle)

    def _start_tunnel(self, leftover: bytes) -> None:
        cycle = self.cycle
        assert cycle is not None
        client = cycle.client
        if self._status != 101:
            self.proxy.upstream_error(cycle, self, "protocol", "backend upgraded without 101")
            return
        self._tunnel = client.transport
        client.start_tunnel(cycle, self)
        if leftover:
            client.write(leftover)
