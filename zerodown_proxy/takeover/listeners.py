"""The proxy's listening sockets by name ("http", "hsms", "admin", or any other a component
adds, e.g. one per HSMS app), so a takeover hands every one of them over generically.

A component asks for its socket with `get(name, host, port, reuse_port)`: the one inherited from
the process it replaces when there is one with that name, else a new one bound here. It gives
the event loop a duplicate (the loop closes what it is given when it stops serving) and this
registry keeps the original until `close()`: what a takeover sends are these originals.
"""

from __future__ import annotations

import socket

BACKLOG = 2048


def bind(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((host, port))
        s.listen(BACKLOG)
    except OSError:
        s.close()
        raise
    s.setblocking(False)
    return s


class Listeners:
    def __init__(self, inherited: dict[str, socket.socket] | None = None) -> None:
        self.inherited = dict(inherited or {})
        self.sockets: dict[str, socket.socket] = {}

    def get(self, name: str, host: str, port: int, reuse_port: bool = False) -> socket.socket:
        """A duplicate of listening socket `name`, for the event loop to serve on."""
        s = self.inherited.pop(name, None)
        if s is None:
            s = bind(host, port, reuse_port)
        s.setblocking(False)
        self.sockets[name] = s
        return s.dup()

    def fds(self) -> tuple[list[str], list[int]]:
        names = list(self.sockets)
        return names, [self.sockets[n].fileno() for n in names]

    def close(self) -> None:
        for s in (*self.sockets.values(), *self.inherited.values()):
            s.close()
        self.sockets.clear()
        self.inherited.clear()
