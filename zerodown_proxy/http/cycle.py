"""One request/response exchange (RequestCycle), from the parsed head to the last response byte:
the request's framing, its body on the way to the backend (buffered while no upstream
connection is attached, retained for a replay when the method is idempotent), its routing and
attempts, and the response status."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ..flow import Pause
from .framing import CHUNKED, RequestFrame

if TYPE_CHECKING:
    from ..config import HttpSection
    from ..routing import AppRoute, Instance
    from .downstream import ClientProtocol
    from .upstream import UpstreamProtocol

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})

BUFFER_LIMIT = 256 * 1024  # body (or pre-101 tunnel) bytes held while nothing can take them


class RequestCycle:
    """One request/response exchange, from parsed head to the last response byte."""

    __slots__ = (
        "client",
        "flow",
        "cfg",
        "method",
        "path",
        "host",
        "http11",
        "keep_alive",
        "upgrade",
        "chunked",
        "preview",
        "pilot_headers",
        "request_id",
        "head",
        "body_buf",
        "buffered",
        "retained",
        "retained_bytes",
        "request_done",
        "app",
        "instance",
        "tried",
        "upstream",
        "status",
        "start",
        "local",
        "tunnel_pending",
        "aborted",
        "sent_once",
        "body_seen",
    )

    def __init__(
        self, client: ClientProtocol, cfg: HttpSection, method: bytes, frame: RequestFrame
    ) -> None:
        self.client = client
        self.flow = client.flow  # the client's back-pressure: paused when the backend is slow
        self.cfg = cfg
        self.method = method
        target = frame.target
        q = target.find(b"?")
        self.path = target if q < 0 else target[:q]
        self.host = frame.host
        self.request_id = ""
        self.head = b""
        self.http11 = client.http11
        # A non-101 answer to an Upgrade request ends the client connection: what the client
        # sent after the head was meant for the new protocol, not as the next request.
        self.keep_alive = frame.keep_alive and not frame.upgrade
        self.upgrade = frame.upgrade
        self.chunked = frame.body == CHUNKED
        self.preview = False
        self.pilot_headers: dict[bytes, bytes] | None = None  # kept only while pilots need them
        self.body_buf: list[bytes] = []
        self.buffered = 0
        self.retained: list[bytes] | None = [] if method in IDEMPOTENT else None
        self.retained_bytes = 0
        self.request_done = False
        self.app: AppRoute | None = None
        self.instance: Instance | None = None
        self.tried: list[Instance] = []
        self.upstream: UpstreamProtocol | None = None
        self.status = 0
        self.local: tuple[int, str] | None = None
        self.tunnel_pending: list[bytes] | None = None
        self.aborted = False
        self.sent_once = False
        self.body_seen = 0
        self.start = time.perf_counter()

    # -- request body -------------------------------------------------------------------------

    def feed_body(self, data: bytes) -> None:
        self.body_seen += len(data)
        if self.body_seen > self.cfg.max_body_bytes:
            self.client.body_too_large(self)
            return
        if self.chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        self._forward(data)

    def end_body(self) -> None:
        self.request_done = True
        if self.chunked:
            self._forward(b"0\r\n\r\n")
        up = self.upstream
        if up is not None:
            # The first-byte clock starts with the last request byte; the time data_received
            # stamped a moment ago is close enough and saves a clock read per request.
            up.sent_at = self.client.last_activity

    def _forward(self, data: bytes) -> None:
        if self.retained is not None:
            self.retained.append(data)
            self.retained_bytes += len(data)
            if self.retained_bytes > self.cfg.retry_body_bytes:
                self.retained = None  # too large to replay: not retryable
        up = self.upstream
        if up is not None:
            up.send(data)
            return
        self.body_buf.append(data)
        self.buffered += len(data)
        if self.buffered > BUFFER_LIMIT:
            self.flow.pause_reading(Pause.BUFFER)

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
            self.flow.resume_reading(Pause.BUFFER)
        return parts

    def draining(self) -> bool:
        return self.client.proxy.draining
