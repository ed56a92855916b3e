"""HSMS session state machine (SEMI E37), sans-I/O: events in, actions out.

One `HsmsSession` per TCP connection, in either role: passive (the proxy toward tools: waits for
Select.req, bounded by T7) or active (the proxy toward backends: sends Select.req, bounded by T6).
It answers every control message itself; data messages received in SELECTED come out as `Frame`
values for the caller to route. The caller owns sockets and clocks: it writes `Send.data`, arms
and cancels the named timers (`ArmTimer`/`CancelTimer`) and calls `timer_fired(name)` when one
expires, and closes the connection on `Close`.

States: NOT_CONNECTED -> (connection_made) NOT_SELECTED -> (select) SELECTED -> (deselect)
NOT_SELECTED; Separate.req, T6/T7 expiry or undecodable bytes -> NOT_CONNECTED + Close.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from . import codec
from .codec import DecodeError, Frame, FrameDecoder


class State(Enum):
    NOT_CONNECTED = "NOT CONNECTED"
    NOT_SELECTED = "NOT SELECTED"
    SELECTED = "SELECTED"


# Timer names (the caller maps them to its clock).
T6 = "t6"  # control transaction (Select/Deselect/Linktest reply)
T7 = "t7"  # NOT SELECTED for too long (passive side)
LINKTEST = "linktest"  # next Linktest.req (active side, when an interval is configured)


@dataclass(frozen=True, slots=True)
class Send:
    data: bytes


@dataclass(frozen=True, slots=True)
class ArmTimer:
    name: str
    seconds: float


@dataclass(frozen=True, slots=True)
class CancelTimer:
    name: str


@dataclass(frozen=True, slots=True)
class Selected:
    """The session entered SELECTED."""


@dataclass(frozen=True, slots=True)
class Deselected:
    """The session left SELECTED (Deselect.req from the peer, or our Deselect.req answered)."""

    by_peer: bool


@dataclass(frozen=True, slots=True)
class PeerRejected:
    """The peer sent Reject.req for one of our messages (system bytes `system`)."""

    system: int
    rejected_type: int
    reason: int

    def describe(self) -> str:
        text = codec.REJECT_REASON_TEXT.get(self.reason, f"local reason {self.reason}")
        return f"peer rejected sys=0x{self.system:08x} (type {self.rejected_type}): {text}"


@dataclass(frozen=True, slots=True)
class Refused:
    """We answered a peer's message with Reject.req (for the log and metrics)."""

    frame_desc: str
    reason: int

    def describe(self) -> str:
        text = codec.REJECT_REASON_TEXT.get(self.reason, f"reason {self.reason}")
        return f"rejected {self.frame_desc}: {text}"


@dataclass(frozen=True, slots=True)
class Close:
    """Close the TCP connection. `error` is False for an orderly end (Separate.req); `kind`
    names the cause for metrics: peer_separate, local, t6, t7, t8, framing, select_refused."""

    reason: str
    error: bool = True
    kind: str = "local"


Action = Send | ArmTimer | CancelTimer | Selected | Deselected | PeerRejected | Refused | Close
Event = Frame | Action


class HsmsSession:
    """The E37 session of one connection. Every method returns the actions to perform, in order."""

    __slots__ = (
        "role",
        "state",
        "t6",
        "t7",
        "linktest_interval",
        "decoder",
        "_system",
        "_select_sys",
        "_deselect_sys",
        "_linktest_sys",
    )

    def __init__(
        self,
        role: str,
        t6: float = 5.0,
        t7: float = 10.0,
        linktest_interval: float = 0.0,
        max_message_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        if role not in ("passive", "active"):
            raise ValueError(f"role must be passive or active, not {role!r}")
        self.role = role
        self.state = State.NOT_CONNECTED
        self.t6 = t6
        self.t7 = t7
        self.linktest_interval = linktest_interval
        self.decoder = FrameDecoder(max_message_bytes)
        self._system = 0
        self._select_sys: int | None = None
        self._deselect_sys: int | None = None
        self._linktest_sys: int | None = None

    @property
    def selected(self) -> bool:
        return self.state is State.SELECTED

    def next_system(self) -> int:
        """System bytes for a control message we originate (never 0, wraps at 2**32)."""
        s = self._system = (self._system % 0xFFFFFFFF) + 1
        return s

    # -- caller events ----------------------------------------------------------------------

    def connection_made(self) -> list[Action]:
        self.state = State.NOT_SELECTED
        if self.role == "passive":
            return [ArmTimer(T7, self.t7)]
        self._select_sys = sb = self.next_system()
        return [Send(codec.select_req(sb)), ArmTimer(T6, self.t6)]

    def connection_lost(self) -> list[Action]:
        self.state = State.NOT_CONNECTED
        return [CancelTimer(T6), CancelTimer(T7), CancelTimer(LINKTEST)]

    def data_received(self, data: bytes) -> list[Event]:
        out: list[Event] = []
        for item in self.decoder.feed(data):
            if type(item) is Frame:
                if item.stype == 0 and item.ptype == 0 and self.state is State.SELECTED:
                    out.append(item)  # the hot path: a data message to route
                else:
                    self._frame(item, out)
            else:
                assert isinstance(item, DecodeError)
                self._separate(out, f"undecodable input: {item.detail}", kind="framing")
            if self.state is State.NOT_CONNECTED:
                break
        return out

    def timer_fired(self, name: str) -> list[Action]:
        out: list[Action] = []
        if self.state is State.NOT_CONNECTED:
            return out
        if name == T7 and self.state is State.NOT_SELECTED:
            self._separate(out, f"not selected within T7 ({self.t7:g}s)", kind="t7")
        elif name == T6:
            what = (
                "Select.rsp" if self._select_sys is not None
                else "Deselect.rsp" if self._deselect_sys is not None
                else "Linktest.rsp" if self._linktest_sys is not None
                else None
            )  # fmt: skip
            if what is not None:
                self._separate(out, f"no {what} within T6 ({self.t6:g}s)", kind="t6")
        elif name == LINKTEST and self.state is State.SELECTED:
            if self._linktest_sys is None and self._deselect_sys is None:
                self._linktest_sys = sb = self.next_system()
                out.append(Send(codec.linktest_req(sb)))
                out.append(ArmTimer(T6, self.t6))
        return out

    def deselect(self) -> list[Action]:
        """Start an orderly end of the session (Deselect.req, then the caller separates)."""
        if self.state is not State.SELECTED or self._deselect_sys is not None:
            return []
        self._deselect_sys = sb = self.next_system()
        return [CancelTimer(LINKTEST), Send(codec.deselect_req(sb)), ArmTimer(T6, self.t6)]

    def separate(
        self, reason: str = "separated", error: bool = False, kind: str = "local"
    ) -> list[Action]:
        """End the session now: Separate.req and close (error=True when we end it because the
        peer misbehaved, for example a T8 timeout seen by the caller)."""
        out: list[Action] = []
        if self.state is not State.NOT_CONNECTED:
            self._separate(out, reason, error, kind)
        return out

    def reject(self, frame: Frame, reason: int) -> list[Action]:
        """Answer a peer's message with Reject.req (used by the caller for routing refusals)."""
        return [Send(codec.reject_req(frame, reason)), Refused(frame.describe(), reason)]

    # -- received messages ------------------------------------------------------------------

    def _frame(self, f: Frame, out: list[Event]) -> None:
        if f.ptype != 0:
            out.append(Send(codec.reject_req(f, codec.REJECT_PTYPE_NOT_SUPPORTED)))
            out.append(Refused(f"message with PType {f.ptype}", codec.REJECT_PTYPE_NOT_SUPPORTED))
            return
        st = f.stype
        if st == codec.DATA:  # not SELECTED (the SELECTED case never reaches here)
            out.append(Send(codec.reject_req(f, codec.REJECT_ENTITY_NOT_SELECTED)))
            out.append(Refused(f.describe(), codec.REJECT_ENTITY_NOT_SELECTED))
        elif st == codec.SELECT_REQ:
            if self.state is State.SELECTED:
                out.append(Send(codec.select_rsp(f.system, codec.SELECT_ALREADY_ACTIVE)))
            elif self._deselect_sys is not None:
                out.append(Send(codec.select_rsp(f.system, codec.SELECT_NOT_READY)))
            else:
                # Passive: the normal select. Active: a simultaneous select, accepted (E37).
                out.append(Send(codec.select_rsp(f.system, codec.SELECT_OK)))
                if self._select_sys is not None:
                    self._select_sys = None
                    out.append(CancelTimer(T6))
                self._enter_selected(out)
        elif st == codec.SELECT_RSP:
            if f.system != self._select_sys:
                self._not_open(f, out)
                return
            self._select_sys = None
            out.append(CancelTimer(T6))
            if f.byte3 == codec.SELECT_OK:
                self._enter_selected(out)
            else:
                text = codec.SELECT_STATUS_TEXT.get(f.byte3, f"status {f.byte3}")
                self._separate(out, f"peer refused Select: {text}", kind="select_refused")
        elif st == codec.DESELECT_REQ:
            if self.state is State.SELECTED:
                out.append(Send(codec.deselect_rsp(f.system, codec.DESELECT_OK)))
                self._leave_selected(out, by_peer=True)
            else:
                out.append(Send(codec.deselect_rsp(f.system, codec.DESELECT_NOT_ESTABLISHED)))
        elif st == codec.DESELECT_RSP:
            if f.system != self._deselect_sys:
                self._not_open(f, out)
                return
            self._deselect_sys = None
            out.append(CancelTimer(T6))
            self._leave_selected(out, by_peer=False)
        elif st == codec.LINKTEST_REQ:
            out.append(Send(codec.linktest_rsp(f.system)))
        elif st == codec.LINKTEST_RSP:
            if f.system != self._linktest_sys:
                self._not_open(f, out)
                return
            self._linktest_sys = None
            out.append(CancelTimer(T6))
            if self.linktest_interval > 0 and self.state is State.SELECTED:
                out.append(ArmTimer(LINKTEST, self.linktest_interval))
        elif st == codec.REJECT_REQ:
            out.append(PeerRejected(f.system, f.byte2, f.byte3))
            if f.system == self._select_sys:
                self._select_sys = None
                self._separate(out, "peer rejected our Select.req", kind="select_refused")
            elif f.system == self._deselect_sys:
                # Nothing left to negotiate: the caller separates.
                self._deselect_sys = None
                out.append(CancelTimer(T6))
                self._leave_selected(out, by_peer=False)
            elif f.system == self._linktest_sys:
                self._linktest_sys = None
                out.append(CancelTimer(T6))
        elif st == codec.SEPARATE_REQ:
            self.state = State.NOT_CONNECTED
            out.extend((CancelTimer(T6), CancelTimer(T7), CancelTimer(LINKTEST)))
            out.append(Close("peer sent Separate.req", error=False, kind="peer_separate"))
        else:
            out.append(Send(codec.reject_req(f, codec.REJECT_STYPE_NOT_SUPPORTED)))
            out.append(Refused(f"message with SType {st}", codec.REJECT_STYPE_NOT_SUPPORTED))

    def _not_open(self, f: Frame, out: list[Event]) -> None:
        out.append(Send(codec.reject_req(f, codec.REJECT_TRANSACTION_NOT_OPEN)))
        out.append(Refused(f.describe(), codec.REJECT_TRANSACTION_NOT_OPEN))

    def _enter_selected(self, out: list[Event]) -> None:
        self.state = State.SELECTED
        if self.role == "passive":
            out.append(CancelTimer(T7))
        if self.linktest_interval > 0:
            out.append(ArmTimer(LINKTEST, self.linktest_interval))
        out.append(Selected())

    def _leave_selected(self, out: list[Event], by_peer: bool) -> None:
        if self.state is State.SELECTED:
            self.state = State.NOT_SELECTED
            out.append(CancelTimer(LINKTEST))
            if self.role == "passive":
                out.append(ArmTimer(T7, self.t7))
            out.append(Deselected(by_peer))

    def _separate(self, out: list, reason: str, error: bool = True, kind: str = "local") -> None:
        out.append(Send(codec.separate_req(self.next_system())))
        self.state = State.NOT_CONNECTED
        out.extend((CancelTimer(T6), CancelTimer(T7), CancelTimer(LINKTEST)))
        out.append(Close(reason, error, kind))
