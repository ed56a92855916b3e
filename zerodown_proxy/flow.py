"""Back-pressure for one connection, shared by the HTTP client and upstream Protocols and the
HSMS links (after uvicorn's `flow_control.py`).

Reading from a transport may be paused for several reasons at once (the peer we forward to is
slow, too much is buffered, shutting down, too many pipelined requests); it resumes only when
the last reason is gone. Writing is paused by asyncio itself (`pause_writing`): `write_paused`
records it so the other side of a relay can stop feeding this one.
"""

from __future__ import annotations

import asyncio
import enum


class Pause(enum.IntFlag):
    """Why reading is paused (several at once)."""

    PEER = 1  # the connection we relay to cannot take more (its write buffer is full)
    BUFFER = 2  # too much is buffered here waiting for somewhere to go
    DRAIN = 4  # shutting down or handing over: read nothing new
    PIPELINE = 8  # too many requests queued behind the one being answered
    LIMIT = 16  # a global budget (bytes held, connections) is exhausted


class FlowControl:
    __slots__ = ("_transport", "reasons", "write_paused")

    def __init__(self, transport: asyncio.Transport | None = None) -> None:
        self._transport = transport
        self.reasons = Pause(0)
        self.write_paused = False

    def attach(self, transport: asyncio.Transport) -> None:
        """The transport arrived (connection_made); apply any pause asked for before it."""
        self._transport = transport
        if self.reasons:
            transport.pause_reading()

    @property
    def reading_paused(self) -> bool:
        return bool(self.reasons)

    def pause_reading(self, reason: Pause) -> None:
        if not self.reasons:
            tr = self._transport
            if tr is not None and not tr.is_closing():
                tr.pause_reading()
        self.reasons |= reason

    def resume_reading(self, reason: Pause) -> None:
        if not self.reasons & reason:
            return
        self.reasons &= ~reason
        if not self.reasons:
            tr = self._transport
            if tr is not None and not tr.is_closing():
                tr.resume_reading()

    # asyncio calls these on the Protocol, which forwards them here.
    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
