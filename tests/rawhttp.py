"""A tiny raw HTTP/1.1 client for tests that need exact bytes on the wire."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import httptools


@dataclass
class Response:
    status: int = 0
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    interim: list[int] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        for n, v in self.headers:
            if n.lower() == name.lower():
                return v
        return None


class _Collector:
    def __init__(self, head_only: bool) -> None:
        self.resp = Response()
        self.done = False
        self.head_only = head_only
        self.parser = httptools.HttpResponseParser(self)
        self._headers: list[tuple[str, str]] = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode(), value.decode()))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self.resp.interim.append(status)
            self._headers = []
            return
        self.resp.status = status
        self.resp.headers = self._headers
        if self.head_only or status == 101:
            self.done = True

    def on_body(self, body: bytes) -> None:
        self.resp.body += body

    def on_message_complete(self) -> None:
        if self.resp.status:
            self.done = True


async def read_response(
    reader: asyncio.StreamReader, head_only: bool = False, timeout: float = 10.0
) -> Response:
    """Read exactly one response (EOF also ends a close-delimited body)."""
    c = _Collector(head_only)
    while not c.done:
        data = await asyncio.wait_for(reader.read(65536), timeout)
        if not data:
            if c.resp.status:
                return c.resp
            raise ConnectionError("connection closed before a response")
        try:
            c.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            return c.resp
    return c.resp


async def request(
    port: int, raw: bytes, head_only: bool = False, timeout: float = 10.0
) -> Response:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        return await read_response(reader, head_only, timeout)
    finally:
        writer.close()


async def closed_by_peer(reader: asyncio.StreamReader, timeout: float = 5.0) -> bool:
    try:
        rest = await asyncio.wait_for(reader.read(), timeout)
    except (TimeoutError, ConnectionError):
        return True
    return rest == b""
