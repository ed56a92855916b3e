"""The listening-socket registry a takeover hands over (zerodown_proxy/takeover/listeners.py)."""

from __future__ import annotations

import socket

from zerodown_proxy.takeover.listeners import Listeners, bind


def _port(s: socket.socket) -> int:
    return s.getsockname()[1]


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_an_inherited_socket_is_served_again_and_a_moved_address_is_bound_anew():
    old = bind("127.0.0.1", 0)
    moved = bind("127.0.0.1", 0)
    kept = Listeners({"hsms:a": old.dup(), "http": moved.dup()})
    try:
        # The same port: the inherited socket itself (though `old` still holds the address).
        same = kept.get("hsms:a", "127.0.0.1", _port(old))
        assert _port(same) == _port(old)
        same.close()
        kept.inherited["hsms:0"] = old.dup()  # port 0 asks for any port: the one it has
        any_port = kept.get("hsms:0", "127.0.0.1", 0)
        assert _port(any_port) == _port(old)
        any_port.close()
        # Asked elsewhere (the configuration changed the address): a new socket there.
        free = bind("127.0.0.1", 0)
        wanted = _port(free)
        free.close()
        fresh = kept.get("http", "127.0.0.1", wanted)
        assert _port(fresh) == wanted
        fresh.close()
    finally:
        kept.close()
        old.close()
        moved.close()


def test_release_and_unclaimed_inherited_sockets_stop_listening():
    a, b = bind("127.0.0.1", 0), bind("127.0.0.1", 0)
    ports = _port(a), _port(b)
    kept = Listeners({"hsms:a": a, "hsms:b": b, "http": bind("127.0.0.1", 0)})
    try:
        kept.get("hsms:a", "127.0.0.1", 0).close()
        assert kept.drop_inherited("hsms:") == ["hsms:b"]  # "http" is not an app's
        assert list(kept.inherited) == ["http"]
        assert _refused(ports[1])  # no backlog where nothing accepts
        assert not _refused(ports[0])
        kept.release("hsms:a")
        assert "hsms:a" not in kept.sockets and _refused(ports[0])
        assert kept.fds()[0] == []
    finally:
        kept.close()
