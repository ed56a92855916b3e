"""Large bodies stream through the proxy in both directions without the proxy holding them."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import psutil

from ..helpers import instance, registry, write_registry
from ..rawhttp import read_response

GiB = 1024**3
CHUNK = 1024 * 1024


class CountingBackend:
    """POST: counts the request body (content-length or chunked) and answers the count.
    GET /download/N: sends N bytes with content-length, as fast as the proxy takes them."""

    def __init__(self) -> None:
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        line = head.split(b"\r\n", 1)[0]
        if line.startswith(b"GET /download/"):
            n = int(line.split(b"/download/")[1].split(b" ")[0])
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Backend-Version: v1\r\n\r\n" % n
            )
            block = b"d" * CHUNK
            sent = 0
            while sent < n:
                piece = block[: min(CHUNK, n - sent)]
                writer.write(piece)
                sent += len(piece)
                await writer.drain()
        else:
            length = int(
                next(
                    v
                    for k, v in (h.split(b": ", 1) for h in head.split(b"\r\n")[1:-2])
                    if k.lower() == b"content-length"
                )  # fmt: skip
            )
            got = 0
            while got < length:
                data = await reader.read(min(CHUNK, length - got))
                if not data:
                    break
                got += len(data)
            body = str(got).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
        writer.close()


def _watch_rss(pid: int, stop: threading.Event, peak: list[int]) -> None:
    proc = psutil.Process(pid)
    while not stop.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.02)


async def test_one_gib_upload_and_download_do_not_grow_the_proxy(tmp_path, start_proxy):
    backend = CountingBackend()
    await backend.start()
    reg = tmp_path / "registry.json"
    write_registry(reg, registry(1, "blue", [instance("blue-0", "blue", "v1", backend.port)]))
    proxy = start_proxy(reg)
    baseline = psutil.Process(proxy.proc.pid).memory_info().rss
    peak = [baseline]
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_rss, args=(proxy.proc.pid, stop, peak), daemon=True)
    watcher.start()
    try:
        # Upload 1 GiB from a plain blocking socket in a thread (the backend runs on this loop).
        def upload() -> bytes:
            with socket.create_connection(("127.0.0.1", proxy.http)) as s:
                s.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % GiB)
                block = b"u" * CHUNK
                for _ in range(GiB // CHUNK):
                    s.sendall(block)
                data = b""
                while b"\r\n\r\n" not in data or not data.endswith(str(GiB).encode()):
                    more = s.recv(65536)
                    if not more:
                        break
                    data += more
                return data

        answer = await asyncio.wait_for(asyncio.to_thread(upload), 120)
        assert answer.endswith(str(GiB).encode()), answer[:200]

        # Download 1 GiB, reading slowly at first so back-pressure has to hold the backend.
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.http, limit=CHUNK)
        writer.write(b"GET /download/%d HTTP/1.1\r\nHost: x\r\n\r\n" % GiB)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert b" 200 " in head.split(b"\r\n")[0]
        await asyncio.sleep(1.0)  # the client reads nothing for a second
        got = 0
        deadline = time.monotonic() + 120
        while got < GiB and time.monotonic() < deadline:
            data = await reader.read(CHUNK)
            if not data:
                break
            got += len(data)
        writer.close()
        assert got == GiB
    finally:
        stop.set()
        watcher.join()
    growth = peak[0] - baseline
    assert growth < 64 * 1024 * 1024, f"proxy RSS grew by {growth / 2**20:.0f} MiB"
    # The proxy still serves normally afterwards.
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.http)
    writer.write(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
    r = await read_response(reader)
    writer.close()
    assert r.status == 200 and r.body == b"3"
