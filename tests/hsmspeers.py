"""Small raw-socket HSMS peers for tests: a passive host (the backend) and an active tool.

They speak just enough E37 to exercise the proxy: select, linktest, deselect, separate, and data
transactions matched by system bytes. The host behaves like secsgem where it matters: it ignores
data messages whose session id is not its device id.
"""

from __future__ import annotations

import asyncio
import struct
import urllib.request
from dataclasses import dataclass, field

from zerodown_proxy.hsms import codec
from zerodown_proxy.hsms.codec import Frame


async def read_frame(reader: asyncio.StreamReader) -> Frame | None:
    try:
        head = await reader.readexactly(14)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    length, sid, b2, b3, pt, st, system = codec.HEADER.unpack(head)
    try:
        body = await reader.readexactly(length - 10) if length > 10 else b""
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    return Frame(sid, b2, b3, pt, st, system, body)


def metric(proxy, name: str, labels: str = "") -> float:  # type: ignore[no-untyped-def]
    """Sum of a series on the proxy's /metrics (those whose labels contain `labels`)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{proxy.admin}/metrics", timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (len(line) == len(name) or line[len(name)] in " {"):
            if labels in line:
                total += float(line.rsplit(" ", 1)[1])
    return total


def rss(pid: int) -> int:
    import psutil

    return psutil.Process(pid).memory_info().rss


def s6f11_body(dataid: int, ceid: int = 1000) -> bytes:
    return (
        b"\x01\x03\xb1\x04"
        + struct.pack(">I", dataid)
        + b"\xb1\x04"
        + struct.pack(">I", ceid)
        + b"\x01\x00"
    )


def dataid_of(body: bytes) -> int:
    return struct.unpack(">I", body[4:8])[0]


def s9_body(h: Frame) -> bytes:
    """S9F1..F11 body: <B[10]> holding the header of message `h`."""
    raw = codec.HEADER.pack(10, h.session_id, h.byte2, h.byte3, h.ptype, h.stype, h.system)
    return b"\x21\x0a" + raw[4:]


def s9_header(body: bytes) -> Frame:
    """The header an S9F1..F11 body quotes (as s9_body writes it)."""
    assert body[:2] == b"\x21\x0a", body
    _, sid, b2, b3, pt, st, system = codec.HEADER.unpack(b"\x00\x00\x00\x0a" + body[2:12])
    return Frame(sid, b2, b3, pt, st, system)


def ascii_item(text: str) -> bytes:
    raw = text.encode()
    return bytes([0x41, len(raw)]) + raw


@dataclass
class HostConn:
    writer: asyncio.StreamWriter
    selected: bool = False
    waiting: dict[int, asyncio.Future] = field(default_factory=dict)


class RawHost:
    """Backend instance (HSMS passive): answers S1F1 (S1F2 <A version>), S6F11 (S6F12, records
    the DATAID) and can send host primaries (S2F41) to the connected tool."""

    def __init__(self, version: str, device_id: int = 0, reply_delay: float = 0.0) -> None:
        self.version = version
        self.device_id = device_id
        self.reply_delay = reply_delay
        self.received: list[int] = []  # DATAIDs of S6F11, in arrival order
        self.primaries: list[tuple[int, int, int]] = []  # (stream, function, body bytes)
        self.frames: list[Frame] = []  # every data primary received, as received
        self.stream9: list[Frame] = []  # S9 received (a waiting send_primary gets the S9)
        self.ignored: list[Frame] = []  # data messages with another session id
        self.rejects: list[Frame] = []
        self.conns: list[HostConn] = []
        self.tasks: set = set()
        self.sessions = 0
        self.linktests = 0
        self.answer_linktest = True  # False: a hung host (the proxy's T6 must notice)
        self.answer_data = True  # False (with the above): reads everything, answers nothing
        self.deselects = 0
        self.separates = 0
        self.select_delay = 0.0  # seconds before answering Select.req (a slow-to-select host)
        self._sys = 1000
        self._server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def selected_conns(self) -> list[HostConn]:
        return [c for c in self.conns if c.selected and not c.writer.is_closing()]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = HostConn(writer)
        self.conns.append(conn)
        self.tasks.add(asyncio.current_task())
        self.sessions += 1
        try:
            while True:
                f = await read_frame(reader)
                if f is None:
                    return
                if f.stype == codec.SELECT_REQ:
                    if self.select_delay:
                        await asyncio.sleep(self.select_delay)
                    writer.write(codec.select_rsp(f.system, 1 if conn.selected else 0))
                    conn.selected = True
                elif f.stype == codec.LINKTEST_REQ:
                    self.linktests += 1
                    if self.answer_linktest:
                        writer.write(codec.linktest_rsp(f.system))
                elif f.stype == codec.DESELECT_REQ:
                    self.deselects += 1
                    writer.write(codec.deselect_rsp(f.system, 0))
                    conn.selected = False
                elif f.stype == codec.SEPARATE_REQ:
                    self.separates += 1
                    conn.selected = False
                    return
                elif f.stype == codec.REJECT_REQ:
                    self.rejects.append(f)
                    fut = conn.waiting.pop(f.system, None)
                    if fut is not None and not fut.done():
                        fut.set_result(f)
                elif f.stype == codec.DATA:
                    if f.session_id != self.device_id:
                        self.ignored.append(f)
                        continue
                    if f.function % 2 == 0:
                        fut = conn.waiting.pop(f.system, None)
                        if fut is not None and not fut.done():
                            fut.set_result(f)
                        continue
                    self.primaries.append((f.stream, f.function, len(f.body)))
                    self.frames.append(f)
                    if f.stream == 9:
                        self.stream9.append(f)
                        if f.function != 13:  # the header names the host's own message
                            fut = conn.waiting.pop(s9_header(f.body).system, None)
                            if fut is not None and not fut.done():
                                fut.set_result(f)
                        continue
                    if not self.answer_data:
                        continue
                    if self.reply_delay:
                        asyncio.ensure_future(self._answer_later(writer, f))
                    else:
                        self._answer(writer, f)
        finally:
            conn.selected = False
            writer.close()

    async def _answer_later(self, writer: asyncio.StreamWriter, f: Frame) -> None:
        await asyncio.sleep(self.reply_delay)
        self._answer(writer, f)

    def _answer(self, writer: asyncio.StreamWriter, f: Frame) -> None:
        s, fn = f.stream, f.function
        if (s, fn) == (6, 11):
            self.received.append(dataid_of(f.body))
            body = b"\x21\x01\x00"
        elif (s, fn) == (1, 1):
            body = b"\x01\x02" + ascii_item("MDLN") + ascii_item(self.version)
        elif (s, fn) == (1, 13):
            body = b"\x01\x02\x21\x01\x00\x01\x00"
        else:
            body = b""
        if f.wbit and not writer.is_closing():
            writer.write(codec.data_message(f.session_id, s, fn + 1, False, f.system, body))

    async def send_primary(
        self, stream: int, function: int, body: bytes = b"", timeout: float = 5.0
    ) -> Frame:
        conn = self.selected_conns()[-1]
        self._sys += 1
        fut = asyncio.get_running_loop().create_future()
        conn.waiting[self._sys] = fut
        conn.writer.write(
            codec.data_message(self.device_id, stream, function, True, self._sys, body)
        )
        return await asyncio.wait_for(fut, timeout)

    def kill(self) -> None:
        """Crash: stop listening and cut every connection without a Separate.req."""
        if self._server is not None:
            self._server.close()
        for c in self.conns:
            tr = c.writer.transport
            tr.abort()

    async def stop(self) -> None:
        self.kill()
        pending = [t for t in self.tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=2)


class RawTool:
    """Equipment (HSMS active): selects, sends primaries, answers S2F41 after `reply_delay`."""

    def __init__(self, port: int, device_id: int = 0, reply_delay: float = 0.0) -> None:
        self.port = port
        self.device_id = device_id
        self.reply_delay = reply_delay
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.waiting: dict[int, asyncio.Future] = {}
        self.rejects: list[Frame] = []
        self.host_primaries: list[Frame] = []
        self.data: list[Frame] = []  # every data message received
        # (stream, function) of host primaries answered with S9F<n> (n = value) instead.
        self.s9_for: dict[tuple[int, int], int] = {}
        self.separated = False
        self.closed = asyncio.Event()
        self._sys = 0
        self._task: asyncio.Task | None = None

    async def connect(self, source: str | None = None) -> None:
        """`source`: the local address to connect from (127.0.0.2 ...: a tool's own IP)."""
        local = (source, 0) if source else None
        self.reader, self.writer = await asyncio.open_connection(
            "127.0.0.1", self.port, local_addr=local
        )
        self._task = asyncio.create_task(self._read_loop())

    async def select(self, timeout: float = 5.0) -> int:
        rsp = await self.control(codec.select_req, timeout)
        return rsp.byte3

    async def control(self, encoder, timeout: float = 5.0) -> Frame:  # type: ignore[no-untyped-def]
        sb = self.next_sys()
        fut = asyncio.get_running_loop().create_future()
        self.waiting[sb] = fut
        self.writer.write(encoder(sb))  # type: ignore[union-attr]
        return await asyncio.wait_for(fut, timeout)

    def next_sys(self) -> int:
        self._sys += 1
        return self._sys

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)  # type: ignore[union-attr]

    async def request(
        self, stream: int, function: int, body: bytes = b"", timeout: float = 5.0,
        session_id: int | None = None,
    ) -> Frame:  # fmt: skip
        sb = self.next_sys()
        fut = asyncio.get_running_loop().create_future()
        self.waiting[sb] = fut
        sid = self.device_id if session_id is None else session_id
        self.writer.write(codec.data_message(sid, stream, function, True, sb, body))  # type: ignore[union-attr]
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self.waiting.pop(sb, None)

    async def _read_loop(self) -> None:
        assert self.reader is not None
        try:
            while True:
                f = await read_frame(self.reader)
                if f is None:
                    return
                if f.stype == codec.SEPARATE_REQ:
                    self.separated = True
                    continue
                if f.stype == codec.LINKTEST_REQ:
                    self.writer.write(codec.linktest_rsp(f.system))  # type: ignore[union-attr]
                    continue
                if f.stype == codec.REJECT_REQ:
                    self.rejects.append(f)
                if f.stype == codec.DATA:
                    self.data.append(f)
                if f.stype == codec.DATA and f.function % 2 == 1:
                    self.host_primaries.append(f)
                    s9 = self.s9_for.get((f.stream, f.function))
                    if s9 is not None:
                        self.send_s9(s9, f)
                    else:
                        asyncio.ensure_future(self._answer(f))
                    continue
                fut = self.waiting.pop(f.system, None)
                if fut is not None and not fut.done():
                    fut.set_result(f)
        finally:
            self.closed.set()

    def send_s9(self, function: int, about: Frame) -> None:
        """S9F<function> quoting the header of `about` (as this tool saw or sent it)."""
        self.writer.write(  # type: ignore[union-attr]
            codec.data_message(self.device_id, 9, function, False, self.next_sys(), s9_body(about))
        )

    async def _answer(self, f: Frame) -> None:
        if self.reply_delay:
            await asyncio.sleep(self.reply_delay)
        if f.wbit and self.writer is not None and not self.writer.is_closing():
            body = b"\x01\x02\x21\x01\x00\x01\x00" if (f.stream, f.function) == (2, 41) else b""
            self.writer.write(
                codec.data_message(f.session_id, f.stream, f.function + 1, False, f.system, body)
            )

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self._task is not None:
            await asyncio.wait([self._task], timeout=2)
