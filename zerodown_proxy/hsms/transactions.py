"""Every transaction open through one tool connection, both directions, in one table.

A tool connection has a current backend session and maybe some draining ones (links.py). Through
them two kinds of transaction are open at any moment:

- tool primaries forwarded to a backend session, waiting for its reply (`ToolPrimary`), keyed by
  the system bytes the proxy gave them on that session;
- host primaries forwarded from a backend session to the tool, waiting for the tool's reply
  (`HostPrimary`), keyed by the system bytes the proxy gave them toward the tool.

Both links consult this one table: the tool link to send a reply back to the backend session that
opened the transaction, a backend link to know whether it may finish draining, the sweep for T3,
the status page for counts. Only its methods change it, so "how many transactions are open on this
session" has exactly one answer. It is pure bookkeeping: no I/O, no clock of its own.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, NamedTuple, TypeVar

from .codec import Frame

L = TypeVar("L", bound=Hashable)  # a backend session (links.BackendLink; anything hashable here)


class ToolPrimary(NamedTuple):
    """A tool primary (W-bit) open on a backend session: what is needed to answer the tool."""

    system: int  # the tool's system bytes
    session_id: int  # the tool's session id
    byte2: int
    byte3: int
    sent: float  # monotonic time it was forwarded (T3 counts from here)

    def header(self) -> Frame:
        """The primary as the tool sent it, without its body (for SxF0 and log lines)."""
        return Frame(self.session_id, self.byte2, self.byte3, 0, 0, self.system)


class HostPrimary(NamedTuple, Generic[L]):
    """A backend's primary (W-bit) open toward the tool: where its reply must go."""

    link: L  # the backend session that sent it
    system: int  # the backend's system bytes
    session_id: int  # the backend's session id
    byte2: int
    sent: float

    def header(self) -> Frame:
        return Frame(self.session_id, self.byte2, 0, 0, 0, self.system)


class Transactions(Generic[L]):
    """The open transactions of one tool connection (see the module docstring)."""

    __slots__ = ("_up", "_down", "_down_on")

    def __init__(self) -> None:
        self._up: dict[L, dict[int, ToolPrimary]] = {}  # per backend session, in time order
        self._down: dict[int, HostPrimary[L]] = {}  # in time order
        self._down_on: dict[L, int] = {}  # how many of _down each session opened

    def add_link(self, link: L) -> None:
        """A new backend session of this tool (before anything is sent on it)."""
        self._up.setdefault(link, {})
        self._down_on.setdefault(link, 0)

    def remove_link(self, link: L) -> tuple[list[ToolPrimary], list[HostPrimary[L]]]:
        """The session is gone: forget and return what was open on it, both directions."""
        up = list(self._up.pop(link, {}).values())
        down: list[HostPrimary[L]] = []
        if self._down_on.pop(link, 0):
            keep: dict[int, HostPrimary[L]] = {}
            for k, rec in self._down.items():
                if rec.link == link:
                    down.append(rec)
                else:
                    keep[k] = rec
            self._down = keep
        return up, down

    # -- tool primaries (tool -> backend) -------------------------------------------------------

    def tool_primary(self, link: L, system: int, rec: ToolPrimary) -> None:
        """`rec` was forwarded on `link` with the proxy's system bytes `system`."""
        self._up[link][system] = rec

    def tool_reply(self, link: L, system: int) -> ToolPrimary | None:
        """The backend answered `system`: the transaction it closes, or None if none is open."""
        open_ = self._up.get(link)
        return open_.pop(system, None) if open_ is not None else None

    def find_tool_primary(self, system: int, session_id: int) -> tuple[L, int, ToolPrimary] | None:
        """The open tool primary the tool numbered `system` (session `session_id`): its session,
        the proxy's system bytes on it, its record. A scan: for the rare S9F9, not per message."""
        for link, open_ in self._up.items():
            for psb, rec in open_.items():
                if rec.system == system and rec.session_id == session_id:
                    return link, psb, rec
        return None

    # -- host primaries (backend -> tool) -------------------------------------------------------

    def host_primary(self, system: int, rec: HostPrimary[L]) -> None:
        """`rec` was forwarded to the tool with the proxy's system bytes `system`."""
        old = self._down.pop(system, None)
        if old is not None:  # system bytes wrapped onto a transaction still open: it is lost
            self._down_on[old.link] -= 1
        self._down[system] = rec
        self._down_on[rec.link] = self._down_on.get(rec.link, 0) + 1

    def host_reply(self, system: int) -> HostPrimary[L] | None:
        """The tool answered `system`: the transaction it closes, or None if none is open."""
        rec = self._down.pop(system, None)
        if rec is not None:
            self._down_on[rec.link] -= 1
        return rec

    def drop_host_primaries(self) -> list[HostPrimary[L]]:
        """The tool can no longer answer (deselected, gone): every host primary, now closed."""
        out = list(self._down.values())
        self._down = {}
        for link in self._down_on:
            self._down_on[link] = 0
        return out

    # -- reading --------------------------------------------------------------------------------

    def open_on(self, link: L) -> int:
        """Transactions open on one backend session, both directions (a draining session may
        finish when this is 0)."""
        up = self._up.get(link)
        return (len(up) if up else 0) + self._down_on.get(link, 0)

    def tool_primaries_on(self, link: L) -> int:
        up = self._up.get(link)
        return len(up) if up else 0

    def __len__(self) -> int:
        return sum(len(u) for u in self._up.values()) + len(self._down)

    def expired(
        self, now: float, t3: float
    ) -> tuple[list[tuple[L, ToolPrimary]], list[HostPrimary[L]]]:
        """Close and return every transaction open for longer than T3, both directions."""
        up: list[tuple[L, ToolPrimary]] = []
        for link, open_ in self._up.items():
            if not open_:
                continue
            gone = []
            for k, rec in open_.items():  # insertion order is time order
                if now - rec.sent <= t3:
                    break
                gone.append(k)
            for k in gone:
                up.append((link, open_.pop(k)))
        down: list[HostPrimary[L]] = []
        if self._down:
            gone = []
            for k, hrec in self._down.items():
                if now - hrec.sent <= t3:
                    break
                gone.append(k)
            for k in gone:
                hrec = self._down.pop(k)
                self._down_on[hrec.link] -= 1
                down.append(hrec)
        return up, down
