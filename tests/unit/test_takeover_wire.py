"""The takeover channel (zerodown_proxy/takeover/wire.py) and the live/takeover split of a
configuration reload (zerodown_proxy/live_config.py)."""

from __future__ import annotations

import os
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest

from zerodown_proxy.config import Config
from zerodown_proxy.live_config import changes, needs_takeover
from zerodown_proxy.takeover import wire


def _pair() -> tuple[wire.Channel, wire.Channel]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    return wire.Channel(a, 5.0), wire.Channel(b, 5.0)


def test_a_message_carries_its_descriptors_and_a_blob_larger_than_a_packet():
    a, b = _pair()
    r, w = os.pipe()
    blob = bytes(range(256)) * 1000  # 256 kB: several CHUNK packets
    try:
        with ThreadPoolExecutor(1) as pool:  # the receiver reads while the sender writes
            first = pool.submit(b.recv)
            a.send({"t": "tool", "state": {"sid": 7}}, [w], blob)
            a.send({"t": "done"})
            msg, fds = first.result(10)
        assert msg["t"] == "tool" and msg["state"] == {"sid": 7} and msg["blob"] == blob
        (got,) = fds
        os.write(got, b"x")  # the same pipe, received as a new descriptor
        os.close(got)
        assert os.read(r, 1) == b"x"
        assert b.recv() == ({"t": "done"}, [])  # message boundaries kept
        assert b.peer_uid() == os.getuid() and b.peer_pid() == os.getpid()
    finally:
        os.close(r)
        os.close(w)
        a.close()
        b.close()


def test_a_closed_or_garbled_channel_is_a_clear_error():
    a, b = _pair()
    a.sock.send(b"not json")
    with pytest.raises(wire.ChannelError, match="bad takeover message"):
        b.recv()
    a.close()
    with pytest.raises(wire.ChannelError, match="closed the takeover channel"):
        b.recv()
    b.close()


def test_reload_splits_live_settings_from_those_that_need_a_takeover():
    old = Config()
    new = replace(
        old,
        proxy=replace(old.proxy, log_level="debug", http_listen="0.0.0.0:9090", workers=4),
        http=replace(old.http, read_timeout=5.0, max_client_connections=10),
        hsms=replace(old.hsms, t3=30.0, max_partial_bytes=1),
    )
    diff = changes(old, new)
    live = sorted(f"{s}.{k}" for s, k in diff if not needs_takeover(s, k))
    later = sorted(f"{s}.{k}" for s, k in diff if needs_takeover(s, k))
    assert live == ["hsms.t3", "http.read_timeout", "proxy.log_level"]
    assert later == [
        "hsms.max_partial_bytes", "http.max_client_connections", "proxy.http_listen",
        "proxy.workers",
    ]  # fmt: skip
    assert needs_takeover("discovery", "file") and needs_takeover("consul", "addr")
    assert not needs_takeover("health_check", "interval")
