"""HSMS session state machine: each E37 rule with byte strings, plus a property test on garbage."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from zerodown_proxy.hsms import codec
from zerodown_proxy.hsms.codec import Frame
from zerodown_proxy.hsms.session import (
    LINKTEST,
    T6,
    T7,
    ArmTimer,
    CancelTimer,
    Close,
    Deselected,
    HsmsSession,
    PeerRejected,
    Refused,
    Selected,
    Send,
    State,
)


def sent(actions):
    return [a.data for a in actions if isinstance(a, Send)]


def passive_selected():
    s = HsmsSession("passive", t6=5, t7=10)
    s.connection_made()
    s.data_received(codec.select_req(1))
    assert s.state is State.SELECTED
    return s


def test_passive_select_flow():
    s = HsmsSession("passive", t7=10)
    assert s.connection_made() == [ArmTimer(T7, 10)]
    out = s.data_received(codec.select_req(77))
    assert sent(out) == [codec.select_rsp(77, 0)]
    assert CancelTimer(T7) in out and Selected() in out
    assert s.state is State.SELECTED


def test_select_when_already_selected_answers_status_1():
    s = passive_selected()
    out = s.data_received(codec.select_req(2))
    assert sent(out) == [codec.select_rsp(2, codec.SELECT_ALREADY_ACTIVE)]
    assert s.state is State.SELECTED


def test_data_before_select_is_rejected_reason_4():
    s = HsmsSession("passive")
    s.connection_made()
    msg = codec.data_message(0, 1, 1, True, 5)
    out = s.data_received(msg)
    assert sent(out) == [bytes.fromhex("0000000a 0000 0004 00 07 00000005")]
    assert any(isinstance(a, Refused) and a.reason == 4 for a in out)
    assert s.state is State.NOT_SELECTED


def test_data_when_selected_is_delivered_as_frame():
    s = passive_selected()
    msg = codec.data_message(0, 6, 11, True, 5, b"\x01\x00")
    assert s.data_received(msg + msg) == [Frame(0, 0x86, 11, 0, 0, 5, b"\x01\x00")] * 2


def test_unknown_stype_rejected_reason_1_and_ptype_reason_2():
    s = passive_selected()
    out = s.data_received(codec.control(8, 3))
    assert sent(out) == [bytes.fromhex("0000000a ffff 0801 00 07 00000003")]
    bad_ptype = codec.HEADER.pack(10, 0, 0x81, 1, 5, 0, 4)
    out = s.data_received(bad_ptype)
    assert sent(out) == [bytes.fromhex("0000000a 0000 0502 00 07 00000004")]
    assert s.state is State.SELECTED


def test_linktest_answered_in_any_state():
    s = HsmsSession("passive")
    s.connection_made()
    assert sent(s.data_received(codec.linktest_req(9))) == [codec.linktest_rsp(9)]


def test_unsolicited_responses_rejected_reason_3():
    s = passive_selected()
    for msg in (codec.select_rsp(4), codec.linktest_rsp(4), codec.deselect_rsp(4)):
        out = s.data_received(msg)
        assert sent(out)[0][-6:] == bytes.fromhex("0703 00 07 00000004")[-6:]
        assert sent(out)[0][6:8] == bytes([msg[9], 3])


def test_deselect_by_peer_then_t7_rearmed():
    s = passive_selected()
    out = s.data_received(codec.deselect_req(3))
    assert sent(out) == [codec.deselect_rsp(3, 0)]
    assert Deselected(by_peer=True) in out and ArmTimer(T7, 10) in out
    assert s.state is State.NOT_SELECTED
    out = s.data_received(codec.deselect_req(4))
    assert sent(out) == [codec.deselect_rsp(4, codec.DESELECT_NOT_ESTABLISHED)]


def test_separate_from_peer_closes_without_answer():
    s = passive_selected()
    out = s.data_received(codec.separate_req(1))
    assert sent(out) == []
    assert Close("peer sent Separate.req", error=False, kind="peer_separate") in out
    assert s.state is State.NOT_CONNECTED


def test_t7_expiry_separates():
    s = HsmsSession("passive", t7=3)
    s.connection_made()
    out = s.timer_fired(T7)
    assert sent(out)[0][9] == codec.SEPARATE_REQ
    assert isinstance(out[-1], Close) and "T7" in out[-1].reason


def test_active_select_linktest_deselect():
    s = HsmsSession("active", t6=2, linktest_interval=30)
    out = s.connection_made()
    (req,) = sent(out)
    assert req[9] == codec.SELECT_REQ and ArmTimer(T6, 2) in out
    sysb = int.from_bytes(req[10:14], "big")
    out = s.data_received(codec.select_rsp(sysb, 0))
    assert Selected() in out and ArmTimer(LINKTEST, 30) in out and CancelTimer(T6) in out
    out = s.timer_fired(LINKTEST)
    (lt,) = sent(out)
    assert lt[9] == codec.LINKTEST_REQ
    out = s.data_received(codec.linktest_rsp(int.from_bytes(lt[10:14], "big")))
    assert CancelTimer(T6) in out and ArmTimer(LINKTEST, 30) in out
    out = s.deselect()
    (dr,) = sent(out)
    out = s.data_received(codec.deselect_rsp(int.from_bytes(dr[10:14], "big")))
    assert Deselected(by_peer=False) in out and s.state is State.NOT_SELECTED
    out = s.separate("done")
    assert sent(out)[0][9] == codec.SEPARATE_REQ and Close("done", error=False, kind="local") in out


def test_active_select_refused_or_timed_out():
    s = HsmsSession("active")
    req = sent(s.connection_made())[0]
    out = s.data_received(codec.select_rsp(int.from_bytes(req[10:14], "big"), 3))
    assert isinstance(out[-1], Close) and "connect exhaust" in out[-1].reason
    s = HsmsSession("active", t6=1.5)
    s.connection_made()
    out = s.timer_fired(T6)
    assert isinstance(out[-1], Close) and "Select.rsp within T6 (1.5s)" in out[-1].reason


def test_peer_reject_is_reported():
    s = passive_selected()
    out = s.data_received(codec.control(codec.REJECT_REQ, 12, 0, 4, 0))
    assert out == [PeerRejected(12, 0, 4)]


def test_undecodable_length_separates():
    s = passive_selected()
    out = s.data_received(b"\x00\x00\x00\x02xx")
    assert isinstance(out[-1], Close) and "shorter" in out[-1].reason
    assert s.state is State.NOT_CONNECTED
    assert s.data_received(codec.linktest_req(1)) == []


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.booleans())
def test_garbage_only_produces_documented_events(garbage, selected):
    s = passive_selected() if selected else HsmsSession("passive")
    if not selected:
        s.connection_made()
    for ev in s.data_received(garbage):
        assert isinstance(
            ev,
            Frame
            | Send
            | ArmTimer
            | CancelTimer
            | Selected
            | Deselected
            | PeerRejected
            | Refused
            | Close,
        )
        if isinstance(ev, Frame):
            assert ev.stype == 0 and ev.ptype == 0
