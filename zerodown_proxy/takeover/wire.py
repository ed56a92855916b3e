"""The takeover channel: one AF_UNIX SOCK_SEQPACKET connection between the old proxy process
(the donor) and its replacement, carrying JSON messages with file descriptors (SCM_RIGHTS).

Each message is one packet: a JSON object, with the descriptors it names attached to the same
packet (`socket.send_fds`), so a message and its descriptors can never be split or mixed up.
A message may announce `blob` bytes (a tool's unprocessed input, which can be as large as an
HSMS message): they follow as packets of at most CHUNK bytes.

The socket file lives in a directory only this user can enter, and the donor also checks the
peer's uid (SO_PEERCRED): descriptors of live tool connections go to nobody else.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Any

import orjson

ENV = "ZERODOWN_TAKEOVER_FROM"  # set on the new process: the donor's channel path
CHUNK = 64 * 1024
MAX_FDS = 64
_RECV = CHUNK + 4096


class ChannelError(Exception):
    """The other side went away or broke the protocol (the message says what happened)."""


class Channel:
    """Blocking, with a timeout per call; both sides run it from a thread or briefly inline."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.sock = sock
        sock.settimeout(timeout)

    @classmethod
    def connect(cls, path: str, timeout: float) -> Channel:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            s.settimeout(timeout)
            s.connect(path)
        except OSError:
            s.close()
            raise
        return cls(s, timeout)

    def send(self, msg: dict[str, Any], fds: list[int] | None = None, blob: bytes = b"") -> None:
        if blob:
            msg = {**msg, "blob": len(blob)}
        data = orjson.dumps(msg)
        try:
            if fds:
                socket.send_fds(self.sock, [data], fds)
            else:
                self.sock.sendall(data)
            for i in range(0, len(blob), CHUNK):
                self.sock.sendall(blob[i : i + CHUNK])
        except OSError as exc:
            raise ChannelError(f"takeover channel broken: {exc}") from exc

    def recv(self) -> tuple[dict[str, Any], list[int]]:
        """The next message and the descriptors attached to it (owned by the caller)."""
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.sock, _RECV, MAX_FDS)
        except OSError as exc:
            raise ChannelError(f"takeover channel broken: {exc}") from exc
        if not data:
            for fd in fds:
                os.close(fd)
            raise ChannelError("the other process closed the takeover channel")
        try:
            msg = orjson.loads(data)
            if not isinstance(msg, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            for fd in fds:
                os.close(fd)
            raise ChannelError(f"bad takeover message: {exc}") from exc
        size = int(msg.get("blob", 0))
        if size:
            parts = []
            got = 0
            while got < size:
                try:
                    part = self.sock.recv(CHUNK)
                except OSError as exc:
                    raise ChannelError(f"takeover channel broken: {exc}") from exc
                if not part:
                    raise ChannelError("the other process closed the takeover channel")
                parts.append(part)
                got += len(part)
            msg["blob"] = b"".join(parts)
        return msg, fds

    def peer_uid(self) -> int:
        creds = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", creds)[2]

    def peer_pid(self) -> int:
        creds = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", creds)[0]

    def close(self) -> None:
        self.sock.close()


def listen(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(path)
    s.listen(4)
    return s


def receive_listeners(ch: Channel) -> tuple[dict[str, Any], dict[str, socket.socket]]:
    """The successor's side of the first exchange: hello, then the donor's "listeners" message
    (its other fields, and the listening sockets by name). A wrong message closes what came."""
    ch.send({"t": "hello", "pid": os.getpid()})
    msg, fds = ch.recv()
    names = msg.get("names") or []
    if msg.get("t") != "listeners" or len(names) != len(fds):
        for fd in fds:
            os.close(fd)
        raise ChannelError(f"expected the listening sockets, got {msg.get('t')!r}")
    return msg, {n: socket.socket(fileno=fd) for n, fd in zip(names, fds, strict=True)}
