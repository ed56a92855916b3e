"""One kept-alive HTTP connection for an instance's health probes (used by active.py).

A probe passes on a complete 2xx/3xx answer; a malformed answer, a close before the head, or
bytes nobody asked for fail it and the connection is never reused.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httptools

MAX_RESPONSE_BYTES = 64 * 1024  # a health answer larger than this is cut (judged by its status)

OnResult = Callable[["ProbeConnection", bool, str], None]


class ProbeConnection(asyncio.Protocol):
    """A kept-alive connection for one instance's probes: one request at a time; each ends in
    exactly one `on_result(conn, passed, detail)`."""

    def __init__(self, request: bytes, on_result: OnResult) -> None:
        self.request = request
        self.on_result = on_result
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.busy = False
        self.closed = False
        self.received = 0
        self.status = 0
        self.connecting: asyncio.Task[Any] | None = None

    def send(self) -> None:
        self.busy = True
        self.received = 0
        self.status = 0
        self.transport.write(self.request)  # type: ignore[union-attr]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if not self.busy:
            self.close()  # bytes nobody asked for: never reuse this connection
            return
        self.received += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._done(False, f"malformed answer: {exc}")
            return
        if self.busy and self.received > MAX_RESPONSE_BYTES:
            self._done(200 <= self.status < 400, f"{self.status} (answer over 64 KiB, cut)")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_message_complete(self) -> None:
        if 100 <= self.status < 200:
            return  # an interim answer; the real one follows
        keep = self.parser.should_keep_alive()
        ok = 200 <= self.status < 400
        self._done(ok, str(self.status) if ok else f"answered {self.status}", keep)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.busy and self.status >= 200:
            # The head arrived: a body delimited by the close (HTTP/1.0 style) ends here.
            ok = self.status < 400
            self._done(ok, str(self.status) if ok else f"answered {self.status}")
        elif self.busy:
            why = getattr(exc, "strerror", None) or str(exc or "") or "closed without an answer"
            self._done(False, f"connection lost: {why}")

    def abandon(self) -> None:
        """The probe timed out: its answer no longer counts; never reuse the connection."""
        self.busy = False
        if self.connecting is not None:
            self.connecting.cancel()  # an unanswered SYN must not pile up connect tasks
        self.close()

    def _done(self, passed: bool, detail: str, keep: bool = False) -> None:
        if not self.busy:
            return
        self.busy = False
        if not keep:
            self.close()
        self.on_result(self, passed, detail)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
