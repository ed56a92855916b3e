"""The upstream side of the HTTP data path: one asyncio Protocol per pooled backend connection.

An UpstreamProtocol carries one request at a time (`attach` ... `detach`), parses the response
with httptools, asks the framing core how the body is delimited, and streams it to the client
connection that owns the request. Back-pressure runs both ways through FlowControl: a slow
client pauses reading from the backend, a slow backend pauses reading from the client.

The connection goes back to the pool only when both messages ended cleanly: the request was
sent whole, the response ended where its framing says, the backend allows reuse, and not one
byte followed the response. Anything else closes it, so that no byte of one exchange can ever
be read as part of another client's.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import httptools

from ..flow import FlowControl, Pause
from .framing import (
    HOP_BY_HOP,
    LENGTH,
    MAX_INTERIM,
    NO_BODY,
    UNTIL_CLOSE,
    Refusal,
    ResponseFrame,
    client_body,
    response_frame,
)

if TYPE_CHECKING:
    from .cycle import RequestCycle
    from .proxy import HttpProxy


class _BadResponse(Exception):
    """Raised from a parser callback: the backend's answer cannot be relayed safely."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


class UpstreamProtocol(asyncio.Protocol):
    __slots__ = (
        "proxy",
        "key",
        "instance_id",
        "transport",
        "flow",
        "parser",
        "cycle",
        "peer_flow",
        "last_activity",
        "idle_since",
        "sent_at",
        "closed",
        "reused",
        "frame",
        "_peer_paused",
        "_in_head",
        "_headers",
        "_lnames",
        "_reason",
        "_interim",
        "_got_bytes",
        "_rechunk",
        "_pending_head",
        "_done",
        "_extra",
        "_fresh_parser",
        "_tunnel",
    )

    def __init__(self, proxy: HttpProxy, key: tuple[str, int], instance_id: str) -> None:
        self.proxy = proxy
        self.key = key
        self.instance_id = instance_id
        self.transport: asyncio.Transport | None = None
        self.flow = FlowControl()
        self.parser = httptools.HttpResponseParser(self)
        self.cycle: RequestCycle | None = None
        self.peer_flow: FlowControl | None = None  # the client's, while a cycle is attached
        self.last_activity = time.monotonic()
        self.idle_since = self.last_activity
        self.sent_at = 0.0  # when the whole request was written (first-byte clock); 0: not yet
        self.closed = False
        self.reused = False
        self._peer_paused = False
        self._tunnel: asyncio.Transport | None = None
        self._fresh_parser = False
        self._reset()

    def _reset(self) -> None:
        self.frame: ResponseFrame | None = None  # the final response head, once parsed
        self._in_head = True  # collecting a head's fields (not trailers, not after the end)
        self._headers: list[tuple[bytes, bytes]] = []
        self._lnames: list[bytes] = []  # lower-cased names, parallel to _headers (lowered once)
        self._reason = b""
        self._interim = 0
        self._got_bytes = False
        self._rechunk = False
        self._pending_head: bytes | None = None
        self._done = False
        self._extra = False

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.flow.attach(self.transport)  # type: ignore[arg-type]

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
            return
        except httptools.HttpParserCallbackError as exc:
            ctx = exc.__context__
            reason = ctx.reason if isinstance(ctx, _BadResponse) else f"bad response: {exc}"
            self.proxy.upstream_error(cycle, self, "protocol", reason)
            return
        except httptools.HttpParserError as exc:
            if not self._done:
                self.proxy.upstream_error(cycle, self, "protocol", f"malformed response: {exc}")
                return
            self._extra = True  # garbage after a complete response
        if self._done:
            self._complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.proxy.upstream_gone(self)
        cycle = self.cycle
        if self._tunnel is not None:
            self._tunnel.close()
            self._tunnel = None
            if cycle is not None:
                self.detach()
                cycle.client.tunnel_closed()
            return
        if cycle is None:
            self.proxy.pool_discard(self)
            return
        frame = self.frame
        if frame is not None and frame.body == UNTIL_CLOSE and not self._done:
            self._done = True  # EOF ends a close-delimited body
            self._complete()
            return
        if not self._got_bytes:
            self.proxy.upstream_lost_before_response(cycle, self)
        else:
            self.proxy.upstream_error(
                cycle, self, "reset", "backend closed the connection mid-response"
            )

    def pause_writing(self) -> None:
        # The backend is slow to take the request body (or tunnel data): stop reading the client.
        if self.peer_flow is not None and not self._peer_paused:
            self._peer_paused = True
            self.peer_flow.pause_reading(Pause.PEER)

    def resume_writing(self) -> None:
        if self._peer_paused:
            self._peer_paused = False
            if self.peer_flow is not None:
                self.peer_flow.resume_reading(Pause.PEER)

    # -- driven by the client side ------------------------------------------------------------

    def attach(self, cycle: RequestCycle) -> None:
        """Send `cycle`'s request (head and whatever body has arrived) on this connection."""
        self.cycle = cycle
        self.peer_flow = cycle.flow
        cycle.upstream = self
        if self._fresh_parser:
            self.parser = httptools.HttpResponseParser(self)
            self._fresh_parser = False
        self._reset()
        self.last_activity = now = time.monotonic()
        parts = cycle.take_buffered()
        if len(parts) == 1:
            self.transport.write(parts[0])  # type: ignore[union-attr]
        else:
            self.transport.writelines(parts)  # type: ignore[union-attr]
        self.sent_at = now if cycle.request_done else 0.0
        if cycle.flow.write_paused:
            self.peer_paused()

    def detach(self) -> RequestCycle | None:
        """Unlink this connection and its cycle (both sides) and lift any pause one put on the
        other: the one place where an exchange lets go of its backend connection."""
        cycle = self.cycle
        if cycle is not None:
            self.cycle = None
            if cycle.upstream is self:
                cycle.upstream = None
        if self._peer_paused:
            self._peer_paused = False
            if self.peer_flow is not None:
                self.peer_flow.resume_reading(Pause.PEER)
        self.peer_flow = None
        if self.flow.reasons:
            self.flow.resume_reading(Pause.PEER)
        return cycle

    def send(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    def peer_paused(self) -> None:
        """The client cannot take more: stop reading the backend."""
        self.flow.pause_reading(Pause.PEER)

    def peer_resumed(self) -> None:
        if not self.closed:
            self.flow.resume_reading(Pause.PEER)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    def abort(self) -> None:
        """Cut the connection (RST); the caller has detached its cycle first."""
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    # -- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._done:
            self._extra = True  # a second response nobody asked for
            self._in_head = False
            return
        if self._headers:
            self._headers = []
            self._lnames = []
        self._reason = b""

    def on_status(self, reason: bytes) -> None:
        if not self._done:
            self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_head:
            self._headers.append((name, value))
            self._lnames.append(name.lower())
        # else: chunked trailers (not forwarded), or bytes after the end (flagged elsewhere)

    def on_headers_complete(self) -> None:
        if self._done:
            return
        parser = self.parser
        status = parser.get_status_code()
        cycle = self.cycle
        assert cycle is not None
        if 100 <= status < 200 and status != 101:
            # Interim response (100 Continue, 103 Early Hints): relayed as received, to
            # HTTP/1.1 clients only, a bounded number of times.
            self._interim += 1
            if self._interim > MAX_INTERIM:
                raise _BadResponse(f"backend sent more than {MAX_INTERIM} interim responses")
            if cycle.http11:
                cycle.client.write(self._build_head(status, HOP_BY_HOP, interim=True))
            if self.sent_at:
                self.sent_at = time.monotonic()  # a sign of life: the first-byte clock restarts
            return
        self._in_head = False
        # get_http_version() formats a string (~0.3 us). llhttp's keep-alive verdict is an
        # exact stand-in for "HTTP/1.1" here: response_frame reads the version only when
        # Connection has neither close nor keep-alive, where the verdict is the version (and
        # a body read until close is never reusable either way; a HEAD answer without a length
        # is then not pooled, which only costs a connection).
        http11 = parser.should_keep_alive()
        if status == 101:
            if not cycle.upgrade:
                raise _BadResponse("backend switched protocols without an Upgrade request")
            self.frame = ResponseFrame(NO_BODY, 0, b"", False, HOP_BY_HOP)
            cycle.status = 101
            cycle.client.write(self._build_head(101, HOP_BY_HOP))
            return  # the tunnel starts when httptools raises HttpParserUpgrade
        frame = response_frame(status, cycle.method, http11, self._headers, self._lnames)
        if type(frame) is Refusal:
            raise _BadResponse(frame.reason)  # type: ignore[union-attr]
        self.frame = frame  # type: ignore[assignment]
        if frame.body == LENGTH:  # type: ignore[union-attr]
            # The common case, decided inline (client_body's answer for a known length).
            if cycle.client.proxy.draining:
                cycle.keep_alive = False
        else:
            rechunk, close_client = client_body(frame, cycle.http11)  # type: ignore[arg-type]
            self._rechunk = rechunk
            if close_client or cycle.draining():
                cycle.keep_alive = False
        head = self._build_head(status, frame.drop)  # type: ignore[union-attr]
        cycle.status = status
        if frame.body == NO_BODY:  # type: ignore[union-attr]
            cycle.client.write(head)
            # httptools cannot be told that a response to HEAD has no body: it is finished
            # here, the parser is replaced before reuse, and any byte after it is extra.
            self._done = True
            self._fresh_parser = True
        else:
            self._pending_head = head

    def on_body(self, body: bytes) -> None:
        if self._done:
            self._extra = True  # body bytes the framing says do not exist
            return
        if self.frame is None:
            return  # the body of an interim response (none is valid; ignored)
        client = self.cycle.client  # type: ignore[union-attr]
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
        if self.frame is not None:
            self._done = True

    # -- internals ----------------------------------------------------------------------------

    def _build_head(self, status: int, drop: frozenset[bytes], interim: bool = False) -> bytes:
        cycle = self.cycle
        assert cycle is not None
        parts = [b"HTTP/1.1 %d %s\r\n" % (status, self._reason or b"-")]
        if status == 101:
            for (name, value), ln in zip(self._headers, self._lnames, strict=True):
                if ln not in HOP_BY_HOP or ln in (b"upgrade", b"connection"):
                    parts.append(b"%s: %s\r\n" % (name, value))
            parts.append(b"\r\n")
            return b"".join(parts)
        ap = parts.append
        # One format per field: about half the cost of four appends (name, ": ", value, CRLF).
        for field, ln in zip(self._headers, self._lnames, strict=True):
            if ln not in drop:
                ap(b"%s: %s\r\n" % field)
        if not interim:
            if self._rechunk:
                codings = self.frame.codings  # type: ignore[union-attr]
                if codings:
                    parts.append(b"Transfer-Encoding: %s, chunked\r\n" % codings)
                else:
                    parts.append(b"Transfer-Encoding: chunked\r\n")
            elif self.frame is not None and self.frame.codings:
                parts.append(b"Transfer-Encoding: %s\r\n" % self.frame.codings)
            if not cycle.keep_alive:
                parts.append(b"Connection: close\r\n")
            elif not cycle.http11:
                parts.append(b"Connection: keep-alive\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def _complete(self) -> None:
        """The response ended where its framing says: finish the client's side, then pool this
        connection only if both messages ended cleanly, else close it."""
        frame = self.frame
        cycle = self.cycle
        if cycle is None or frame is None:
            return
        # detach(), inline on the hot path
        self.cycle = None
        if cycle.upstream is self:
            cycle.upstream = None
        if self._peer_paused:
            self._peer_paused = False
            cycle.flow.resume_reading(Pause.PEER)
        self.peer_flow = None
        if self.flow.reasons:
            self.flow.resume_reading(Pause.PEER)
        client = cycle.client
        tail = b"0\r\n\r\n" if self._rechunk else b""
        if self._pending_head is not None:
            client.write(self._pending_head + tail)
            self._pending_head = None
        elif tail:
            client.write(tail)
        if frame.reusable and cycle.request_done and not self._extra and not cycle.upgrade:
            self.proxy.pool_release(self)
        else:
            if self._extra:
                self.proxy.upstream_extra_bytes(cycle, self)
            self.close()
        client.response_complete(cycle)

    def _start_tunnel(self, leftover: bytes) -> None:
        cycle = self.cycle
        assert cycle is not None
        client = cycle.client
        if cycle.status != 101:
            self.proxy.upstream_error(cycle, self, "protocol", "backend upgraded without 101")
            return
        self._tunnel = client.transport
        client.start_tunnel(cycle, self)
        if leftover:
            client.write(leftover)
