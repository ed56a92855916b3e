"""hsms/stream9.py: the header inside S9 bodies, the per-tool memory, the [hsms] key."""

from __future__ import annotations

import pytest

from zerodown_proxy.config import ConfigError, load_config
from zerodown_proxy.hsms import codec, secs2
from zerodown_proxy.hsms.codec import Frame
from zerodown_proxy.hsms.stream9 import Recent, header_body, quoted_header


def test_header_round_trip_and_sml():
    h = Frame(0x0102, 0x82, 41, 0, 0, 0xDEADBEEF)
    body = header_body(h)
    assert quoted_header(body) == h
    assert secs2.to_sml(body) == "<B 0x01 0x02 0x82 0x29 0x00 0x00 0xde 0xad 0xbe 0xef>"


def test_header_with_a_two_byte_length_field_is_read_too():
    raw = header_body(Frame(1, 6, 12, 0, 0, 77))[2:]
    assert quoted_header(b"\x22\x00\x0a" + raw) == Frame(1, 6, 12, 0, 0, 77)


@pytest.mark.parametrize(
    "body",
    [b"", b"\x41\x01x", b"\x21\x09" + bytes(9), b"\x21\x0b" + bytes(11), b"\x21\x0a" + bytes(3),
     b"\x01\x01\x21\x0a" + bytes(10)],
)  # fmt: skip
def test_anything_but_one_ten_byte_binary_item_is_no_header(body):
    assert quoted_header(body) is None


def test_recent_keeps_the_last_size_messages_per_kind():
    r = Recent(4)
    for sb in range(1, 7):
        r.primaries[sb % r.size] = (sb, "link", 1000 + sb, 0)
    assert r.primary(1) is None and r.primary(2) is None  # overwritten by 5 and 6
    assert r.primary(6) == (6, "link", 1006, 0)
    assert r.reply(6) is None  # replies are a separate numbering (the tool's own)
    r.replies[6 % r.size] = (6, "other", 9, 1)
    assert r.reply(6) == (6, "other", 9, 1) and r.primary(6) == (6, "link", 1006, 0)


def test_stream9_memory_key():
    assert load_config(env={}).hsms.stream9_memory == 256
    with pytest.raises(ConfigError, match=r"\[hsms\] stream9_memory must be 1..1000000"):
        load_config(env={}, overrides={"hsms": {"stream9_memory": 0}})


def test_codec_header_layout_is_what_stream9_packs():
    # header_body packs the 10 header bytes exactly as they travel on the wire.
    wire = codec.data_message(5, 6, 11, True, 42, b"")
    assert header_body(Frame(5, 0x86, 11, 0, 0, 42))[2:] == wire[4:14]
