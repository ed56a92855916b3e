"""hsms/msglog.py: rotation within the size budget, shared file sets, line format, config."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from zerodown_proxy.config import ConfigError, HsmsSection, load_config
from zerodown_proxy.hsms.codec import Frame
from zerodown_proxy.hsms.msglog import MessageLog, RotatingFile, parse_tools


def _sizes(d: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(d.iterdir())}


def test_rotation_keeps_the_files_within_the_budget_and_the_newest_lines(tmp_path):
    f = RotatingFile(tmp_path / "t.sml", 3 * 5000, 3)
    for k in range(2000):
        f.write(f"line {k:05d} ".encode() + b"x" * 80 + b"\n")
    f.close()
    sizes = _sizes(tmp_path)
    assert set(sizes) == {"t.sml", "t.sml.1", "t.sml.2"}
    assert sum(sizes.values()) <= 15000 and all(s <= 5000 for s in sizes.values())
    newest = (tmp_path / "t.sml").read_text().splitlines()
    assert newest[-1].startswith("line 01999 ")
    kept = [
        int(line.split()[1])
        for name in ("t.sml.2", "t.sml.1", "t.sml")
        for line in (tmp_path / name).read_text().splitlines()
    ]
    assert kept == list(range(kept[0], 2000))  # contiguous: the oldest lines went first


def test_one_file_is_truncated_and_a_line_longer_than_the_file_is_cut(tmp_path):
    f = RotatingFile(tmp_path / "t.sml", 4096, 1)
    for _ in range(100):
        f.write(b"y" * 100 + b"\n")
    f.write(b"z" * 10_000 + b"\n")
    f.close()
    assert set(_sizes(tmp_path)) == {"t.sml"}
    text = (tmp_path / "t.sml").read_bytes()
    assert len(text) <= 4096 and text.endswith(b"...\n")


def test_a_reopened_file_counts_what_it_already_holds(tmp_path):
    (tmp_path / "t.sml").write_bytes(b"a" * 4000)  # left by an earlier run
    f = RotatingFile(tmp_path / "t.sml", 8192, 2)  # 4096 bytes per file
    f.write(b"b" * 100 + b"\n")
    f.close()
    assert _sizes(tmp_path) == {"t.sml": 101, "t.sml.1": 4000}


def _link(iid: str, version: str) -> SimpleNamespace:
    return SimpleNamespace(instance=SimpleNamespace(id=iid, version=version))


async def test_tools_at_one_address_share_a_file_set_until_both_close(tmp_path):
    ml = MessageLog(HsmsSection(message_log_dir=str(tmp_path / "log")))
    a = ml.for_tool(SimpleNamespace(sid=None, peer="10.0.0.1:1000"), "10.0.0.1")  # type: ignore[arg-type]
    b = ml.for_tool(SimpleNamespace(sid=None, peer="10.0.0.1:1001"), "10.0.0.1")  # type: ignore[arg-type]
    assert a is not None and b is not None and a.out is b.out
    a.up(Frame(1, 0x81, 1, 0, 0, 7), _link("blue-1", "v1"), 42)  # type: ignore[arg-type]
    b.proxy_reply(Frame(1, 0x86, 11, 0, 0, 9, b"\x01\x00"))
    a.close()
    assert not b.out._f.closed
    b.close()
    assert b.out._f.closed
    lines = (tmp_path / "log" / "10.0.0.1.sml").read_text().splitlines()
    assert lines[0].endswith(
        " tool->host 10.0.0.1:1000 session=1 sys=0x00000007 backend=blue-1 version=v1 "
        "host_sys=0x0000002a S1F1 W."
    )
    assert lines[1].endswith(
        " proxy->tool 10.0.0.1:1001 session=1 sys=0x00000009 backend=- version=- S6F0."
    )
    ml.close()


async def test_filter_by_address_and_device_id(tmp_path):
    ml = MessageLog(HsmsSection(message_log_dir=str(tmp_path), message_log_tools="10.0.0.2, 7"))
    assert ml.wants("10.0.0.2", None) and ml.wants("10.0.0.9", 7)
    assert not ml.wants("10.0.0.9", None) and not ml.wants("10.0.0.9", 8)
    assert ml.for_tool(SimpleNamespace(sid=None, peer="x"), "10.0.0.9") is None  # type: ignore[arg-type]
    assert not list(tmp_path.iterdir())
    ml.close()


def test_parse_tools():
    assert parse_tools(" 10.1.2.3, 12,::1 ,") == (frozenset({"10.1.2.3", "::1"}), frozenset({12}))
    with pytest.raises(ValueError, match="not 0..32767"):
        parse_tools("40000")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"message_log_files": 0}, "[hsms] message_log_files must be 1..100"),
        ({"message_log_max_bytes": 1000}, "message_log_max_bytes must be at least"),
        ({"message_log_tools": "a b"}, "[hsms] message_log_tools: 'a b' is neither"),
    ],
)
def test_message_log_config_refusals(values, message):
    with pytest.raises(ConfigError) as exc:
        load_config(overrides={"hsms": values}, env={})
    assert message in str(exc.value)


def test_off_by_default():
    h = load_config(env={}).hsms
    assert h.message_log_dir == "" and MessageLog.from_config(h) is None


async def test_a_write_that_fails_never_reaches_the_data_path(tmp_path, caplog):
    ml = MessageLog(HsmsSection(message_log_dir=str(tmp_path)))
    tl = ml.for_tool(SimpleNamespace(sid=None, peer="10.0.0.3:9"), "10.0.0.3")  # type: ignore[arg-type]
    assert tl is not None
    ml.close()  # e.g. the proxy shutting down while a late message is forwarded
    for _ in range(3):
        tl.proxy_reply(Frame(0, 0x81, 1, 0, 0, 1))
    assert tl.failed
    assert sum("lines are missing" in r.getMessage() for r in caplog.records) == 1
