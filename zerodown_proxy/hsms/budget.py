"""One budget for the bytes all tools hold in incomplete messages (`[hsms] max_partial_bytes`).

Each tool may send messages up to `max_message_bytes` (16 MiB), and the proxy holds a message
until its last byte arrives. Without a shared bound, N tools that each trickle most of a large
message hold N times that much memory (12 tools held 176 MiB).

The policy, and why:

- A tool whose incomplete message is at the head of its stream *reserves* the message's whole
  declared size (its length field says it) the moment it has one. The reservation is granted
  while the budget has room and nobody is waiting before it; otherwise the tool is paused (not
  read) and queued, first come first served. A reservation never grows, so a tool holding one
  can always finish its message: reservations cannot deadlock each other, as incremental
  accounting of bytes received could (every tool paused half-way, none able to finish).
- Memory is lent, not given: while tools wait, a holder whose message is still incomplete T8
  after the later of (its reservation, the start of the wait) is separated with a logged reason,
  and its reservation goes to the next in line. A tool sending at LAN speed finishes a 16 MiB
  message well within T8 (5 s); a tool that trickles (one byte every T8 - 1 s defeats T8 alone)
  cannot keep the memory others need. Pausing alone could wait forever on such a tool;
  separating the *waiting* tool instead would punish the tool that did nothing wrong.
- A waiting tool holds only what was already read of its message (at most one read, 256 KiB)
  and is not subject to T8 while it is not read; T7 and T3 still apply to it.

Pure bookkeeping: the caller pauses a tool when `reserve` says no, and `on_grant` resumes it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

H = TypeVar("H", bound=Hashable)  # a tool connection (links.ToolLink; anything hashable here)


class PartialBudget(Generic[H]):
    __slots__ = ("limit", "used", "contended_since", "_held", "_waiting", "_on_grant")

    def __init__(self, limit: int, on_grant: Callable[[H], None]) -> None:
        self.limit = limit
        self.used = 0
        self.contended_since = 0.0  # when the oldest waiter started waiting
        self._held: dict[H, tuple[int, float]] = {}  # holder -> (bytes reserved, since)
        self._waiting: dict[H, tuple[int, float]] = {}  # insertion order = first come first served
        self._on_grant = on_grant

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def held_by(self, holder: H) -> int:
        entry = self._held.get(holder)
        return entry[0] if entry is not None else 0

    def reserve(self, holder: H, need: int, now: float) -> bool:
        """`holder` has a new incomplete message of `need` bytes (any previous one of it ended).
        True: reserved, keep reading it. False: queued; pause it until `on_grant(holder)`."""
        if self._drop(holder):
            self._grant(now)  # its previous reservation may let others in first
        if not self._waiting and self.used + need <= self.limit:
            self._held[holder] = (need, now)
            self.used += need
            return True
        if not self._waiting:
            self.contended_since = now
        self._waiting[holder] = (need, now)
        return False

    def release(self, holder: H, now: float) -> None:
        """`holder` holds no incomplete message any more (finished it, or is gone)."""
        if self._drop(holder):
            self._grant(now)

    def hogs(self, now: float, grace: float) -> list[H]:
        """Holders that kept a reservation for longer than `grace` while others waited."""
        if not self._waiting:
            return []
        start = self.contended_since
        return [h for h, (_, since) in self._held.items() if now - max(since, start) > grace]

    def _drop(self, holder: H) -> bool:
        entry = self._held.pop(holder, None)
        if entry is not None:
            self.used -= entry[0]
            return True
        return self._waiting.pop(holder, None) is not None

    def _grant(self, now: float) -> None:
        granted = []
        while self._waiting:
            holder, (need, _) = next(iter(self._waiting.items()))
            if self.used + need > self.limit:
                break  # first come first served: a big message is not overtaken for ever
            del self._waiting[holder]
            self._held[holder] = (need, now)
            self.used += need
            granted.append(holder)
        for holder in granted:
            self._on_grant(holder)
