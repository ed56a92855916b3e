"""`zerodown healthcheck`: is the local proxy up and routing? Exit 0 yes, 1 no (as
`traefik healthcheck`), for Docker's HEALTHCHECK, load balancers' scripts and monitoring.

It asks the proxy's admin `GET /health`, which answers 200 once a routing snapshot with an Active
group for every app is applied and 503 before that. Standard library only (a socket, no
asyncio or aiohttp): Docker runs this every few seconds, so it must start fast and cheaply.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass

from zerodown_proxy.config import ConfigError, load_config, parse_addr

DEFAULT_TIMEOUT = 3.0
MAX_RESPONSE = 64 * 1024  # /health is a few dozen bytes; more is not a zerodown proxy


@dataclass(frozen=True, slots=True)
class Health:
    ok: bool
    message: str  # one sentence: what was asked, what came back


def admin_address(admin: str | None, config: str | None) -> tuple[str, int]:
    """--admin wins; else the proxy's own view of its admin address: the config file and the
    ZERODOWN_ADMIN_LISTEN variable, read by the proxy's loader (raises ConfigError)."""
    listen = admin if admin else load_config(config).proxy.admin_listen
    host, port = parse_addr(listen, default_host="127.0.0.1")
    if port == 0:
        raise ConfigError(
            f"the admin address {listen!r} has port 0 (any free port): pass --admin ADDR"
        )
    # A proxy bound to every address is reached on loopback from its own host or container.
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return host, port


class _BadResponse(Exception):
    pass


def _get_health(host: str, port: int, timeout: float) -> tuple[int, bytes]:
    """GET /health under one deadline for the whole exchange: a peer that accepts and then
    stalls, or drips a byte at a time, cannot hold the check past `timeout`."""
    deadline = time.monotonic() + timeout
    hostport = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    request = f"GET /health HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\r\n"
    buf = bytearray()
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(request.encode())
        while len(buf) < MAX_RESPONSE:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)
            chunk = sock.recv(MAX_RESPONSE - len(buf))
            if not chunk:
                break
            buf += chunk
            if _complete(buf):
                break
    head, sep, body = bytes(buf).partition(b"\r\n\r\n")
    if not sep:
        raise _BadResponse("no complete HTTP response head")
    parts = head.split(b"\r\n", 1)[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise _BadResponse(f"not an HTTP status line: {parts[:2]!r}")
    length = _content_length(head)
    return int(parts[1]), body if length is None else body[:length]


def _content_length(head: bytes) -> int | None:
    # The admin API (aiohttp json_response) always sends Content-Length; without one the body
    # is what came before the close (we asked for Connection: close).
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            return int(value)
    return None


def _complete(buf: bytearray) -> bool:
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return False
    length = _content_length(bytes(buf[:end]))
    return length is not None and len(buf) - end - 4 >= length


def check(host: str, port: int, timeout: float = DEFAULT_TIMEOUT) -> Health:
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        status, body = _get_health(host, port, timeout)
    except TimeoutError:
        return Health(
            False, f"the proxy's admin API at {where} did not answer within {timeout:g} s"
        )
    except ConnectionRefusedError:
        return Health(
            False, f"nothing listens at {where} (connection refused): is the proxy running?"
        )
    except OSError as exc:
        return Health(
            False, f"cannot reach the proxy's admin API at {where}: {exc.strerror or exc}"
        )
    except _BadResponse as exc:
        return Health(False, f"{where} does not speak HTTP like a zerodown admin API: {exc}")
    try:
        doc = json.loads(body)
        state, generation = str(doc["status"]), doc["generation"]
    except (ValueError, KeyError, TypeError):
        return Health(
            False, f"{where} answered HTTP {status} to /health, not a zerodown proxy's JSON"
        )
    if status == 200 and state == "ok":
        return Health(True, f"ok: the proxy at {where} routes generation {generation}")
    if state == "no-routing":
        return Health(False, f"the proxy at {where} is up but has no routing yet (generation {generation}): "
                             "no snapshot with an Active group for every app was applied")  # fmt: skip
    return Health(False, f"the proxy at {where} answered HTTP {status}, status {state!r}")


def run(admin: str | None, config: str | None, timeout: float) -> Health:
    try:
        host, port = admin_address(admin, config)
    except ConfigError as exc:  # a bad file or address, said in one line
        return Health(False, str(exc))
    return check(host, port, timeout)
