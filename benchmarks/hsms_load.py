"""Lean HSMS load client for the benchmark: raw asyncio sockets, pre-encoded SECS-II.

Why not secsgem on the tool side too: secsgem spends ~0.5 ms of Python per message (threads,
a full SECS-II decode of every message, per-message queues), so a secsgem tool process saturates
a core before a secsgem backend does, and the benchmark would measure the client. This client
costs a few microseconds per transaction, so the numbers are those of the proxy and the backend
(which stays secsgem: `zerodown sample-app`). Behaviour is a well-behaved HSMS active peer: Select,
answer Linktest, S1F1, S1F13 and S2F41 from the host, count Reject and Separate.

Each tool keeps `window` S6F11 transactions open (closed loop: a reply triggers the next send).
Tool k numbers DATAIDs k*10_000_000 + 1, 2, ... so the backends' records can be checked for lost
and duplicated reports.
"""

from __future__ import annotations

import asyncio
import struct
import time
from dataclasses import dataclass, field
from typing import Any

DATAID_STRIDE = 10_000_000
_HDR = struct.Struct(
    ">IHBBBBI"
)  # length, session id, byte2 (W|stream), byte3, ptype, stype, system
SELECT_REQ, SELECT_RSP, DESELECT_REQ, DESELECT_RSP = 1, 2, 3, 4
LINKTEST_REQ, LINKTEST_RSP, REJECT_REQ, SEPARATE_REQ = 5, 6, 7, 9
S6F12_ACK0 = b"\x21\x01\x00"  # <B 0x00>


def frame(session: int, b2: int, b3: int, stype: int, system: int, body: bytes = b"") -> bytes:
    return _HDR.pack(10 + len(body), session, b2, b3, 0, stype, system) + body


def s6f11_body(dataid: int, ceid: int) -> bytes:
    # <L[3] <U4 DATAID> <U2 CEID> <L[0]>>
    return (
        b"\x01\x03\xb1\x04"
        + dataid.to_bytes(4, "big")
        + b"\xa9\x02"
        + ceid.to_bytes(2, "big")
        + b"\x01\x00"
    )


def parse_s1f2_softrev(body: bytes) -> str | None:
    """SOFTREV from S1F2 <L[2] <A MDLN> <A SOFTREV>> (1-byte lengths, as every peer here sends)."""
    try:
        if body[:2] != b"\x01\x02":
            return None
        pos = 2
        texts = []
        for _ in range(2):
            if body[pos] != 0x41:
                return None
            n = body[pos + 1]
            texts.append(body[pos + 2 : pos + 2 + n].decode("ascii", "replace"))
            pos += 2 + n
        return texts[1]
    except IndexError:
        return None


@dataclass(slots=True)
class ToolStats:
    sent: int = 0
    replied: int = 0
    nacked: int = 0
    timed_out: int = 0
    rejected: int = 0
    late: int = 0
    disconnects: int = 0
    host_primaries: int = 0
    rtts: list[float] = field(default_factory=list)  # seconds
    done_at: list[float] = field(default_factory=list)  # perf_counter at each reply
    dataids_replied: list[int] = field(default_factory=list)


class LoadTool(asyncio.Protocol):
    """One tool session. Drive it with `start(end_time)`; read `.stats`."""

    stride = DATAID_STRIDE  # tool k's DATAIDs are k * stride + 1, 2, ... (U4: below 2**32)

    def __init__(
        self, index: int, device_id: int, window: int, t3: float, ceid: int = 1000
    ) -> None:
        self.index = index
        self.device_id = device_id
        self.window = window
        self.t3 = t3
        self.ceid = ceid
        self.stats = ToolStats()
        self.open: dict[int, tuple[float, int]] = {}  # system -> (t0, dataid); S6F11 only
        self._probes: dict[int, asyncio.Future[str | None]] = {}
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None
        self._system = 0
        self._seq = 0
        self._selected: asyncio.Future[bool] | None = None
        self._end = 0.0
        self._closing = False
        self.closed = asyncio.Event()

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._closing:  # our own close at the end is not a disconnect
            self.stats.disconnects += 1
        self._transport = None
        self.closed.set()
        for fut in self._probes.values():
            if not fut.done():
                fut.set_result(None)
        if self._selected is not None and not self._selected.done():
            self._selected.set_result(False)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        while len(buf) >= 14:
            length, session, b2, b3, _ptype, stype, system = _HDR.unpack_from(buf)
            end = 4 + length
            if len(buf) < end:
                break
            header, body = bytes(buf[4:14]), bytes(buf[14:end])
            del buf[:end]
            self._on_message(header, session, b2, b3, stype, system, body)

    # -- protocol logic -----------------------------------------------------------------------

    def _on_message(
        self, header: bytes, session: int, b2: int, b3: int, stype: int, system: int, body: bytes
    ) -> None:
        if stype == 0:
            stream, function, wbit = b2 & 0x7F, b3, b2 & 0x80
            if function % 2 == 0:  # a reply
                opened = self.open.pop(system, None)
                if opened is not None:
                    self._on_event_reply(opened, stream, function, body)
                elif system in self._probes:
                    self._probes.pop(system).set_result(parse_s1f2_softrev(body))
                else:
                    self.stats.late += 1  # reply after we gave up on it (T3)
                return
            self.stats.host_primaries += 1
            if wbit:
                self._answer_host(header, stream, function, system)
        elif stype == SELECT_RSP:
            if self._selected is not None and not self._selected.done():
                self._selected.set_result(b3 == 0)
        elif stype == LINKTEST_REQ:
            self._send(frame(0xFFFF, 0, 0, LINKTEST_RSP, system))
        elif stype == DESELECT_REQ:
            self._send(frame(0xFFFF, 0, 0, DESELECT_RSP, system))
        elif stype == REJECT_REQ:
            if self.open.pop(system, None) is not None:
                self.stats.rejected += 1
                self._fill()
            elif system in self._probes:
                self._probes.pop(system).set_result(None)
        elif stype == SEPARATE_REQ and self._transport is not None:
            self._transport.close()

    def _answer_host(self, header: bytes, stream: int, function: int, system: int) -> None:
        if (stream, function) == (2, 41):
            body = b"\x01\x02\x21\x01\x00\x01\x00"  # S2F42 <L <B 0> <L>>
        elif (stream, function) == (1, 1):
            body = b"\x01\x02\x41\x05bench\x41\x04load"  # S1F2 <L <A MDLN> <A SOFTREV>>
        elif (stream, function) == (1, 13):
            body = b"\x01\x02\x21\x01\x00\x01\x00"  # S1F14 <L <B 0> <L>>
        else:  # S9F5 unrecognized function, with the header of the offending message
            self._send(frame(self.device_id, 9, 5, 0, self._next_system(), b"\x21\x0a" + header))
            return
        self._send(frame(self.device_id, stream, function + 1, 0, system, body))

    def _on_event_reply(
        self, opened: tuple[float, int], stream: int, function: int, body: bytes
    ) -> None:
        now = time.perf_counter()
        st = self.stats
        if (stream, function) == (6, 12) and body == S6F12_ACK0:
            st.replied += 1
            st.rtts.append(now - opened[0])
            st.done_at.append(now)
            st.dataids_replied.append(opened[1])
        else:
            st.nacked += 1
        self._fill()

    def _fill(self) -> None:
        if self._transport is None or time.perf_counter() >= self._end:
            return
        while len(self.open) < self.window:
            self.send_event()

    def send_event(self) -> None:
        """One S6F11 (W) with the tool's next DATAID, timed from now."""
        if self._transport is None:
            return
        self._seq += 1
        dataid = self.index * self.stride + self._seq
        system = self._next_system()
        self.open[system] = (time.perf_counter(), dataid)
        self.stats.sent += 1
        self._send(frame(self.device_id, 0x86, 11, 0, system, s6f11_body(dataid, self.ceid)))

    def _next_system(self) -> int:
        self._system = (self._system + 1) & 0xFFFFFFFF
        return self._system

    def _send(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.write(data)

    # -- driving ------------------------------------------------------------------------------

    async def select(self, timeout: float) -> None:
        self._selected = asyncio.get_running_loop().create_future()
        self._send(frame(0xFFFF, 0, 0, SELECT_REQ, self._next_system()))
        ok = await asyncio.wait_for(self._selected, timeout)
        if not ok:
            raise ConnectionError(f"tool {self.index}: Select refused or connection closed")

    def start(self, end: float) -> None:
        self._end = end
        self._fill()

    def expire(self, now: float) -> None:
        """Count transactions older than T3 as timed out and keep the window full."""
        stale = [s for s, (t0, _) in self.open.items() if now - t0 > self.t3]
        for s in stale:
            del self.open[s]
            self.stats.timed_out += 1
        if stale:
            self._fill()

    async def softrev(self, timeout: float) -> str | None:
        system = self._next_system()
        fut: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._probes[system] = fut
        self._send(frame(self.device_id, 0x81, 1, 0, system))
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            self._probes.pop(system, None)
            return None

    def close(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._send(frame(0xFFFF, 0, 0, SEPARATE_REQ, self._next_system()))
            self._transport.close()


async def connect_tools(
    targets: list[tuple[str, int]],
    tools: int,
    device_id: int,
    window: int,
    t3: float,
    first_index: int,
    cls: type[LoadTool] = LoadTool,
) -> list[LoadTool]:
    """Open and select `tools` sessions (of class `cls`), spread round-robin over `targets`."""
    loop = asyncio.get_running_loop()
    out: list[LoadTool] = []
    for k in range(tools):
        host, port = targets[k % len(targets)]
        index = first_index + k
        _, proto = await loop.create_connection(
            lambda index=index: cls(index, device_id, window, t3), host, port
        )
        tool: LoadTool = proto  # type: ignore[assignment]
        await tool.select(10.0)
        out.append(tool)
    return out


async def wait_drained(tools: list[LoadTool], timeout: float) -> None:
    """After the end time, wait for open transactions to finish (or expire at T3)."""
    deadline = time.perf_counter() + timeout
    while any(t.open for t in tools) and time.perf_counter() < deadline:
        now = time.perf_counter()
        for t in tools:
            t.expire(now)
        await asyncio.sleep(0.01)
    for t in tools:
        t.expire(float("inf"))


def merged(tools: list[LoadTool]) -> dict[str, Any]:
    keys = (
        "sent",
        "replied",
        "nacked",
        "timed_out",
        "rejected",
        "late",
        "disconnects",
        "host_primaries",
    )
    return {k: sum(getattr(t.stats, k) for t in tools) for k in keys}
