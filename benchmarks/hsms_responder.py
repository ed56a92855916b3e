"""A lightweight HSMS backend for the fab benchmark: raw asyncio, one process per instance.

The secsgem sample host runs a thread per session; a fab of 1,000 tools through one proxy means
1,000 backend sessions, so the fab scenario uses this passive HSMS peer instead, with the
sample host's contract (HSMS_PEERS.md) for what the tools send: Select, Linktest, Deselect,
Separate; S1F1 -> S1F2 <L <A MDLN> <A SOFTREV=version>>; S1F13 -> S1F14; S6F11 -> S6F12 <B 0>,
recording the DATAID; any other primary with W -> S9F5. It also answers HTTP GET on a second
port with 200 (the proxy's active health checks probe every instance's http_port).

    python -m benchmarks.hsms_responder --version v1 --ready ready.json --record record.bin

The ready file gets {"hsms": port, "http": port}; on SIGTERM the DATAIDs received (uint32,
native order, in arrival order) are written to the record file and the process exits.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from array import array
from pathlib import Path

import orjson

from .hsms_load import (
    _HDR,
    DESELECT_REQ,
    DESELECT_RSP,
    LINKTEST_REQ,
    LINKTEST_RSP,
    S6F12_ACK0,
    SELECT_REQ,
    SELECT_RSP,
    SEPARATE_REQ,
    frame,
)

_S6F11_HEAD = b"\x01\x03\xb1\x04"  # <L[3] <U4 DATAID> ...: what hsms_load.s6f11_body encodes
_HTTP_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Type: text/plain\r\n\r\nok\n"


def _text(s: bytes) -> bytes:
    return b"\x41" + bytes([len(s)]) + s


class HsmsPeer(asyncio.Protocol):
    def __init__(self, version: bytes, record: array) -> None:
        self.version = version
        self.record = record
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while len(buf) >= 14:
            length, session, b2, b3, _ptype, stype, system = _HDR.unpack_from(buf)
            end = 4 + length
            if len(buf) < end:
                break
            header, body = bytes(buf[4:14]), bytes(buf[14:end])
            del buf[:end]
            self._on_message(header, session, b2, b3, stype, system, body)

    def _send(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def _on_message(
        self, header: bytes, session: int, b2: int, b3: int, stype: int, system: int, body: bytes
    ) -> None:
        if stype == SELECT_REQ:
            self._send(frame(session, 0, 0, SELECT_RSP, system))  # status 0: selected
        elif stype == LINKTEST_REQ:
            self._send(frame(0xFFFF, 0, 0, LINKTEST_RSP, system))
        elif stype == DESELECT_REQ:
            self._send(frame(session, 0, 0, DESELECT_RSP, system))
        elif stype == SEPARATE_REQ:
            if self.transport is not None:
                self.transport.close()
        elif stype == 0 and b2 & 0x80:  # a primary that wants a reply
            self._answer(header, session, b2 & 0x7F, b3, system, body)

    def _answer(
        self, header: bytes, session: int, stream: int, function: int, system: int, body: bytes
    ) -> None:
        if (stream, function) == (6, 11):
            if body[:4] == _S6F11_HEAD:
                self.record.append(int.from_bytes(body[4:8], "big"))
            reply = S6F12_ACK0
        elif (stream, function) == (1, 1):
            reply = b"\x01\x02" + _text(b"fab-responder") + _text(self.version)
        elif (stream, function) == (1, 13):
            reply = b"\x01\x02\x21\x01\x00\x01\x00"  # S1F14 <L <B 0> <L>>
        else:  # S9F5 unrecognized function, with the offending header
            self._send(frame(session, 9, 5, 0, system, b"\x21\x0a" + header))
            return
        self._send(frame(session, stream, function + 1, 0, system, reply))


class HttpOk(asyncio.Protocol):
    """200 to every request head (keep-alive), for the proxy's health checks."""

    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf and self.transport is not None:
            _, self.buf = self.buf.split(b"\r\n\r\n", 1)
            self.transport.write(_HTTP_OK)


async def serve(version: str, ready: Path, record_path: Path) -> None:
    loop = asyncio.get_running_loop()
    record = array("I")
    # A switch opens a backend session per tool at once: a backlog of 100 (asyncio's default)
    # would drop SYNs and delay sessions by the 1 s SYN retransmit, which is not the proxy.
    hsms = await loop.create_server(
        lambda: HsmsPeer(version.encode(), record), "127.0.0.1", 0, backlog=4096
    )
    http = await loop.create_server(HttpOk, "127.0.0.1", 0)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    ports = {"hsms": hsms.sockets[0].getsockname()[1], "http": http.sockets[0].getsockname()[1]}
    tmp = ready.with_name(ready.name + ".tmp")
    tmp.write_bytes(orjson.dumps(ports))
    os.replace(tmp, ready)
    await stop.wait()
    hsms.close()
    http.close()
    tmp = record_path.with_name(record_path.name + ".tmp")
    tmp.write_bytes(record.tobytes())
    os.replace(tmp, record_path)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.hsms_responder")
    p.add_argument("--version", required=True, help="SOFTREV answered to S1F1")
    p.add_argument("--ready", required=True, help="JSON file for the bound ports")
    p.add_argument("--record", required=True, help="where the DATAIDs go on SIGTERM")
    a = p.parse_args()
    import uvloop

    uvloop.run(serve(a.version, Path(a.ready), Path(a.record)))


if __name__ == "__main__":
    main()
