"""HSMS frame codec: byte-exact encoders, incremental decoding, limits, header rewrites."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from zerodown_proxy.hsms import codec
from zerodown_proxy.hsms.codec import DecodeError, Frame, FrameDecoder

S1F1 = bytes.fromhex("0000000a0000810100000000002a")


def test_decode_s1f1_w():
    (f,) = FrameDecoder().feed(S1F1)
    assert f == Frame(0, 0x81, 1, 0, 0, 42, b"")
    assert (f.stream, f.function, f.wbit) == (1, 1, True)
    assert f.describe() == "S1F1 W sys=0x0000002a"
    assert f.encode() == S1F1


def test_control_encoders_are_e37_layout():
    assert codec.select_req(1) == bytes.fromhex("0000000a ffff 0000 00 01 00000001")
    assert codec.select_rsp(7, 1) == bytes.fromhex("0000000a ffff 0001 00 02 00000007")
    assert codec.deselect_req(2) == bytes.fromhex("0000000a ffff 0000 00 03 00000002")
    assert codec.deselect_rsp(2, 1) == bytes.fromhex("0000000a ffff 0001 00 04 00000002")
    assert codec.linktest_req(3) == bytes.fromhex("0000000a ffff 0000 00 05 00000003")
    assert codec.linktest_rsp(3) == bytes.fromhex("0000000a ffff 0000 00 06 00000003")
    assert codec.separate_req(9) == bytes.fromhex("0000000a ffff 0000 00 09 00000009")


def test_reject_names_the_rejected_type_and_reason():
    data = Frame(5, 0x86, 11, 0, 0, 0x1234, b"x")
    # Reason 4 (entity not selected): byte 2 = SType of the rejected message (0), byte 3 = 4.
    assert codec.reject_req(data, 4) == bytes.fromhex("0000000a 0005 0004 00 07 00001234")
    bad_ptype = Frame(0xFFFF, 0, 0, 3, 1, 9)
    assert codec.reject_req(bad_ptype, 2) == bytes.fromhex("0000000a ffff 0302 00 07 00000009")
    bad_stype = Frame(0xFFFF, 0, 0, 0, 8, 9)
    assert codec.reject_req(bad_stype, 1) == bytes.fromhex("0000000a ffff 0801 00 07 00000009")


def test_rewrite_touches_only_session_and_system():
    body = bytes(range(200))
    f = Frame(1, 0x86, 11, 0, 0, 77, body)
    out = codec.rewrite(f, 9, 0xDEADBEEF)
    assert out[:14] == struct.pack(">IHBBBBI", 210, 9, 0x86, 11, 0, 0, 0xDEADBEEF)
    assert out[14:] == body


def test_abort_reply_is_sxf0_same_system():
    f = Frame(3, 0x86, 11, 0, 0, 55, b"body")
    (g,) = FrameDecoder().feed(codec.abort_reply(f))
    assert (g.session_id, g.stream, g.function, g.wbit, g.system, g.body) == (
        3,
        6,
        0,
        False,
        55,
        b"",
    )


def test_data_message_roundtrip():
    raw = codec.data_message(2, 6, 11, True, 99, b"\x01\x02")
    (f,) = FrameDecoder().feed(raw)
    assert f == Frame(2, 0x86, 11, 0, 0, 99, b"\x01\x02")


def test_partial_frame_is_held_until_complete():
    d = FrameDecoder()
    raw = codec.data_message(0, 6, 11, True, 1, b"a" * 100)
    assert d.feed(raw[:3]) == []
    assert d.feed(raw[3:20]) == []
    assert d.pending == 20
    (f,) = d.feed(raw[20:] + raw[:5])
    assert f.body == b"a" * 100
    assert d.pending == 5


def test_the_incomplete_frame_held_is_described_by_its_offset_and_declared_size():
    d = FrameDecoder()
    raw = codec.data_message(0, 6, 11, True, 1, b"a" * 100)
    assert (d.consumed, d.expected) == (0, 0)
    d.feed(raw[:2])
    assert d.expected == codec.FRAME_OVERHEAD  # the length field itself is not complete yet
    d.feed(raw[2:30])
    assert (d.consumed, d.expected) == (0, len(raw))
    d.feed(raw[30:] + raw[:20])  # the first completes, a second one starts
    assert (d.consumed, d.expected, d.pending) == (len(raw), len(raw), 20)
    d.feed(raw[20:])
    assert (d.consumed, d.expected, d.pending) == (2 * len(raw), 0, 0)
    d.feed(raw)  # the one-whole-frame fast path counts too
    assert d.consumed == 3 * len(raw)


def test_too_short_length_is_an_error_value_and_stops_decoding():
    d = FrameDecoder()
    out = d.feed(b"\x00\x00\x00\x05hello" + S1F1)
    assert len(out) == 1 and isinstance(out[0], DecodeError) and out[0].kind == "too_short"
    assert d.feed(S1F1) == []


def test_too_long_is_refused_from_the_length_alone():
    d = FrameDecoder(max_message_bytes=1000)
    out = d.feed(S1F1 + struct.pack(">I", 1001))
    assert isinstance(out[0], Frame)
    assert isinstance(out[1], DecodeError) and out[1].kind == "too_long"
    assert "1001" in out[1].detail and "1000" in out[1].detail


frames = st.builds(
    Frame,
    st.integers(0, 0xFFFF),
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(0, 0xFFFFFFFF),
    st.binary(max_size=300),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(frames, max_size=8), st.data())
def test_any_chunking_yields_the_same_frames(msgs, data):
    stream = b"".join(m.encode() for m in msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    d = FrameDecoder()
    got = []
    prev = 0
    for c in cuts + [len(stream)]:
        got.extend(d.feed(stream[prev:c]))
        prev = c
        # What is held is exactly the stream after the complete frames, and its declared size.
        assert d.consumed + d.pending == c
        if d.pending >= 4:
            assert d.expected == 4 + struct.unpack_from(">I", stream, d.consumed)[0]
    assert got == msgs
    assert d.pending == 0 and d.consumed == len(stream)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(1, 50))
def test_garbage_never_raises(garbage, step):
    d = FrameDecoder(max_message_bytes=256)
    for i in range(0, len(garbage), step):
        for item in d.feed(garbage[i : i + step]):
            assert isinstance(item, Frame | DecodeError)
            if isinstance(item, Frame):
                assert len(item.body) <= 246


# -- SECS-II item decoder (logging only) ------------------------------------------------------

from zerodown_proxy.hsms import secs2  # noqa: E402


def test_secs2_s6f11_and_s1f2_bodies():
    body = bytes.fromhex("0103 b104 0000002a b104 000003e8 0100")
    assert secs2.to_sml(body) == "<L[3] <U4 42> <U4 1000> <L[0]>>"
    s1f2 = b"\x01\x02\x41\x04MDLN\x41\x02v2"
    assert secs2.to_sml(s1f2) == '<L[2] <A "MDLN"> <A "v2">>'
    assert secs2.to_sml(b"\x21\x01\x00") == "<B 0x00>"
    assert secs2.to_sml(b"\x25\x02\x01\x00") == "<BOOLEAN T F>"
    assert secs2.to_sml(bytes.fromhex("6902fffe")) == "<I2 -2>"
    assert secs2.to_sml(b"") == ""


def test_secs2_malformed_is_rendered_not_raised():
    assert secs2.to_sml(b"\xb1\x04\x00").startswith("<malformed SECS-II:")
    assert "trailing" in secs2.to_sml(b"\x21\x01\x00\x00")
    assert "zero length bytes" in secs2.to_sml(b"\x20")
    deep = b"\x01\x01" * 40 + b"\x01\x00"
    assert "deeper" in secs2.to_sml(deep)
    assert secs2.to_sml(b"\x41\x05" + b"x" * 5, max_chars=8) == '<A "x...'


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_secs2_garbage_never_raises(data):
    assert isinstance(secs2.to_sml(data), str)
